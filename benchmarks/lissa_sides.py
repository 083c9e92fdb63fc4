"""LiSSA's recursion on the n x n side against the d side, on the diffusion study's shapes
(LoRA r 8 on the digit UNet's attention, 6 timesteps: blocks of 3,072 and 18,432 columns;
n = 600 training images; a batch of 64 queries), the same fit and scores, in one run:

    .venv/bin/python benchmarks/lissa_sides.py [--blocks 8] [--n 600] [--m 64]

Prints the seconds of each side, their ratio, and the largest relative difference of the
scores (the same recursion: float rounding only).
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

import datainf.methods.lissa as lissa
from datainf import LiSSA


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=8, help="blocks of each width")
    parser.add_argument("--n", type=int, default=600)
    parser.add_argument("--m", type=int, default=64)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", "LiSSA did not converge")
    g = torch.Generator().manual_seed(0)
    widths = {f"b{i}-{d}": d for i in range(args.blocks) for d in (3072, 18432)}
    train = {k: torch.randn(args.n, d, generator=g) for k, d in widths.items()}
    test = {k: torch.randn(args.m, d, generator=g) for k, d in widths.items()}
    found = {}
    for side, limit in (("n x n side", lissa.DUAL_BYTES), ("d side", 0)):
        lissa.DUAL_BYTES = limit
        est = LiSSA(progress=False).fit(train)
        start = time.perf_counter()
        scores = est.score(test)
        found[side] = (time.perf_counter() - start, scores, est.worst_convergence())
    (fast, a, ca), (slow, b, cb) = found["n x n side"], found["d side"]
    print(f"{len(widths)} blocks, n {args.n}, m {args.m}: score() n x n side {fast:.2f} s "
          f"({ca.iterations} iterations), d side {slow:.2f} s ({cb.iterations}); "
          f"{slow / fast:.1f}x faster; max rel. diff of the scores "
          f"{float((a - b).abs().max() / b.abs().max()):.1e}")


if __name__ == "__main__":
    main()
