"""Influence estimators: fit(train gradients) / score(test gradients). Positive = harmful."""

from ..errors import DataInfError
from .base import InfluenceEstimator, TopK, top_k_of
from .datainf import DataInf
from .exact import Exact
from .hessian_free import HessianFree
from .lissa import Convergence, LiSSA

# method name -> (estimator class, its settings); the last two are variants of ours, not the
# paper's: gradients scaled to unit norm first (cosine = normalized Hessian-free)
NAMED = {
    "datainf": (DataInf, {}),
    "exact": (Exact, {}),
    "lissa": (LiSSA, {}),
    "hessian_free": (HessianFree, {}),
    "datainf_normalized": (DataInf, {"normalize": True}),
    "cosine": (HessianFree, {"normalize": True}),
}

# what reports call each named method
LABELS = {"datainf": "DataInf", "exact": "Exact", "lissa": "LiSSA",
          "hessian_free": "Hessian-free", "datainf_normalized": "DataInf, unit gradients",
          "cosine": "Cosine (Hessian-free, unit gradients)"}


def estimator(name: str, **kwargs) -> InfluenceEstimator:
    """The estimator called ``name`` in :data:`NAMED`, built with ``kwargs`` (damping, ...)."""
    if name not in NAMED:
        raise DataInfError(f"unknown method {name!r}; choose from {', '.join(NAMED)}")
    cls, settings = NAMED[name]
    return cls(**settings, **kwargs)


__all__ = ["LABELS", "NAMED", "Convergence", "DataInf", "Exact", "HessianFree",
           "InfluenceEstimator", "LiSSA", "TopK", "estimator", "top_k_of"]
