"""Where collected gradients go, and which rows this process fills: a store on disk (new, or
resumed: only the rows still missing) or memory. Each sink plans its ``parts`` (row ranges
of this process: the store's shards dealt round-robin, or this rank's shard), takes the rows
as they come (``write``) and gives the result once the batches are done (``finish``)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from ..distributed import all_gather_cat, barrier, broadcast_flag, world
from ..distributed import shard as shard_rows
from ..errors import DataInfError
from ..identity import adapter_fingerprint, model_fingerprint
from .store import GradientStore


@dataclass
class Part:
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


class ToStore:
    """Rows into the store at ``out`` for ``n`` examples, made for ``size`` shards (rank 0
    creates it, the others then open it) or resumed; this process fills the shards s with
    s % size == rank, from their first missing row."""

    def __init__(self, out: str, model: torch.nn.Module, task, widths: dict[str, int], n: int,
                 dtype: str, rank: int, size: int, group: object | None) -> None:
        self.out, self.group = out, group
        self.store = _open_store(out, model, task, widths, n, dtype, size, rank, group)
        self.n = self.store.num_rows
        todo = [self.store.shard_progress(s) for s in range(self.store.shards)
                if s % size == rank]
        self.parts = [Part(lo, hi, lo + done, digest) for lo, hi, done, digest in todo]

    def write(self, part: Part, first: int, chunk: dict[str, torch.Tensor]) -> None:
        self.store.write_rows(first, chunk, data_hash=part.hasher.hexdigest())

    def finish(self, rows: int) -> GradientStore:
        """The store, once the batches gave all ``rows``: marked complete if this process
        wrote its last rows; with a group, after every rank is done (then complete on every
        rank)."""
        if rows != self.n:
            raise DataInfError(f"the batches held {rows} examples but {self.n} were announced; "
                               f"the store at {self.out} keeps the {self.store.rows_complete} "
                               "rows written")
        self.store.finish()
        if self.group is None:
            return self.store
        barrier(self.group)
        if world(self.group)[0] == 0:
            self.store.finish()  # (done already by whoever wrote last; again, should a file lag)
        barrier(self.group)
        return GradientStore.open(self.store.path)


class ToMemory:
    """Rows into memory: every row (``n`` None: known at the end), or with ``size`` > 1 this
    rank's shard of ``n``; ``gather``: every rank gets all rows at the end."""

    def __init__(self, widths: dict[str, int], columns: int, dtype: torch.dtype, rank: int,
                 size: int, n: int | None, gather: bool, group: object | None) -> None:
        self.widths, self.columns, self.dtype = widths, columns, dtype
        self.n, self.gather, self.group = n, gather, group
        self.parts = [Part(*shard_rows(n, rank, size))] if size > 1 else [Part(0, None)]
        self.collected: dict[str, list[torch.Tensor]] = {name: [] for name in widths}

    def write(self, part: Part, first: int, chunk: dict[str, torch.Tensor]) -> None:
        for name in self.widths:
            self.collected[name].append(chunk[name])

    def finish(self, rows: int) -> dict[str, torch.Tensor]:
        """block name -> (rows, width x passes) tensor."""
        if self.n is not None and rows != self.n:
            raise DataInfError(f"the batches held {rows} examples but {self.n} were announced")
        if rows == 0:
            raise DataInfError("the batches held no examples")
        local = {name: torch.cat(chunks) if chunks else
                 torch.zeros(0, self.widths[name] * self.columns, dtype=self.dtype)
                 for name, chunks in self.collected.items()}
        if not self.gather:
            return local
        return {name: all_gather_cat(value, self.group) for name, value in local.items()}


def _open_store(out, model, task, widths, n, dtype, size, rank, group) -> GradientStore:
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
