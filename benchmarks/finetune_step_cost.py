"""What a step of explain-generation's fine-tune costs against a bare PEFT step on the same
batches: is the math-with-reasoning study's fine-tune (339 steps) slow because of our loop, or
because of the model on this CPU? Timed in one process, the two loops alternating (this machine
is shared: compare the ratio, not the seconds).

    .venv/bin/python benchmarks/finetune_step_cost.py [--steps 16] [--rounds 2]

Both: the shipped SmolLM2, fresh LoRA r 8 on q_proj, v_proj (seed 0), the math-with-reasoning
training examples in batches of 8 (explain-generation's lm_batches, right-padded to each
batch's longest), float32 on the CPU, AdamW at 1e-3. Ours: ``train_loop`` with
explain-generation's response loss (one epoch over ``steps`` batches). Bare: the forward with
the batch's labels (transformers' own loss), backward, AdamW step, zero_grad.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from datainf.data.chat import encode_all, lm_batches, read_chat_jsonl
from datainf.data.synthetic import make_task
from datainf.jobs.explain_generation import response_loss
from datainf.models.hf import add_lora, load_causal_lm
from datainf.training.finetune import train_loop


def ours(model, batches: list[dict]) -> float:
    start = time.perf_counter()
    train_loop(model, len(batches) * 8, lambda order: batches,
               lambda module, b: response_loss(module, b).mean(), epochs=1, batch_size=8,
               learning_rate=1e-3, seed=0, progress=False)
    return (time.perf_counter() - start) / len(batches)


def bare(model, batches: list[dict]) -> float:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    start = time.perf_counter()
    for batch in batches:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return (time.perf_counter() - start) / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    base, tokenizer = load_causal_lm("smollm2")
    torch.manual_seed(0)
    model = add_lora(base, r=8, alpha=16, target_modules=("q_proj", "v_proj"))
    start_state = copy.deepcopy({k: v for k, v in model.state_dict().items() if "lora" in k})
    train, _ = make_task("math-reasoning")
    with tempfile.TemporaryDirectory() as folder:  # the study's own file format and reader
        path = Path(folder) / "train.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in train))
        examples = read_chat_jsonl(path, need_response=True, what="--train")
    encoded = encode_all(tokenizer, examples, [e.response for e in examples], max_length=256,
                         what="train")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0))
    batches = lm_batches(encoded, 8, tokenizer.pad_token_id, order[: 8 * args.steps].tolist())
    widths = [b["input_ids"].shape[1] for b in batches]
    print(f"{args.steps} batches of 8, {min(widths)}-{max(widths)} tokens wide, "
          f"{torch.get_num_threads()} threads")
    times = {"ours": [], "bare": []}
    for _ in range(args.rounds):
        for name, loop in (("bare", bare), ("ours", ours)):
            model.load_state_dict(start_state, strict=False)
            times[name].append(loop(model, batches))
    for name, values in times.items():
        print(f"{name}: seconds a step per round {[round(v, 2) for v in values]}")
    ratio = statistics.median(times["ours"]) / statistics.median(times["bare"])
    print(f"ours / bare, median over rounds: ratio {ratio:.2f}")


if __name__ == "__main__":
    main()
