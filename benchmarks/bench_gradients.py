"""Per-example gradient throughput and store-backed scoring; ratios measured in one run.

    .venv/bin/python benchmarks/bench_gradients.py                # everything
    .venv/bin/python benchmarks/bench_gradients.py --skip-smollm2 --store-rows 20000 80000

1. MiniLM-L6 + LoRA (r = 8, query/value, plus the head), max length 128: hook-based
   per-example gradients (collect_gradients) against (a) a plain training step (forward +
   backward) on the same batches and (b) a loop of batch-size-1 backward passes.
   Goals: <= 1.5x the training step, >= 2x faster than the loop.
2. The same for SmolLM2-135M-Instruct (LoRA r = 8 on q/v), sequence length 128, the loss on
   the second half of each sequence.
3. DataInf aggregate straight from a gradient store of n = 20,000 and 80,000 rows (generated
   gradients, 16 blocks of 1536): peak RSS must stay flat as n grows 4x, time must grow ~4x.
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


def single_example(batch: dict, b: int) -> dict:
    """Example b of a padded batch, as a batch of one without its padding."""
    keep = batch["attention_mask"][b].bool()
    one = {}
    for key, value in batch.items():
        row = value[b : b + 1]
        one[key] = row[:, keep] if row.ndim == 2 and row.shape[1] == len(keep) else row
    return one


def per_example_loop(model, batches, loss_fn):
    """Seconds for one forward/backward per unpadded example, gradients copied out."""
    params = [p for p in model.parameters() if p.requires_grad]
    start = time.perf_counter()
    for batch in batches:
        for b in range(len(batch["input_ids"])):
            grads = torch.autograd.grad(loss_fn(model, single_example(batch, b)), params)
            _ = [g.reshape(-1).clone() for g in grads]
    return time.perf_counter() - start


def training_steps(model, batches, loss_fn):
    """Seconds for forward + backward of the batch loss (no optimizer step)."""
    start = time.perf_counter()
    for batch in batches:
        model.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()
    return time.perf_counter() - start


def hooked(model, batches, task):
    from datainf import collect_gradients

    start = time.perf_counter()
    collect_gradients(model, batches, task, progress=False)
    return time.perf_counter() - start


def compare(label, model, batches, task, loss_fn, rows):
    model.eval()
    n = sum(len(b["input_ids"]) for b in batches)
    hooked(model, batches[:1], task)  # warm-up
    t_hook = min(hooked(model, batches, task) for _ in range(2))
    t_step = min(training_steps(model, batches, loss_fn) for _ in range(2))
    t_loop = per_example_loop(model, batches, loss_fn)
    print(f"{label}: hooks {1000 * t_hook / n:.1f} ms/example ({n / t_hook:.1f} ex/s); "
          f"training step {1000 * t_step / n:.1f} ms/example; batch-size-1 loop "
          f"{1000 * t_loop / n:.1f} ms/example")
    rows.append((f"{label}: hooks / training step", t_hook / t_step, "<= 1.5",
                 t_hook / t_step <= 1.5))
    rows.append((f"{label}: loop / hooks", t_loop / t_hook, ">= 2", t_loop / t_hook >= 2))


def minilm(rows, examples: int, batch_size: int):
    import torch.nn.functional as F

    from datainf.data.text import bbc_news
    from datainf.models.hf import add_lora, load_classifier

    torch.manual_seed(0)
    texts, labels = bbc_news()
    classes = sorted(set(labels))
    model, tokenizer = load_classifier("minilm", len(classes))
    model = add_lora(model, r=8, alpha=16, target_modules=("query", "value"))
    pick = list(range(0, len(texts), len(texts) // examples))[:examples]
    batches = []
    for s in range(0, examples, batch_size):
        idx = pick[s : s + batch_size]
        batch = dict(tokenizer([texts[i] for i in idx], truncation=True, max_length=128,
                               padding=True, return_tensors="pt"))
        batch["labels"] = torch.tensor([classes.index(labels[i]) for i in idx])
        batches.append(batch)

    def loss(model, batch):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return F.cross_entropy(model(**inputs).logits, batch["labels"], reduction="sum")

    compare("MiniLM-L6 r=8, length 128", model, batches, "classification", loss, rows)


def smollm2(rows, examples: int, batch_size: int):
    from datainf.data.text import bbc_news
    from datainf.models.hf import add_lora, load_causal_lm

    torch.manual_seed(0)
    model, tokenizer = load_causal_lm("smollm2")
    model = add_lora(model, r=8, alpha=16, target_modules=("q_proj", "v_proj"))
    texts, _ = bbc_news()
    batches = []
    for s in range(0, examples, batch_size):
        batch = dict(tokenizer(texts[s : s + batch_size], truncation=True, max_length=128,
                               padding="max_length", return_tensors="pt"))
        labels = batch["input_ids"].clone()
        labels[:, :64] = -100                       # the "prompt": not scored
        labels[batch["attention_mask"] == 0] = -100
        batch["labels"] = labels
        batches.append(batch)

    def loss(model, batch):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    labels=batch["labels"])
        return out.loss * len(batch["input_ids"])  # the mean over examples, times B

    compare("SmolLM2-135M r=8, length 128", model, batches, "causal_lm", loss, rows)


STORE_CHILD = r"""
import json, sys, time, torch
from datainf import DataInf
from datainf.gradients.store import GradientStore


def peak_rss_mb():
    # VmHWM: this process's own peak (ru_maxrss would carry the parent's over exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024


path, m = sys.argv[1], int(sys.argv[2])
store = GradientStore.open(path)
g = torch.Generator().manual_seed(1)
test = {k: torch.randn(m, d, generator=g) for k, d in store.block_widths.items()}
before = peak_rss_mb()
times = []
for _ in range(3):  # the first may read from disk, the others from the page cache
    start = time.perf_counter()
    scores = DataInf(progress=False).fit(store).score(test, aggregate=True)
    times.append(time.perf_counter() - start)
print(json.dumps({"seconds": times, "rss_before_mb": before, "max_rss_mb": peak_rss_mb(),
                  "finite": bool(torch.isfinite(scores).all())}))
"""


def make_store(path: str, n: int, blocks: int, width: int) -> None:
    from datainf.gradients.store import GradientStore

    widths = {f"layer{b}.lora": width for b in range(blocks)}
    store = GradientStore.create_or_resume(path, widths, n, {"bench": n})
    g = torch.Generator().manual_seed(0)
    step = 2000
    for start in range(0, n, step):
        b = min(step, n - start)
        store.write_rows(start, {k: torch.randn(b, d, generator=g) for k, d in widths.items()},
                         data_hash=str(start + b))


def store_scaling(rows, sizes, blocks: int, width: int, folder: str):
    results = {}
    for n in sizes:  # write every store first, so no measurement runs right after its writes
        start = time.perf_counter()
        make_store(os.path.join(folder, f"store-{n}"), n, blocks, width)
        gb = n * blocks * width * 4 / 1e9
        print(f"store n={n}: {gb:.1f} GB written in {time.perf_counter() - start:.0f} s")
    for n in sizes:
        out = subprocess.run([sys.executable, "-c", STORE_CHILD,
                              os.path.join(folder, f"store-{n}"), "100"],
                             check=True, capture_output=True, text=True)
        results[n] = json.loads(out.stdout)
        seconds = results[n]["seconds"]
        print(f"  n={n}: DataInf aggregate from the store: "
              + ", ".join(f"{t:.2f}" for t in seconds)
              + f" s; peak RSS {results[n]['max_rss_mb']:.0f} MB "
              f"({results[n]['rss_before_mb']:.0f} MB before scoring)")
    small, large = sizes[0], sizes[-1]
    growth = large / small
    t_ratio = min(results[large]["seconds"]) / min(results[small]["seconds"])
    m_ratio = results[large]["max_rss_mb"] / results[small]["max_rss_mb"]
    rows.append((f"store time x{growth:.0f} rows", t_ratio, f"~{growth:.0f} (linear)",
                 0.7 * growth <= t_ratio <= 1.3 * growth))
    rows.append((f"store peak RSS x{growth:.0f} rows", m_ratio, "~1 (flat)", m_ratio <= 1.15))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--skip-store", action="store_true")
    parser.add_argument("--store-rows", type=int, nargs="+", default=[20000, 80000])
    parser.add_argument("--store-blocks", type=int, default=16)
    parser.add_argument("--store-dir", default=None, help="where the stores go (default: tmp)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    if not args.skip_minilm:
        minilm(rows, args.examples, batch_size=16)
    if not args.skip_smollm2:
        smollm2(rows, args.examples // 2, batch_size=8)
    if not args.skip_store:
        with tempfile.TemporaryDirectory(dir=args.store_dir) as folder:
            store_scaling(rows, args.store_rows, args.store_blocks, 1536, folder)
    print("\nsummary")
    for label, value, goal, ok in rows:
        print(f"  {label:<44}{value:>8.2f}  goal {goal:<14} {'met' if ok else 'NOT MET'}")


if __name__ == "__main__":
    main()
