"""Does acting on the scores pay? Remove what a method flags, fine-tune again, measure.

Per run (a seed) at one LoRA rank: the detect-mislabeled pipeline ranks the training examples
by each method (DataInf, Hessian-free, the training loss, and a random order as the control);
for each share k (default 5%, 10%, 20%) the top ceil(k n) examples are removed and the model is
fine-tuned again from the same initialisation (same seed: same LoRA matrices and head) on what
remains; the validation accuracy and loss of that model are compared with the run's model
trained on everything (k = 0). Removed examples that were flipped on purpose are counted too.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pandas as pd

from ..jobs.detect_mislabeled import prepared
from ..report import figure_png, study_page
from .common import (
    DIFFERENCE,
    LABELS,
    POSITIVE,
    UNIT,
    Settings,
    cells,
    has_spread,
    interval,
    scores_of,
    write_outputs,
)

RANKED_BY = ("datainf", "hessian_free", "loss", "random")
SHARES = (0.05, 0.10, 0.20)
NAMES = {**LABELS, "random": "Random order (control)"}


def run(settings: Settings) -> dict:
    """Validation accuracy and loss after removing each method's top k%; writes summary.json,
    removal.csv and report.html into ``settings.out`` and returns the summary."""
    shares = tuple(settings.extra.get("shares", SHARES))
    settings = replace(settings, base=replace(settings.base, methods=("datainf", "hessian_free")))
    rows = []
    for rank, seed, p, config in cells(settings):
        scores, _, _ = scores_of(config, p)
        scores["random"] = np.random.default_rng(seed).permutation(len(p.train)).astype(float)
        flipped = p.train.flipped
        rows.append(_row(rank, seed, "none", 0.0, 0, 0, p))
        for method in RANKED_BY:
            order = np.argsort(-scores[method], kind="stable")
            for share in shares:
                top = order[: math.ceil(share * len(order))]
                retrain = replace(config, exclude=tuple(sorted(int(i) for i in top)))
                retrain = settings.cell_of(retrain)
                with prepared(retrain, with_gradients=False) as again:
                    n_flipped = int(flipped[top].sum()) if flipped is not None else 0
                    rows.append(_row(rank, seed, method, share, len(top), n_flipped, again))
    table = pd.DataFrame(rows)
    summary: dict = {"shares": list(shares), "accuracy": {}, "loss": {}, "flipped_removed": {}}
    for method in ("none", *RANKED_BY):
        at = table[table["method"] == method]
        for share in sorted(set(at["share"])):
            key = f"{method}@{share:g}"
            sel = at[at["share"] == share]
            summary["accuracy"][key] = interval(sel["val_accuracy"], UNIT)
            summary["loss"][key] = interval(sel["val_loss"], POSITIVE)
            summary["flipped_removed"][key] = interval(sel["flipped_removed"], POSITIVE)
    summary["gain_over_random"] = gains_over_random(table)
    summary["loss_change_over_random"] = gains_over_random(table, "val_loss")
    summary["verdict"] = verdict(summary, shares)
    write_outputs(settings, "removal", summary, table, _report(settings, summary, shares))
    return summary


def gains_over_random(table: pd.DataFrame, column: str = "val_accuracy") -> dict:
    """Per method and share, ``column`` (validation accuracy or loss) after removing its top k%
    minus the same after removing as many at random, paired by run (seed): mean with its 95%
    interval."""
    by = table.set_index(["method", "share", "rank", "seed"])[column].sort_index()
    gains = {}
    for method in RANKED_BY[:-1]:
        for share in sorted(set(table.loc[table["method"] == method, "share"])):
            diff = by.loc[method, share] - by.loc["random", share]
            gains[f"{method}@{share:g}"] = interval(
                diff.to_numpy(), DIFFERENCE if column == "val_accuracy" else (-np.inf, np.inf))
    return gains


def verdict(summary: dict, shares: tuple[float, ...]) -> str:
    """Which ranking to act on, from the numbers: the one whose removal gains most over random
    removal at the largest share where any gain's 95% interval lies above zero; failing that,
    what the validation loss says (an interval below zero)."""
    if not any(has_spread(g) for g in summary["gain_over_random"].values()):
        return ("No verdict: too few runs for an interval (at least 2 runs whose results "
                "differ); run more (--runs).")
    found = _clearest(summary["gain_over_random"], shares, +1)
    if found:
        share, best, gain = found
        return (f"Act on {NAMES[best]}: removing its top {share:.0%} raised the validation "
                f"accuracy by {gain['mean']:+.3f} over removing as many at random "
                f"(95% interval {gain['low']:+.3f} to {gain['high']:+.3f}).")
    said = ("No ranking beat random removal clearly on validation accuracy here (no 95% "
            "interval of the gain over random lies above zero): more runs, or acting on these "
            "scores does not pay in accuracy for this data.")
    found = _clearest(summary.get("loss_change_over_random", {}), shares, -1)
    if found:
        share, best, change = found
        said += (f" On the validation loss, removing the top {share:.0%} by {NAMES[best]} "
                 f"lowered it by {-change['mean']:.3f} against random removal (95% "
                 f"interval {change['low']:+.3f} to {change['high']:+.3f}).")
    return said


def _clearest(changes: dict, shares: tuple[float, ...], sign: int):
    """(share, method, interval) at the largest share where some method's change over random
    lies wholly on the side of ``sign`` (+1: above zero, -1: below), the method with the
    largest sign x mean there; None when there is none."""
    for share in sorted(shares, reverse=True):
        clear = {}
        for method in RANKED_BY[:-1]:
            change = changes.get(f"{method}@{share:g}")
            if not has_spread(change):  # one run, or identical runs: no evidence either way
                continue
            bound = change["low"] if sign > 0 else change["high"]
            if sign * bound > 0:
                clear[method] = change
        if clear:
            best = max(clear, key=lambda m: sign * clear[m]["mean"])
            return share, best, clear[best]
    return None


def _row(rank: int, seed: int, method: str, share: float, removed: int, flipped: int,
         p) -> dict:
    return {"rank": rank, "seed": seed, "method": method, "share": share, "removed": removed,
            "flipped_removed": flipped, "n_train": len(p.train),
            "val_accuracy": p.preds.val_accuracy(p.val),
            "val_loss": float(p.preds.val_loss.mean())}


def _report(settings: Settings, summary: dict, shares: tuple[float, ...]) -> str:
    xs = [0.0, *shares]

    def curves(ax):
        for i, method in enumerate(RANKED_BY):
            keys = ["none@0", *(f"{method}@{s:g}" for s in shares)]
            means = [summary["accuracy"][k]["mean"] for k in keys]
            ax.plot([100 * x for x in xs], means, marker="os^D"[i], label=NAMES[method],
                    linestyle=["-", "--", "-.", ":"][i])
        ax.set_xlabel("share of training data removed, highest score first (%)")
        ax.set_ylabel("validation accuracy after fine-tuning again")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    return study_page("removal_study.html", "Removing what the scores flag",
                      base=settings.base, ranks=settings.ranks, runs=settings.runs,
                      summary=summary, shares=shares, ranked_by=RANKED_BY, names=NAMES,
                      curves=figure_png(curves))
