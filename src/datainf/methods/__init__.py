"""Influence estimators: fit(train gradients) / score(test gradients). Positive = harmful."""

from .base import InfluenceEstimator, TopK, top_k_of
from .datainf import DataInf
from .exact import Exact
from .hessian_free import HessianFree
from .less import Less
from .lissa import Convergence, LiSSA
from .registry import LABELS, METHODS, PAIRWISE, Inputs, Method, estimator, score_each
from .repsim import RepSim

__all__ = ["LABELS", "METHODS", "PAIRWISE", "Convergence", "DataInf", "Exact", "HessianFree",
           "InfluenceEstimator", "Inputs", "Less", "LiSSA", "Method", "RepSim", "TopK",
           "estimator", "score_each", "top_k_of"]
