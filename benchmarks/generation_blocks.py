"""Which gradient blocks and which normalization find the training examples behind a test
answer? Scores a finished `datainf experiment generation` run again, from its stores, on
subsets of the LoRA blocks, for every method (cheap: no training, no gradients).

    .venv/bin/python benchmarks/generation_blocks.py runs/experiment-generation-math

Prints the class-detection AUC and recall (mean over test examples) per block subset and
method.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from datainf.gradients.source import BlockSubset, names_matching
from datainf.gradients.store import GradientStore
from datainf.methods import estimator
from datainf.metrics import class_detection

SUBSETS = {
    "all": ".",
    "layers 0-9": r"layers\.[0-9]\.",
    "layers 10-19": r"layers\.1[0-9]\.",
    "layers 20-29": r"layers\.2[0-9]\.",
    "q_proj": "q_proj",
    "v_proj": "v_proj",
    "lora_A": "lora_A",
    "lora_B": "lora_B",
}
METHODS = ("datainf", "hessian_free", "datainf_normalized", "cosine")


def main(folder: str) -> None:
    out = Path(folder)
    classes = {name: np.array([json.loads(x)["class"] for x in
                               (out / "data" / f"{name}.jsonl").read_text().splitlines()])
               for name in ("train", "test")}
    train = GradientStore.open(out / "run" / "gradients" / "train")
    test = GradientStore.open(out / "run" / "query" / "gradients")
    print(f"{'blocks':<14}{'method':<20}{'AUC':>7}{'recall':>8}")
    for label, pattern in SUBSETS.items():
        names = names_matching(train.block_names, pattern)
        tr, te = BlockSubset(train, names), BlockSubset(test, names)
        for method in METHODS:
            scores = estimator(method, progress=False).fit(tr).score(te).numpy()
            m = class_detection(scores, classes["train"], classes["test"])
            print(f"{label:<14}{method:<20}{m['auc'].mean():>7.3f}{m['recall'].mean():>8.3f}",
                  flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
