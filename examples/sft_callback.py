"""Fine-tune the shipped SmolLM2 with TRL's SFTTrainer and datainf's callback, then ask which
training examples made it answer a query, from the run folder alone (no second pass over the
training data).

    .venv/bin/python examples/sft_callback.py [--out runs/example-sft] [--examples 120]

The task: the synthetic sentence transformations of the generation study (each rule named in
its prompt), as conversational prompt/completion rows, which SFTTrainer tokenizes with the chat
template and trains on the completion alone, as explain-generation does. A few minutes on 2
CPU cores.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from datainf.cli import main as datainf
from datainf.data.synthetic import make_task
from datainf.integrations import DataInfCallback
from datainf.models.hf import add_lora, load_causal_lm


def rows(examples: list[dict]) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": e["prompt"]}],
             "completion": [{"role": "assistant", "content": e["response"]}]}
            for e in examples]


def run(out: Path, examples: int) -> None:
    per_class = examples // 10 + 1  # the last of each class is a query
    train, test = make_task("sentence-transformations", per_class=per_class, test_per_class=1)
    model, tokenizer = load_causal_lm("smollm2")
    torch.manual_seed(0)
    model = add_lora(model, r=8, alpha=16)  # q_proj, v_proj: explain-generation's default
    args = SFTConfig(output_dir=str(out / "trainer"), per_device_train_batch_size=8,
                     num_train_epochs=3, learning_rate=1e-3, report_to=[], save_strategy="no",
                     logging_strategy="epoch", use_cpu=True, bf16=False,
                     gradient_checkpointing=False, max_length=256)
    trainer = SFTTrainer(model=model, train_dataset=Dataset.from_list(rows(train)), args=args,
                         processing_class=tokenizer,
                         callbacks=[DataInfCallback(out / "run")])
    trainer.train()
    queries = out / "queries.jsonl"
    queries.write_text("".join(json.dumps({"prompt": q["prompt"], "response": q["response"]})
                               + "\n" for q in test[:3]))
    datainf(["explain-generation", "--run", str(out / "run"), "--queries", str(queries),
             "--out", str(out / "explain"), "--methods", "datainf,cosine,less"])
    first = json.loads((out / "explain" / "top.jsonl").read_text().splitlines()[0])
    print(f"\nquery: {first['prompt'][0]['content']!r} -> {first['response']!r}")
    for entry in first["datainf"]["helpful"][:3]:
        user = entry["prompt"].split("user\n")[-1].split("<|im_end|>")[0]  # the chat turn
        print(f"  helpful ({entry['score']:.3g}): {user[:90]!r} -> {entry['response']!r}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/example-sft")
    parser.add_argument("--examples", type=int, default=120, help="training examples")
    options = parser.parse_args()
    run(Path(options.out), options.examples)
