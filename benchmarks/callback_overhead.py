"""What DataInfCallback costs: the same SFTTrainer run on the shipped SmolLM2 with and without
the callback, timed in one process, one after the other (this machine is shared: compare the
ratio, not the seconds).

    .venv/bin/python benchmarks/callback_overhead.py [--examples 240] [--epochs 1]

Both runs: the same LoRA (rank 8 on q_proj, v_proj, seed 0), the same conversational rows of the
sentence-transformations task, batch 8, float32 on the CPU. The callback's share is its gradient
pass over the training set at the end (one forward and backward per batch, hooks on the LoRA
layers) and its writes; the ratio falls as epochs are added (its cost is paid once).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from datainf.data.synthetic import make_task
from datainf.integrations import DataInfCallback
from datainf.models.hf import add_lora, load_causal_lm


def train(rows: list[dict], epochs: int, folder: Path, with_callback: bool) -> float:
    model, tokenizer = load_causal_lm("smollm2")
    torch.manual_seed(0)
    model = add_lora(model, r=8, alpha=16)
    args = SFTConfig(output_dir=str(folder / "trainer"), per_device_train_batch_size=8,
                     num_train_epochs=epochs, learning_rate=1e-3, report_to=[],
                     save_strategy="no", logging_strategy="no", use_cpu=True, bf16=False,
                     gradient_checkpointing=False, max_length=256, disable_tqdm=True)
    callbacks = [DataInfCallback(folder / "run")] if with_callback else []
    trainer = SFTTrainer(model=model, train_dataset=Dataset.from_list(rows), args=args,
                         processing_class=tokenizer, callbacks=callbacks)
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=240)
    parser.add_argument("--epochs", type=int, default=1)
    options = parser.parse_args()
    examples, _ = make_task("sentence-transformations", per_class=options.examples // 10 + 1,
                            test_per_class=1)
    rows = [{"prompt": [{"role": "user", "content": e["prompt"]}],
             "completion": [{"role": "assistant", "content": e["response"]}]}
            for e in examples]
    with tempfile.TemporaryDirectory() as tmp:
        plain = train(rows, options.epochs, Path(tmp) / "plain", with_callback=False)
        with_cb = train(rows, options.epochs, Path(tmp) / "callback", with_callback=True)
    print(f"SFTTrainer, SmolLM2-135M + LoRA r8, {len(rows)} examples, {options.epochs} "
          f"epoch(s), batch 8, CPU, torch {torch.__version__} ({torch.get_num_threads()} "
          "threads)")
    print("| run | seconds (trainer.train, end-of-training callback included) |")
    print("|---|---|")
    print(f"| without the callback | {plain:.1f} |")
    print(f"| with DataInfCallback | {with_cb:.1f} |")
    print(f"ratio with / without: {with_cb / plain:.2f} (overhead {with_cb / plain - 1:+.0%})")


if __name__ == "__main__":
    main()
