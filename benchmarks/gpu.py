"""Every headline figure on one device, in one run: on a CUDA GPU at full size in at most
about 8 minutes; on the CPU with --quick (CI runs that, so the script works when a GPU comes).

    .venv/bin/python benchmarks/gpu.py                          # --device cuda, full sizes
    .venv/bin/python benchmarks/gpu.py --device cpu --quick     # tiny sizes: plumbing only

Parts (each prints a table; times are wall seconds with the device synchronised):
1. per-example gradients: MiniLM-L6 + LoRA r 4 (classification, BBC News, 128 tokens) and
   SmolLM2-135M + LoRA r 8 on q/v (the math task's chat examples): examples per second, and
   the time against a plain training step (one forward and backward of the batch's mean loss)
   on the same batches. --quick: 32 tokens, and a 2-layer Llama of random weights for SmolLM2.
2. DataInf, Exact and LiSSA at the QQP size (n 4500 training rows, 48 blocks of 4096,
   m 500 test rows; aggregate scores): fit + score seconds.
3. pairwise top-k (100 queries, k 10) on the same gradients, each method.
4. the default detect-mislabeled run (900 BBC News articles) on the device: seconds per stage.
5. bfloat16 against float32: MiniLM's per-example gradients collected in bfloat16 (model and
   store): speed, and the Spearman correlation of DataInf's scores with float32's.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import torch

from datainf import DataInf, Exact, LiSSA, collect_gradients
from datainf.metrics import spearman

FULL = {"texts": 256, "batch": 32, "tokens": 128, "n": 4500, "blocks": 48, "width": 4096,
        "m": 500, "queries": 100, "train_size": 900, "val_size": 100}
QUICK = {"texts": 16, "batch": 8, "tokens": 32, "n": 300, "blocks": 6, "width": 256, "m": 20,
         "queries": 10, "train_size": 40, "val_size": 20}


def timed(device: torch.device, work) -> tuple[float, object]:
    """(seconds, result) of ``work()``, the device synchronised before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n## {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(f"{x:.4g}" if isinstance(x, float) else str(x) for x in row)
              + " |")


def plain_steps(model, batches, task, device) -> None:
    """One forward and backward of each batch's mean loss (what a training step costs, without
    the optimizer), the reference for the per-example gradients."""
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        rows = torch.arange(len(batch["input_ids"]))
        model.zero_grad(set_to_none=True)
        task.losses(model, batch, rows, 0).mean().backward()


def as_if_trained(model):
    """LoRA's B starts at zero (so A's gradients are zero); give it small weights, as
    fine-tuning would, so that every block's gradients are non-zero."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    return model


def classifier_batches(tokenizer, sizes: dict) -> list[dict]:
    from datainf.data.text import builtin_dataset

    texts, labels, _ = builtin_dataset("bbc-news").load()
    classes = sorted(set(labels))
    batches = []
    for start in range(0, sizes["texts"], sizes["batch"]):
        part = slice(start, start + sizes["batch"])
        batch = dict(tokenizer(texts[part], truncation=True, max_length=sizes["tokens"],
                               padding=True, return_tensors="pt"))
        batch["labels"] = torch.tensor([classes.index(x) for x in labels[part]])
        batches.append(batch)
    return batches


def chat_batches(tokenizer, sizes: dict) -> list[dict]:
    from datainf.data.chat import ChatExample, encode_all, lm_batches
    from datainf.data.synthetic import make_task

    train, _ = make_task("math", per_class=sizes["texts"] // 10 + 1, test_per_class=0)
    examples = [ChatExample([{"role": "user", "content": r["prompt"]}], r["response"])
                for r in train[: sizes["texts"]]]
    encoded = encode_all(tokenizer, examples, [e.response for e in examples], max_length=512,
                         what="benchmark")
    return lm_batches(encoded, sizes["batch"], tokenizer.pad_token_id)


def part_gradients(device, sizes, quick: bool, work: Path) -> dict:
    from datainf.gradients.tasks import as_task
    from datainf.models import add_lora, load_causal_lm, load_classifier
    from datainf.models.tiny import tiny_chat_model

    rows, kept = [], {}
    for name in ("MiniLM-L6", "SmolLM2-135M"):
        torch.manual_seed(0)
        if name == "MiniLM-L6":
            model, tokenizer = load_classifier("minilm", 5)
            model = as_if_trained(add_lora(model, r=4, alpha=8))
            batches, task = classifier_batches(tokenizer, sizes), "classification"
        else:
            source = tiny_chat_model(work / "tiny-chat") if quick else "smollm2"
            model, tokenizer = load_causal_lm(source)
            model = as_if_trained(add_lora(model, r=8, alpha=16,
                                           target_modules=("q_proj", "v_proj")))
            batches, task = chat_batches(tokenizer, sizes), "causal_lm"
        model.to(device)
        n = sum(len(b["input_ids"]) for b in batches)
        collect_gradients(model, batches[:1], task, progress=False)  # warm-up
        seconds, grads = timed(device, lambda m=model, b=batches, t=task:
                               collect_gradients(m, b, t, progress=False))
        step, _ = timed(device, lambda m=model, b=batches, t=task:
                        plain_steps(m, b, as_task(t), device))
        rows.append([name, n, seconds, n / seconds, seconds / step])
        if name == "MiniLM-L6":
            kept = {"grads": grads, "seconds": seconds, "batches": batches}
    table("Per-example gradients", ["model", "examples", "seconds", "examples / s",
                                    "x a plain training step"], rows)
    return kept


def random_gradients(rows: int, sizes: dict, device, seed: int) -> dict:
    g = torch.Generator(device=device).manual_seed(seed)
    return {f"block{i}": torch.randn(rows, sizes["width"], generator=g, device=device)
            for i in range(sizes["blocks"])}


def part_estimators(device, sizes) -> None:
    train = random_gradients(sizes["n"], sizes, device, 0)
    test = random_gradients(sizes["m"], sizes, device, 1)
    queries = random_gradients(sizes["queries"], sizes, device, 2)
    rows, tops = [], []
    for label, make in (("DataInf", DataInf), ("Exact", Exact), ("LiSSA", LiSSA)):
        est = make(progress=False)
        seconds, _ = timed(device, lambda e=est: e.fit(train).score(test, aggregate=True))
        note = "" if label != "LiSSA" else ("converged" if est.converged_ else
                                            "did not converge")
        rows.append([label, seconds, note])
        top_seconds, _ = timed(device, lambda e=est: e.top_k(queries, 10))
        tops.append([label, sizes["queries"], top_seconds])
    shape = f"n {sizes['n']}, {sizes['blocks']} blocks of {sizes['width']}, m {sizes['m']}"
    table(f"Influence step ({shape}; fit + aggregate score)", ["method", "seconds", "note"],
          rows)
    table(f"Pairwise top-10 (n {sizes['n']})", ["method", "queries", "seconds"], tops)


def part_pipeline(device, sizes, quick: bool, work: Path) -> None:
    from datainf.jobs.detect_mislabeled import Config, run

    extra = {"max_length": 16, "epochs": 1, "max_epochs": 1, "methods": ("datainf",)} \
        if quick else {}
    config = Config(device=str(device), out=str(work / "detect-mislabeled"), progress=False,
                    train_size=sizes["train_size"], val_size=sizes["val_size"], **extra)
    seconds, summary = timed(device, lambda: run(config))
    stages = summary["stage_seconds"]
    table(f"detect-mislabeled, {summary['n_train']} training examples ({seconds:.1f} s in all)",
          ["stage", "seconds"], [[k, float(v)] for k, v in stages.items()])


def part_bfloat16(device, sizes, float32: dict) -> None:
    from datainf.models import add_lora, load_classifier

    torch.manual_seed(0)
    model, _ = load_classifier("minilm", 5, torch_dtype=torch.bfloat16)
    model = as_if_trained(add_lora(model, r=4, alpha=8)).to(device)
    batches = float32["batches"]
    seconds, grads = timed(device, lambda: collect_gradients(
        model, batches, "classification", dtype="bfloat16", progress=False))
    test = {k: v[:8] for k, v in float32["grads"].items()}
    scores32 = DataInf().fit(float32["grads"]).score(test, aggregate=True)
    scores16 = DataInf().fit({k: v.float() for k, v in grads.items()}).score(
        {k: v[:8].float() for k, v in grads.items()}, aggregate=True)
    table("bfloat16 collection against float32 (MiniLM-L6)",
          ["float32 s", "bfloat16 s", "speed-up", "Spearman of DataInf scores"],
          [[float32["seconds"], seconds, float32["seconds"] / seconds,
            spearman(scores32, scores16)]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the plumbing")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", "LiSSA did not converge")  # the table says so
    from datainf.devices import check_device

    check_device(args.device)
    device = torch.device(args.device)
    sizes = QUICK if args.quick else FULL
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# datainf on {name} (torch {torch.__version__}){' --quick' if args.quick else ''}")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        kept = part_gradients(device, sizes, args.quick, work)
        part_bfloat16(device, sizes, kept)
        part_estimators(device, sizes)
        part_pipeline(device, sizes, args.quick, work)
    print(f"\nall parts: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
