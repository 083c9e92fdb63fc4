"""The paper's Figure 1: how closely each method's scores follow the exact influence function,
across LoRA ranks.

Per cell (rank, seed): fine-tune, collect gradients, score every training example's influence
on the mean validation loss with DataInf, LiSSA, Hessian-free, the unit-gradient variants
(DataInf normalized, cosine) and Exact (the same damping), and compare each with Exact: Pearson
correlation (the paper's measure), Spearman rank correlation, and the overlap of the top 10%
(the examples a user would inspect). Exact is solved on the cheaper side (Woodbury n x n when
n < d), so ranks the paper could not run are included; its seconds are reported per rank.
"""

from __future__ import annotations

from dataclasses import replace

import pandas as pd

from ..metrics import pearson, spearman, top_k_overlap
from ..report import figure_png, study_page
from .common import (
    CORRELATION,
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

# the last two: our unit-gradient variants, compared with plain Exact (what they stand in for)
COMPARED = ("datainf", "lissa", "hessian_free", "datainf_normalized", "cosine")
TOP_SHARE = 0.1
# the paper's Figure 1, GLUE MRPC, RoBERTa-large, rank 1 (SPEC section 6, item 1)
PAPER_MRPC_RANK1 = {"datainf": 0.64, "hessian_free": 0.50, "lissa": 0.45}


def run(settings: Settings) -> dict:
    """Every cell's correlations with Exact; writes summary.json, approximation.csv and
    report.html into ``settings.out`` and returns the summary."""
    rows = []
    for rank, seed, p, config in cells(_with_methods(settings)):
        scores, seconds, notes = scores_of(config, p)
        exact = scores["exact"]
        for method in COMPARED:
            rows.append({
                "rank": rank, "seed": seed, "method": method,
                "pearson": pearson(scores[method], exact),
                "spearman": spearman(scores[method], exact),
                "top10_overlap": top_k_overlap(scores[method], exact, TOP_SHARE),
                "seconds": seconds[method], "exact_seconds": seconds["exact"],
                "converged": notes.get(method, {}).get("converged"),
                "n_train": len(p.train), "val_accuracy": p.preds.val_accuracy(p.val),
            })
    table = pd.DataFrame(rows)
    summary = {"per_rank": {}, "exact_seconds": {}, "paper_mrpc_rank1_pearson": PAPER_MRPC_RANK1}
    for rank in settings.ranks:
        at = table[table["rank"] == rank]
        summary["per_rank"][str(rank)] = {
            m: {stat: interval(at.loc[at["method"] == m, stat], within)
                for stat, within in (("pearson", CORRELATION), ("spearman", CORRELATION),
                                     ("top10_overlap", UNIT))} for m in COMPARED}
        summary["exact_seconds"][str(rank)] = interval(at["exact_seconds"].unique(), POSITIVE)
    write_outputs(settings, "approximation", summary, table, _report(settings, summary))
    return summary


def _with_methods(settings: Settings) -> Settings:
    return replace(settings, base=replace(settings.base, methods=(*COMPARED, "exact")))


def _report(settings: Settings, summary: dict) -> str:
    ranks = [str(r) for r in settings.ranks]
    per = summary["per_rank"]
    figures = []
    for stat, label in (("pearson", "Pearson correlation with Exact"),
                        ("spearman", "Spearman correlation with Exact"),
                        ("top10_overlap", "share of Exact's top 10% found")):
        series = {LABELS[m]: {r: per[r][m][stat] for r in ranks} for m in COMPARED}
        low = 0 if stat == "top10_overlap" else -1
        figures.append((label, figure_png(
            lambda ax, series=series, label=label, low=low: (
                interval_bars(ax, ranks, series, label), ax.set_xlabel("LoRA rank"),
                ax.set_ylim(low, 1.05)))))
    return study_page("approximation_study.html", "Approximation error across LoRA ranks",
                      base=settings.base, runs=settings.runs, figures=figures, ranks=ranks,
                      compared=COMPARED, labels=LABELS, per=per, paper=PAPER_MRPC_RANK1,
                      exact_seconds=summary["exact_seconds"])
