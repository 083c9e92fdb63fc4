"""Per-example gradients of LoRA tensors from one batched forward and backward per batch.

For a Linear layer y = W a + b applied at positions t of example i (tokens, pixels), the
gradient of example i's loss L_i is

    dL_i/dW = sum_t delta_it a_it^T,     dL_i/db = sum_t delta_it,     delta_it = dL_i/dy_it

Forward hooks on the trainable Linear layers (LoRA's lora_A / lora_B and heads kept by
``modules_to_save``) record a and y; one ``autograd.grad`` of sum_i L_i gives every delta at
once (examples do not interact in eval mode, so delta_it involves only L_i). Parameter
gradients of the full model are never formed: all parameters are frozen during collection and
the gradient flows only from the hooked outputs to the loss. Padding positions have delta = 0.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..errors import DataInfError
from .tasks import as_task, batch_size


@dataclass
class _HookedLinear:
    """One trainable nn.Linear: the block names of its weight and bias, and what it saw."""

    module: torch.nn.Linear
    weight: str | None
    bias: str | None
    calls: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def record(self, module, args, output) -> None:
        if not output.requires_grad:
            output.requires_grad_()
        self.calls.append((args[0].detach(), output))


def select_blocks(model: torch.nn.Module, blocks: str | Sequence[str] | None = None):
    """The trainable parameters to collect, grouped by their Linear layer.

    ``blocks``: None (every trainable parameter), a regular expression searched in parameter
    names, or a list of names. Returns (layers, widths) with widths[name] = numel.
    """
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not any("lora_" in n for n in trainable):
        raise DataInfError(
            "the model has no trainable LoRA parameters; wrap it with peft "
            "(datainf.models.add_lora) or load its adapter with is_trainable=True"
        )
    if blocks is None:
        chosen = set(trainable)
    elif isinstance(blocks, str):
        pattern = re.compile(blocks)
        chosen = {n for n in trainable if pattern.search(n)}
    else:
        unknown = [b for b in blocks if b not in trainable]
        if unknown:
            raise DataInfError(f"blocks {unknown[:3]} are not trainable parameters of the model")
        chosen = set(blocks)
    if not chosen:
        raise DataInfError(
            f"no trainable parameter matches blocks={blocks!r}; parameter names "
            f"look like {sorted(trainable)[:2]}"
        )
    layers, widths = [], {}
    for prefix, module in model.named_modules():
        own = {
            f"{prefix}.{k}" if prefix else k: k for k, _ in module.named_parameters(recurse=False)
        }
        mine = {full: short for full, short in own.items() if full in chosen}
        if not mine:
            continue
        if not isinstance(module, torch.nn.Linear):
            raise DataInfError(
                f"parameter {sorted(mine)[0]!r} belongs to a {type(module).__name__}; per-example "
                "gradients are computed for Linear layers (LoRA A/B, classifier heads): freeze "
                "it or leave it out with blocks=..."
            )
        by_kind = {short: full for full, short in mine.items()}
        layers.append(_HookedLinear(module, by_kind.get("weight"), by_kind.get("bias")))
        for full in mine:
            widths[full] = trainable[full].numel()
    return layers, dict(sorted(widths.items(), key=lambda kv: list(trainable).index(kv[0])))


@contextmanager
def _collecting(model: torch.nn.Module, layers: list[_HookedLinear]):
    """Eval mode, all parameters frozen, hooks on; everything restored afterwards."""
    was_training = model.training
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    handles = [layer.module.register_forward_hook(layer.record) for layer in layers]
    try:
        model.eval()
        for p, _ in frozen:
            p.requires_grad_(False)
        with torch.enable_grad():
            yield
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.train(was_training)


def _batch_gradients(model, task, layers, batch, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example gradients of one batch: block name -> (B, numel), passes concatenated."""
    B = len(rows)
    parts: dict[str, list[torch.Tensor]] = {}
    for pass_index in range(task.num_passes):
        for layer in layers:
            layer.calls.clear()
        losses = task.losses(model, batch, rows, pass_index)
        if losses.shape != (B,):
            raise DataInfError(
                f"the task gave losses of shape {tuple(losses.shape)} for a batch "
                f"of {B} examples; it must give one loss per example"
            )
        bad = (~torch.isfinite(losses.detach())).nonzero()
        if len(bad):
            b = int(bad[0])
            raise DataInfError(
                f"the loss of example {int(rows[b])} is {float(losses[b].detach())}; "
                "check that example's input"
            )
        outputs = [out for layer in layers for _, out in layer.calls]
        deltas = iter(torch.autograd.grad(losses.sum(), outputs, allow_unused=True))
        for layer in layers:
            grad_w = grad_b = 0
            for a, _ in layer.calls:
                delta = next(deltas)
                if delta is None:
                    continue
                if a.shape[0] != B or delta.shape[0] != B:
                    raise DataInfError(
                        f"layer of {layer.weight or layer.bias!r} saw an input whose first "
                        f"dimension is {a.shape[0]}, not the batch size {B}"
                    )
                a = a.reshape(B, -1, a.shape[-1])
                delta = delta.reshape(B, -1, delta.shape[-1])
                grad_w = grad_w + torch.einsum("bto,bti->boi", delta, a).reshape(B, -1)
                grad_b = grad_b + delta.sum(1)
            for name, grad, param in (
                (layer.weight, grad_w, layer.module.weight),
                (layer.bias, grad_b, layer.module.bias),
            ):
                if name is None:
                    continue
                if isinstance(grad, int):  # the layer did not influence the loss
                    grad = torch.zeros(B, param.numel(), dtype=losses.dtype, device=losses.device)
                parts.setdefault(name, []).append(grad.detach())
        for layer in layers:
            layer.calls.clear()
    return {name: torch.cat(p, dim=1) if len(p) > 1 else p[0] for name, p in parts.items()}


def example_digest(hasher, batch: Mapping, b: int) -> None:
    """Feed example b of a batch into ``hasher``, padding removed (batch-size independent)."""
    mask = batch.get("attention_mask")
    for key in sorted(batch):
        value = batch[key]
        if key == "attention_mask":
            continue
        hasher.update(key.encode())
        if isinstance(value, torch.Tensor):
            row = value[b]
            if mask is not None and row.ndim >= 1 and row.shape[0] == mask.shape[1]:
                row = row[mask[b].bool()]
            hasher.update(str((row.dtype, tuple(row.shape))).encode())
            hasher.update(row.detach().cpu().contiguous().numpy().tobytes())
        else:
            hasher.update(repr(value[b] if isinstance(value, Sequence) else value).encode())


def _check_rows(batch: Mapping, B: int) -> None:
    """Every tensor of a batch holds one row per example."""
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and (value.ndim == 0 or value.shape[0] != B):
            raise DataInfError(
                f"batch key {key!r} has shape {tuple(value.shape)} but the batch has {B} "
                "examples; every tensor needs one row per example"
            )


def _num_examples(batches, num_examples: int | None) -> int:
    if num_examples is not None:
        return int(num_examples)
    dataset = getattr(batches, "dataset", None)
    if dataset is not None and hasattr(dataset, "__len__"):
        return len(dataset)
    if isinstance(batches, Sequence):
        return sum(batch_size(b) for b in batches)
    raise DataInfError(
        "writing to a store needs the number of examples up front: pass "
        "num_examples=..., a DataLoader over a sized dataset, or a list of batches"
    )


def _to_device(batch: Mapping, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def adapter_fingerprint(model: torch.nn.Module, names: Iterable[str]) -> str:
    """Hash of the named parameters' names, shapes and values (the adapter's weights)."""
    params = dict(model.named_parameters())
    h = hashlib.sha256()
    for name in names:
        p = params[name].detach()
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(p.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def collect_gradients(
    model: torch.nn.Module,
    batches: Iterable[Mapping],
    task: object = "classification",
    out: str | None = None,
    *,
    blocks: str | Sequence[str] | None = None,
    dtype: str = "float32",
    num_examples: int | None = None,
    task_settings: Mapping | None = None,
    progress: bool | None = None,
):
    """Per-example gradients of the model's trainable LoRA (and head) parameters.

    Returns a mapping block name -> (n, numel) tensor (``dtype``, CPU) when ``out`` is None;
    otherwise writes a :class:`~datainf.gradients.store.GradientStore` at ``out`` and returns
    it. A row is the gradient of that example's loss alone (see
    :mod:`datainf.gradients.tasks`), flattened in the parameter's own layout. A store left
    incomplete by an interrupted run is resumed: only the missing rows are computed. A store
    made for another model, adapter, data or task is refused.
    """
    task = as_task(task, **dict(task_settings or {}))
    if dtype not in ("float32", "bfloat16"):
        raise DataInfError(f"dtype must be 'float32' or 'bfloat16', not {dtype!r}")
    layers, widths = select_blocks(model, blocks)
    store, done = None, 0
    if out is not None:
        from ..models.hf import model_fingerprint
        from .store import GradientStore

        n = _num_examples(batches, num_examples)
        identity = {
            "model": model_fingerprint(model, trainable_values=False),
            "adapter": adapter_fingerprint(model, widths),
            "task": task.settings(),
        }
        # a row holds the gradients of every pass (e.g. diffusion timesteps), concatenated
        columns = {name: width * task.num_passes for name, width in widths.items()}
        store = GradientStore.create_or_resume(out, columns, n, identity, dtype=dtype)
        done = store.rows_complete
    device = next(model.parameters()).device
    torch_dtype = getattr(torch, dtype)
    hasher = hashlib.sha256()
    collected: dict[str, list[torch.Tensor]] = {name: [] for name in widths}
    row = 0
    bar = tqdm(
        total=store.num_rows if store else None,
        initial=done,
        unit="ex",
        desc="gradients",
        disable=None if progress is None else not progress,
    )
    with _collecting(model, layers):
        for batch in batches:
            B = batch_size(batch)
            _check_rows(batch, B)
            for b in range(B):
                example_digest(hasher, batch, b)
                if (
                    store is not None
                    and row + b + 1 == done
                    and hasher.hexdigest() != store.data_hash
                ):
                    raise DataInfError(
                        f"the store at {out} was made from other data (its first {done} "
                        "examples differ from these); use another output folder or delete it"
                    )
            if row + B <= done:
                row += B
                continue
            rows = torch.arange(row, row + B)
            grads = _batch_gradients(model, task, layers, _to_device(batch, device), rows)
            keep = slice(max(done - row, 0), B)
            grads = {name: grads[name][keep].to(device="cpu", dtype=torch_dtype) for name in widths}
            if store is not None:
                if row + B > store.num_rows:
                    raise DataInfError(
                        f"the batches hold more than the {store.num_rows} examples announced"
                    )
                store.write_rows(row + keep.start, grads, data_hash=hasher.hexdigest())
            else:
                for name in widths:
                    collected[name].append(grads[name])
            bar.update(B - keep.start)
            row += B
    bar.close()
    if store is not None:
        if row != store.num_rows:
            raise DataInfError(
                f"the batches held {row} examples but {store.num_rows} were "
                f"announced; the store at {out} keeps the {store.rows_complete} "
                "rows written"
            )
        return store
    if row == 0:
        raise DataInfError("the batches held no examples")
    return {name: torch.cat(parts) for name, parts in collected.items()}
