"""Influence estimators: fit(train gradients) / score(test gradients). Positive = harmful."""

from .base import InfluenceEstimator, TopK, top_k_of
from .datainf import DataInf
from .exact import Exact
from .hessian_free import HessianFree
from .lissa import Convergence, LiSSA
from .registry import LABELS, METHODS, PAIRWISE, Method, estimator, score_each

__all__ = ["LABELS", "METHODS", "PAIRWISE", "Convergence", "DataInf", "Exact", "HessianFree",
           "InfluenceEstimator", "LiSSA", "Method", "TopK", "estimator", "score_each",
           "top_k_of"]
