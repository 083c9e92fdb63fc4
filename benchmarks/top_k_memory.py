"""Peak memory of pairwise scoring as the number of training examples n grows 4x: the full
(m, n) matrix of `score` against `top_k`, which scores the training rows a chunk at a time.

    .venv/bin/python benchmarks/top_k_memory.py            # n = 10,000 and 40,000
    .venv/bin/python benchmarks/top_k_memory.py --n 2000   # smaller

Gradient stores of n and 4n rows (8 blocks of 1,024, float32, generated) are written to a
temporary folder; each measurement runs in a fresh process that samples its anonymous resident
memory (RssAnon: not the store's memory-mapped pages, which the kernel can drop) every 5 ms
and prints the peak above the process's baseline. Ratios (4n / n) are from this one run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

BLOCKS, WIDTH, M, K, CHUNK = 8, 1024, 512, 10, 2048


def rss_anon() -> int:
    """Anonymous resident memory of this process, bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def write_store(path: Path, n: int) -> None:
    from datainf.gradients.store import GradientStore

    store = GradientStore.create_or_resume(path, {f"b{i}": WIDTH for i in range(BLOCKS)}, n,
                                           {"benchmark": n})
    g = torch.Generator().manual_seed(n)
    for start in range(0, n, 5000):
        rows = min(5000, n - start)
        store.write_rows(start, {f"b{i}": torch.randn(rows, WIDTH, generator=g)
                                 for i in range(BLOCKS)}, data_hash=str(start))


def measure(path: str, mode: str) -> None:
    """In a fresh process: fit DataInf on the store, score M test rows, print peak MiB."""
    from datainf import DataInf
    from datainf.gradients.store import GradientStore

    store = GradientStore.open(path)
    g = torch.Generator().manual_seed(0)
    test = {name: torch.randn(M, WIDTH, generator=g) for name in store.block_names}
    est = DataInf(progress=False, chunk_rows=CHUNK).fit(store)
    base, peak, done = rss_anon(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon())
            time.sleep(0.005)

    thread = threading.Thread(target=sample)
    thread.start()
    start = time.perf_counter()
    if mode == "score":
        result = est.score(test)
    else:
        result = est.top_k(test, K, chunk_rows=CHUNK)
    seconds = time.perf_counter() - start
    done.set()
    thread.join()
    del result
    print(f"{(peak[0] - base) / 2**20:.1f} {seconds:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000)
    args = parser.parse_args()
    sizes = (args.n, 4 * args.n)
    with tempfile.TemporaryDirectory() as folder:
        results = {}
        for n in sizes:
            path = Path(folder) / f"n{n}"
            write_store(path, n)
            for mode in ("score", "top_k"):
                out = subprocess.run([sys.executable, __file__, "--measure", str(path), mode],
                                     check=True, capture_output=True, text=True).stdout.split()
                results[n, mode] = (float(out[0]), float(out[1]))
                print(f"n = {n:>7,}  {mode:<6} peak {results[n, mode][0]:8.1f} MiB above "
                      f"baseline, {results[n, mode][1]:.2f} s", flush=True)
    for mode in ("score", "top_k"):
        ratio = results[sizes[1], mode][0] / max(results[sizes[0], mode][0], 1e-9)
        print(f"{mode:<6} peak memory 4n / n: {ratio:.2f}  (m = {M}, k = {K}, chunk {CHUNK})")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--measure":
        measure(sys.argv[2], sys.argv[3])
    else:
        main()
