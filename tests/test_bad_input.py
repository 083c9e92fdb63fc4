"""Bad input raises DataInfError naming the block and the problem; nothing is broadcast."""

import math

import pytest
import torch

from datainf import Damping, DataInf, DataInfError, Exact, HessianFree, LiSSA

ALL = [DataInf, Exact, HessianFree, LiSSA]


@pytest.fixture
def small():
    g = torch.Generator().manual_seed(0)
    train = {"a": torch.randn(10, 4, generator=g), "b": torch.randn(10, 3, generator=g)}
    test = {"a": torch.randn(2, 4, generator=g), "b": torch.randn(2, 3, generator=g)}
    return train, test


def test_is_a_value_error():
    assert issubclass(DataInfError, ValueError)


@pytest.mark.parametrize("cls", ALL)
def test_missing_and_extra_test_blocks(small, cls):
    train, test = small
    est = cls().fit(train)
    with pytest.raises(DataInfError, match=r"missing \['b'\]"):
        est.score({"a": test["a"]})
    with pytest.raises(DataInfError, match=r"extra \['c'\]"):
        est.score({**test, "c": torch.zeros(2, 1)})


@pytest.mark.parametrize("cls", ALL)
def test_width_mismatch(small, cls):
    train, test = small
    with pytest.raises(DataInfError, match="block 'b' has 5 columns in the test"):
        cls().fit(train).score({"a": test["a"], "b": torch.zeros(2, 5)})


@pytest.mark.parametrize("shape", [(10,), (10, 2, 2), ()])
def test_non_2d_block(small, shape):
    train, _ = small
    with pytest.raises(DataInfError, match=r"block 'a' has shape .* must be 2-D"):
        DataInf().fit({**train, "a": torch.zeros(shape)})


def test_non_2d_test_block(small):
    train, test = small
    with pytest.raises(DataInfError, match="block 'a' has shape"):
        DataInf().fit(train).score({**test, "a": torch.zeros(4)})


def test_row_count_mismatch_between_blocks(small):
    train, _ = small
    with pytest.raises(DataInfError, match="block 'b' has 9 rows"):
        DataInf().fit({"a": train["a"], "b": train["b"][:9]})


def test_integer_gradients(small):
    with pytest.raises(DataInfError, match="dtype torch.int64"):
        DataInf().fit({"a": torch.ones(3, 2, dtype=torch.int64)})


@pytest.mark.parametrize("cls", ALL)
def test_empty_training_set(cls):
    with pytest.raises(DataInfError, match="no examples"):
        cls().fit({"a": torch.zeros(0, 4)})
    with pytest.raises(DataInfError, match="no blocks"):
        cls().fit({})
    with pytest.raises(DataInfError, match="list of chunks is empty"):
        cls().fit([])


def test_empty_test_set(small):
    with pytest.raises(DataInfError, match="test gradients: there are no examples"):
        DataInf().fit(small[0]).score({"a": torch.zeros(0, 4), "b": torch.zeros(0, 3)})


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("cls", ALL)
def test_non_finite_training_gradient(small, cls, bad):
    train, _ = small
    b = train["b"].clone()
    b[6, 1] = bad
    with pytest.raises(DataInfError, match="block 'b' has a NaN or infinite gradient in example 6"):
        cls().fit({**train, "b": b})


def test_non_finite_in_chunk_reports_global_row(small):
    train, _ = small
    chunks = [{k: v[:4] for k, v in train.items()}, {k: v[4:].clone() for k, v in train.items()}]
    chunks[1]["a"][2, 0] = math.nan
    with pytest.raises(DataInfError, match="example 6"):
        DataInf().fit(chunks)


@pytest.mark.parametrize("aggregate", [False, True])
@pytest.mark.parametrize("cls", ALL)
def test_non_finite_test_gradient(small, cls, aggregate):
    train, test = small
    a = test["a"].clone()
    a[1, 3] = math.nan
    with pytest.raises(DataInfError, match="test gradients: block 'a' .* example 1"):
        cls().fit(train).score({**test, "a": a}, aggregate=aggregate)


@pytest.mark.parametrize(
    "damping",
    [
        0,
        -0.1,
        math.nan,
        math.inf,
        "0.1",
        lambda: Damping(absolute=0.0),
        lambda: Damping(absolute=-1e-3),
        {"a": 1.0, "b": -1.0},
        {"a": 1.0},
        {"a": 1, "b": 1, "c": 1},
    ],
)
@pytest.mark.parametrize("cls", ALL)
def test_non_positive_or_incomplete_damping(small, cls, damping):
    with pytest.raises(DataInfError, match="damping|Damping"):
        cls(damping() if callable(damping) else damping).fit(small[0])


def test_damping_with_two_rules_is_refused():
    with pytest.raises(DataInfError, match="only one"):
        Damping(relative=0.1, absolute=1.0)


def test_all_zero_block_with_relative_damping(small):
    train, _ = small
    with pytest.raises(DataInfError, match="block 'b': relative damping gives lambda = 0"):
        DataInf().fit({**train, "b": torch.zeros(10, 3)})
    # the fix the message suggests works
    DataInf(Damping(absolute=1e-3)).fit({**train, "b": torch.zeros(10, 3)})


def test_one_shot_iterator_is_refused(small):
    train, _ = small
    with pytest.raises(DataInfError, match="one-shot iterator"):
        DataInf().fit(iter([train]))


def test_unknown_container(small):
    with pytest.raises(DataInfError, match="cannot read gradients from a str"):
        DataInf().fit("grads.pt")


def test_chunks_with_different_blocks(small):
    train, _ = small
    with pytest.raises(DataInfError, match=r"chunk 1 has other blocks .*missing \['b'\]"):
        DataInf().fit([train, {"a": train["a"]}])


def test_score_before_fit(small):
    with pytest.raises(DataInfError, match="not fitted"):
        DataInf().score(small[1])


@pytest.mark.parametrize(
    "kwargs", [{"chunk_rows": 0}, {"test_batch_size": -1}, {"chunk_rows": 2.5}]
)
def test_bad_sizes(small, kwargs):
    with pytest.raises(DataInfError, match="positive integer"):
        DataInf(**kwargs).fit(small[0])


@pytest.mark.parametrize(
    "kwargs",
    [{"max_iterations": 0}, {"tol": 0}, {"scale": "auto"}, {"scale": -1.0}, {"scale": {"a": 1.0}}],
)
def test_bad_lissa_settings(small, kwargs):
    with pytest.raises(DataInfError):
        LiSSA(**kwargs).fit(small[0])


@pytest.mark.parametrize("device, message", [
    ("cuda:99", r"device='cuda:99': (this torch has no CUDA device|there are only)"),
    ("gpu", "device='gpu' is not a device name; use cpu, cuda or cuda:N"),
])
def test_a_device_this_machine_lacks(small, device, message):
    train, _ = small
    with pytest.raises(DataInfError, match=message):
        DataInf(device=device).fit(train)


@pytest.mark.parametrize("labels, message", [
    ([0, 1, 3], "label 3 of example 2 is not a class of the model, which has 3 "
                r"\(0 .. 2\); give labels in that range"),
    ([0, -1, 2], "label -1 of example 1 is not a class of the model"),
    ([0.0, 1.0, 2.0], "labels are torch.float32, not class indices; give integer labels"),
])
def test_classification_labels_are_checked_at_the_boundary(labels, message):
    from test_collect_store import text_batches
    from tiny_models import tiny_bert_classifier

    from datainf import collect_gradients

    batch = text_batches(sizes=(3,))[0]
    batch["labels"] = torch.tensor(labels)
    with pytest.raises(DataInfError, match=message):
        collect_gradients(tiny_bert_classifier(), [batch])
