"""Hessian-free influence: the inverse Hessian replaced by the identity.

    I(k) = - sum_l v_l . g_kl        (single-checkpoint TracIn / gradient dot product)

Positive = harmful. The damping is computed (every method shares the rule) but not used.
"""

from __future__ import annotations

import torch

from .base import InfluenceEstimator


class HessianFree(InfluenceEstimator):
    """Gradient dot-product influence (positive score = the example raises the test loss)."""

    def _score_block(self, name: str, V: torch.Tensor) -> torch.Tensor:
        out = torch.empty(V.shape[0], self.n_, dtype=torch.float64, device=V.device)
        for start, G in self._train_chunks(name, self._rows(name, V.shape[0])):
            out[:, start : start + len(G)] = -(V @ G.T)
        return out

    def _self_influence_block(self, name: str) -> torch.Tensor:
        """s_k = ||g_kl||^2 (the identity in place of H^-1)."""
        return self.row_sq_norms_[name].clone()
