"""How the fine-tuning settings of detect-mislabeled shape what the scores can find.

    .venv/bin/python benchmarks/defaults_sweep.py [--max-length 128] [--lr 3e-4 1e-3] [--epochs 8]

On the built-in default data (BBC News, 900 training / 100 validation articles, 20% of the
training labels flipped, seed 0) and MiniLM-L6 + LoRA r = 4, trains once per learning rate for
``--epochs`` epochs (linear decay over all of them) and, after every epoch, prints the validation
loss and accuracy, the training loss, and the AUC of DataInf, Hessian-free and the training loss
for finding the flipped labels. ``--max-length 16`` makes the texts as short as tweets (a
harder task). This chose the defaults of the fine-tuning stage (see the README).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from datainf import DataInf, HessianFree, collect_gradients
from datainf.data.text import text_batches
from datainf.jobs.detect_mislabeled import Config, load_data
from datainf.metrics import detection_auc
from datainf.models.hf import add_lora, load_classifier
from datainf.training.finetune import finetune, predict


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, nargs="+", default=[3e-4, 1e-3])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = Config(seed=args.seed)
    train, val = load_data(config)[:2]
    majority = np.bincount(val.labels).max() / len(val)
    print(f"max_length {args.max_length}, {len(train)} train, {len(val)} val, "
          f"majority rate {majority:.3f}", flush=True)
    for lr in args.lr:
        torch.manual_seed(config.seed)
        base, tokenizer = load_classifier("minilm", len(train.classes))
        torch.manual_seed(config.seed)
        model = add_lora(base, r=config.lora_r, alpha=config.lora_alpha,
                         target_modules=config.lora_targets)
        start = time.perf_counter()

        def evaluate(epoch: int, train_loss: float, lr=lr, start=start, model=model,
                     tokenizer=tokenizer) -> None:
            val_loss, val_probs = predict(model, tokenizer, val, batch_size=32,
                                          max_length=args.max_length)
            val_pred = val_probs.argmax(1)
            losses, _ = predict(model, tokenizer, train, batch_size=32,
                                max_length=args.max_length)
            grads = {}
            for split, data in (("train", train), ("val", val)):
                grads[split] = collect_gradients(
                    model, text_batches(tokenizer, data, 16, args.max_length), progress=False)
            aucs = {"datainf": DataInf().fit(grads["train"]).score(grads["val"], aggregate=True),
                    "hessian_free": HessianFree().fit(grads["train"]).score(grads["val"],
                                                                            aggregate=True),
                    "loss": losses}
            line = " ".join(f"{k} {detection_auc(v, train.flipped):.3f}" for k, v in aucs.items())
            print(f"lr {lr:g} epoch {epoch}: train loss {train_loss:.3f}, val loss "
                  f"{val_loss.mean():.3f}, val acc {(val_pred == val.labels).mean():.3f}; "
                  f"AUC {line}; {time.perf_counter() - start:.0f} s", flush=True)

        finetune(model, tokenizer, train, epochs=args.epochs, batch_size=config.batch_size,
                 learning_rate=lr, max_length=args.max_length, seed=config.seed,
                 progress=False, on_epoch=evaluate)


if __name__ == "__main__":
    main()
