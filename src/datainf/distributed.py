"""torch.distributed for datainf: which rows a rank owns, and the collectives the engine needs.

A run on several processes (started by ``torchrun``: NCCL on GPUs, gloo on CPUs) passes a
process group to the estimators, :func:`~datainf.gradients.collect.collect_gradients` and the
training loop. ``None`` means one process: every helper here is then the identity, so the
single-process code path is the distributed one with a world of size 1.

Rows are split into contiguous shards: rank r of W owns rows [r n / W, (r + 1) n / W) (integer
division), so the shards cover 0..n-1 in rank order and differ in size by at most one row.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import DataInfError


def world(group: object | None) -> tuple[int, int]:
    """(rank, size) of this process in ``group``; (0, 1) for None."""
    if group is None:
        return 0, 1
    if not (dist.is_available() and dist.is_initialized()):
        raise DataInfError(
            "a process group was given but torch.distributed is not initialised; call "
            "torch.distributed.init_process_group first (torchrun sets up what it needs)"
        )
    return dist.get_rank(group), dist.get_world_size(group)


def shard(num_rows: int, rank: int, size: int) -> tuple[int, int]:
    """Rows [start, stop) of rank ``rank`` of ``size``: contiguous, in rank order."""
    if not (0 <= rank < size):
        raise DataInfError(f"rank {rank} is not in a world of {size} processes")
    return rank * num_rows // size, (rank + 1) * num_rows // size


def all_reduce_sum(tensor: torch.Tensor, group: object | None) -> torch.Tensor:
    """Sum ``tensor`` over the ranks of ``group`` in place (every rank gets the same sum)."""
    if group is not None and world(group)[1] > 1:
        where = collective_device(group)
        if tensor.device == where:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        else:  # e.g. CPU tensors in an NCCL group: through the GPU and back
            moved = tensor.to(where)
            dist.all_reduce(moved, op=dist.ReduceOp.SUM, group=group)
            tensor.copy_(moved)
    return tensor


def all_reduce_max(value: float, group: object | None) -> float:
    """The largest ``value`` over the ranks (for decisions every rank must take alike)."""
    if group is None or world(group)[1] == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=collective_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t)


def all_gather_cat(tensor: torch.Tensor, group: object | None, dim: int = 0) -> torch.Tensor:
    """The ranks' tensors joined along ``dim`` in rank order; their sizes along ``dim`` may
    differ (they are padded for the collective and cut again). Every rank gets the result."""
    if group is None or world(group)[1] == 1:
        return tensor
    home, tensor = tensor.device, tensor.to(collective_device(group))
    size = world(group)[1]
    length = torch.tensor([tensor.shape[dim]], dtype=torch.int64, device=tensor.device)
    lengths = [torch.zeros_like(length) for _ in range(size)]
    dist.all_gather(lengths, length, group=group)
    lengths = [int(x) for x in lengths]
    longest = max(lengths)
    shape = list(tensor.shape)
    shape[dim] = longest - tensor.shape[dim]
    padded = torch.cat([tensor, tensor.new_zeros(shape)], dim=dim).contiguous()
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded, group=group)
    joined = torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, lengths, strict=True)],
                       dim=dim)
    return joined.to(home)


def broadcast_flag(flag: bool, group: object | None) -> bool:
    """Rank 0's ``flag`` on every rank (a decision taken once, followed by all)."""
    if group is None or world(group)[1] == 1:
        return flag
    t = torch.tensor([int(bool(flag))], dtype=torch.int64, device=collective_device(group))
    dist.broadcast(t, src=dist.get_global_rank(group, 0), group=group)
    return bool(t)


def barrier(group: object | None) -> None:
    """Wait for every rank of ``group`` (nothing to wait for in one process)."""
    if group is not None and world(group)[1] > 1:
        dist.barrier(group=group)


def collective_device(group: object) -> torch.device:
    """Where a collective's tensors live: CUDA for NCCL, the CPU otherwise."""
    if group is not None and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def launched_by_torchrun() -> bool:
    """Whether this process was started by torchrun (or another launcher setting its
    environment) as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_environment(device: str) -> object:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT, LOCAL_RANK) and return it: NCCL when ``device`` is CUDA (each
    rank on GPU LOCAL_RANK), gloo otherwise."""
    if not dist.is_available():
        raise DataInfError("this torch build has no torch.distributed; install one that has")
    if dist.is_initialized():
        return dist.group.WORLD
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=60))
    return dist.group.WORLD


def rank_device(device: str) -> str:
    """The device of this rank: ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun."""
    if device == "cuda" and launched_by_torchrun():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device
