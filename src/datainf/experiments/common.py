"""What the paper's experiments share: one detect-mislabeled run per cell (a LoRA rank and a
seed), cached by its settings so that the experiments share fine-tunes and gradient stores, and
the outputs (summary.json, a CSV, report.html) written whole or not at all.

A cell is the detect-mislabeled pipeline itself
(:func:`datainf.jobs.detect_mislabeled.prepared`): the same data loading, label noise,
fine-tuning, predictions and gradient stores, in a folder of the cache named by a hash of
the settings that decide them. Scores are recomputed (cheap).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..data.text import builtin_dataset
from ..errors import DataInfError
from ..jobs.detect_mislabeled import COMMAND as DETECT
from ..jobs.detect_mislabeled import (
    DEMO_NOISE,
    REFERENCES,
    Config,
    Prepared,
    from_command,
    prepared,
    score_all,
)
from ..jobs.runs import is_main, settings_json
from ..methods import LABELS as METHOD_LABELS
from ..metrics import mean_interval
from ..options import said

LABELS = {**METHOD_LABELS, **REFERENCES}  # the methods' and the reference scores'


# The presets of the studies on the detect-mislabeled pipeline ("cells": a LoRA rank and a
# seed each). Ranks and runs: 25 fine-tunes of the approximation study fit in 30 minutes on a
# 2-core CPU at 400 training and 100 validation articles of 64 tokens
CELLS = {
    "approximation": {"ranks": "1,2,4,8,16", "runs": 5},
    "mislabeled": {"ranks": "4", "runs": 5},
    # 13 fine-tunes a run (the run's own, 4 rankings x 3 shares)
    "removal": {"ranks": "4", "runs": 3},
}
# built-in data at the experiments' size; 1e-3 because 400 examples give 100 steps in 4 epochs,
# too few at 3e-4 to fit (validation accuracy 0.52 on BBC News against 0.85 at 1e-3)
EXPERIMENT_DATA = {"train_size": 400, "val_size": 100, "learning_rate": 1e-3}
QUICK = {"train_size": 40, "val_size": 20, "max_length": 16, "epochs": 1, "max_epochs": 1,
         "runs": 2}
QUICK_HELP = ("a tiny version that checks the set-up, not the method (a few minutes on 2 CPU "
              "cores; its numbers mean nothing)")
# the detect-mislabeled options a cell study takes (an experiment sets the adapter, LoRA rank
# and alpha, seed and methods per cell), the defaults it gives them and their help
CELL_OPTIONS = {
    "data": DETECT.layout["data"],
    "model": tuple(n for n in DETECT.layout["model"]
                   if n not in ("adapter", "lora_r", "lora_alpha", "seed")),
    "scoring": tuple(n for n in DETECT.layout["scoring"] if n != "methods")}
# one training budget for every cell (no second round, no early stop unless asked): the
# removal study's retrainings then differ in their data only
CELL_DEFAULTS = {"max_length": 64, "max_epochs": None, "patience": 0}
CELL_HELPS = {
    "train_size": f"training examples drawn (default: {EXPERIMENT_DATA['train_size']} of "
                  "built-in data; all of a file)",
    "val_size": f"validation examples drawn (default: {EXPERIMENT_DATA['val_size']} of "
                "built-in data; --val-fraction of a file)",
    "learning_rate": f"AdamW (default: {EXPERIMENT_DATA['learning_rate']:g} on built-in data, "
                     "the job's default on a file)",
    "noise": f"share of the training labels flipped to measure detection (default: "
             f"{DEMO_NOISE:g} on any data)",
}
CELL_DESCRIPTION = (" Built-in data (default: BBC News) at 400 training and 100 validation "
                    "examples of 64 tokens, learning rate 1e-3. Every cell is fine-tuned for "
                    "--epochs epochs (--max-epochs: default --epochs; --patience: default 0, no "
                    "early stop), so that cells differ only in what the experiment varies.")


def cell_options(name: str) -> tuple[tuple[str, dict], ...]:
    """The options of the cell study ``name`` itself (its "experiment" group)."""
    own = (("--ranks", {"help": f"comma-separated LoRA ranks (default: {CELLS[name]['ranks']})"}),
           ("--runs", {"type": int, "help": "runs per rank (seeds 0, 1, ...; default: "
                                            f"{CELLS[name]['runs']})"}),
           ("--quick", {"action": "store_true",
                        "help": f"{QUICK_HELP}: 40 training and 20 validation examples of 16 "
                                "tokens, 1 epoch, 2 runs, the first two ranks"}),
           ("--out", {"help": f"the experiment's folder (default: runs/experiment-{name})"}),
           ("--cache", {"default": "runs/experiment-cache",
                        "help": "fine-tunes and gradient stores, shared by the experiments"}),
           ("--quiet", {"action": "store_true", "help": "no progress bars or stage lines"}))
    if name == "removal":
        own += (("--shares", {"default": "5,10,20", "help": "percentages of the training data "
                              "removed (comma-separated)"}),)
    return own


def cell_settings(name: str, settings: dict, *, ranks: str | None, runs: int | None,
                  quick: bool, out: str | None, cache: str, quiet: bool,
                  shares: str | None = None, process_group: object | None = None) -> Settings:
    """The Settings of the cell study ``name`` from its command's options: ``settings`` the
    detect-mislabeled ones (:data:`CELL_OPTIONS`, as given), the others its own."""
    given = dict(settings)
    config = from_command(**settings, methods=("datainf",), progress=False if quiet else None,
                          process_group=process_group)
    if given.get("noise") is None:  # the studies measure detection: flipped labels on any data
        config = replace(config, noise=DEMO_NOISE)
    if builtin_dataset(given.get("data")) is not None:  # built-in data at the studies' size
        config = replace(config, **{k: given.get(k) or v for k, v in EXPERIMENT_DATA.items()})
    config = replace(config, max_epochs=given.get("max_epochs") or config.epochs)
    preset = QUICK if quick else CELLS[name]  # --quick: the first two of the ranks
    runs = runs if runs is not None else preset["runs"]
    ranks = ranks or ",".join(CELLS[name]["ranks"].split(",")[: 2 if quick else None])
    if quick:
        config = replace(config, **{k: v for k, v in QUICK.items() if k != "runs"})
    try:
        ranks = tuple(int(r) for r in ranks.split(","))
    except ValueError:
        raise DataInfError(f"{said('ranks')} takes comma-separated integers, not {ranks!r}"
                           ) from None
    extra = {"quick": bool(quick)}
    if name == "removal":
        try:
            extra["shares"] = tuple(float(x) / 100 for x in shares.split(","))
        except ValueError:
            raise DataInfError(f"{said('shares')} takes comma-separated percentages, not "
                               f"{shares!r}") from None
        if not all(0 < x < 1 for x in extra["shares"]):
            raise DataInfError(f"{said('shares')} must be percentages between 0 and 100, not "
                               f"{shares!r}")
    return Settings(base=config, ranks=ranks, runs=runs,
                    out=out or f"runs/experiment-{name}", cache=cache, extra=extra)


@dataclass
class Settings:
    """An experiment's settings: the base run (data, model, fine-tuning) and what varies.

    ``base``: a detect-mislabeled Config whose ``lora_r`` and ``seed`` are replaced per cell;
    ``ranks`` and ``runs`` (seeds 0..runs-1) span the cells; ``out``: the experiment's folder;
    ``cache``: where cells are kept (shared by every experiment pointed at it).
    """

    base: Config
    ranks: tuple[int, ...]
    runs: int
    out: str
    cache: str
    extra: dict = field(default_factory=dict)

    def cell(self, rank: int, seed: int) -> Config:
        """The run of one cell: LoRA rank ``rank`` (alpha = 2 rank, as the default 8 at rank 4)
        and ``seed`` (split, noise draw, LoRA initialisation, data order)."""
        return self.cell_of(replace(self.base, lora_r=rank, lora_alpha=2 * rank, seed=seed))

    def cell_of(self, config: Config) -> Config:
        """``config`` with its folder in the cache: named by its rank and seed and a hash of
        the settings that decide its fine-tune and gradients."""
        key = hashlib.sha256(json.dumps(config.expensive(), sort_keys=True).encode())
        folder = Path(self.cache) / f"r{config.lora_r}-s{config.seed}-{key.hexdigest()[:10]}"
        return replace(config, out=str(folder), stage_seconds={})

    def check(self) -> None:
        if not self.ranks or min(self.ranks) < 1:
            raise DataInfError(f"{said('ranks')} must be positive integers, not "
                               f"{list(self.ranks)}")
        if self.runs < 1:
            raise DataInfError(f"{said('runs')} must be at least 1, not {self.runs}")
        if Path(self.out).resolve() == Path(self.cache).resolve():
            raise DataInfError("--out and --cache must be different folders")


def cells(settings: Settings) -> Iterator[tuple[int, int, Prepared, Config]]:
    """Every (rank, seed) cell, prepared (fine-tuned and with gradients; cached), in order."""
    settings.check()
    for rank in settings.ranks:
        for seed in range(settings.runs):
            config = settings.cell(rank, seed)
            _say(settings, f"rank {rank}, run {seed + 1} of {settings.runs}")
            with prepared(config) as p:
                yield rank, seed, p, config


def scores_of(config: Config, p: Prepared) -> tuple[dict, dict, dict]:
    """(scores, seconds, notes) of ``config.methods`` and the references, as
    detect-mislabeled computes them (higher = more suspicious)."""
    scores, seconds, notes, _ = score_all(config, p.inputs, p.preds.train_loss)
    return scores, seconds, notes


def interval(values, within: tuple[float, float] = (-np.inf, np.inf)) -> dict:
    """{"mean", "low", "high", "n"}: the mean over runs with its 95% t interval, clipped to
    ``within``, the range the quantity can take (an AUC's [0, 1], seconds' [0, inf), ...)."""
    values = [v for v in values if v is not None and np.isfinite(v)]
    if not values:
        return {"mean": None, "low": None, "high": None, "n": 0}
    mean, low, high = mean_interval(np.asarray(values, dtype=np.float64))
    low, high = max(low, within[0]), min(high, within[1])  # NaN (one run) stays NaN
    clean = lambda x: None if not np.isfinite(x) else round(float(x), 4)  # noqa: E731
    return {"mean": clean(mean), "low": clean(low), "high": clean(high), "n": len(values)}


# the ranges of the quantities the studies average over runs
UNIT = (0.0, 1.0)             # AUC, accuracy, recall, a share
CORRELATION = (-1.0, 1.0)
DIFFERENCE = (-1.0, 1.0)      # of two numbers in [0, 1]
POSITIVE = (0.0, np.inf)      # seconds, losses, ratios of them


def has_spread(value: dict | None) -> bool:
    """Whether an interval dict carries a real interval: 2 or more runs that differ (one run
    has none; identical runs give a zero-width one, which proves nothing)."""
    return bool(value) and value["n"] >= 2 and value["low"] is not None \
        and value["high"] > value["low"]


QUICK_NOTE = ("--quick: a tiny version that checks that everything runs. Its numbers come "
              "from a few examples, a model at chance and 1 or 2 runs: they mean nothing about "
              "the methods.")


def write_outputs(settings: Settings, name: str, summary: dict, table, html: str) -> None:
    """summary.json, NAME.csv and report.html in ``settings.out``; summary.json last (by
    rank 0 alone when the runs share a process group)."""
    if not is_main(settings.base.process_group):
        return
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    base = settings_json(settings.base, leave_out=("stage_seconds",))
    summary = {"experiment": name, "ranks": list(settings.ranks), "runs": settings.runs,
               "quick": bool(settings.extra.get("quick")), "cache": settings.cache,
               "base": base, **summary}
    write_files(out, name, summary, table, html)


def write_files(out: Path, name: str, summary: dict, table, html: str) -> None:
    """NAME.csv, report.html and summary.json (last: its presence says the experiment is
    complete) in ``out``, each whole or not at all. A ``--quick`` run (``summary["quick"]``)
    says on its page that its numbers mean nothing."""
    if summary.get("quick"):
        html = html.replace("</h1>", f"</h1>\n<p class='warning'><b>{QUICK_NOTE}</b></p>", 1)
    for file, write in ((f"{name}.csv", lambda p: table.to_csv(p, index=False)),
                        ("report.html", lambda p: Path(p).write_text(html, encoding="utf-8")),
                        ("summary.json",
                         lambda p: Path(p).write_text(json.dumps(summary, indent=2)))):
        tmp = out / f"{file}.tmp"
        write(tmp)
        os.replace(tmp, out / file)


def interval_bars(ax, groups: list, series: dict, ylabel: str) -> None:
    """Grouped bars with 95% intervals: ``series[name][group] = interval dict``."""
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        x = np.arange(len(groups)) + (i - (len(series) - 1) / 2) * width
        means = [values[g]["mean"] if values[g]["mean"] is not None else np.nan for g in groups]
        low = [m - (values[g]["low"] if values[g]["low"] is not None else m)
               for m, g in zip(means, groups, strict=True)]
        high = [(values[g]["high"] if values[g]["high"] is not None else m) - m
                for m, g in zip(means, groups, strict=True)]
        ax.bar(x, means, width, yerr=[low, high], capsize=3, label=name,
               hatch=["", "//", "..", "xx", "\\\\", "++", "oo"][i % 7], edgecolor="black",
               linewidth=0.5)
    ax.set_xticks(np.arange(len(groups)), [str(g) for g in groups])
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def _say(settings: Settings, message: str) -> None:
    if settings.base.progress is not False:
        logging.getLogger("datainf.experiment").info(message)
