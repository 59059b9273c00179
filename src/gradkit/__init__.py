"""gradkit: tools computed from gradients, verified against independent references.

Pillars (see ``DESIGN.md``): :mod:`gradkit.core` (exact derivative products),
:mod:`gradkit.linalg` (operators, solvers, eigensolvers, stochastic estimators),
:mod:`gradkit.curvature` (Hessian, GGN and Fisher operators of a model on data).
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"

logging.getLogger("gradkit").addHandler(logging.NullHandler())

__all__ = ["__version__"]
