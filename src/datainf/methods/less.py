"""LESS / TrackStar-style gradient similarity: the cosine of gradients preconditioned by the
fine-tune's Adam second moments (Xia et al., "LESS", ICML 2024; Chang et al., "TrackStar",
ICLR 2025), without their random projection:

    p = 1 / (sqrt(v_hat) + eps)           (Adam's per-entry step size; v_hat: bias-corrected)
    I(k, j) = - cos(p * v_j, p * g_k)      (entrywise products, over all blocks together)

the same preconditioner on both sides (TrackStar's symmetric form). Sign: the paper's
(negative = helpful), like ``cosine``, which is this method with p = 1.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import DataInfError
from ..gradients.source import GradientSource, ScaledColumns
from .hessian_free import HessianFree


class Less(HessianFree):
    """Cosine of Adam-preconditioned gradients (positive score = harmful).

    ``second_moments``: block (parameter) name -> v_hat, as the jobs keep it beside an adapter
    (:func:`datainf.training.moments.read_second_moments`); ``eps``: Adam's (1e-8). Other
    keyword arguments as :class:`~datainf.InfluenceEstimator` (``normalize`` is always on).
    """

    def __init__(self, second_moments: Mapping[str, torch.Tensor] | None = None, *,
                 eps: float = 1e-8, **kwargs) -> None:
        if second_moments is None:
            raise DataInfError(
                "less needs the second moments of the optimizer that fine-tuned the adapter; "
                "datainf keeps them beside the adapters it trains "
                "(adapter/second_moments.safetensors)")
        kwargs["normalize"] = True
        super().__init__(**kwargs)
        self.second_moments = second_moments
        self.eps = eps
        # p = 1 / (sqrt(v_hat) + eps), per block, for the training and every test source
        self.step_ = {name: 1.0 / (torch.as_tensor(v).double().sqrt() + eps)
                      for name, v in second_moments.items()}

    def _view(self, source: GradientSource, where: str) -> GradientSource:
        return super()._view(ScaledColumns(source, self.step_, "second moments"), where)
