"""Representation similarity: the cosine of the model's own features of two examples, no
gradients (the cheap baseline that DATE-LM, arXiv 2507.09424, ranks above DataInf):

    I(k, j) = - cos(h_j, h_k)

``h``: for a causal LM the mean last-layer hidden state over the positions whose next token the
loss scores; for a classifier the features its head reads (see
:mod:`datainf.models.representations`). Sign: the paper's (negative = helpful).
"""

from __future__ import annotations

import torch

from ..gradients.source import GradientSource, as_gradient_source
from .hessian_free import HessianFree

BLOCK = "representation"


class RepSim(HessianFree):
    """Cosine of representations (positive score = harmful). ``fit`` and ``score`` take an
    (n, d) tensor of features (or a gradient source with a block per feature group)."""

    def __init__(self, **kwargs) -> None:
        kwargs["normalize"] = True
        super().__init__(**kwargs)

    def _source(self, features: object, where: str) -> GradientSource:
        return super()._source(features_source(features), where)

    def _test_source(self, features: object) -> GradientSource:
        return super()._test_source(features_source(features))


def features_source(features: object) -> GradientSource:
    """An (n, d) tensor or array as the one-block source {"representation": features} (a
    source or mapping as it is)."""
    if isinstance(features, torch.Tensor) or hasattr(features, "__array__"):
        features = {BLOCK: torch.as_tensor(features)}
    return as_gradient_source(features, "representations")
