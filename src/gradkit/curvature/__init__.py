"""Curvature of a model's loss on data: Hessian, GGN, empirical and Monte-Carlo Fisher as
linear operators."""

from gradkit.curvature.operators import CurvatureOperator, EFOperator, GGNOperator, HessianOperator, MCFisherOperator

__all__ = ["CurvatureOperator", "HessianOperator", "GGNOperator", "EFOperator", "MCFisherOperator"]
