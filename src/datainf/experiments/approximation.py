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

import html
from dataclasses import replace

import pandas as pd

from ..metrics import pearson, spearman, top_k_overlap
from ..report import study_page
from .common import (
    CORRELATION,
    LABELS,
    POSITIVE,
    UNIT,
    Settings,
    cells,
    figure,
    interval,
    interval_bars,
    scores_of,
    shown,
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
    e = html.escape
    ranks = [str(r) for r in settings.ranks]
    per = summary["per_rank"]
    figures = []
    for stat, label in (("pearson", "Pearson correlation with Exact"),
                        ("spearman", "Spearman correlation with Exact"),
                        ("top10_overlap", "share of Exact's top 10% found")):
        series = {LABELS[m]: {r: per[r][m][stat] for r in ranks} for m in COMPARED}
        low = 0 if stat == "top10_overlap" else -1
        figures.append(f"<h2>{e(label)}</h2>" + figure(
            lambda ax, series=series, label=label, low=low: (
                interval_bars(ax, ranks, series, label), ax.set_xlabel("LoRA rank"),
                ax.set_ylim(low, 1.05))))
    rows = "".join(
        f"<tr><td>{r}</td><td>{e(LABELS[m])}</td><td>{shown(per[r][m]['pearson'])}</td>"
        f"<td>{shown(per[r][m]['spearman'])}</td><td>{shown(per[r][m]['top10_overlap'])}</td>"
        f"<td>{PAPER_MRPC_RANK1.get(m, '') if r == '1' else ''}</td></tr>"
        for r in ranks for m in COMPARED)
    exact = "".join(f"<tr><td>{r}</td><td>{shown(summary['exact_seconds'][r])}</td></tr>"
                    for r in ranks)
    base = settings.base
    intro = (f"Model <code>{e(str(base.model))}</code> on <code>"
             f"{e(str(base.data or 'BBC News (shipped)'))}</code>, {settings.runs} runs (seeds "
             f"0 to {settings.runs - 1}: split, noise draw, LoRA initialisation, data order) per "
             f"rank, {base.noise:.0%} of the training labels flipped. Scores: influence on the "
             "mean validation loss, every method on the same damping. Means with 95% t "
             "intervals over runs.")
    body = "".join(figures) + (
        "<h2>Numbers</h2><table><tr><th>rank</th><th>method</th><th>Pearson</th>"
        "<th>Spearman</th><th>top-10% overlap</th><th>paper (MRPC, Pearson)</th></tr>"
        f"{rows}</table><h2>Seconds of Exact per rank</h2><table><tr><th>rank</th>"
        f"<th>seconds</th></tr>{exact}</table>")
    return study_page("Approximation error across LoRA ranks", intro, body)
