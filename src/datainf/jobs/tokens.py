"""``explain-generation --per-token``: every scored token of each query attributed alone.

A query's loss is the mean NLL of its scored tokens (its response, or the span of
``--loss-on``), so token t's score of training example i is the method's score of the
gradient of token t's loss alone, and the query's score is the mean of its tokens' scores
(every method; see :mod:`datainf.gradients.tokens`). Cost: one forward and backward per token
(token rows batched ``--batch-size`` at a time), then the scoring of R token rows instead of m
queries; memory stays that of the pairwise scoring (``query_batch`` rows x n at a time).

The other side: for each query's most helpful training examples (by the query's score), which
of their own attributed tokens carry the influence, on each of the query's tokens: the
example's token rows scored against the query's token rows with the inverse of the whole
training set (``InfluenceEstimator.score_rows``), a (query tokens, example tokens) matrix whose
mean is the example's score. One backward per token of those examples (the examples of each
query token's own lists would cost up to one backward per token of the whole training set).

Outputs: ``tokens.jsonl`` (per query, per token: its text and its ``--top`` most helpful and
most harmful training examples; and per method the query's most helpful training examples
with the score of each of their tokens, against the whole query and, ``by_query_token``,
against each query token) and, with ``--token-matrix``, ``token_scores.npz`` (per method an
(R, n) float64 array, the tokens of all queries in file order; ``query`` and ``position``:
each token's query row and its position in the query's token sequence)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..files import write_atomic
from ..gradients.collect import collect_gradients
from ..gradients.source import RowRange, blocks_matching
from ..gradients.tokens import TokenBatches, TokenGradients, token_batches
from ..methods import METHODS, Inputs, score_each
from .pairwise import SIDES, matrix_folder, save_matrices, score_queries
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
    their texts; ``matrix``: whether token_scores.npz was written (--token-matrix, rank 0)."""

    tops: dict
    seconds: dict
    tokens: TokenBatches
    texts: list[str]
    matrix: bool
    # method -> per query: [(training example, [(position, text, score) of its tokens])], the
    # query's most helpful examples in order (None: no training tokens, a --run folder's)
    training: dict | None = None


def score_tokens(run: Run, options, model, tokenizer, batches: list[dict], path: Path,
                 inputs: Inputs, *, matrix: bool, query_tops: dict,
                 train_batches: Callable[[list[int]], list[dict]] | None) -> TokenScores:
    """The "token gradients" stage (a store at ``path``, reused when complete) and the
    "token scoring" stage: the per-token scores of ``options.methods``' gradient methods.
    ``batches``: the queries' batches labelled on the attributed tokens. With
    ``train_batches(examples)`` (the batches of those training examples, labelled alike), the
    "training tokens" stage: the token split of the most helpful examples of each query in
    ``query_tops`` (the pairwise lists of :func:`datainf.jobs.pairwise.score_queries`)."""
    tokens = token_batches(batches, rows_per_batch=options.batch_size)
    store = collected(run, "token gradients", [path], lambda: collect_gradients(
        model, tokens.batches, "causal_lm", out=str(path), progress=options.progress,
        process_group=options.process_group))
    methods = token_methods(options.methods)
    by_token = replace(inputs, test=TokenGradients(store, tokens.owners), test_features=None)
    settings = {**options.scoring(), "methods": methods, "matrix": matrix}
    with matrix_folder(run.out, matrix and run.main) as folder, run.stage("token scoring"):
        tops, seconds, _ = score_queries(by_token, folder=folder, **settings)
        if folder is not None:
            save_matrices(folder, methods, run.out, "token_scores.npz",
                          query=tokens.owners.numpy(), position=tokens.positions.numpy())
    scores = TokenScores(tops, seconds, tokens, token_texts(tokenizer, tokens),
                         folder is not None)
    if train_batches is not None:
        with run.stage("training tokens"):
            scores.training = training_splits(options, by_token, query_tops, methods, model,
                                              tokenizer, train_batches)
    return scores


def token_texts(tokenizer, tokens: TokenBatches) -> list[str]:
    """The text of each token row's scored token."""
    return [tokenizer.decode([int(batch["labels"][b, t])]) for batch in tokens.batches
            for b, t in zip(*torch.nonzero(batch["labels"] != -100, as_tuple=True), strict=True)]


def training_splits(options, inputs: Inputs, query_tops: dict, methods: tuple[str, ...],
                    model, tokenizer, train_batches) -> dict:
    """Per method, per query: its most helpful training examples (in ``query_tops``' order),
    each as (example, [(position, text, scores) of its attributed tokens]), ``scores`` (T_j,)
    float: that token's score on each of query j's T_j attributed tokens (``inputs.test``:
    the queries' :class:`TokenGradients`). The mean over the query's tokens is the token's
    score against the whole query, and the mean of those over the example's tokens is the
    example's score (both sides linear). The token gradients of every example listed are
    taken once, in memory (every rank alike)."""
    blocks = options.blocks
    inputs = replace(inputs, train=blocks_matching(inputs.train, blocks),
                     test=blocks_matching(inputs.test, blocks))
    counts = torch.bincount(inputs.test.owners, minlength=len(next(iter(query_tops.values()))))
    ends = torch.cumsum(counts, 0).tolist()  # query j's token rows: ends[j] - counts[j] : ends[j]
    listed = sorted({i for m in methods for per_query in query_tops[m]
                     for i, _ in per_query["helpful"]})
    if not listed:
        return {m: [[] for _ in query_tops[m]] for m in methods}
    tokens = token_batches(train_batches(listed), rows_per_batch=options.batch_size)
    rows = collect_gradients(model, tokens.batches, "causal_lm", progress=False)
    texts = token_texts(tokenizer, tokens)
    where = {i: torch.nonzero(tokens.owners == k).flatten() for k, i in enumerate(listed)}

    def split(method: str, est, queries) -> list[list]:
        out = []
        for j, per_query in enumerate(query_tops[method]):
            examples = [i for i, _ in per_query["helpful"]]
            if not examples:
                out.append([])
                continue
            picked = torch.cat([where[i] for i in examples])
            owners = torch.cat([torch.full((len(where[i]),), k) for k, i in enumerate(examples)])
            part = blocks_matching(TokenGradients({n: r[picked] for n, r in rows.items()},
                                                  owners), blocks)
            # (T_j, rows): query j's tokens against the examples' tokens
            s = est.score_rows(RowRange(queries, ends[j] - int(counts[j]), ends[j]), part)
            s = s.T.tolist()
            out.append([(i, [(int(tokens.positions[r]), texts[r], s[q])
                              for q, r in enumerate(picked.tolist()) if owners[q] == k])
                        for k, i in enumerate(examples)])
        return out

    found, _, _ = score_each(methods, inputs, split,
                             damping=options.scoring()["damping"], progress=False,
                             device=options.device, process_group=options.process_group)
    return found


def write_token_outputs(out: Path, scores: TokenScores, rows: list[dict],
                        entry: Callable[[int, float, int], dict]) -> tuple[list[str], list[dict]]:
    """tokens.jsonl (``rows``: one dict per query, the job's fields; each training example
    as ``entry(i, score, rank)``), whole or not at all; returns the names of the per-token
    outputs (token_scores.npz too when scoring wrote it) and the rows written."""
    per_query: list[list[dict]] = [[] for _ in rows]
    for r, (j, t) in enumerate(zip(scores.tokens.owners.tolist(),
                                   scores.tokens.positions.tolist(), strict=True)):
        token = {"position": t, "token": scores.texts[r]}
        for method, lists in scores.tops.items():
            token[method] = {side: [entry(i, s, k + 1) for k, (i, s) in enumerate(lists[r][side])]
                             for side in SIDES}
        per_query[j].append(token)
    for j, row in enumerate(rows):
        row["tokens"] = per_query[j]
        if scores.training is not None:  # the query's most helpful examples, token by token
            row["training_tokens"] = {method: [
                {**entry(i, float(np.mean([np.mean(x) for *_, x in split])), k + 1),
                 "tokens": [{"position": t, "token": text, "score": float(np.mean(x)),
                             "by_query_token": x} for t, text, x in split]}
                for k, (i, split) in enumerate(lists[j])]
                for method, lists in scores.training.items()}
    write_atomic(out / "tokens.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    return (list(OUTPUTS) if scores.matrix else ["tokens.jsonl"]), rows


__all__ = ["TokenScores", "score_tokens", "token_methods", "write_token_outputs"]
