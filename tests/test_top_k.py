"""top_k: the k most helpful and most harmful training examples per test example, computed a
training chunk at a time, equal the full sort of score()'s matrix for every method, on
in-memory gradients and on a store read in many chunks."""

import numpy as np
import pytest
import torch
from conftest import any_estimator
from tolerances import FLOAT32_PASS, FLOAT64, assert_same_ranking

from datainf.errors import DataInfError
from datainf.gradients.store import GradientStore
from datainf.methods import PAIRWISE, estimator

WIDTHS = {"a": 12, "b": 30, "c": 80}  # c is wider than n: Exact solves it on the dual side


def gradients(rows: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(rows, d, generator=g, dtype=torch.float64)
            for name, d in WIDTHS.items()}


def expected(scores: torch.Tensor, k: int):
    """Full sort of each row: ascending score (then index) and descending (then index)."""
    s = scores.numpy()
    idx = np.arange(s.shape[1])
    low = np.array([np.lexsort((idx, row))[:k] for row in s])
    high = np.array([np.lexsort((idx, -row))[:k] for row in s])
    return low, high


@pytest.mark.filterwarnings("ignore:LiSSA did not converge")  # the same either way
@pytest.mark.parametrize("method", list(PAIRWISE))
def test_top_k_equals_the_full_sort(method):
    train, test = gradients(50, 0), gradients(7, 1)
    est = any_estimator(method, WIDTHS, progress=False).fit(train)
    full = est.score(test)
    top = est.top_k(test, 5, chunk_rows=8)  # 7 chunks, the last one partial
    low, high = expected(full, 5)
    # chunked against whole: the same float64 sums in other orders (tests/tolerances.py)
    assert_same_ranking(top.helpful, low, full, FLOAT64)
    assert_same_ranking(top.harmful, high, full, FLOAT64)
    scale = float(full.abs().max())
    assert torch.allclose(top.helpful_scores, full.gather(1, top.helpful), rtol=0,
                          atol=1e-9 * scale)
    assert torch.allclose(top.harmful_scores, full.gather(1, top.harmful), rtol=0,
                          atol=1e-9 * scale)
    assert (top.helpful_scores.diff(dim=1) >= 0).all()
    assert (top.harmful_scores.diff(dim=1) <= 0).all()


def test_top_k_on_a_store_in_many_chunks(tmp_path):
    train = {k: v.float() for k, v in gradients(300, 2).items()}
    store = GradientStore.create_or_resume(tmp_path / "g", {k: v.shape[1] for k, v in
                                                            train.items()}, 300, {"test": 1})
    store.write_rows(0, train, data_hash="x")
    store = GradientStore.open(tmp_path / "g")
    test = {k: v.float() for k, v in gradients(4, 3).items()}
    est = estimator("datainf", progress=False, chunk_rows=64).fit(store)
    full = est.score(test)
    top = est.top_k(test, 10, chunk_rows=64)
    low, high = expected(full, 10)
    assert_same_ranking(top.helpful, low, full, FLOAT32_PASS)  # float32 rows, other chunks
    assert_same_ranking(top.harmful, high, full, FLOAT32_PASS)


def test_k_larger_than_n_and_bad_k():
    est = estimator("hessian_free", progress=False).fit(gradients(6, 0))
    top = est.top_k(gradients(2, 1), 10)
    assert top.helpful.shape == (2, 6) and sorted(top.helpful[0].tolist()) == list(range(6))
    with pytest.raises(DataInfError, match="k must be at least 1"):
        est.top_k(gradients(2, 1), 0)


def test_top_k_refuses_non_finite_test_rows():
    est = estimator("datainf", progress=False).fit(gradients(6, 0))
    test = gradients(2, 1)
    test["b"][1, 3] = float("nan")
    with pytest.raises(DataInfError, match="block .b. has a NaN or infinite gradient in example 1"):
        est.top_k(test, 2)
