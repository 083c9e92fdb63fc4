"""Influence estimators: fit(train gradients) / score(test gradients). Positive = harmful."""

from .base import InfluenceEstimator
from .datainf import DataInf
from .exact import Exact
from .hessian_free import HessianFree
from .lissa import Convergence, LiSSA

__all__ = ["Convergence", "DataInf", "Exact", "HessianFree", "InfluenceEstimator", "LiSSA"]
