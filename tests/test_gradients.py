"""Hook-based per-example gradients equal a plain loop of single, unpadded examples."""

import math

import pytest
import torch
from tiny_models import (
    padded_text_batch,
    tiny_bert_classifier,
    tiny_llama,
    tiny_llama_classifier,
    tiny_unet,
)

from datainf import DataInfError, collect_gradients
from datainf.gradients.tasks import Diffusion
from datainf.models.hf import add_lora

TOL = {torch.float64: 1e-5, torch.float32: 1e-4}


def loop_gradients(model, loss_of_example, n):
    """Reference: one forward and backward per example; block name -> (n, numel)."""
    model.eval()
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    rows = {k: [] for k in params}
    for i in range(n):
        grads = torch.autograd.grad(loss_of_example(i), list(params.values()))
        for k, g in zip(params, grads, strict=True):
            rows[k].append(g.reshape(-1))
    return {k: torch.stack(v) for k, v in rows.items()}


def assert_same(hooked, looped, dtype):
    assert list(hooked) == list(looped)
    for name in looped:
        expected, got = looped[name].double(), hooked[name].double()
        assert got.shape == expected.shape, name
        rel = float((got - expected).norm() / expected.norm())
        assert rel < TOL[dtype], (name, rel)


def assert_equal_to_rounding(got, expected, rtol=1e-10, msg=None):
    """Equal up to float64 rounding, relative to the block's largest entry: batches of other
    shapes may run other kernels, which sum in other orders."""
    torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol * float(expected.abs().max()),
                               msg=msg)


def split(batch, sizes):
    out, start = [], 0
    for size in sizes:
        out.append({k: v[start : start + size] for k, v in batch.items()})
        start += size
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "make, side",
    # BERT pools its first position, so it is only used right-padded (as its tokenizer does)
    [
        (tiny_bert_classifier, "right"),
        (tiny_llama_classifier, "right"),
        (tiny_llama_classifier, "left"),
    ],
)
def test_classifier_matches_loop(make, side, dtype):
    model = make(dtype=dtype)
    batch = padded_text_batch([5, 9, 3, 7, 9], vocab=50, side=side, seed=1)
    batch["labels"] = torch.tensor([0, 2, 1, 1, 0])
    model.train()  # collection must switch to eval (no dropout) and back
    hooked = collect_gradients(model, split(batch, [2, 3]), "classification")
    assert model.training

    def loss(i):
        keep = batch["attention_mask"][i].bool()
        return model(
            input_ids=batch["input_ids"][i][keep][None], labels=batch["labels"][i : i + 1]
        ).loss

    assert_same(hooked, loop_gradients(model, loss, 5), dtype)
    assert all(
        p.requires_grad == ("lora_" in n or "modules_to_save.default" in n)
        for n, p in model.named_parameters()
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("side", ["right", "left"])
def test_causal_lm_matches_loop(side, dtype):
    model = tiny_llama(dtype=dtype)
    batch = padded_text_batch([6, 11, 4, 8], vocab=50, side=side, seed=2, prompt=3)
    hooked = collect_gradients(model, split(batch, [3, 1]), "causal_lm")

    def loss(i):
        keep = batch["attention_mask"][i].bool()
        return model(
            input_ids=batch["input_ids"][i][keep][None], labels=batch["labels"][i][keep][None]
        ).loss

    assert_same(hooked, loop_gradients(model, loss, 4), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_unet_matches_loop(dtype):
    model = tiny_unet(dtype=dtype)
    g = torch.Generator().manual_seed(3)
    batch = {
        "pixel_values": torch.randn(3, 1, 8, 8, generator=g).to(dtype),
        "encoder_hidden_states": torch.randn(3, 4, 8, generator=g).to(dtype),
    }
    task = Diffusion(timesteps=(25, 525, 925), seed=7)
    hooked = collect_gradients(model, split(batch, [2, 1]), task)
    scheduler = task.scheduler

    def loss(i):
        total = []
        for t in task.timesteps:
            x0 = batch["pixel_values"][i : i + 1]
            noise = task.noise(x0.shape[1:], i, t)[None].to(dtype)
            steps = torch.tensor([t])
            noisy = scheduler.add_noise(x0, noise, steps)
            pred = model(
                noisy, steps, encoder_hidden_states=batch["encoder_hidden_states"][i : i + 1]
            ).sample
            total.append(((pred - noise) ** 2).mean())
        return total

    # the reference concatenates per-timestep gradients, as the task does
    model.eval()
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    looped = {k: [] for k in params}
    for i in range(3):
        per_t = [torch.autograd.grad(l_t, list(params.values())) for l_t in loss(i)]
        for j, k in enumerate(params):
            looped[k].append(torch.cat([grads[j].reshape(-1) for grads in per_t]))
    looped = {k: torch.stack(v) for k, v in looped.items()}
    assert_same(hooked, looped, dtype)
    numel = dict(model.named_parameters())[next(iter(hooked))].numel()
    assert next(iter(hooked.values())).shape == (3, 3 * numel)


def test_batch_size_invariance():
    model = tiny_llama()
    batch = padded_text_batch([6, 11, 4, 8, 5, 9], vocab=50, side="right", seed=4, prompt=2)
    reference = collect_gradients(model, [batch], "causal_lm")
    for sizes in ([1] * 6, [2, 4], [5, 1]):
        got = collect_gradients(model, split(batch, sizes), "causal_lm")
        for name in reference:
            assert_equal_to_rounding(got[name], reference[name],
                                     msg=lambda m, s=sizes, n=name: f"{s} {n}: {m}")


def test_diffusion_noise_does_not_depend_on_batching():
    model = tiny_unet()
    batch = {
        "pixel_values": torch.randn(4, 1, 8, 8, dtype=torch.float64),
        "encoder_hidden_states": torch.randn(4, 4, 8, dtype=torch.float64),
    }
    task = Diffusion(timesteps=(100,), seed=1)
    a = collect_gradients(model, [batch], task)
    b = collect_gradients(model, split(batch, [1, 3]), task)
    for k in a:
        assert_equal_to_rounding(b[k], a[k])
    c = collect_gradients(model, [batch], Diffusion(timesteps=(100,), seed=2))
    assert not all(torch.allclose(a[k], c[k]) for k in a)


def test_diffusion_noise_streams():
    """Stream 0 gives row i the same noise in every store of a seed (a query and the training
    image at position i share it); another stream gives every row other noise, and its
    settings say so while stream 0's stay those of earlier stores."""
    shared, own = Diffusion(seed=3), Diffusion(seed=3, noise_stream=1)
    shape = torch.Size([1, 8, 8])
    assert torch.equal(shared.noise(shape, 4, 25), Diffusion(seed=3).noise(shape, 4, 25))
    for row in range(3):
        a, b = shared.noise(shape, row, 25), own.noise(shape, row, 25)
        assert abs(float((a * b).mean())) < 0.3  # independent draws: correlation ~ N(0, 1/64)
    assert "noise_stream" not in shared.settings()
    assert own.settings()["noise_stream"] == 1


def test_diffusion_gradients_same_in_train_mode():
    """The authors' notebook keeps the UNet in train mode. The shipped digit UNet with
    explain-image's LoRA (dropout 0 in the UNet's config and in the adapter; GroupNorm, not
    BatchNorm) has no layer that depends on the mode: the gradients in train mode are those
    in eval mode, in which the collection takes them."""
    from diffusers import UNet2DConditionModel

    from datainf.jobs.explain_image import Config
    from datainf.models.diffusion import SHIPPED_DIGITS

    unet = UNet2DConditionModel.from_pretrained(SHIPPED_DIGITS / "unet")
    defaults = Config(train_dir="t", queries="q")
    torch.manual_seed(0)
    model = add_lora(unet, r=defaults.lora_r, alpha=defaults.lora_alpha,
                     target_modules=defaults.lora_targets)
    g = torch.Generator().manual_seed(0)
    size, width = unet.config.sample_size, unet.config.cross_attention_dim
    batch = {"pixel_values": torch.randn(2, 1, size, size, generator=g),
             "encoder_hidden_states": torch.randn(2, 4, width, generator=g)}
    task = Diffusion(timesteps=(25, 525), seed=1)
    params = [p for p in model.parameters() if p.requires_grad]

    def gradient(train: bool) -> list[torch.Tensor]:
        model.train(train)
        return torch.autograd.grad(task.losses(model, batch, torch.arange(2), 1).sum(), params)

    for a, b in zip(gradient(False), gradient(True), strict=True):
        assert torch.equal(a, b)  # the same computation when no layer depends on the mode


def test_diffusion_store_holds_every_timestep(tmp_path):
    """A store of a task with several passes (timesteps) holds their gradients side by side,
    as the in-memory result does."""
    model = tiny_unet()
    batch = {
        "pixel_values": torch.randn(3, 1, 8, 8, dtype=torch.float64),
        "encoder_hidden_states": torch.randn(3, 4, 8, dtype=torch.float64),
    }
    task = Diffusion(timesteps=(25, 525, 925), seed=1)
    memory = collect_gradients(model, [batch], task)
    store = collect_gradients(model, split(batch, [2, 1]), task, out=str(tmp_path / "g"))
    for name, rows in memory.items():
        assert store.block_widths[name] == rows.shape[1] == 3 * model.get_parameter(name).numel()
        # both float32, from float64 gradients batched differently
        torch.testing.assert_close(store.read_block(name), rows, rtol=1e-6,
                                   atol=1e-6 * float(rows.abs().max()))


def test_block_selection():
    model = tiny_bert_classifier()
    batch = padded_text_batch([4, 6], vocab=60, side="right", seed=5)
    batch["labels"] = torch.tensor([0, 1])
    only_head = collect_gradients(model, [batch], blocks=r"classifier")
    assert sorted(only_head) == sorted(
        n for n, _ in model.named_parameters() if "classifier.modules_to_save" in n
    )
    everything = collect_gradients(model, [batch])
    # Not bit for bit: with the head alone no graph is recorded before the head, and whether
    # autograd records may pick other kernels (torch.matmul does).
    for name, value in only_head.items():
        assert_equal_to_rounding(value, everything[name])
    with pytest.raises(DataInfError, match="no trainable parameter matches"):
        collect_gradients(model, [batch], blocks=r"nothing-like-this")


def test_model_without_lora():
    model = tiny_bert_classifier().get_base_model()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(DataInfError, match="no trainable LoRA parameters"):
        collect_gradients(model, [{}])


def test_unsupported_trainable_parameter():
    model = tiny_bert_classifier()
    model.get_base_model().bert.embeddings.LayerNorm.weight.requires_grad_(True)
    batch = padded_text_batch([4], vocab=60, side="right", seed=5)
    batch["labels"] = torch.tensor([0])
    with pytest.raises(DataInfError, match="LayerNorm.weight.*belongs to a LayerNorm"):
        collect_gradients(model, [batch])


def test_batch_without_needed_keys():
    model = tiny_bert_classifier()
    batch = padded_text_batch([4, 5], vocab=60, side="right", seed=5)
    with pytest.raises(DataInfError, match="no 'labels'"):
        collect_gradients(model, [batch])
    with pytest.raises(DataInfError, match="no 'input_ids'"):
        collect_gradients(model, [{"labels": torch.tensor([0, 1])}])
    with pytest.raises(DataInfError, match="no 'pixel_values'"):
        collect_gradients(tiny_unet(), [{"x": torch.zeros(2, 1)}], "diffusion")


def test_label_count_mismatch():
    model = tiny_bert_classifier()
    batch = padded_text_batch([4, 5, 6], vocab=60, side="right", seed=5)
    batch["labels"] = torch.tensor([0, 1])
    with pytest.raises(DataInfError, match="'labels' has shape \\(2,\\) but the batch has 3"):
        collect_gradients(model, [batch])
    lm_batch = padded_text_batch([4, 5], vocab=50, side="right", seed=5, prompt=1)
    lm_batch["labels"] = lm_batch["labels"][:, :3]
    with pytest.raises(DataInfError, match="labels of shape \\(2, 3\\) do not match"):
        collect_gradients(tiny_llama(), [lm_batch], "causal_lm")


def test_example_without_scored_tokens():
    batch = padded_text_batch([4, 5], vocab=50, side="right", seed=5, prompt=1)
    batch["labels"][1] = -100
    first = split(batch, [1, 1])[0]
    with pytest.raises(DataInfError, match="example 2 has no scored tokens"):
        collect_gradients(tiny_llama(), [first, batch], "causal_lm")  # rows 0 | 1, 2


def test_nan_loss_names_the_example():
    def loss(model, batch):
        out = model(input_ids=batch["input_ids"]).logits[:, 0, 0]
        return torch.where(batch["input_ids"][:, 0] == 7, math.nan, 1.0) * out

    clean = {"input_ids": torch.tensor([[1, 2], [3, 3], [4, 5]])}
    batch = {"input_ids": torch.tensor([[1, 2], [7, 3], [4, 5]])}
    with pytest.raises(DataInfError, match="loss of example 4 is nan"):
        collect_gradients(tiny_llama(), [clean, batch], loss)  # rows 0-2 | 3-5


def test_unknown_task():
    with pytest.raises(DataInfError, match="unknown task 'regression'"):
        collect_gradients(tiny_llama(), [{}], "regression")
