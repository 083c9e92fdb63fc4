"""Scores do not depend on how the gradients are cut or ordered (beyond float rounding)."""

import pytest
import torch

from datainf import DataInf, Exact, HessianFree, LiSSA

# LiSSA runs a fixed 30 iterations here, converged or not: the point is that it is deterministic
pytestmark = pytest.mark.filterwarnings("ignore:LiSSA did not converge")

METHODS = {
    "datainf": DataInf,
    "exact": Exact,
    "hessian_free": HessianFree,
    "lissa": lambda **kw: LiSSA(max_iterations=30, **kw),  # same iterations either way
}


def as_chunks(blocks, sizes):
    """Split a mapping of (n, d) tensors into a list of row-chunk mappings of the given sizes."""
    out, start = [], 0
    for size in sizes:
        out.append({k: v[start : start + size] for k, v in blocks.items()})
        start += size
    assert start == next(iter(blocks.values())).shape[0]
    return out


def close(a, b, dtype=torch.float64):
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    return (a - b).abs().max() <= rtol * b.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", list(METHODS))
def test_chunk_size_and_chunk_lists(grads, method, dtype):
    train, test = ({k: v.to(dtype) for k, v in g.items()} for g in grads)
    make = METHODS[method]
    base = make().fit(train)
    expected = base.score(test)
    expected_aggregate = base.score(test, aggregate=True)
    for chunk_rows in (1, 3, 16, 1000):
        est = make(chunk_rows=chunk_rows).fit(train)
        assert close(est.score(test), expected, dtype), chunk_rows
        assert close(est.score(test, aggregate=True), expected_aggregate, dtype), chunk_rows
    chunked = as_chunks(train, [5, 1, 20, 14])
    assert close(make().fit(chunked).score(test), expected, dtype)
    assert close(
        make().fit(chunked).score(as_chunks(test, [2, 5]), aggregate=True),
        expected_aggregate,
        dtype,
    )


@pytest.mark.parametrize("method", list(METHODS))
def test_block_order(grads, method):
    train, test = grads
    make = METHODS[method]
    expected = make().fit(train).score(test)
    reversed_train = dict(reversed(list(train.items())))
    shuffled_test = {k: test[k] for k in ["head", "layer.0.lora_A", "layer.0.lora_B"]}
    assert close(make().fit(reversed_train).score(shuffled_test), expected)


@pytest.mark.parametrize("method", list(METHODS))
def test_test_batch_size(grads, method):
    train, test = grads
    make = METHODS[method]
    expected = make().fit(train).score(test)
    for batch in (1, 2, 6, 100):
        assert close(make(test_batch_size=batch).fit(train).score(test), expected), batch


def test_self_influence_chunk_invariance(grads):
    train, _ = grads
    for cls in (DataInf, Exact, HessianFree):
        expected = cls().fit(train).self_influence()
        for chunk_rows in (1, 7):
            assert close(cls(chunk_rows=chunk_rows).fit(train).self_influence(), expected)
        assert close(cls().fit(as_chunks(train, [30, 10])).self_influence(), expected)


def test_numpy_input_gives_same_scores(grads):
    train, test = grads
    expected = DataInf().fit(train).score(test)
    got = (
        DataInf()
        .fit({k: v.numpy() for k, v in train.items()})
        .score({k: v.numpy() for k, v in test.items()})
    )
    assert torch.equal(got, expected)
