"""How the damping rule changes what DataInf and Exact find, on a finished detect-mislabeled run.

    .venv/bin/python benchmarks/detection_damping.py [runs/detect-mislabeled]

From the run's stored gradients (gradients/train, gradients/val) and its flipped labels,
prints the mislabeled-detection AUC of the influence on the mean validation loss for:
Hessian-free (no curvature); DataInf and Exact with the relative rule at several constants c
(lambda_l = c x block l's mean squared gradient entry; the default c = 0.1 is the paper's);
DataInf with ONE absolute lambda for every block; and DataInf on the LoRA blocks alone and on
the classifier head alone. Written when every peer (kronfluence, bergson, cleanlab) detected
better than our default DataInf (benchmarks/peers).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from datainf import Damping, DataInf, Exact, HessianFree
from datainf.gradients.store import GradientStore
from datainf.jobs.detect_mislabeled import Config, load_data, recorded_settings
from datainf.metrics import detection_auc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", default="runs/detect-mislabeled", type=Path)
    run = parser.parse_args().run
    config = Config(**recorded_settings(run))
    flipped = load_data(config)[0].flipped
    train, val = ({name: s.read_block(name) for name in s.block_names}
                  for s in (GradientStore.open(run / "gradients" / split)
                            for split in ("train", "val")))

    def auc(estimator, keep: str = "") -> float:
        t = {k: v for k, v in train.items() if keep in k}
        q = {k: v for k, v in val.items() if keep in k}
        return detection_auc(estimator.fit(t).score(q, aggregate=True), flipped)

    squares = {k: float(v.double().pow(2).mean()) for k, v in train.items()}
    print(f"{run}: {len(train)} blocks, mean squared entry per block "
          f"{min(squares.values()):.2g} .. {max(squares.values()):.2g}")
    print(f"Hessian-free                        AUC {auc(HessianFree(progress=False)):.4f}")
    for c in (0.001, 0.01, 0.1, 1, 10, 100, 1000):
        kwargs = {"damping": Damping(relative=c), "progress": False}
        print(f"relative c = {c:<8g} DataInf AUC {auc(DataInf(**kwargs)):.4f}"
              f"   Exact AUC {auc(Exact(**kwargs)):.4f}")
    for a in (1e-6, 1e-4, 1e-2, 1.0):
        estimator = DataInf(damping=Damping(absolute=a), progress=False)
        print(f"one lambda = {a:<8g} DataInf AUC {auc(estimator):.4f}")
    for keep in ("lora_", "classifier"):
        count = sum(keep in k for k in train)
        print(f"blocks with {keep!r} only ({count}): DataInf AUC "
              f"{auc(DataInf(progress=False), keep):.4f}, Hessian-free AUC "
              f"{auc(HessianFree(progress=False), keep):.4f}")


if __name__ == "__main__":
    main()
