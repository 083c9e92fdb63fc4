"""Influence-engine benchmark: every number is measured in this one run and printed as a ratio.

    .venv/bin/python benchmarks/bench_estimators.py            # the sizes of the issue
    .venv/bin/python benchmarks/bench_estimators.py --blocks 12 --pairwise-blocks 10  # less memory

1. DataInf aggregate, n = 4500 train / 500 test, 48 blocks of 4096 (the paper's QQP at rank 4),
   against the floor: three streaming passes over the same gradients (one matrix-vector
   product per chunk each), the passes the closed form needs. Goal: <= 1.5x the floor.
2. The same computation in the authors' shape (Python loops over training examples, per
   block). Goal: >= 10x slower than ours.
3. Exact on the same gradients. Goal: <= 180 s on this 2-core CPU (paper: 11,279 s on an A40).
4. Pairwise DataInf, m = 100 test x n = 900 train, 40 blocks of 8 x 5120, against the float32
   matrix-multiply rate of this machine measured in the same run. Goal: >= 50% of it.
"""

from __future__ import annotations

import argparse
import time

import torch

from datainf import DataInf, Exact


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def random_blocks(n: int, blocks: int, width: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for b in range(blocks):
        row_scale = torch.rand(n, 1, generator=g) + 0.5      # uneven per-example norms
        out[f"layer{b}.lora"] = torch.randn(n, width, generator=g) * row_scale
    return out


def matmul_rate(size: int = 4096, repeats: int = 5) -> float:
    """Best float32 GFLOP/s of a square (size x size) @ (size x size) product."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(timed(lambda: a @ b)[1] for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def streaming_floor(train: dict[str, torch.Tensor]) -> float:
    """Seconds for three passes over every block, one whole-block matrix-vector product each.

    The fastest way found here to read every gradient entry once (faster than chunked reads).
    """
    vectors = {k: torch.randn(v.shape[1]) for k, v in train.items()}
    start = time.perf_counter()
    for _ in range(3):
        for name, block in train.items():
            block @ vectors[name]
    return time.perf_counter() - start


def authors_shape(train: dict[str, torch.Tensor], test: dict[str, torch.Tensor]) -> torch.Tensor:
    """DataInf aggregate written the way the authors' code is shaped: loops over examples."""
    n = next(iter(train.values())).shape[0]
    v = {k: t.mean(0) for k, t in test.items()}
    r = {}
    for name, block in train.items():
        lam = 0.0
        for i in range(n):
            lam += float(torch.sum(block[i] ** 2))
        lam = 0.1 * lam / (n * block.shape[1])
        r[name] = torch.zeros_like(v[name])
        for i in range(n):
            g = block[i]
            c = torch.sum(v[name] * g) / (lam + torch.sum(g**2))
            r[name] += (v[name] - c * g) / (n * lam)
    scores = torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        total = 0.0
        for name, block in train.items():
            total += float(torch.sum(r[name] * block[i]))
        scores[i] = -total
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=4500)
    parser.add_argument("--m", type=int, default=500)
    parser.add_argument("--blocks", type=int, default=48)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--pairwise-blocks", type=int, default=40)
    parser.add_argument("--skip-exact", action="store_true")
    parser.add_argument("--skip-authors", action="store_true")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []

    gemm = matmul_rate()
    print(f"float32 matrix-multiply rate (4096^3): {gemm:.1f} GFLOP/s")

    print(f"\n[1-3] aggregate: n={args.n}, m={args.m}, {args.blocks} blocks of {args.width}")
    train = random_blocks(args.n, args.blocks, args.width, seed=0)
    test = random_blocks(args.m, args.blocks, args.width, seed=1)
    gb = sum(t.numel() for t in train.values()) * 4 / 1e9
    print(f"training gradients: {gb:.2f} GB float32")
    ours, t_ours = timed(lambda: DataInf(progress=False).fit(train).score(test, aggregate=True))
    ours, t_ours2 = timed(lambda: DataInf(progress=False).fit(train).score(test, aggregate=True))
    t_ours = min(t_ours, t_ours2)
    t_floor = min(streaming_floor(train) for _ in range(3))
    print(f"DataInf aggregate (fit + score): {t_ours:.2f} s; floor (3 streaming passes): "
          f"{t_floor:.2f} s; ratio {t_ours / t_floor:.2f}x (goal <= 1.5x)")
    rows.append(("DataInf aggregate / streaming floor", t_ours / t_floor, "<= 1.5",
                 t_ours / t_floor <= 1.5))

    if not args.skip_authors:
        theirs, t_theirs = timed(lambda: authors_shape(train, test))
        diff = float((theirs - ours).abs().max() / ours.abs().max())
        print(f"authors' shape (Python loops): {t_theirs:.1f} s; ours is "
              f"{t_theirs / t_ours:.0f}x faster (goal >= 10x); max rel. difference {diff:.1e}")
        rows.append(("authors' loop / ours", t_theirs / t_ours, ">= 10", t_theirs / t_ours >= 10))

    if not args.skip_exact:
        exact, t_exact = timed(lambda: Exact(progress=False).fit(train).score(test,
                                                                             aggregate=True))
        corr = float(torch.corrcoef(torch.stack([exact, ours]))[0, 1])
        print(f"Exact (fit + score): {t_exact:.1f} s (goal <= 180 s; paper 11,279 s on an A40); "
              f"Pearson(DataInf, Exact) = {corr:.3f}")
        rows.append(("Exact seconds", t_exact, "<= 180", t_exact <= 180))
    del train, test

    print(f"\n[4] pairwise: m=100, n=900, {args.pairwise_blocks} blocks of 8 x 5120")
    d = 8 * 5120
    train = random_blocks(900, args.pairwise_blocks, d, seed=2)
    test = random_blocks(100, args.pairwise_blocks, d, seed=3)
    est = DataInf(progress=False).fit(train)
    _, t_pair = timed(lambda: est.score(test))
    _, t_pair2 = timed(lambda: est.score(test))
    t_pair = min(t_pair, t_pair2)
    flops = 6 * 100 * 900 * d * args.pairwise_blocks     # V G^T, C G and R G^T: 2 m n d each
    rate = flops / t_pair / 1e9
    print(f"pairwise score: {t_pair:.2f} s, {rate:.1f} GFLOP/s = {rate / gemm:.0%} of the "
          f"matrix-multiply rate (goal >= 50%)")
    rows.append(("pairwise GFLOP/s / matmul rate", rate / gemm, ">= 0.5", rate / gemm >= 0.5))

    print("\nsummary")
    for label, value, goal, ok in rows:
        print(f"  {label:<40}{value:>10.2f}  goal {goal:<8} {'met' if ok else 'NOT MET'}")


if __name__ == "__main__":
    main()
