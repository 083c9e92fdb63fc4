"""The methods by name, one registry for every command, study and report: the estimator
class, the settings it is built with and the label reports give it; and the one loop that
fits and scores each chosen method, timing it and keeping its notes."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from ..errors import DataInfError
from .base import InfluenceEstimator
from .datainf import DataInf
from .exact import Exact
from .hessian_free import HessianFree
from .lissa import LiSSA

T = TypeVar("T")


@dataclass(frozen=True)
class Method:
    """A named method. ``self_influence``: it scores each training example against itself
    (g_i^T H^-1 g_i), with no test examples."""

    estimator: type[InfluenceEstimator]
    label: str
    settings: dict = field(default_factory=dict)
    self_influence: bool = False


# the last three are variants of ours, not the paper's: DataInf's self-influence, and
# gradients scaled to unit norm first (cosine = normalized Hessian-free)
METHODS = {
    "datainf": Method(DataInf, "DataInf"),
    "exact": Method(Exact, "Exact"),
    "lissa": Method(LiSSA, "LiSSA"),
    "hessian_free": Method(HessianFree, "Hessian-free"),
    "datainf_self": Method(DataInf, "DataInf self-influence", self_influence=True),
    "datainf_normalized": Method(DataInf, "DataInf, unit gradients", {"normalize": True}),
    "cosine": Method(HessianFree, "Cosine (Hessian-free, unit gradients)", {"normalize": True}),
}
LABELS = {name: method.label for name, method in METHODS.items()}
# the methods that score training examples against test examples
PAIRWISE = tuple(name for name, method in METHODS.items() if not method.self_influence)


def estimator(name: str, **kwargs) -> InfluenceEstimator:
    """The estimator called ``name`` in :data:`METHODS`, built with ``kwargs`` (damping, ...)."""
    if name not in METHODS:
        raise DataInfError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name].estimator(**METHODS[name].settings, **kwargs)


def score_each(names: Iterable[str], train: object,
               score: Callable[[str, InfluenceEstimator], T], **kwargs
               ) -> tuple[dict[str, T], dict[str, float], dict[str, dict]]:
    """(results, seconds, notes) per method of ``names``: each built with ``kwargs``, fitted
    on ``train`` and scored by ``score(name, fitted estimator)``; seconds of both; notes: what
    the estimator reports (LiSSA: whether it converged), where it has any. A method that does
    not converge is not warned of here: its notes say so, for the caller to report."""
    results, seconds, notes = {}, {}, {}
    for name in names:
        start = time.perf_counter()
        est = estimator(name, **kwargs)
        with warnings.catch_warnings():  # convergence: in the notes
            warnings.simplefilter("ignore", RuntimeWarning)
            results[name] = score(name, est.fit(train))
        seconds[name] = time.perf_counter() - start
        if est.notes():
            notes[name] = est.notes()
    return results, seconds, notes
