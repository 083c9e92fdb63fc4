"""What every influence estimator shares: fit on training gradients, score test gradients.

Sign convention (the paper's): a POSITIVE score means that up-weighting the training example
INCREASES the test loss, i.e. the example is harmful; the most helpful examples have the most
negative scores.

Estimators read gradients block by block (see :mod:`datainf.gradients.source`) and sum the blocks'
contributions: I(k) = sum_l I_l(k). Computations run in float64 when the training gradients are
float64, otherwise in float32 with float64 sums across chunks and blocks; scores are float64.

Given a torch.distributed process group, every rank reads the same training gradients (a store
on a shared file system) but works on its own shard of training rows (see
:mod:`datainf.distributed`): the sums over training examples (row norms for the
damping, DataInf's sum_i c_i g_i, LiSSA's products H x, Exact's G^T G) are summed across ranks
with all_reduce, each rank scores its rows, and the results are gathered so that every rank
returns what one process would, to float rounding. Test gradients are read whole by every rank.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from ..devices import check_device
from ..distributed import all_gather_cat, all_reduce_sum, shard, world
from ..errors import DataInfError
from ..gradients.source import (
    GradientSource,
    RowRange,
    UnitNormRows,
    as_gradient_source,
    check_finite,
    check_same_blocks,
    squared_row_norms,
)
from .damping import Damping, as_damping


class TopK(NamedTuple):
    """Per test example (row), the k most helpful training examples (most negative scores,
    most helpful first) and the k most harmful (most positive first): training indices
    (m, k) int64 and their scores (m, k) float64; ties go to the lower training index."""

    helpful: torch.Tensor
    helpful_scores: torch.Tensor
    harmful: torch.Tensor
    harmful_scores: torch.Tensor


class InfluenceEstimator:
    """Base class: ``fit(train)`` then ``score(test)`` (scikit-learn style, no global state).

    Parameters
    ----------
    damping:
        A number (the relative constant of the paper's rule, default 0.1), a mapping
        block -> lambda_l, or a :class:`~datainf.Damping`.
    chunk_rows:
        Rows of training gradients read at a time; None picks a size per block (64 MiB of
        float32 per test row, at most 256 MiB). Changes nothing but memory and speed.
    test_batch_size:
        Test rows scored together in pairwise mode (bounds memory to test_batch_size x d_l).
    device:
        Where to compute (default: where the gradients are).
    progress:
        Show a progress bar over blocks (None: only when stderr is a terminal).
    normalize:
        Scale every training and test gradient to unit norm over all blocks before anything
        else (the damping is then computed on the unit rows): a variant of ours, not the
        paper's, against a few large-gradient examples topping every query. With it,
        HessianFree scores are minus the cosine similarity of the gradients.
    process_group:
        A torch.distributed process group to share the work with (every rank makes the same
        calls with the same arguments); None: this process alone.
    """

    def __init__(
        self,
        damping: float | Mapping[str, float] | Damping = 0.1,
        *,
        chunk_rows: int | None = None,
        test_batch_size: int = 1024,
        device: str | torch.device | None = None,
        progress: bool | None = None,
        normalize: bool = False,
        process_group: object | None = None,
    ) -> None:
        self.damping = damping
        self.normalize = normalize
        self.process_group = process_group
        self.chunk_rows = chunk_rows
        self.test_batch_size = test_batch_size
        self.device = device
        self.progress = progress

    # ------------------------------------------------------------------ fit
    def fit(self, train_gradients: object) -> InfluenceEstimator:
        """Read the training gradients (mapping, list of row chunks, or store) and prepare.

        Computes, per block, the squared norm of every row and the damping lambda_l, then
        whatever the method precomputes. Returns ``self``.
        """
        for name in ("chunk_rows", "test_batch_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise DataInfError(f"{name} must be a positive integer, not {value!r}")
        if self.device is not None:
            check_device(self.device)
        train = self._source(train_gradients, "training gradients")
        if train.num_rows == 0:
            raise DataInfError(
                "training gradients: there are no examples (0 rows); "
                "pass at least one training example"
            )
        for name in train.block_names:
            if train.block_widths[name] == 0:
                raise DataInfError(f"training gradients: block {name!r} has no columns; drop it")
        self.train_ = train
        self.n_ = train.num_rows
        self.rank_, size = world(self.process_group)
        self.rows_ = shard(self.n_, self.rank_, size)  # this rank's training rows [lo, hi)
        self.local_ = train if size == 1 else RowRange(train, *self.rows_)
        _, first = next(iter(train.iter_block(train.block_names[0], 1)))
        self.device_ = torch.device(self.device) if self.device is not None else first.device
        self.compute_dtype_ = torch.float64 if first.dtype == torch.float64 else torch.float32
        # ||g_il||^2 of this rank's rows; their sums over all ranks give the damping
        self.row_sq_norms_ = {name: self._row_sq_norms(name) for name in train.block_names}
        sums = torch.stack([sq.sum() for sq in self.row_sq_norms_.values()])
        sums = all_reduce_sum(sums, self.process_group).tolist()
        self.sq_sums_ = dict(zip(train.block_names, sums, strict=True))
        mean_squares = {name: self.sq_sums_[name] / (self.n_ * train.block_widths[name])
                        for name in train.block_names}
        self.damping_ = as_damping(self.damping).resolve(mean_squares)
        self._fit_blocks()
        return self

    def _row_sq_norms(self, name: str) -> torch.Tensor:
        """||g_il||^2 for every row of this rank's shard of block ``name`` (float64), checking
        that all are finite."""
        lo, hi = self.rows_
        if hasattr(self.train_, "row_sq_norms"):  # a store keeps them, checked when written
            sq = self.train_.row_sq_norms(name)[lo:hi]
            return sq.to(device=self.device_, dtype=torch.float64)
        if hi == lo:
            return torch.zeros(0, dtype=torch.float64, device=self.device_)
        chunks = self._train_chunks(name, rows=self._rows(name, 1))
        return squared_row_norms(name, chunks, "training gradients")

    def _fit_blocks(self) -> None:
        """Method-specific precomputation after norms and damping are known."""

    # ---------------------------------------------------------------- score
    def score(self, test_gradients: object, aggregate: bool = False) -> torch.Tensor:
        """Influence of each training example on the test loss (positive = harmful).

        Returns an (m, n) float64 tensor, row j the influence of every training example on
        test example j; with ``aggregate=True`` an (n,) tensor, the influence on the MEAN test
        loss (the test gradients are averaged per block first).
        """
        self._check_fitted()
        test = self._test_source(test_gradients)
        self._start_scoring()
        n, m = self.local_.num_rows, test.num_rows  # this rank's columns
        out = torch.zeros((n,) if aggregate else (m, n), dtype=torch.float64, device=self.device_)
        for name in self._blocks("scoring"):
            if aggregate:
                v = self._test_mean(test, name)
                out += self._score_block(name, v)[0]
                continue
            for start, rows in test.iter_block(name, self.test_batch_size):
                V = rows.to(device=self.device_, dtype=self.compute_dtype_)
                if not torch.isfinite(torch.linalg.vector_norm(V, dim=1)).all():
                    check_finite(name, rows, start, "test gradients")
                out[start : start + len(rows)] += self._score_block(name, V)
        self._finish_scoring()
        return all_gather_cat(out, self.process_group, dim=-1)

    def top_k(self, test_gradients: object, k: int, *, chunk_rows: int | None = None) -> TopK:
        """The k most helpful and k most harmful training examples of each test example,
        without the (m, n) score matrix: the test rows are preconditioned once per block
        (R_l = V_l H_l^-1, m x d_l), then the training rows are scored ``chunk_rows`` at a time
        over all blocks and merged into the running top k. Memory: m x (chunk_rows + 4k)
        scores plus the R_l, whatever n. Same scores as :meth:`score` up to float rounding.
        With a process group each rank ranks its shard and the ranks' lists are merged.
        """
        self._check_fitted()
        if k < 1:
            raise DataInfError(f"k must be at least 1, not {k}")
        test = self._test_source(test_gradients)
        m, k = test.num_rows, min(k, self.n_)
        lo, hi = self.rows_
        self._start_scoring()
        R = {}
        for name in self._blocks("preconditioning"):
            V = torch.cat([rows for _, rows in test.iter_block(name, self.test_batch_size)])
            V = V.to(device=self.device_, dtype=self.compute_dtype_)
            if not torch.isfinite(torch.linalg.vector_norm(V, dim=1)).all():
                check_finite(name, V, 0, "test gradients")
            R[name] = self._precondition(name, V)
        self._finish_scoring()
        step = chunk_rows or min(self._rows(name, m) for name in self.train_.block_names)
        empty = torch.empty(m, 0, dtype=torch.float64, device=self.device_)
        low = high = (empty.long(), empty)
        for start in range(lo, hi, step):
            part = RowRange(self.train_, start, min(hi, start + step))
            S = torch.zeros(m, part.num_rows, dtype=torch.float64, device=self.device_)
            for name, r in R.items():
                for first, G in part.iter_block(name, part.num_rows):
                    G = G.to(device=self.device_, dtype=r.dtype)
                    S[:, first : first + len(G)] -= (G @ r.T).T
            index = torch.arange(start, start + part.num_rows, device=self.device_).expand(m, -1)
            low = _merge(low, (index, S), k, largest=False)
            high = _merge(high, (index, S), k, largest=True)
        if self.process_group is not None:  # the ranks' lists, merged alike on every rank
            gathered = [tuple(all_gather_cat(t, self.process_group, dim=1) for t in pair)
                        for pair in (low, high)]
            low = _merge((empty.long(), empty), gathered[0], k, largest=False)
            high = _merge((empty.long(), empty), gathered[1], k, largest=True)
        return TopK(low[0], low[1], high[0], high[1])

    def score_rows(self, test_gradients: object, rows: object) -> torch.Tensor:
        """Influence of other gradient rows, in the place of training examples, on each test
        example, with the inverse of the fitted training set: an (m, r) float64 tensor,
        S[j, s] = -sum_l r_jl . x_sl, R = V H^-1 as in :meth:`score`, x the rows after the
        method's own transform (unit norm, preconditioning; per-token rows of training
        examples, :class:`~datainf.gradients.tokens.TokenGradients`, are scaled by their
        example's norm). For the per-token split of a training example's score: the mean of
        its token rows' scores is its score (the method is linear in the training gradient
        once the inverse is fixed). Every rank of a process group gets the whole tensor."""
        self._check_fitted()
        test = self._test_source(test_gradients)
        other = self._source(rows, "rows")
        check_same_blocks(self.train_, other)
        self._start_scoring()
        out = torch.zeros(test.num_rows, other.num_rows, dtype=torch.float64,
                          device=self.device_)
        for name in self._blocks("scoring"):
            V = torch.cat([part for _, part in test.iter_block(name, self.test_batch_size)])
            R = self._precondition(name, V.to(device=self.device_, dtype=self.compute_dtype_))
            for first, X in other.iter_block(name, self.test_batch_size):
                out[:, first : first + len(X)] -= (X.to(device=R.device, dtype=R.dtype)
                                                   @ R.T).T.double()
        self._finish_scoring()
        return out

    def self_influence(self) -> torch.Tensor:
        """Self-influence of every training example, shape (n,), float64, >= 0.

        s_k = sum_l g_kl^T H_l^-1 g_kl: how much example k's own loss falls when k is
        up-weighted. It is MINUS the influence I(k, k) of k on its own loss under the paper's sign
        convention, so that, as with the other scores, larger means more suspicious (mislabeled
        and atypical examples have large self-influence).
        """
        self._check_fitted()
        out = torch.zeros(self.local_.num_rows, dtype=torch.float64, device=self.device_)
        for name in self._blocks("self-influence"):
            out += self._self_influence_block(name)
        return all_gather_cat(out, self.process_group)

    # ------------------------------------------------------- for subclasses
    def _precondition(self, name: str, V: torch.Tensor) -> torch.Tensor:
        """R = V H_l^-1 (the method's inverse of block l): (m, d_l) test rows -> (m, d_l)."""
        raise NotImplementedError

    def _score_block(self, name: str, V: torch.Tensor) -> torch.Tensor:
        """Block l's share of the scores of this rank's training rows: (m, d_l) test rows ->
        (m, n_rank) float64, I(k) = -r_j . g_kl with R = :meth:`_precondition` (in R's dtype)."""
        R = self._precondition(name, V)
        out = torch.empty(V.shape[0], self.local_.num_rows, dtype=torch.float64,
                          device=V.device)
        for start, G in self._train_chunks(name, self._rows(name, V.shape[0])):
            # computed as (G R^T)^T: the faster orientation for BLAS here
            out[:, start : start + len(G)] = (G.to(R.dtype) @ R.T).T.neg()
        return out

    def _self_influence_block(self, name: str) -> torch.Tensor:
        """s_k of this rank's rows k (float64, (n_rank,))."""
        raise DataInfError(
            f"{type(self).__name__} does not compute self-influence; use DataInf, Exact or "
            "HessianFree"
        )

    def notes(self) -> dict:
        """What a summary reports of this estimator's scoring since fit() (iterative methods:
        whether they converged); empty for the closed-form methods."""
        return {}

    def _start_scoring(self) -> None:
        """Called before each score(); methods reset per-call diagnostics here."""

    def _finish_scoring(self) -> None:
        """Called after each score()."""

    # -------------------------------------------------------------- helpers
    def _test_source(self, test_gradients: object) -> GradientSource:
        """Test gradients as a source with the training blocks, unit rows if normalizing."""
        test = as_gradient_source(test_gradients, "test gradients")
        check_same_blocks(self.train_, test)
        if test.num_rows == 0:
            raise DataInfError("test gradients: there are no examples (0 rows)")
        return self._view(test, "test gradients")

    def _source(self, gradients: object, where: str) -> GradientSource:
        return self._view(as_gradient_source(gradients, where), where)

    def _view(self, source: GradientSource, where: str) -> GradientSource:
        """The rows the method computes with, training and test alike: unit rows when
        normalizing (methods that transform the gradients first extend this)."""
        if self.normalize and source.num_rows:
            return UnitNormRows(source, where)
        return source

    def _train_chunks(self, name: str, rows: int,
                      whole: bool = False) -> Iterator[tuple[int, torch.Tensor]]:
        """Row chunks of this rank's shard of training block ``name`` (every row when
        ``whole``), moved to the compute device and dtype; ``start`` counts from the shard's
        first row."""
        for start, chunk in (self.train_ if whole else self.local_).iter_block(name, rows):
            yield start, chunk.to(device=self.device_, dtype=self.compute_dtype_)

    def _whole_block(self, name: str) -> torch.Tensor:
        """The whole (n, d_l) training block ``name`` in float64 (for the n x n kernels, used
        when n < d_l: small enough for every rank to hold and factor alike)."""
        chunks = self._train_chunks(name, self._rows(name, 1), whole=True)
        return torch.cat([G.double() for _, G in chunks])

    def _mine(self, values: torch.Tensor) -> torch.Tensor:
        """The entries of this rank's training rows from an (..., n) tensor over all rows."""
        lo, hi = self.rows_
        return values[..., lo:hi]

    def _sum_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        """A sum over training rows, completed across the ranks' shards (in place)."""
        return all_reduce_sum(tensor, self.process_group)

    def _rows(self, name: str, test_rows: int) -> int:
        """Training rows per chunk: 64 MiB of float32 per test row, capped at 256 MiB.

        Large chunks keep BLAS efficient; the cap bounds the memory of chunks read from disk.
        """
        if self.chunk_rows is not None:
            return self.chunk_rows
        elements = min(1 << 26, (1 << 24) * max(1, test_rows))
        return max(1, elements // self.train_.block_widths[name])

    def _test_mean(self, test: GradientSource, name: str) -> torch.Tensor:
        """v_l = mean_j v_jl as a (1, d_l) row (float32 sums per test batch, float64 across)."""
        total = torch.zeros(test.block_widths[name], dtype=torch.float64, device=self.device_)
        for start, rows in test.iter_block(name, self.test_batch_size):
            rows = rows.to(device=self.device_)
            part = (rows.new_ones(len(rows)) @ rows).double()  # column sums (a fast gemv)
            if not torch.isfinite(part).all():
                check_finite(name, rows, start, "test gradients")
                part = rows.to(device=self.device_, dtype=torch.float64).sum(dim=0)
            total += part
        return (total / test.num_rows).to(self.compute_dtype_)[None, :]

    def _blocks(self, what: str) -> list[str]:
        return tqdm(
            self.train_.block_names,
            desc=f"{type(self).__name__} {what}",
            unit="block",
            disable=True if self.rank_ > 0 else (None if self.progress is None
                                                 else not self.progress),
            leave=False,
        )

    def _check_fitted(self) -> None:
        if not hasattr(self, "train_"):
            raise DataInfError(
                f"{type(self).__name__} is not fitted; call .fit(train_gradients) first"
            )


def top_k_of(scores: torch.Tensor, k: int) -> TopK:
    """:class:`TopK` of a score matrix (m, n) already computed: the same order and ties as
    :meth:`InfluenceEstimator.top_k`."""
    m, n = scores.shape
    index = torch.arange(n, device=scores.device).expand(m, -1)
    empty = torch.empty(m, 0, dtype=scores.dtype, device=scores.device)
    low = _merge((empty.long(), empty), (index, scores), min(k, n), largest=False)
    high = _merge((empty.long(), empty), (index, scores), min(k, n), largest=True)
    return TopK(low[0], low[1], high[0], high[1])


def _merge(best: tuple[torch.Tensor, torch.Tensor], new: tuple[torch.Tensor, torch.Tensor],
           k: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest (or largest) of the running best and a new chunk, per row, ordered by
    score then by the lower index: (indices (m, k), scores (m, k))."""
    index = torch.cat([best[0], new[0]], dim=1)
    scores = torch.cat([best[1], new[1]], dim=1)
    by_index = torch.argsort(index, dim=1, stable=True)
    index, scores = index.gather(1, by_index), scores.gather(1, by_index)
    order = torch.argsort(scores, dim=1, descending=largest, stable=True)[:, :k]
    return index.gather(1, order), scores.gather(1, order)
