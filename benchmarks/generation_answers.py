"""What does the sign of a text-generation influence follow: the test example's class (its
task template) or its answer? Scores a finished `datainf experiment generation` run again from
its stores (cheap: no training, no gradients) and prints, per method:

- the share of training examples scored helpful (score < 0) among: same class and same last
  answer word as the test example ("same answer"), same class with another last word, other
  classes;
- the class-detection AUC (the paper's: AUC of -score against "same class");
- the answer AUC (ours): AUC of -score against "the training answer ends in the test answer's
  last word", over the test examples where some but not all training answers do.

    .venv/bin/python benchmarks/generation_answers.py runs/experiment-generation-TASK ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from datainf.gradients.store import GradientStore
from datainf.methods import estimator
from datainf.metrics import class_detection, detection_auc

METHODS = ("datainf", "hessian_free", "exact", "datainf_normalized", "cosine")


def read(out: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(classes, last answer words) of the study's `data/NAME.jsonl`."""
    rows = [json.loads(x) for x in (out / "data" / f"{name}.jsonl").read_text().splitlines()]
    return (np.array([r["class"] for r in rows]),
            np.array([r["messages"][-1]["content"].split()[-1] for r in rows]))


def main(folders: list[str]) -> None:
    print(f"{'task':<26}{'method':<20}{'helpful: same answer':>21}{'same class':>11}"
          f"{'other class':>12}{'class AUC':>10}{'answer AUC':>11}")
    for folder in folders:
        out = Path(folder)
        (train_cls, train_word), (test_cls, test_word) = read(out, "train"), read(out, "test")
        train = GradientStore.open(out / "run" / "gradients" / "train")
        test = GradientStore.open(out / "run" / "query" / "gradients")
        same = test_cls[:, None] == train_cls[None, :]
        answer = test_word[:, None] == train_word[None, :]
        for method in METHODS:
            scores = estimator(method, progress=False).fit(train).score(test).numpy()
            helpful = scores < 0
            aucs = [detection_auc(-scores[j], answer[j]) for j in range(len(test_cls))
                    if 0 < answer[j].sum() < answer.shape[1]]
            class_auc = class_detection(scores, train_cls, test_cls)["auc"].mean()
            print(f"{out.name:<26}{method:<20}{helpful[same & answer].mean():>21.2f}"
                  f"{helpful[same & ~answer].mean():>11.2f}{helpful[~same].mean():>12.2f}"
                  f"{class_auc:>10.3f}{np.mean(aucs):>11.3f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
