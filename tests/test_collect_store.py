"""collect_gradients into an on-disk store: round trip, resume, refusal of another run's store."""

import numpy as np
import pytest
import torch
from tiny_models import padded_text_batch, tiny_bert_classifier, tiny_llama
from tolerances import ONE_FLOAT32_ROUNDING, relative

from datainf import DataInfError, collect_gradients
from datainf.gradients.store import GradientStore


def text_batches(sizes=(3, 3, 3, 3), seed=0):
    """One padded batch of sum(sizes) examples, cut into batches of the given sizes."""
    n = sum(sizes)
    whole = padded_text_batch([4 + i % 5 for i in range(n)], vocab=60, side="right", seed=seed)
    whole["labels"] = torch.tensor([i % 3 for i in range(n)])
    batches, start = [], 0
    for size in sizes:
        batches.append({k: v[start : start + size] for k, v in whole.items()})
        start += size
    return batches


def interrupted(batches, after):
    """Yields ``after`` batches, then fails like a killed run."""
    for i, batch in enumerate(batches):
        if i == after:
            raise KeyboardInterrupt
        yield batch


def test_store_equals_in_memory(tmp_path):
    model = tiny_bert_classifier(dtype=torch.float32)
    batches = text_batches()
    in_memory = collect_gradients(model, batches)
    store = collect_gradients(model, batches, out=tmp_path / "g", progress=False)
    assert store.complete and store.num_rows == 12
    for name, value in in_memory.items():  # the same batches computed again: bit for bit
        assert torch.equal(store.read_block(name), value)
    reopened = GradientStore.open(tmp_path / "g")
    assert reopened.identity["task"] == {"name": "classification"}


def counting_forward_calls(model):
    """Batch sizes of the model's forward calls from now on."""
    calls = []
    original_forward = model.forward

    def counting_forward(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return original_forward(*args, **kwargs)

    model.forward = counting_forward
    return calls


@pytest.mark.parametrize("resume_sizes", [(3, 3, 3, 3), (4, 4, 4)])
def test_resume_after_interruption(tmp_path, resume_sizes):
    """Only the missing rows are computed; with the interrupted run's batch sizes the arrays are
    those of an uninterrupted run bit for bit, with other batch sizes up to one float32
    rounding (a float64 model, its gradients stored in float32)."""
    model = tiny_bert_classifier()
    batches = text_batches(sizes=(3, 3, 3, 3))
    whole = collect_gradients(model, batches, out=tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        collect_gradients(model, interrupted(batches, 2), out=tmp_path / "part",
                          num_examples=12)
    partial = GradientStore.create_or_resume(tmp_path / "part", whole.block_widths, 12,
                                             whole.identity)
    assert partial.rows_complete == 6
    calls = counting_forward_calls(model)
    resumed = collect_gradients(model, text_batches(sizes=resume_sizes), out=tmp_path / "part")
    if resume_sizes == (3, 3, 3, 3):
        assert calls == [3, 3]
    else:  # of rows 4-7 only 6-7 are missing (they are computed alone), rows 8-11 are new
        assert calls == [2, 4]
    for name in whole.block_names:
        got, expected = resumed.read_block(name), whole.read_block(name)
        # The same batches through the same model in one process run the same kernels on
        # the same shapes: bit for bit. This holds for the 6 rows kept in any case.
        assert torch.equal(got[:6], expected[:6]), name
        if resume_sizes == (3, 3, 3, 3):
            assert torch.equal(got, expected), name
        else:
            # A batch of another shape may run other BLAS kernels (other summation orders):
            # float64 gradients equal to ~1e-15, each rounded once to float32 (tolerances.py)
            assert relative(got, expected) < ONE_FLOAT32_ROUNDING, name


@pytest.mark.parametrize("change", ["adapter", "data", "task", "blocks"])
def test_store_of_another_run_is_refused(tmp_path, change):
    model = tiny_bert_classifier(dtype=torch.float32)
    batches = text_batches()
    collect_gradients(model, batches, out=tmp_path / "g")
    kwargs, message = {}, ""
    if change == "adapter":
        with torch.no_grad():
            next(p for n, p in model.named_parameters() if "lora_B" in n).add_(0.01)
        message = "another adapter"
    elif change == "data":
        batches = text_batches(seed=7)
        message = "other data"
    elif change == "task":
        kwargs = {"task": lambda m, b: m(input_ids=b["input_ids"]).logits.sum(1)}
        message = "another task"
    else:
        kwargs = {"blocks": "classifier"}
        message = "blocks"
    with pytest.raises(DataInfError, match=message) as refused:
        collect_gradients(model, batches, out=tmp_path / "g", **kwargs)
    if change in ("adapter", "data"):  # names only what differs
        assert "another model" not in str(refused.value)


def test_more_or_fewer_examples_than_announced(tmp_path):
    model = tiny_llama(dtype=torch.float32)
    batch = padded_text_batch([4, 5], vocab=50, side="right", seed=1, prompt=1)
    with pytest.raises(DataInfError, match="held 2 examples but 3 were announced"):
        collect_gradients(model, iter([batch]), "causal_lm", out=tmp_path / "a", num_examples=3)
    with pytest.raises(DataInfError, match="more than the 1 examples announced"):
        collect_gradients(model, iter([batch]), "causal_lm", out=tmp_path / "b", num_examples=1)
    with pytest.raises(DataInfError, match="number of examples up front"):
        collect_gradients(model, iter([batch]), "causal_lm", out=tmp_path / "c")


def test_bfloat16_store(tmp_path):
    model = tiny_bert_classifier(dtype=torch.float32)
    batches = text_batches()
    exact = collect_gradients(model, batches)
    store = collect_gradients(model, batches, out=tmp_path / "g", dtype="bfloat16")
    for name, value in exact.items():  # the same float32 gradients, rounded once: bit for bit
        got = store.read_block(name)
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, value.to(torch.bfloat16))
    rel = np.mean([float((store.read_block(n).float() - v).norm() / v.norm())
                   for n, v in exact.items()])
    assert rel < 1e-2


def test_grouping_by_module_on_a_store(tmp_path):
    from datainf import DataInf
    from datainf.gradients.source import as_gradient_source, group_by_module

    model = tiny_bert_classifier(dtype=torch.float32)
    batches = text_batches()
    in_memory = collect_gradients(model, batches)
    store = collect_gradients(model, batches, out=tmp_path / "g")
    grouped_store, grouped = group_by_module(store), group_by_module(as_gradient_source(in_memory))
    assert len(grouped_store.block_names) == 4 + 1  # query/value of 2 layers, the head
    for name in grouped.block_names:
        expected = sum(v.double().square().sum(1) for k, v in in_memory.items()
                       if k.startswith(name + "."))
        assert torch.allclose(grouped_store.row_sq_norms(name), expected, rtol=1e-6)
    a = DataInf().fit(grouped_store).score(grouped_store, aggregate=True)
    b = DataInf().fit(grouped).score(grouped, aggregate=True)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-6 * float(b.abs().max()))
