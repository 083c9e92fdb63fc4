"""Hessian-free influence: the inverse Hessian replaced by the identity.

    I(k) = - sum_l v_l . g_kl        (single-checkpoint TracIn / gradient dot product)

Positive = harmful. The damping is computed (every method shares the rule) but not used.
"""

from __future__ import annotations

import torch

from .base import InfluenceEstimator


class HessianFree(InfluenceEstimator):
    """Gradient dot-product influence (positive score = the example raises the test loss)."""

    def _precondition(self, name: str, V: torch.Tensor) -> torch.Tensor:
        return V  # the identity in place of H^-1

    def _self_influence_block(self, name: str) -> torch.Tensor:
        """s_k = ||g_kl||^2 (the identity in place of H^-1)."""
        return self.row_sq_norms_[name].clone()
