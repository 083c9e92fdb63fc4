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

from ..distributed import (
    all_gather_cat,
    barrier,
    broadcast_flag,
    world,
)
from ..distributed import shard as shard_rows
from ..errors import DataInfError
from ..identity import adapter_fingerprint, example_digest, model_fingerprint
from .store import GradientStore
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
    process_group: object | None = None,
    shard: tuple[int, int] | None = None,
):
    """Per-example gradients of the model's trainable LoRA (and head) parameters.

    Returns a mapping block name -> (n, numel) tensor (``dtype``, CPU) when ``out`` is None;
    otherwise writes a :class:`~datainf.gradients.store.GradientStore` at ``out`` and returns
    it. A row is the gradient of that example's loss alone (see
    :mod:`datainf.gradients.tasks`), flattened in the parameter's own layout. A store left
    incomplete by an interrupted run is resumed: only the missing rows are computed. A store
    made for another model, adapter, data or task is refused.

    With a torch.distributed ``process_group`` of W ranks (each passing the same batches),
    a new store is made for W shards and each rank computes and writes its own (rank r: shard
    r, see :mod:`datainf.distributed`); every rank returns the complete store (in
    memory: every rank gets all rows). ``shard=(r, W)`` does rank r's part in this process
    alone, without a group: to re-run a rank that died (in memory: that shard's rows are
    returned). The shards of an existing store are
    dealt to the ranks round-robin, so any number of processes can finish it; one process
    alone finishes every shard.
    """
    task = as_task(task, **dict(task_settings or {}))
    if dtype not in ("float32", "bfloat16"):
        raise DataInfError(f"dtype must be 'float32' or 'bfloat16', not {dtype!r}")
    if process_group is not None and shard is not None:
        raise DataInfError("give a process_group or a shard=(rank, world size), not both")
    rank, size = world(process_group) if shard is None else _checked_shard(shard)
    layers, widths = select_blocks(model, blocks)
    store, n = None, None
    if out is not None:
        n = _num_examples(batches, num_examples)
        store = _open_store(out, model, task, widths, n, dtype, size, rank, process_group)
        n = store.num_rows
        todo = [store.shard_progress(s) for s in range(store.shards) if s % size == rank]
        parts = [_Part(lo, hi, lo + done, digest) for lo, hi, done, digest in todo]
    elif size > 1:
        n = _num_examples(batches, num_examples)
        parts = [_Part(*shard_rows(n, rank, size))]
    else:
        parts = [_Part(0, None)]  # every row; n is known at the end
    device = next(model.parameters()).device
    torch_dtype = getattr(torch, dtype)
    collected: dict[str, list[torch.Tensor]] = {name: [] for name in widths}
    row = 0
    bar = tqdm(
        total=sum(p.stop - p.start for p in parts) if n is not None else None,
        initial=sum(p.first - p.start for p in parts),
        unit="ex",
        desc="gradients",
        disable=True if rank > 0 else (None if progress is None else not progress),
    )
    with _collecting(model, layers):
        for batch in batches:
            B = batch_size(batch)
            _check_rows(batch, B)
            if n is not None and row + B > n:
                raise DataInfError(f"the batches hold more than the {n} examples announced")
            wanted = []  # (part, first row, stop row) to compute in this batch
            for part in parts:
                a = max(part.start, row)
                b = row + B if part.stop is None else min(part.stop, row + B)
                for i in range(a, b):
                    example_digest(part.hasher, batch, i - row)
                    if (i + 1 == part.first and part.digest is not None
                            and part.hasher.hexdigest() != part.digest):
                        raise DataInfError(
                            f"the store at {out} was made from other data (its examples "
                            f"{part.start}..{part.first - 1} differ from these); use another "
                            "output folder or delete it"
                        )
                if max(a, part.first) < b:
                    wanted.append((part, max(a, part.first), b))
            if wanted:
                a, b = min(w[1] for w in wanted), max(w[2] for w in wanted)
                sub = _rows_of(batch, a - row, b - row, B)
                grads = _batch_gradients(model, task, layers, _to_device(sub, device),
                                         torch.arange(a, b))
                for part, first, stop in wanted:
                    chunk = {name: grads[name][first - a : stop - a].to(device="cpu",
                                                                        dtype=torch_dtype)
                             for name in widths}
                    if store is not None:
                        store.write_rows(first, chunk, data_hash=part.hasher.hexdigest())
                    else:
                        for name in widths:
                            collected[name].append(chunk[name])
                    part.first = stop
                    bar.update(stop - first)
            row += B
    bar.close()
    if n is not None and row != n:
        kept = f"; the store at {out} keeps the {store.rows_complete} rows written" \
            if store is not None else ""
        raise DataInfError(f"the batches held {row} examples but {n} were announced{kept}")
    if store is not None:
        return _finished(store, process_group)
    if row == 0:
        raise DataInfError("the batches held no examples")
    local = {name: torch.cat(chunks) if chunks else
             torch.zeros(0, widths[name] * task.num_passes, dtype=torch_dtype)
             for name, chunks in collected.items()}
    if size == 1 or shard is not None:
        return local
    return {name: all_gather_cat(value, process_group) for name, value in local.items()}


@dataclass
class _Part:
    """Rows start..stop-1 (stop None: to the end) that this process fills: ``first`` is the
    first one still missing, ``digest`` the hash committed with the rows before it (None:
    unknown), ``hasher`` the running hash of the part's examples read so far."""

    start: int
    stop: int | None
    first: int = -1
    digest: str | None = ""
    hasher: object = field(default_factory=hashlib.sha256)

    def __post_init__(self) -> None:
        if self.first < 0:
            self.first = self.start


def _checked_shard(shard: tuple[int, int]) -> tuple[int, int]:
    if (not isinstance(shard, tuple) or len(shard) != 2
            or not all(isinstance(x, int) for x in shard) or not 0 <= shard[0] < shard[1]):
        raise DataInfError(f"shard must be (rank, world size) with 0 <= rank < size, not "
                           f"{shard!r}")
    return shard


def _rows_of(batch: Mapping, a: int, b: int, B: int) -> Mapping:
    """Examples a..b-1 of a batch of B (the batch itself when that is all of it)."""
    if (a, b) == (0, B):
        return batch
    return {k: v[a:b] if isinstance(v, torch.Tensor) or (isinstance(v, Sequence)
                                                         and not isinstance(v, str)) else v
            for k, v in batch.items()}


def _open_store(out, model, task, widths, n, dtype, size, rank, group):
    """The store at ``out``, created for ``size`` shards by rank 0 (the others wait for it and
    then open it, so that only one process ever creates files)."""
    identity = {
        "model": model_fingerprint(model, trainable_values=False),
        "adapter": adapter_fingerprint(model, widths),
        "task": task.settings(),
    }
    # a row holds the gradients of every pass (e.g. diffusion timesteps), concatenated
    columns = {name: width * task.num_passes for name, width in widths.items()}

    def create():
        return GradientStore.create_or_resume(out, columns, n, identity, dtype=dtype,
                                              shards=size)

    if group is None:
        return create()
    store, error = None, None
    if rank == 0:
        try:
            store = create()
        except DataInfError as e:
            error = e
    if not broadcast_flag(error is None, group):
        if error is not None:
            raise error
        raise DataInfError(f"rank 0 could not open the gradient store at {out}; see its error")
    return store if rank == 0 else create()


def _finished(store, group):
    """The store, marked complete if this process wrote its last rows; with a group, after
    every rank is done (then complete on every rank)."""
    store.finish()
    if group is None:
        return store
    barrier(group)
    if world(group)[0] == 0:
        store.finish()  # (done already by whoever wrote last; again, should a file lag)
    barrier(group)
    return GradientStore.open(store.path)
