"""DataInf (Kwon et al. 2024, eq. 5): the closed-form influence for LoRA-sized blocks.

Per block l, swap the inverse and the average and apply Sherman-Morrison to each rank-one term:

    (G_l + lambda_l I)^-1  ~=  1/(n lambda_l) sum_i ( I - g_il g_il^T / (lambda_l + ||g_il||^2) )

so that, with c_i = (v_l . g_il) / (lambda_l + ||g_il||^2),

    r_l  = ( v_l - (1/n) sum_i c_i g_il ) / lambda_l,        I(k) = - sum_l r_l . g_kl

(positive = harmful). Cost O(n d_l) per test row; it streams the training rows twice.
"""

from __future__ import annotations

import torch

from ..distributed import all_gather_cat
from .base import InfluenceEstimator


class DataInf(InfluenceEstimator):
    """DataInf influence scores (positive score = up-weighting the example raises the test loss).

    The approximation error against :class:`Exact` is O(d_l^2) (Theorem 1): small for LoRA
    blocks, growing with the LoRA rank. See :class:`InfluenceEstimator` for the parameters.
    """

    def _precondition(self, name: str, V: torch.Tensor) -> torch.Tensor:
        lam, n = self.damping_[name], self.n_
        sq = self.row_sq_norms_[name]
        # sum_i c_i g_i, with C = (V G^T) / (lambda + ||g_i||^2) column-wise   (m x d)
        weighted_sum = torch.zeros_like(V)
        for start, G in self._train_chunks(name, self._rows(name, V.shape[0])):
            # computed as (G V^T)^T: the faster orientation for BLAS here
            C = (G @ V.T) / (lam + sq[start : start + len(G), None]).to(V.dtype)
            weighted_sum.addmm_(C.T, G)
        self._sum_over_ranks(weighted_sum)  # each rank summed its shard of i
        # R = (V - C G / n) / lambda; the scores are - R G^T                    (m x d)
        return torch.add(V, weighted_sum, alpha=-1.0 / n).mul_(1.0 / lam)

    def _self_influence_block(self, name: str) -> torch.Tensor:
        """s_k = ( ||g_k||^2 - (1/n) sum_i (g_k . g_i)^2 / (lambda + ||g_i||^2) ) / lambda.

        That is g_k^T H^-1 g_k with DataInf's inverse. The inner sum is g_k^T M g_k with
        M = sum_i g_i g_i^T / (lambda + ||g_i||^2), computed on the cheaper side: the d x d
        matrix M when d_l <= n, the n x n kernel K = G G^T otherwise. In float64.
        """
        lam, n = self.damping_[name], self.n_
        sq = self.row_sq_norms_[name]
        w = 1.0 / (lam + sq)
        rows = self._rows(name, 1)
        if self.train_.block_widths[name] <= n:
            d = self.train_.block_widths[name]
            M = torch.zeros(d, d, dtype=torch.float64, device=self.device_)
            for start, G in self._train_chunks(name, rows):
                G = G.double()
                M.addmm_(G.T * w[start : start + len(G)], G)
            self._sum_over_ranks(M)
            quad = torch.cat(
                [((G.double() @ M) * G.double()).sum(1) for _, G in self._train_chunks(name, rows)]
            )
        else:
            G = self._whole_block(name)
            K = G @ G.T
            w_all = all_gather_cat(w, self.process_group)  # every row's (w: this rank's)
            quad = self._mine((K * K) @ w_all)
        return (sq - quad / n) / lam
