"""Several processes (gloo, as torchrun starts them) give what one process gives: the
estimators' scores of every method, aggregate and pairwise, top-k and self-influence."""

from __future__ import annotations

import pytest
import torch
from conftest import random_gradients
from ranks import run_ranks

from datainf.gradients.distributed import shard
from datainf.gradients.store import GradientStore
from datainf.methods import NAMED, estimator

# c is wider than n = 41: Exact and DataInf's self-influence take the n x n side there
WIDTHS = {"a": 6, "b": 30, "c": 64}
SELF = ("datainf", "exact", "hessian_free", "datainf_normalized", "cosine")


def results(method: str, train, test, group=None) -> dict[str, torch.Tensor]:
    """Everything an estimator computes from ``train`` for ``test``. In float64, LiSSA runs
    its 400 iterations (its float32 rounding grows with them: on a float32 store it stops at
    its default tolerance)."""
    float64 = isinstance(train, dict)
    kwargs = {"max_iterations": 400, "tol": 1e-10} if method == "lissa" and float64 else {}
    est = estimator(method, progress=False, process_group=group, **kwargs).fit(train)
    out = {"score": est.score(test), "aggregate": est.score(test, aggregate=True)}
    top = est.top_k(test, 4, chunk_rows=6)
    out.update(helpful=top.helpful, helpful_scores=top.helpful_scores, harmful=top.harmful,
               harmful_scores=top.harmful_scores)
    if method in SELF:
        out["self"] = est.self_influence()
    return out


def engine_worker(rank, group, folder, source):
    train = GradientStore.open(folder / "store") if source == "store" else \
        random_gradients(41, WIDTHS, seed=1)
    test = random_gradients(5, WIDTHS, seed=2)
    found = {method: results(method, train, test, group) for method in NAMED}
    torch.save(found, folder / f"rank{rank}.pt")


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.filterwarnings("ignore:LiSSA did not converge")
@pytest.mark.parametrize(("source", "size"), [("memory", 3), ("store", 2)])
def test_ranks_score_like_one_process(tmp_path, source, size):
    if source == "store":  # float32 on disk, as the jobs keep them
        store = GradientStore.create_or_resume(tmp_path / "store", WIDTHS, 41, {"test": 1})
        store.write_rows(0, random_gradients(41, WIDTHS, seed=1, dtype=torch.float32), "h")
        train = GradientStore.open(tmp_path / "store")
    else:
        train = random_gradients(41, WIDTHS, seed=1)
    test = random_gradients(5, WIDTHS, seed=2)
    run_ranks(engine_worker, size, tmp_path, tmp_path, source)
    for method in NAMED:
        alone = results(method, train, test)
        for rank in range(size):
            found = torch.load(tmp_path / f"rank{rank}.pt")[method]
            assert set(found) == set(alone)
            for key, value in alone.items():
                if key in ("helpful", "harmful"):
                    assert torch.equal(found[key], value), (method, key, rank)
                else:
                    assert found[key].shape == value.shape
                    assert relative(found[key], value) < 1e-6, (method, key, rank)


def test_shards_cover_the_rows_in_order():
    for n in (1, 5, 41, 1000):
        for size in (1, 2, 3, 8):
            bounds = [shard(n, r, size) for r in range(size)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
            assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1
