"""LiSSA: H^-1 v by the damped, scaled Neumann recursion (Agarwal et al. 2017).

Per block l, with H = G^T G / n + lambda I and a scale s >= the largest eigenvalue of H,

    x_0 = v,     x_t = v + (I - H / s) x_{t-1},     H^-1 v ~= x_T / s

and I(k) = - sum_l g_kl . x_T / s (positive = harmful). Full-batch products H x, so the
recursion is deterministic. It stops when the residual of the estimate y = x_{t-1} / s,
||v - H y|| = ||x_t - x_{t-1}||, is at most ``tol * ||v||`` for every test row, or after
``max_iterations`` passes over the block. It converges for any s > lambda_max(H) / 2, at the
rate 1 - lambda / s per pass: slowly when lambda is small next to s. On blocks with fewer
rows than columns (n < d_l) the same iterates are computed on the n x n side (see
``_precondition_dual``): O(m n^2) a pass instead of O(m n d_l).

(The authors' code iterated with G - lambda I and no scale, which does not converge to H^-1 v.)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..distributed import all_reduce_max
from ..errors import DataInfError
from .base import InfluenceEstimator
from .damping import Damping

# Blocks with n < d_l run LiSSA's recursion on the n x n side when the whole block fits in
# this many bytes of float64 (every rank holds it); a residual below this share of |v| is
# confirmed from the vectors (its n x n expansion cancels in float64 below ~1e-7).
DUAL_BYTES = 1 << 30
DUAL_RESIDUAL_FLOOR = 1e-6


@dataclass(frozen=True)
class Convergence:
    """LiSSA's record for one block in the last score() call (worst over its test rows)."""

    iterations: int
    relative_residual: float
    converged: bool


class LiSSA(InfluenceEstimator):
    """LiSSA influence (positive score = the example raises the test loss).

    Parameters (besides those of :class:`InfluenceEstimator`)
    ----------
    max_iterations:
        Passes over each block at most (one H x product each).
    tol:
        Stop when ||v - H y|| <= tol ||v|| for every test row.
    scale:
        "power" (default): 1.1 x the largest eigenvalue of H from ``power_iterations`` power
        iterations; "trace": trace(G) + lambda, a bound that needs no extra pass but converges
        more slowly; a number, or a mapping block -> number.
    power_iterations, seed:
        For scale="power".

    After score(), ``convergence_`` maps block -> :class:`Convergence` and ``converged_`` is
    True when every block converged; a warning is issued otherwise.
    """

    def __init__(
        self,
        damping: float | Mapping[str, float] | Damping = 0.1,
        *,
        max_iterations: int = 200,
        tol: float = 1e-4,
        scale: str | float | Mapping[str, float] = "power",
        power_iterations: int = 20,
        seed: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(damping, **kwargs)
        self.max_iterations = max_iterations
        self.tol = tol
        self.scale = scale
        self.power_iterations = power_iterations
        self.seed = seed

    def _hvp(self, name: str, X: torch.Tensor) -> torch.Tensor:
        """H X^T as rows: X (G^T G / n) + lambda X  for X of shape (m, d), in float64 (the
        products in the gradients' dtype, their sums over chunks and ranks in float64, so
        that the rounding does not build up over the iterations)."""
        Xc = X.to(self.compute_dtype_)
        acc = torch.zeros_like(X, dtype=torch.float64)
        for _, G in self._train_chunks(name, self._rows(name, X.shape[0])):
            acc += ((Xc @ G.T) @ G).double()
        self._sum_over_ranks(acc)  # each rank summed its shard of the rows
        return acc / self.n_ + self.damping_[name] * X.double()

    def _fit_blocks(self) -> None:
        self.worst_: Convergence | None = None  # over every score() since fit()
        if not isinstance(self.max_iterations, int) or self.max_iterations < 1:
            raise DataInfError(
                f"max_iterations must be a positive integer, not {self.max_iterations!r}"
            )
        if not (isinstance(self.tol, (int, float)) and self.tol > 0):
            raise DataInfError(f"tol must be a number > 0, not {self.tol!r}")
        self.scale_: dict[str, float] = {}
        for name in self.train_.block_names:
            lam = self.damping_[name]
            if isinstance(self.scale, Mapping):
                if name not in self.scale:
                    raise DataInfError(f"LiSSA scale: no value for block {name!r}")
                s = float(self.scale[name])
            elif self.scale == "trace":
                # lambda_max(H) <= trace(G^T G / n) + lambda
                s = self.sq_sums_[name] / self.n_ + lam
            elif self.scale == "power":
                s = 1.1 * self._largest_eigenvalue(name)
            elif isinstance(self.scale, (int, float)) and not isinstance(self.scale, bool):
                s = float(self.scale)
            else:
                raise DataInfError(
                    f"LiSSA scale must be 'power', 'trace', a number or a mapping, "
                    f"not {self.scale!r}"
                )
            if not (math.isfinite(s) and s > 0):
                raise DataInfError(f"LiSSA scale for block {name!r} must be > 0, not {s}")
            self.scale_[name] = s

    def _largest_eigenvalue(self, name: str) -> float:
        """Power iteration on H from a start vector seeded by (seed, block name)."""
        d = self.train_.block_widths[name]
        generator = torch.Generator().manual_seed(self.seed ^ zlib.crc32(name.encode()))
        u = torch.randn(1, d, generator=generator, dtype=torch.float64)
        u = (u / u.norm()).to(device=self.device_)
        estimate = self.damping_[name]
        for _ in range(self.power_iterations):
            Hu = self._hvp(name, u)
            estimate = float((Hu * u).sum())  # Rayleigh quotient u^T H u, ||u|| = 1
            u = Hu / Hu.norm()
        return max(estimate, self.damping_[name])

    def _start_scoring(self) -> None:
        self.convergence_: dict[str, Convergence] = {}

    def _finish_scoring(self) -> None:
        self.converged_ = all(c.converged for c in self.convergence_.values())
        last = self.worst_convergence()
        self.worst_ = last if self.worst_ is None else worse(self.worst_, last)
        if not self.converged_:
            worst = max(self.convergence_.items(), key=lambda kv: kv[1].relative_residual)
            warnings.warn(
                f"LiSSA did not converge in {self.max_iterations} iterations on "
                f"{sum(not c.converged for c in self.convergence_.values())} of "
                f"{len(self.convergence_)} blocks (worst: {worst[0]!r}, relative residual "
                f"{worst[1].relative_residual:.3g}); raise max_iterations or the damping",
                RuntimeWarning,
                stacklevel=3,
            )

    def _precondition(self, name: str, V: torch.Tensor) -> torch.Tensor:
        n, d = self.n_, self.train_.block_widths[name]
        if n < d and n * d * 8 <= DUAL_BYTES:
            return self._precondition_dual(name, V)
        s = self.scale_[name]
        V = V.double()  # the recursion runs in float64 (its products in the gradients' dtype)
        v_norm = V.norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
        X = V.clone()

        def step() -> float:
            nonlocal X
            X_next = V + X - self._hvp(name, X) / s  # x_t = v + (I - H/s) x_{t-1}
            # ||v - H x_{t-1}/s|| = ||x_t - x_{t-1}||, relative to ||v||, worst row
            residual = float(((X_next - X).norm(dim=1) / v_norm).max())
            X = X_next
            return all_reduce_max(residual, self.process_group)  # every rank stops alike

        self._iterate(name, step)
        return (X / s).to(self.compute_dtype_)  # H^-1 v

    def _iterate(self, name: str, step) -> None:
        """Run ``step`` (one pass of the recursion; returns the worst relative residual)
        until the residual is at most ``tol``, it diverges (the scale is too small) or
        ``max_iterations`` passes are done; record the outcome for block ``name``."""
        residual, converged, iterations = math.inf, False, 0
        while iterations < self.max_iterations:
            iterations += 1
            residual = step()
            if residual <= self.tol:
                converged = True
                break
            if not math.isfinite(residual) or residual > 1e12:
                break  # diverging
        self._record(name, Convergence(iterations, residual, converged))

    def _precondition_dual(self, name: str, V: torch.Tensor) -> torch.Tensor:
        """The same recursion on the n x n side, for blocks with n < d_l: every iterate is
        x_t = c_t v + y_t G (c_t a number, y_t an n-vector per test row), since
        x_t = v + x_{t-1} - H x_{t-1} / s and H x = ((c P + y K) G) / n + lambda x with
        P = V G^T and K = G G^T. Hence, with a = 1 - lambda / s,

            c_t = 1 + a c_{t-1},    y_t = a y_{t-1} - (c_{t-1} P + y_{t-1} K) / (n s)

        an O(m n^2) step instead of O(m n d). The residual ||x_t - x_{t-1}|| (dc = a^t, dy):
        dc^2 |v|^2 + 2 dc dy.P + dy K dy^T, accurate while it is above ~1e-6 of |v|^2's
        rounding; below 1e-6 it is computed from the vectors, ||dc v + dy G||. Every rank
        holds the whole block (n < d_l: small) and computes alike."""
        s, lam = self.scale_[name], self.damping_[name]
        G = self._whole_block(name)                              # (n, d) float64
        V = V.double()
        v_sq = V.square().sum(dim=1)
        v_norm = v_sq.sqrt().clamp_min(torch.finfo(torch.float64).tiny)
        K, P = G @ G.T, V @ G.T                                  # (n, n), (m, n)
        a, scaled = 1.0 - lam / s, 1.0 / (self.n_ * s)
        c, Y = 1.0, torch.zeros_like(P)                          # x_0 = v

        def step() -> float:
            nonlocal c, Y
            c_next, Y_next = 1.0 + a * c, a * Y - (c * P + Y @ K) * scaled
            dc, dY = c_next - c, Y_next - Y
            squares = dc * dc * v_sq + 2 * dc * (dY * P).sum(dim=1) + ((dY @ K) * dY).sum(dim=1)
            residual = float((squares.clamp_min(0).sqrt() / v_norm).max())
            if residual <= max(self.tol, DUAL_RESIDUAL_FLOOR):  # confirm from the vectors
                residual = float(((dc * V + dY @ G).norm(dim=1) / v_norm).max())
            c, Y = c_next, Y_next
            return residual

        self._iterate(name, step)
        return ((c * V + Y @ G) / s).to(self.compute_dtype_)   # H^-1 v

    def worst_convergence(self) -> Convergence:
        """The last score() call's convergence in one record, worst over blocks and test rows
        (for summaries and the console)."""
        return functools.reduce(worse, self.convergence_.values())

    def notes(self) -> dict:
        """{"converged", "iterations", "relative_residual"}: the worst over blocks, test rows
        and every score() since fit() (empty before the first)."""
        return {} if self.worst_ is None else dataclasses.asdict(self.worst_)

    def _record(self, name: str, result: Convergence) -> None:
        """Keep the worst record per block over the test batches of one score() call."""
        old = self.convergence_.get(name)
        self.convergence_[name] = result if old is None else worse(old, result)


def worse(a: Convergence, b: Convergence) -> Convergence:
    """The worst of two records: the most iterations, the largest residual, converged only if
    both did."""
    return Convergence(max(a.iterations, b.iterations),
                       max(a.relative_residual, b.relative_residual),
                       a.converged and b.converged)
