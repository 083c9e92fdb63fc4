"""Per-example gradients of a model's LoRA tensors over a stream of batches, into a store on
disk or into memory. Three steps: the sink plans which rows this process fills
(:mod:`datainf.gradients.sinks`: a new or resumed store, or memory; a shard under
torch.distributed); :class:`_Rows` streams the batches, checks each example against the
digest of the rows a store holds already and slices out the rows still to compute; the hooks
(:mod:`datainf.gradients.hooks`) compute their gradients with one batched backward.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..distributed import world
from ..errors import DataInfError
from ..identity import example_digest
from .hooks import batch_gradients, collecting, select_blocks
from .sinks import Part, ToMemory, ToStore
from .tasks import as_task, batch_size


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
    torch_dtype = getattr(torch, dtype)
    if out is not None:
        sink = ToStore(out, model, task, widths, _num_examples(batches, num_examples), dtype,
                       rank, size, process_group)
    else:
        n = _num_examples(batches, num_examples) if size > 1 else None
        sink = ToMemory(widths, task.num_passes, torch_dtype, rank, size, n,
                        gather=size > 1 and shard is None, group=process_group)
    device = next(model.parameters()).device
    stream = _Rows(batches, sink.parts, sink.n, out)
    bar = tqdm(
        total=sum(p.stop - p.start for p in sink.parts) if sink.n is not None else None,
        initial=sum(p.first - p.start for p in sink.parts),
        unit="ex",
        desc="gradients",
        disable=True if rank > 0 else (None if progress is None else not progress),
    )
    with collecting(model, layers):
        for rows, a, wanted in stream:
            grads = batch_gradients(model, task, layers, _to_device(rows, device),
                                    torch.arange(a, a + batch_size(rows)))
            for part, first, stop in wanted:
                sink.write(part, first, {name: grads[name][first - a : stop - a].to(
                    device="cpu", dtype=torch_dtype) for name in widths})
                part.first = stop
                bar.update(stop - first)
    bar.close()
    return sink.finish(stream.rows)


@dataclass
class _Rows:
    """The examples of ``batches`` in order (``rows``: how many so far). Each example of a
    part is hashed into its running digest, which must equal the digest a resumed store
    committed with its rows; per batch, yields (the batch's rows a..b-1 still to compute, a,
    [(part, first, stop)])."""

    batches: Iterable[Mapping]
    parts: list[Part]
    n: int | None
    out: str | None
    rows: int = 0

    def __iter__(self) -> Iterator[tuple[Mapping, int, list[tuple[Part, int, int]]]]:
        for batch in self.batches:
            row, B = self.rows, batch_size(batch)
            _check_rows(batch, B)
            if self.n is not None and row + B > self.n:
                raise DataInfError(f"the batches hold more than the {self.n} examples announced")
            wanted = []  # (part, first row, stop row) to compute in this batch
            for part in self.parts:
                a = max(part.start, row)
                b = row + B if part.stop is None else min(part.stop, row + B)
                for i in range(a, b):
                    example_digest(part.hasher, batch, i - row)
                    if (i + 1 == part.first and part.digest is not None
                            and part.hasher.hexdigest() != part.digest):
                        raise DataInfError(
                            f"the store at {self.out} was made from other data (its examples "
                            f"{part.start}..{part.first - 1} differ from these); use another "
                            "output folder or delete it"
                        )
                if max(a, part.first) < b:
                    wanted.append((part, max(a, part.first), b))
            self.rows += B
            if wanted:
                a, b = min(w[1] for w in wanted), max(w[2] for w in wanted)
                yield _rows_of(batch, a - row, b - row, B), a, wanted


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
