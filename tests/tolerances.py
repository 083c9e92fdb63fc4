"""How far apart two runs of one computation may be when only the order of its sums differs,
and rankings compared only where the scores separate them.

Two runs of the same formula that split its sums differently (training rows in other chunks,
shards or ranks; other batch shapes; other thread counts; another CPU's BLAS kernels, e.g.
MKL's AVX2 path on AMD EPYC against AVX-512 on Intel) round differently. With u the unit
roundoff (2^-24 in float32, 2^-53 in float64), a sum of L terms moves by at most L u sum|terms|
and typically by about sqrt(L) u sum|terms| (rounding errors of random sign). Every bound here
is relative to the largest |value| compared. Where a test can run in float64 it does, so that
its bound holds with orders of magnitude to spare; float32 is compared where float32 is what
is tested (the float32 store the jobs write, float32 models through the command line).

The bounds, and the tests that use them:

- ``FLOAT64`` (1e-10): float64 computations whose sums have at most ~10^3 terms (L u <= 1.2e-13)
  repeated over at most 400 passes (LiSSA): at most 5e-11 in the worst case, before any
  cancellation; measured <= 3e-15. Used by test_invariance (chunks, chunk lists, block order,
  test batches), test_distributed (engine over 3 ranks in memory; DDP fine-tuning in float64:
  AdamW's m / (sqrt(v) + eps) keeps relative errors relative), test_top_k (chunked top-k
  against the full sort).
- ``ONE_FLOAT32_ROUNDING`` (1e-6): float64 results that agree to ~1e-13 and are then each rounded
  once to float32 (a float32 store written from a float64 model, batched or sharded otherwise)
  end at most one float32 ulp apart: 2^-23 |x| <= 1.2e-7 of the block's largest value. Used by
  the collection tests of test_distributed (ranks, a killed rank re-run, shards finished by one
  process) and test_collect_store (resumed with other batch sizes); test_gradients' diffusion
  store (float64 model, other batches, stored in float32) uses the same 1e-6.
- ``FLOAT32_PASS`` (1e-6): one pass over float32 rows (products of float32 rows of width <= 80,
  partial sums over chunks and ranks in float64): typical rounding sqrt(80) u = 5.3e-7 of the
  terms per run; measured <= 1.1e-7 on AMD EPYC (AVX2, default kernels, one thread) and Intel.
  Used by test_distributed (engine on a float32 store over 2 ranks), test_invariance (float32
  chunks), test_top_k (a float32 store), test_explain_generation (query batches, top-k against
  the matrix, a recomputation from the stores), test_mislabeled and test_cli_runs (the CSV's
  scores against a recomputation from the stores in default chunks).
- ``float32_passes(T)`` = T x FLOAT32_PASS: an iteration that repeats such a pass T times
  (LiSSA on a float32 store). The difference between two runs evolves as
  e_t = (I - H/s) e_{t-1} + d_t with ||I - H/s|| <= 1 (s >= the largest eigenvalue of H), so
  the new rounding d_t of each pass adds up at most linearly: after T passes at most T times
  one pass's. Measured 1.6e-6 after 200 passes (AMD EPYC), bound 2e-4; a sharding mistake
  (a row missed or counted twice) moves the scores by > 1e-2. Also the float32 runs under
  torchrun against one process (test_distributed): T = the fine-tuning steps (gradients
  all-reduced in another order) + the gradient pass + the scoring pass, LiSSA's 200 on top;
  their AUCs may differ only by the pairs of near-tied scores (``auc_rounding_bound``).

Left as they are, since they compare the same computation repeated (bit for bit) or a float32
value with its float64 source (one rounding, 2^-24 relative, inside every bound used): the
store's own tests (test_store), the in-memory and on-disk collection of the same batches
(test_collect_store), a repeated explain-image run, and the peers' float64 bridge.
Comparisons with an independent float64 reference (test_methods' 2e-4 in float32, LiSSA
converged to 1e-6 in float32 against 1e-3) measure an approximation, not a reordering.
"""

from __future__ import annotations

import numpy as np
import torch

FLOAT64 = 1e-10
ONE_FLOAT32_ROUNDING = 1e-6
FLOAT32_PASS = 1e-6


def float32_passes(passes: int) -> float:
    """The bound for ``passes`` repetitions of a float32 pass (see the module docstring)."""
    return passes * FLOAT32_PASS


def relative(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """max |a - b| relative to max |b|."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).abs().max() / b.abs().max())


def assert_same_ranking(found, expected, scores, rtol: float) -> None:
    """Index lists of training examples per test row, ranked from the score matrix ``scores``
    (m, n), computed twice in other summation orders: equal at every position whose expected
    example is separated from every other example of its row by more than 2 x rtol x
    max|scores| (a near-tie may rank either way within the rounding). Lists cut by the sign of
    the score (helpful < 0 < harmful) may differ in length only by examples whose score is
    that close to 0."""
    scores = np.asarray(torch.as_tensor(scores).double())
    assert len(found) == len(expected)
    margin = 2 * rtol * np.abs(scores).max()
    for row, (got, want) in enumerate(zip(found, expected, strict=True)):
        got, want = list(np.asarray(got).tolist()), list(np.asarray(want).tolist())
        longer = got if len(got) > len(want) else want
        for index in longer[min(len(got), len(want)):]:
            assert abs(scores[row, index]) <= margin, (row, got, want)
        for position, index in enumerate(want[: len(got)]):
            gaps = np.abs(scores[row] - scores[row, index])
            gaps[index] = np.inf
            if gaps.min() > margin:
                assert got[position] == index, (row, position, got, want)


def auc_rounding_bound(scores: np.ndarray, positive: np.ndarray, rtol: float) -> float:
    """How far the AUC of ``scores`` against the 0/1 ``positive`` can move when every score
    moves by at most rtol x max|scores|: only pairs (positive, negative) whose scores lie within
    twice that of each other can swap, each by 1 / (P N)."""
    scores, positive = np.asarray(scores, dtype=float), np.asarray(positive, dtype=bool)
    margin = 2 * rtol * np.abs(scores).max()
    gaps = np.abs(scores[positive][:, None] - scores[~positive][None, :])
    return float((gaps <= margin).sum() / gaps.size)
