"""``explain-generation --per-token``: every scored token of each query attributed alone.

A query's loss is the mean NLL of its scored tokens (its response, or the span of
``--loss-on``), so token t's score of training example i is the method's score of the
gradient of token t's loss alone, and the query's score is the mean of its tokens' scores
(every method; see :mod:`datainf.gradients.tokens`). Cost: one forward and backward per token
(token rows batched ``--batch-size`` at a time), then the scoring of R token rows instead of m
queries; memory stays that of the pairwise scoring (``query_batch`` rows x n at a time).

Outputs: ``tokens.jsonl`` (per query, per token: its text and its ``--top`` most helpful and
most harmful training examples) and, with ``--token-matrix``, ``token_scores.npz`` (per
method an (R, n) float64 array, the tokens of all queries in file order; ``query`` and
``position``: each token's query row and its position in the query's token sequence).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..files import write_atomic
from ..gradients.collect import collect_gradients
from ..gradients.tokens import TokenBatches, TokenGradients, token_batches
from ..methods import METHODS, Inputs
from .pairwise import SIDES, matrix_folder, score_queries
from .pipeline import Run, collected

OUTPUTS = ("tokens.jsonl", "token_scores.npz")


def token_methods(methods: tuple[str, ...]) -> tuple[str, ...]:
    """The methods of ``methods`` that score gradients (repsim compares representations: it
    has no per-token split here)."""
    return tuple(m for m in methods if METHODS[m].reads == "gradients")


@dataclass
class TokenScores:
    """Every token row's lists (``tops[method][r]`` as in
    :func:`datainf.jobs.pairwise.score_queries`), seconds per method, the token rows and
    their texts; ``matrices``: method -> (R, n) array (with --token-matrix, rank 0)."""

    tops: dict
    seconds: dict
    tokens: TokenBatches
    texts: list[str]
    matrices: dict | None


def score_tokens(run: Run, options, model, tokenizer, batches: list[dict], path: Path,
                 inputs: Inputs, *, matrix: bool) -> TokenScores:
    """The "token gradients" stage (a store at ``path``, reused when complete) and the
    "token scoring" stage: the per-token scores of ``options.methods``' gradient methods.
    ``batches``: the queries' batches labelled on the attributed tokens."""
    tokens = token_batches(batches, rows_per_batch=options.batch_size)
    store = collected(run, "token gradients", [path], lambda: collect_gradients(
        model, tokens.batches, "causal_lm", out=str(path), progress=options.progress,
        process_group=options.process_group))
    inputs = replace(inputs, test=TokenGradients(store, tokens.owners), test_features=None)
    settings = {**options.scoring(), "methods": token_methods(options.methods),
                "matrix": matrix}
    with matrix_folder(run.out, matrix and run.main) as folder, run.stage("token scoring"):
        tops, seconds, _ = score_queries(inputs, folder=folder, **settings)
        matrices = None if folder is None else {
            m: np.load(folder / f"{m}.npy") for m in settings["methods"]}
    texts = [tokenizer.decode([int(batch["labels"][b, t])])
             for batch in tokens.batches
             for b, t in zip(*torch.nonzero(batch["labels"] != -100, as_tuple=True),
                             strict=True)]
    return TokenScores(tops, seconds, tokens, texts, matrices)


def write_token_outputs(out: Path, scores: TokenScores, rows: list[dict],
                        entry: Callable[[int, float, int], dict]) -> list[str]:
    """tokens.jsonl (``rows``: one dict per query, the job's fields; each training example
    as ``entry(i, score, rank)``) and token_scores.npz when the matrices are there, each
    whole or not at all; returns the names written."""
    per_query: list[list[dict]] = [[] for _ in rows]
    for r, (j, t) in enumerate(zip(scores.tokens.owners.tolist(),
                                   scores.tokens.positions.tolist(), strict=True)):
        token = {"position": t, "token": scores.texts[r]}
        for method, lists in scores.tops.items():
            token[method] = {side: [entry(i, s, k + 1) for k, (i, s) in enumerate(lists[r][side])]
                             for side in SIDES}
        per_query[j].append(token)
    write_atomic(out / "tokens.jsonl", "".join(
        json.dumps({**row, "tokens": per_query[j]}) + "\n" for j, row in enumerate(rows)))
    if scores.matrices is None:
        return ["tokens.jsonl"]
    tmp = out / "token_scores.tmp.npz"
    np.savez(tmp, query=scores.tokens.owners.numpy(), position=scores.tokens.positions.numpy(),
             **scores.matrices)
    os.replace(tmp, out / "token_scores.npz")
    return list(OUTPUTS)


__all__ = ["TokenScores", "score_tokens", "token_methods", "write_token_outputs"]
