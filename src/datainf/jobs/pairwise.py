"""Pairwise scoring for the explain-* jobs: every method's influence of every training example
on every query, streamed a batch of queries at a time, with each query's most helpful and most
harmful training examples, and the (m, n) matrices when asked for.

Scores have the paper's sign: NEGATIVE = the training example helps (up-weighting it lowers
the query's loss), positive = harmful.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from ..errors import DataInfError
from ..files import write_atomic
from ..gradients.source import RowRange, blocks_matching, blocks_pattern
from ..methods import LABELS, PAIRWISE, Inputs, TopK, score_each, top_k_of
from ..methods.damping import Damping, damping_rule
from ..options import option
from .pipeline import DAMPING_HELP, DAMPING_RULE_HELP, DEVICE_HELP
from .runs import settings_json, warn_unconverged

OUTPUTS = ("scores.npz", "top.jsonl", "summary.json", "report.html")
SIDES = ("helpful", "harmful")
# the options of PairwiseOptions that the explain-* commands show, by --help group
SCORING_OPTIONS = ("methods", "blocks", "damping", "damping_rule")
OUTPUT_OPTIONS = ("top", "matrix", "out", "progress")
# DataInf (the paper's), DataInf on unit gradients (ahead of DataInf on the generation
# study's tasks), the Hessian-free baseline and cosine (the best or level with the best on
# every LDS and class-detection measure so far, README "Defaults from the evidence");
# --methods adds the others.
DEFAULT_METHODS = ("datainf", "datainf_normalized", "hessian_free", "cosine")


@dataclass
class PairwiseOptions:
    """What an explain-* job scores and writes: cheap settings, which may change between runs
    on the same --out (the job's own settings follow these in its Config)."""

    methods: tuple[str, ...] = option(
        DEFAULT_METHODS, "comma-separated: datainf, hessian_free, exact, lissa; variants of "
        "ours with gradients scaled to unit norm: datainf_normalized, cosine; baselines: less "
        "(cosine of Adam-preconditioned gradients; needs an adapter datainf trained), repsim "
        "(cosine of the model's hidden states)", kind="list")
    blocks: str | None = option(  # regular expression: only matching blocks count
        None, "regular expression: only the matching gradient blocks count")
    damping: float = option(0.1, DAMPING_HELP)
    damping_rule: str = option(  # or "absolute" (methods.damping.damping_rule)
        "relative", DAMPING_RULE_HELP, metavar="{relative,absolute}")
    top: int = option(  # most helpful and most harmful listed per query
        5, "most helpful and most harmful training examples listed per query")
    matrix: bool = option(  # write scores.npz (m x n per method)
        True, "skip scores.npz (8 x queries x training examples bytes per method)",
        flag="--no-matrix", kind="off")
    query_batch: int = 64               # queries scored together (memory: query_batch x n)
    device: str = option("cpu", DEVICE_HELP)
    # torch.distributed: the ranks share fine-tuning, gradients and scoring; rank 0 writes
    # the outputs. None: one process
    process_group: object | None = None

    # the job's settings that decide its adapter and stores
    EXPENSIVE: ClassVar[tuple[str, ...]] = ()

    def expensive(self) -> dict:
        """The settings of ``EXPENSIVE`` as run.json records them."""
        return settings_json(self, self.EXPENSIVE)

    def scoring(self) -> dict:
        """The options of :func:`score_queries`."""
        return {"methods": self.methods,
                "damping": damping_rule(self.damping_rule, self.damping), "blocks": self.blocks,
                "top": self.top, "query_batch": self.query_batch, "device": self.device,
                "matrix": self.matrix, "process_group": self.process_group}

    def check_scoring(self) -> None:
        """Refuses unknown methods and a bad --blocks pattern (numbers: the job's check)."""
        unknown = [m for m in self.methods if m not in PAIRWISE]
        if unknown or not self.methods:
            raise DataInfError(f"unknown methods {unknown}; choose from {', '.join(PAIRWISE)}")
        if self.blocks is not None:
            blocks_pattern(self.blocks)
        damping_rule(self.damping_rule, 1.0)  # refuses an unknown rule


def score_queries(inputs: Inputs, *, methods: tuple[str, ...], damping: Damping,
                  blocks: str | None, top: int, query_batch: int, device: str,
                  matrix: bool, folder: Path | None,
                  process_group: object | None = None) -> tuple[dict, dict, dict]:
    """(tops, seconds, notes) per method: ``tops[method][j]`` = {"helpful": [(i, score)],
    "harmful": [(i, score)]}, the ``top`` most helpful (negative scores only) and most harmful
    (positive scores only) training examples of query j; the method's seconds; notes (LiSSA:
    whether it converged). With ``matrix``, the (m, n) float64 score matrix too, written as
    folder/METHOD.npy a batch of queries at a time (not written when ``folder`` is None: the
    ranks other than 0); memory holds
    ``query_batch`` x n scores, never the whole matrix. Without ``matrix``, the engine's
    ``top_k`` scores the training rows a chunk at a time: memory does not grow with n at all.
    With a process group, every rank takes the same path and gets the same lists.
    ``inputs``: the training and query gradients, and what other methods read
    (:class:`~datainf.methods.Inputs`); ``blocks`` selects among the gradients' blocks."""
    inputs = replace(inputs, train=blocks_matching(inputs.train, blocks),
                     test=blocks_matching(inputs.test, blocks))
    n, m = inputs.train.num_rows, inputs.test.num_rows
    k = min(top, n)
    ranges = query_ranges(m, query_batch, getattr(inputs.test, "owners", None))

    def score(method: str, est, queries) -> list[dict]:
        written = None
        if matrix and folder is not None:
            written = np.lib.format.open_memmap(folder / f"{method}.npy", mode="w+",
                                                dtype=np.float64, shape=(m, n))
        entries = []
        for first, last in ranges:
            if not matrix:  # the engine's top k: memory does not grow with n
                found = est.top_k(RowRange(queries, first, last), k)
            else:
                scores = est.score(RowRange(queries, first, last))  # (q, n)
                if written is not None:
                    written[first:last] = scores.cpu().numpy()
                found = top_k_of(scores, k)
            entries += _entries(found)
        if written is not None:
            written.flush()
        return entries

    return score_each(methods, inputs, score, damping=damping, progress=False, device=device,
                      process_group=process_group)


def query_ranges(m: int, query_batch: int, owners=None) -> list[tuple[int, int]]:
    """(first, last) row ranges of at most ``query_batch`` of the m query rows; with
    ``owners`` (per-token rows, sorted by owner), each range holds whole owners (at least one,
    however many rows it has), so that every owner is scaled by all its rows."""
    if owners is None:
        return [(f, min(m, f + query_batch)) for f in range(0, m, query_batch)]
    bounds = [0, *(torch.nonzero(owners[1:] != owners[:-1]).flatten() + 1).tolist(), m]
    ranges, first = [], 0
    for start, end in itertools.pairwise(bounds):  # one owner's rows: start..end
        if end - first > query_batch and start > first:  # it would overflow: close before it
            ranges.append((first, start))
            first = start
    ranges.append((first, m))
    return ranges


def _entries(top: TopK) -> list[dict]:
    """A :class:`~datainf.methods.base.TopK` as one dict per query: {"helpful": [(i, score)],
    "harmful": [(i, score)]}, helpful only with score < 0 and harmful only with score > 0 (so
    the two lists never share an example; either may be shorter than k, or empty: when every
    training example helps a query, none is listed as harmful)."""
    sides = {"helpful": (top.helpful, top.helpful_scores, lambda s: s < 0),
             "harmful": (top.harmful, top.harmful_scores, lambda s: s > 0)}
    per_side = {side: [[(i, s) for i, s in zip(i.tolist(), s.tolist(), strict=True) if keep(s)]
                       for i, s in zip(index.cpu(), scores.cpu(), strict=True)]
                for side, (index, scores, keep) in sides.items()}
    return [{"helpful": h, "harmful": x} for h, x in zip(per_side["helpful"],
                                                          per_side["harmful"], strict=True)]


@contextmanager
def matrix_folder(out: Path, wanted: bool = True) -> Iterator[Path | None]:
    """A temporary folder in ``out`` for :func:`score_queries`' matrices (None when not
    wanted), removed afterwards."""
    if not wanted:
        yield None
        return
    folder = Path(tempfile.mkdtemp(prefix="scores.", dir=out))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def kept(example) -> dict:
    """An example's kept keys of the user's file, as a row of top.jsonl holds them."""
    return {"keys": example.extra} if example.extra else {}


def save_matrices(folder: Path, methods, out: Path, name: str = "scores.npz",
                  **extra: np.ndarray) -> None:
    """folder/METHOD.npy of every method (memory-mapped, not read whole) and the ``extra``
    arrays into out/``name``, written whole or not at all."""
    arrays = {m: np.load(folder / f"{m}.npy", mmap_mode="r") for m in methods}
    tmp = out / f"{name}.tmp.npz"
    np.savez(tmp, **extra, **arrays)
    del arrays
    os.replace(tmp, out / name)


@dataclass
class Scored:
    """Every method's pairwise scores of a run: ``tops[method][j]`` (see
    :func:`score_queries`), seconds and notes per method, and the folder of the (m, n)
    matrices (None: not written, or not by this rank)."""

    tops: dict
    seconds: dict
    notes: dict
    folder: Path | None


@contextmanager
def scored(run, options: PairwiseOptions, inputs: Inputs) -> Iterator[Scored]:
    """The "scoring" stage of an explain-* run (``run``: a :class:`~datainf.jobs.pipeline.
    Run`); the matrices' temporary folder lives while the block runs. Rank 0 warns of every
    method that did not converge."""
    with matrix_folder(run.out, options.matrix and run.main) as folder:
        with run.stage("scoring"):
            tops, seconds, notes = score_queries(inputs, folder=folder, **options.scoring())
        if run.main:
            warn_unconverged(notes)
        yield Scored(tops, seconds, notes, folder)


def write_outputs(options: PairwiseOptions, out: Path, scores: Scored, rows: list[dict],
                  entry: Callable[[int, float, int], dict], head: dict, sign: str,
                  extra: dict, page: Callable[[dict, list[dict]], str]) -> dict:
    """scores.npz, top.jsonl, report.html, then summary.json (last: its presence says the run
    is complete), each whole or not at all. ``rows``: one dict per query (the job's fields),
    to which each method's lists are added, each training example as ``entry(i, score,
    rank)``; ``head``: the summary's first keys (command, config, sizes); ``page(summary,
    rows)``: the report. Returns the summary."""
    if scores.folder is not None:
        save_matrices(scores.folder, scores.tops, out)
    for j, row in enumerate(rows):
        for method, per_query in scores.tops.items():
            row[method] = {side: [entry(i, s, r + 1) for r, (i, s) in enumerate(per_query[j][side])]
                           for side in SIDES}
    write_atomic(out / "top.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    summary = {
        **head,
        "methods": {m: {"label": LABELS[m], "seconds": round(s, 4), **scores.notes.get(m, {})}
                    for m, s in scores.seconds.items()},
        "sign": sign,
        "outputs": [name for name in OUTPUTS if name != "scores.npz" or scores.folder],
        **extra,
    }
    summary["stage_seconds"] = {k: round(v, 2) for k, v in options.stage_seconds.items()}
    write_atomic(out / "report.html", page(summary, rows))
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    return summary
