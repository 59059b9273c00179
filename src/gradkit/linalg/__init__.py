"""Linear algebra on operators: :class:`LinearOperator`, Krylov solvers, eigensolvers and
stochastic estimators.  Knows nothing about neural networks: it only sees operators."""

from gradkit.linalg.operator import DenseOperator, IdentityOperator, LinearOperator, aslinearoperator
from gradkit.linalg.solvers import SolveResult, cg, gmres, minres, neumann, normal_cg
from gradkit.linalg.lanczos import lanczos, lanczos_tridiagonal
from gradkit.linalg.power import power_iteration
from gradkit.linalg.trace import hutchinson_diagonal, hutchinson_trace, hutchpp_trace
from gradkit.linalg.density import SpectralDensity, spectral_density

__all__ = [
    "LinearOperator",
    "IdentityOperator",
    "DenseOperator",
    "aslinearoperator",
    "SolveResult",
    "cg",
    "minres",
    "gmres",
    "normal_cg",
    "neumann",
    "lanczos",
    "lanczos_tridiagonal",
    "power_iteration",
    "hutchinson_trace",
    "hutchpp_trace",
    "hutchinson_diagonal",
    "SpectralDensity",
    "spectral_density",
]
