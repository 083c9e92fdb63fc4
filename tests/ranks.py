"""Run a function on several processes joined in a gloo process group (what torchrun gives
each rank), on this CPU machine: ``run_ranks(target, size, folder, *args)`` calls
``target(rank, group, *args)`` in ``size`` fresh processes and waits for all of them."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_ranks(target, size: int, folder: Path, *args) -> None:
    """Start ``size`` processes (spawned, as torchrun would), each in the group; raise if one
    fails."""
    init = Path(folder) / f"init-{os.getpid()}-{id(target)}"
    init.unlink(missing_ok=True)
    mp.start_processes(_entry, args=(target, size, str(init), args), nprocs=size,
                       start_method="spawn", join=True)


def _entry(rank: int, target, size: int, init: str, args: tuple) -> None:
    torch.set_num_threads(1)  # two cores shared by every rank
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=size)
    try:
        target(rank, dist.group.WORLD, *args)
    finally:
        dist.destroy_process_group()
