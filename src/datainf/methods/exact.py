"""Exact influence: the damped block Gauss-Newton system solved exactly, in float64.

Per block l, with G the (n x d_l) training gradients and H = G^T G / n + lambda I,

    I(k) = - sum_l g_kl^T H^-1 v_l                    (positive = harmful)

solved on the cheaper side:

- d_l <= n ("primal"): Cholesky factor of the d x d matrix H; x = H^-1 v; I = -G x.
- n < d_l ("dual", Woodbury): with the n x n kernel K = G G^T,
      G H^-1 v = n (K + n lambda I)^-1 G v,   so   I = -n (K + n lambda I)^-1 G v.

Memory: one min(n, d_l)^2 float64 factor per block is kept after fit.
"""

from __future__ import annotations

import torch

from ..errors import DataInfError
from .base import InfluenceEstimator


class Exact(InfluenceEstimator):
    """Exact influence with block-diagonal damped Gauss-Newton (positive = harmful).

    After fit, ``sides_`` says per block whether the d x d ("primal") or n x n ("dual") system
    was factored. See :class:`InfluenceEstimator` for the parameters.
    """

    def _fit_blocks(self) -> None:
        self.sides_: dict[str, str] = {}
        self.factors_: dict[str, torch.Tensor] = {}
        n = self.n_
        for name in self._blocks("factoring"):
            lam, d = self.damping_[name], self.train_.block_widths[name]
            rows = self._rows(name, 1)
            if d <= n:
                # H = G^T G / n + lambda I                                 (d x d)
                H = torch.zeros(d, d, dtype=torch.float64, device=self.device_)
                for _, G in self._train_chunks(name, rows):
                    G = G.double()
                    H.addmm_(G.T, G)
                self._sum_over_ranks(H)  # each rank summed its shard of the rows
                H /= n
                H.diagonal().add_(lam)
                side = "primal"
            else:
                # K + n lambda I with K = G G^T                            (n x n)
                G = self._whole_block(name)
                H = G @ G.T
                H.diagonal().add_(n * lam)
                side = "dual"
            factor, info = torch.linalg.cholesky_ex(H)
            if int(info) != 0:
                raise DataInfError(
                    f"block {name!r}: the damped {side} system is not positive definite in "
                    f"float64 (lambda = {lam:g}); increase the damping"
                )
            self.sides_[name] = side
            self.factors_[name] = factor

    def _precondition(self, name: str, V: torch.Tensor) -> torch.Tensor:
        """R = (H^-1 V^T)^T in float64 (H is symmetric). Dual side, by Woodbury:
        H^-1 = (I - G^T (K + n lambda I)^-1 G) / lambda."""
        V = V.double()
        if self.sides_[name] == "primal":
            return torch.cholesky_solve(V.T, self.factors_[name]).T
        G = self._whole_block(name)
        Z = torch.cholesky_solve(G @ V.T, self.factors_[name])  # (n x m)
        return (V - Z.T @ G) / self.damping_[name]

    def _score_block(self, name: str, V: torch.Tensor) -> torch.Tensor:
        if self.sides_[name] == "primal":
            return super()._score_block(name, V)
        # dual side: I = -n (K + n lambda I)^-1 G v, without forming H^-1 v (which would
        # subtract nearly equal terms when lambda is small)
        # (every rank solves for all rows: n < d_l here, and keeps its own)
        n, m = self.n_, V.shape[0]
        GV = torch.empty(n, m, dtype=torch.float64, device=V.device)  # G V^T   (n x m)
        for start, G in self._train_chunks(name, self._rows(name, m), whole=True):
            GV[start : start + len(G)] = G.double() @ V.double().T
        return self._mine(-n * torch.cholesky_solve(GV, self.factors_[name]).T)

    def _self_influence_block(self, name: str) -> torch.Tensor:
        """s_k = g_k^T H^-1 g_k; on the dual side n [(K + n lambda I)^-1 K]_kk."""
        factor = self.factors_[name]
        if self.sides_[name] == "primal":
            parts = []
            for _, G in self._train_chunks(name, self._rows(name, 1)):
                G = G.double()
                parts.append((G * torch.cholesky_solve(G.T, factor).T).sum(1))
            return torch.cat(parts)
        G = self._whole_block(name)
        return self._mine(self.n_ * torch.cholesky_solve(G @ G.T, factor).diagonal())
