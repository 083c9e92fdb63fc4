"""Per-example costs that docs/scaling.md extrapolates from, measured on this machine.

    .venv/bin/python benchmarks/scaling_costs.py                 # CPU
    .venv/bin/python benchmarks/scaling_costs.py --device cuda   # a GPU, where there is one

1. Gradient collection: SmolLM2-135M-Instruct with LoRA r = 8 on q/v (the explain-generation
   default), sequences of 128 and 256 tokens, batches of 8: seconds per example in memory and
   into a float32 store (the difference is the store's cost), and the effective rate in
   FLOP/s under the model "4 N T FLOPs per example" (forward 2 N T, backward to the
   activations 2 N T; N parameters, T tokens).
2. Scoring from a store: a float32 store of n rows with SmolLM2's LoRA block shapes (60
   blocks, 460,800 gradient entries per row, random values) and its bfloat16 copy. DataInf
   aggregate (fit + the influence on the mean test loss) and pairwise top-k for m queries
   (``top_k``), each in a fresh process (the store read from the page cache after a first
   pass): seconds per row, nanoseconds per gradient entry, and the GB/s of store read.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# SmolLM2-135M: 30 layers, hidden 576, q 576 -> 576, v 576 -> 192 (3 key/value heads of 64)
SMOLLM2_BLOCKS = {}
for layer in range(30):
    for proj, out in (("q_proj", 576), ("v_proj", 192)):
        SMOLLM2_BLOCKS[f"layers.{layer}.{proj}.lora_A"] = 8 * 576
        SMOLLM2_BLOCKS[f"layers.{layer}.{proj}.lora_B"] = out * 8


def collection(device: str, lengths: tuple[int, ...], examples: int, batch: int) -> list[dict]:
    from datainf import collect_gradients
    from datainf.data.text import bbc_news
    from datainf.models.hf import add_lora, load_causal_lm

    torch.manual_seed(0)
    model, tokenizer = load_causal_lm("smollm2")
    model = add_lora(model, r=8, alpha=8, target_modules=("q_proj", "v_proj")).to(device)
    params = sum(p.numel() for p in model.parameters())
    texts, _ = bbc_news()
    found = []
    for length in lengths:
        batches = []
        for s in range(0, examples, batch):
            b = dict(tokenizer(texts[s : s + batch], truncation=True, max_length=length,
                               padding="max_length", return_tensors="pt"))
            labels = b["input_ids"].clone()
            labels[:, : length // 2] = -100  # the "prompt" half is not scored
            b["labels"] = labels
            batches.append(b)
        collect_gradients(model, batches[:1], "causal_lm", progress=False)  # warm-up
        times = {}
        for where in ("memory", "store"):
            with tempfile.TemporaryDirectory(dir="runs") as folder:
                out = os.path.join(folder, "g") if where == "store" else None
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
                collect_gradients(model, batches, "causal_lm", out=out, progress=False)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                times[where] = (time.perf_counter() - start) / examples
        flops = 4 * params * length
        row = {"length": length, "params": params, "s_per_example_memory": times["memory"],
               "s_per_example_store": times["store"],
               "effective_tflops": flops / times["memory"] / 1e12}
        print(f"collection, SmolLM2-135M r8 q/v, {length} tokens: "
              f"{1000 * times['memory']:.1f} ms/example in memory, "
              f"{1000 * times['store']:.1f} ms/example into a store; "
              f"{row['effective_tflops'] * 1000:.0f} GFLOP/s at 4 N T")
        found.append(row)
    return found


SCORE_CHILD = r"""
import json, sys, time, torch
from datainf import DataInf
from datainf.gradients.store import GradientStore

path, mode, m, device = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
store = GradientStore.open(path)
g = torch.Generator().manual_seed(1)
test = {k: torch.randn(m, d, generator=g) for k, d in store.block_widths.items()}
times = []
for _ in range(2):  # the first reads the files into the page cache
    start = time.perf_counter()
    est = DataInf(progress=False, device=device).fit(store)
    if mode == "aggregate":
        out = est.score(test, aggregate=True)
    else:
        out = est.top_k(test, 10).helpful
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    times.append(time.perf_counter() - start)
print(json.dumps({"seconds": times}))
"""


def make_store(path: str, n: int, dtype: str) -> None:
    from datainf.gradients.store import GradientStore

    store = GradientStore.create_or_resume(path, SMOLLM2_BLOCKS, n, {"bench": n}, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    for start in range(0, n, 250):
        b = min(250, n - start)
        store.write_rows(start, {k: torch.randn(b, d, generator=g)
                                 for k, d in SMOLLM2_BLOCKS.items()}, data_hash=str(start))


def scoring(device: str, n: int, queries: int) -> list[dict]:
    d = sum(SMOLLM2_BLOCKS.values())
    found = []
    with tempfile.TemporaryDirectory(dir="runs") as folder:
        for dtype, size in (("float32", 4), ("bfloat16", 2)):
            path = os.path.join(folder, dtype)
            start = time.perf_counter()
            make_store(path, n, dtype)
            written = time.perf_counter() - start
            print(f"store of {n} rows x {d} entries, {dtype}: {n * d * size / 1e9:.2f} GB "
                  f"(random rows drawn and written in {written:.0f} s)")
            for mode, m in (("aggregate", 1), ("top_k", queries)):
                out = subprocess.run([sys.executable, "-c", SCORE_CHILD, path, mode, str(m),
                                      device], check=True, capture_output=True, text=True)
                seconds = min(json.loads(out.stdout)["seconds"])
                # two passes over the store: preconditioning (DataInf's sum), then scoring
                read = 2 * n * d * size / 1e9
                row = {"dtype": dtype, "mode": mode, "queries": m, "n": n, "d": d,
                       "seconds": seconds, "ns_per_entry": 1e9 * seconds / (n * d),
                       "read_gb_per_s": read / seconds}
                print(f"  {mode} (m = {m}) from {dtype}: {seconds:.2f} s, "
                      f"{row['ns_per_entry']:.2f} ns per row entry, "
                      f"{row['read_gb_per_s']:.2f} GB/s of store read (2 passes)")
                found.append(row)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--store-rows", type=int, default=2000)
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()
    os.makedirs("runs", exist_ok=True)
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    figures = {"device": args.device,
               "collection": collection(args.device, (128, 256), args.examples, 8),
               "scoring": scoring(args.device, args.store_rows, args.queries)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
