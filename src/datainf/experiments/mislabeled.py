"""The paper's Figure 2 and runtime comparison: how well each score finds flipped labels, over
runs, and how long each method's influence step takes.

Per run (a seed: split, noise draw, LoRA initialisation, data order) at one LoRA rank: the
detect-mislabeled pipeline, then the AUC of every method (DataInf, Exact, LiSSA, Hessian-free,
DataInf self-influence) and of the two reference scores (training loss, gradient norm) against
the flipped labels, with the seconds of each method's influence step (fit + score on the
gradients) and the paper's ratios Exact / DataInf and LiSSA / DataInf.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd

from ..errors import DataInfError
from ..jobs.detect_mislabeled import DEFAULT_METHODS
from ..metrics import detection_auc
from ..report import figure_png, study_page
from .common import (
    LABELS,
    POSITIVE,
    UNIT,
    Settings,
    cells,
    interval,
    interval_bars,
    scores_of,
    write_outputs,
)

# SPEC section 6, item 2: the inverse step at rank 4 on QQP, one A40 GPU (seconds)
PAPER_SECONDS_QQP = {"datainf": 13.0, "lissa": 70.0, "exact": 11279.0}
# the command's defaults and the baselines beside them
METHODS = (*DEFAULT_METHODS, "less", "repsim")
RATIOS = {"exact_over_datainf": ("exact", "datainf"), "lissa_over_datainf": ("lissa", "datainf")}


def run(settings: Settings) -> dict:
    """AUC and seconds of every method per run; writes summary.json, mislabeled.csv and
    report.html into ``settings.out`` and returns the summary."""
    if not settings.base.noise > 0:
        raise DataInfError("the mislabeled experiment needs flipped labels: --noise > 0")
    settings = replace(settings, base=replace(settings.base, methods=METHODS))
    rows = []
    for rank, seed, p, config in cells(settings):
        scores, seconds, notes = scores_of(config, p)
        for key, values in scores.items():
            rows.append({"rank": rank, "seed": seed, "method": key,
                         "auc": detection_auc(values, p.train.flipped),
                         "seconds": None if notes.get(key, {}).get("by_product")
                         else seconds[key],
                         "converged": notes.get(key, {}).get("converged"),
                         "n_train": len(p.train), "n_flipped": int(p.train.flipped.sum()),
                         "val_accuracy": p.preds.val_accuracy(p.val)})
    table = pd.DataFrame(rows)
    methods = list(dict.fromkeys(table["method"]))
    summary: dict = {"auc": {}, "seconds": {}, "ratios": {}, "paper_seconds_qqp": {
        **PAPER_SECONDS_QQP, "exact_over_datainf": round(11279 / 13, 1),
        "lissa_over_datainf": round(70 / 13, 2)}}
    for m in methods:
        at = table[table["method"] == m]
        summary["auc"][m] = interval(at["auc"], UNIT)
        if at["seconds"].notna().any():
            summary["seconds"][m] = interval(at["seconds"].astype(float), POSITIVE)
    by_seed = table.pivot_table(index="seed", columns="method", values="seconds")
    for name, (top, bottom) in RATIOS.items():
        if {top, bottom} <= set(by_seed.columns):
            summary["ratios"][name] = interval(by_seed[top] / by_seed[bottom], POSITIVE)
    write_outputs(settings, "mislabeled", summary, table, _report(settings, summary, methods))
    return summary


def _report(settings: Settings, summary: dict, methods: list[str]) -> str:
    aucs = figure_png(lambda ax: (
        interval_bars(ax, ["AUC"], {LABELS[m]: {"AUC": summary["auc"][m]} for m in methods},
                      "AUC, flipped labels (0.5 = chance)"),
        ax.set_ylim(0, 1.0), ax.axhline(0.5, color="grey", linestyle=":")))
    timed = [m for m in methods if m in summary["seconds"]]

    def runtime(ax):
        means = [summary["seconds"][m]["mean"] for m in timed]
        ax.bar(np.arange(len(timed)), means, color="#4477aa", edgecolor="black", linewidth=0.5)
        ax.set_yscale("log")
        ax.set_xticks(np.arange(len(timed)), [LABELS[m] for m in timed], rotation=20,
                      fontsize=8)
        ax.set_ylabel("seconds of the influence step (log scale)")
        ax.grid(axis="y", alpha=0.3)

    return study_page("mislabeled_study.html", "Mislabeled-data detection over runs",
                      base=settings.base, ranks=settings.ranks, runs=settings.runs,
                      summary=summary, methods=methods, labels=LABELS,
                      paper=PAPER_SECONDS_QQP, aucs=aucs, runtime=figure_png(runtime))
