"""cleanlab against datainf on the default detect-mislabeled task, as cleanlab prescribes:
out-of-fold predicted probabilities from K LoRA fine-tunes (each on K-1 folds of the noisy
training set, the same recipe as detect-mislabeled's: model, LoRA, epochs, rounds, early stop
on the validation set), then ``cleanlab.rank.get_label_quality_scores`` (self-confidence) and
``cleanlab.filter.find_label_issues``. Run in cleanlab's own environment (with datainf
installed to load the same data and fine-tune the same way). Both timed in this process, ours
first: the whole detect-mislabeled pipeline, as `datainf detect-mislabeled` runs it (one
fine-tune, predictions, gradients, every default method, the report).

    benchmarks/peers/.venvs/cleanlab/bin/python benchmarks/peers/run_cleanlab.py \
        RUN OUT.json [K]

RUN: a finished detect-mislabeled run, whose settings both use (ours then runs into a
temporary folder); where RUN does not exist, both use the default settings and ours runs into
RUN, which is then the default run (compare.py uses it so, instead of running it twice).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    from datainf.jobs import detect_mislabeled as job
    from datainf.metrics import detection_auc
    from datainf.training.finetune import predict

    run, out = Path(sys.argv[1]), sys.argv[2]
    folds = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    settings = job.recorded_settings(run) if run.exists() else {}
    run.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=run.parent) as folder:
        # ---- ours: the whole pipeline
        ours_out = Path(folder) / "ours" if settings else run
        config = job.Config(**settings, out=str(ours_out), progress=False)
        start = time.perf_counter()
        summary = job.run(config)
        our_seconds = time.perf_counter() - start
        train, val, _ = job.load_data(config)

        # ---- cleanlab: K-fold out-of-fold probabilities, then its label quality
        start = time.perf_counter()
        rng = np.random.default_rng(config.seed)
        fold_of = np.empty(len(train), dtype=int)
        for label in np.unique(train.labels):  # stratified by the (noisy) label
            members = rng.permutation(np.flatnonzero(train.labels == label))
            fold_of[members] = np.arange(len(members)) % folds
        probs = np.zeros((len(train), len(train.classes)))
        for k in range(folds):
            held = np.flatnonzero(fold_of == k)
            fit = job.Config(**settings, out=str(Path(folder) / f"fold{k}"), progress=False)
            Path(fit.out).mkdir()
            model, tokenizer, _ = job.load_model(fit, train, Path(fit.out))
            job.train_adapter(fit, model, tokenizer, train.subset(np.flatnonzero(fold_of != k)),
                              val)
            _, probs[held] = predict(model, tokenizer, train.subset(held),
                                     batch_size=fit.batch_size, max_length=fit.max_length)
            print(f"fold {k + 1} of {folds}: {time.perf_counter() - start:.0f} s", flush=True)
        quality = get_label_quality_scores(train.labels, probs)
        issues = find_label_issues(train.labels, probs)
        their_seconds = time.perf_counter() - start
    flipped = train.flipped
    result = {
        "n_train": len(train), "folds": folds,
        "ours": {"seconds": our_seconds, "auc": summary["methods"]["datainf"]["auc"],
                 "stage_seconds": summary["stage_seconds"]},
        "cleanlab": {"seconds": their_seconds, "auc": detection_auc(-quality, flipped),
                     "issues_found": int(issues.sum()),
                     "issues_precision": float(flipped[issues].mean()) if issues.any() else None,
                     "issues_recall": float(issues[flipped].mean()),
                     "out_of_fold_accuracy": float((probs.argmax(1) == train.labels).mean())},
    }
    Path(out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
