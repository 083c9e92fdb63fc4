"""Scores do not depend on how the gradients are cut or ordered (beyond float rounding)."""

import pytest
import torch
from tolerances import FLOAT32_PASS, FLOAT64, float32_passes, relative

from datainf import DataInf, Exact, HessianFree, Less, LiSSA, RepSim

# LiSSA runs a fixed 30 iterations here, converged or not: the point is that it is deterministic
pytestmark = pytest.mark.filterwarnings("ignore:LiSSA did not converge")

METHODS = {
    "datainf": DataInf,
    "exact": Exact,
    "hessian_free": HessianFree,
    "lissa": lambda **kw: LiSSA(max_iterations=30, **kw),  # same iterations either way
    # the grads fixture's blocks, moments that differ across entries (conftest.any_estimator)
    "less": lambda **kw: Less({"layer.0.lora_A": torch.arange(6.0) + 1,
                               "layer.0.lora_B": torch.arange(64.0) + 1,
                               "head": torch.arange(17.0) + 1}, **kw),
    "repsim": RepSim,  # the gradients' blocks taken as features
}


def as_chunks(blocks, sizes):
    """Split a mapping of (n, d) tensors into a list of row-chunk mappings of the given sizes."""
    out, start = [], 0
    for size in sizes:
        out.append({k: v[start : start + size] for k, v in blocks.items()})
        start += size
    assert start == next(iter(blocks.values())).shape[0]
    return out


def close(a, b, dtype=torch.float64, method=None):
    """Equal up to the rounding of the same sums in other chunks (see tests/tolerances.py):
    float64; one float32 pass; LiSSA's 30 float32 passes."""
    if dtype == torch.float64:
        rtol = FLOAT64
    else:
        rtol = float32_passes(30) if method == "lissa" else FLOAT32_PASS
    return relative(a, b) <= rtol


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
        assert close(est.score(test), expected, dtype, method), chunk_rows
        assert close(est.score(test, aggregate=True), expected_aggregate, dtype,
                     method), chunk_rows
    chunked = as_chunks(train, [5, 1, 20, 14])
    assert close(make().fit(chunked).score(test), expected, dtype, method)
    assert close(
        make().fit(chunked).score(as_chunks(test, [2, 5]), aggregate=True),
        expected_aggregate,
        dtype,
        method,
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
    # the arrays share the tensors' memory: the same computation on the same buffers, bit for bit
    assert torch.equal(got, expected)


def test_grouping_by_module_equals_concatenated_blocks():
    from conftest import random_gradients

    from datainf.gradients.source import as_gradient_source, group_by_module, module_of

    names = {"m.q.lora_A.default.weight": 6, "m.q.lora_B.default.weight": 5,
             "m.head.modules_to_save.default.weight": 4, "m.head.modules_to_save.default.bias": 2}
    assert [module_of(n) for n in names] == ["m.q", "m.q", "m.head", "m.head"]
    train, test = random_gradients(20, names, seed=1), random_gradients(3, names, seed=2)
    joined = {
        "m.q": torch.cat([train["m.q.lora_A.default.weight"], train["m.q.lora_B.default.weight"]],
                         1),
        "m.head": torch.cat([train["m.head.modules_to_save.default.weight"],
                             train["m.head.modules_to_save.default.bias"]], 1),
    }
    joined_test = {
        "m.q": torch.cat([test["m.q.lora_A.default.weight"], test["m.q.lora_B.default.weight"]],
                         1),
        "m.head": torch.cat([test["m.head.modules_to_save.default.weight"],
                             test["m.head.modules_to_save.default.bias"]], 1),
    }
    grouped = group_by_module(as_gradient_source(train))
    grouped_test = group_by_module(as_gradient_source(test))
    assert grouped.block_widths == {"m.q": 11, "m.head": 6}
    for cls in (DataInf, Exact, HessianFree):
        for rows in (1, 7, None):
            got = cls(chunk_rows=rows).fit(grouped).score(grouped_test)
            assert close(got, cls().fit(joined).score(joined_test)), (cls, rows)
    # grouping changes DataInf (bigger blocks), not Hessian-free
    assert not close(DataInf().fit(grouped).score(grouped_test),
                     DataInf().fit(train).score(test))
