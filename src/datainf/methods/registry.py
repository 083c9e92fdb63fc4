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
from .less import Less
from .lissa import LiSSA
from .repsim import RepSim, features_source

T = TypeVar("T")


@dataclass(frozen=True)
class Method:
    """A named method. ``self_influence``: it scores each training example against itself
    (g_i^T H^-1 g_i), with no test examples. ``reads``: "gradients", or "representations"
    (the model's features, no gradients); ``second_moments``: it needs the fine-tune's Adam
    second moments."""

    estimator: type[InfluenceEstimator]
    label: str
    settings: dict = field(default_factory=dict)
    self_influence: bool = False
    reads: str = "gradients"
    second_moments: bool = False


# datainf_self, datainf_normalized and cosine are variants of ours, not the paper's: DataInf's
# self-influence, and gradients scaled to unit norm first (cosine = normalized Hessian-free)
METHODS = {
    "datainf": Method(DataInf, "DataInf"),
    "exact": Method(Exact, "Exact"),
    "lissa": Method(LiSSA, "LiSSA"),
    "hessian_free": Method(HessianFree, "Hessian-free"),
    "datainf_self": Method(DataInf, "DataInf self-influence", self_influence=True),
    "datainf_normalized": Method(DataInf, "DataInf, unit gradients", {"normalize": True}),
    "cosine": Method(HessianFree, "Cosine (Hessian-free, unit gradients)", {"normalize": True}),
    # the baselines that published evaluations rank above DataInf (see methods.less, .repsim)
    "less": Method(Less, "LESS (Adam-preconditioned cosine)", second_moments=True),
    "repsim": Method(RepSim, "RepSim (representation cosine)", reads="representations"),
}
LABELS = {name: method.label for name, method in METHODS.items()}
# the methods that score training examples against test examples
PAIRWISE = tuple(name for name, method in METHODS.items() if not method.self_influence)


def estimator(name: str, **kwargs) -> InfluenceEstimator:
    """The estimator called ``name`` in :data:`METHODS`, built with ``kwargs`` (damping, ...)."""
    if name not in METHODS:
        raise DataInfError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name].estimator(**METHODS[name].settings, **kwargs)


@dataclass
class Inputs:
    """What the methods read: training and test gradient sources (``test`` None where only
    self-influence is asked for); the model's representations of the same examples, (n, d) and
    (m, d), for the methods that read them; Adam's second moments (block -> v_hat) for those
    that need them."""

    train: object
    test: object | None = None
    train_features: object | None = None
    test_features: object | None = None
    second_moments: dict | None = None

    def of(self, name: str) -> tuple[object, object | None, dict]:
        """(train, test, extra estimator settings) of the method ``name``."""
        method = METHODS[name]
        if method.reads == "representations":
            if self.train_features is None:
                raise DataInfError(f"{name} reads the model's representations; none were given")
            test = self.test_features
            return (features_source(self.train_features),
                    None if test is None else features_source(test), {})
        if method.second_moments:
            return self.train, self.test, {"second_moments": self.second_moments}
        return self.train, self.test, {}


def score_each(names: Iterable[str], inputs: Inputs | object,
               score: Callable[[str, InfluenceEstimator, object], T], **kwargs
               ) -> tuple[dict[str, T], dict[str, float], dict[str, dict]]:
    """(results, seconds, notes) per method of ``names``: each built with ``kwargs``, fitted
    on its training input of ``inputs`` (an :class:`Inputs`, or one training gradient
    source) and scored by ``score(name, fitted estimator, its test input)``; seconds of both;
    notes: what the estimator reports (LiSSA: whether it converged), where it has any. A
    method that does not converge is not warned of here: its notes say so, for the caller to
    report."""
    if not isinstance(inputs, Inputs):
        inputs = Inputs(inputs)
    results, seconds, notes = {}, {}, {}
    for name in names:
        start = time.perf_counter()
        train, test, extra = inputs.of(name)
        est = estimator(name, **extra, **kwargs)
        with warnings.catch_warnings():  # convergence: in the notes
            warnings.simplefilter("ignore", RuntimeWarning)
            results[name] = score(name, est.fit(train), test)
        seconds[name] = time.perf_counter() - start
        if est.notes():
            notes[name] = est.notes()
    return results, seconds, notes
