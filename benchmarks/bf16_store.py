"""What a bfloat16 gradient store changes in the scores, on finished runs of the shipped models.

    .venv/bin/python benchmarks/bf16_store.py runs/detect-mislabeled \
        runs/experiment-generation-sentence-transformations/run

Each run's float32 stores are copied into bfloat16 stores (the rounding that
``collect_gradients(..., dtype="bfloat16")`` applies when it writes) and every method scores
from both. A detect-mislabeled run (gradients/train, gradients/val): the influence on the mean
validation loss of each method and DataInf's self-influence, their Spearman correlation
between the float32 and bfloat16 stores, the overlap of the 5% most suspicious, and the
mislabeled-detection AUC from each. An explain-* run (gradients/train, query/gradients): the
(m, n) pairwise scores, the mean over queries of the Spearman correlation, and the share of
each query's 5 most helpful examples found again.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def bfloat16_copy(store, path: Path):
    """``store`` written again as bfloat16 at ``path`` (rows rounded as the collector would)."""
    from datainf.gradients.store import GradientStore

    copy = GradientStore.create_or_resume(path, store.block_widths, store.num_rows,
                                          store.identity, dtype="bfloat16")
    blocks = {name: store.read_block(name) for name in store.block_names}
    for start in range(0, store.num_rows, 512):
        stop = min(store.num_rows, start + 512)
        copy.write_rows(start, {k: v[start:stop] for k, v in blocks.items()}, str(stop))
    return GradientStore.open(path)


def overlap(a: np.ndarray, b: np.ndarray, share: float) -> float:
    k = max(1, int(round(share * len(a))))
    return len(set(np.argsort(-a)[:k]) & set(np.argsort(-b)[:k])) / k


def mislabeled_run(run: Path, folder: Path) -> None:
    import pandas as pd

    from datainf.gradients.store import GradientStore
    from datainf.methods import DataInf, estimator
    from datainf.metrics import detection_auc, spearman

    train = GradientStore.open(run / "gradients" / "train")
    val = GradientStore.open(run / "gradients" / "val")
    flipped = pd.read_csv(run / "scores.csv")["flipped"].to_numpy().astype(bool)
    copies = {"float32": (train, val),
              "bfloat16": (bfloat16_copy(train, folder / "train"),
                           bfloat16_copy(val, folder / "val"))}
    print(f"{run}: n = {train.num_rows}, {sum(train.block_widths.values())} entries a row")
    for method in ("datainf", "exact", "lissa", "hessian_free", "datainf_self"):
        scores, seconds = {}, {}
        for dtype, (tr, va) in copies.items():
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                if method == "datainf_self":
                    s = DataInf(progress=False).fit(tr).self_influence()
                else:
                    s = estimator(method, progress=False).fit(tr).score(va, aggregate=True)
            seconds[dtype] = time.perf_counter() - start
            scores[dtype] = s.numpy()
        a, b = scores["float32"], scores["bfloat16"]
        print(f"  {method:13s} 1 - Spearman {1 - spearman(a, b):.1e}, top-5% overlap "
              f"{overlap(a, b, 0.05):.3f}, AUC {detection_auc(a, flipped):.4f} (float32) vs "
              f"{detection_auc(b, flipped):.4f} (bfloat16); "
              f"{seconds['float32']:.2f} s vs {seconds['bfloat16']:.2f} s")


def explain_run(run: Path, folder: Path) -> None:
    from datainf.gradients.store import GradientStore
    from datainf.methods import estimator
    from datainf.metrics import spearman

    train = GradientStore.open(run / "gradients" / "train")
    queries = GradientStore.open(run / "query" / "gradients")
    copies = {"float32": (train, queries),
              "bfloat16": (bfloat16_copy(train, folder / "train"),
                           bfloat16_copy(queries, folder / "queries"))}
    print(f"{run}: n = {train.num_rows}, m = {queries.num_rows}, "
          f"{sum(train.block_widths.values())} entries a row")
    for method in ("datainf", "datainf_normalized", "hessian_free", "exact"):
        scores = {}
        for dtype, (tr, qu) in copies.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                scores[dtype] = estimator(method, progress=False).fit(tr).score(qu).numpy()
        a, b = scores["float32"], scores["bfloat16"]
        rho = [spearman(x, y) for x, y in zip(a, b, strict=True)]
        found = [len(set(np.argsort(x)[:5]) & set(np.argsort(y)[:5])) / 5
                 for x, y in zip(a, b, strict=True)]
        print(f"  {method:18s} per query, 1 - Spearman: mean {1 - np.mean(rho):.1e}, worst "
              f"{1 - np.min(rho):.1e}; 5 most helpful found again {np.mean(found):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    for run in args.runs:
        with tempfile.TemporaryDirectory(dir=run) as folder:
            if (run / "gradients" / "val").exists():
                mislabeled_run(run, Path(folder))
            else:
                explain_run(run, Path(folder))


if __name__ == "__main__":
    main()
