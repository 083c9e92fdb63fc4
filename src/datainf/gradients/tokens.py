"""Per-token gradients of a causal LM: one gradient row per scored token of each example.

A causal-LM example's loss is the mean NLL of its scored tokens (labels != -100; see
:class:`datainf.gradients.tasks.CausalLM`), so its gradient is the mean of its tokens'
gradients,

    g = (1 / T) sum_t g_t,    g_t = grad of -log p(y_t | y_<t)  (token t's loss alone),

and every estimator's score, linear in the test gradient, splits the same way: the
sequence's score is the mean of its tokens' scores. :func:`token_batches` turns batches of
examples into batches of token rows (each a copy of its example with only that token's label
kept), which :func:`datainf.collect_gradients` with the ``"causal_lm"`` task makes into one
gradient row per token (one backward per token: the rows are batched like any others).
:class:`TokenGradients` marks those rows with the example they belong to, so that the
unit-norm methods (``normalize=True``, ``less``) scale every token row by the norm of its
example's gradient, not its own: the split then holds for them too.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

from ..errors import DataInfError
from .source import GradientSource, as_gradient_source


@dataclass
class TokenBatches:
    """Token rows in batches, and where each row comes from: ``owners[r]``, the example (its
    row among all the examples given, in order) and ``positions[r]``, the index of the token
    in that example's sequence (its label's position; the logits of position - 1 predict
    it). Both (R,) int64, R = the scored tokens of all examples."""

    batches: list[dict]
    owners: torch.Tensor
    positions: torch.Tensor


def scored_positions(labels: torch.Tensor) -> torch.Tensor:
    """The (example, position) pairs of the scored tokens of a (B, T) label batch, (S, 2), in
    example order then position order; position 0 never is (nothing predicts it)."""
    scored = labels != -100
    scored[:, 0] = False
    return scored.nonzero()


def token_batches(batches: Iterable[Mapping[str, torch.Tensor]], rows_per_batch: int = 8
                  ) -> TokenBatches:
    """``batches`` of causal-LM examples (input_ids, attention_mask, labels) as batches of at
    most ``rows_per_batch`` token rows: row r is example ``owners[r]`` whole, its labels -100
    except at ``positions[r]``. A batch of token rows never spans two of ``batches`` (their
    padded lengths may differ), so each row keeps the padding its example was given."""
    if rows_per_batch < 1:
        raise DataInfError(f"rows_per_batch must be at least 1, not {rows_per_batch}")
    out: list[dict] = []
    owners, positions = [], []
    offset = 0
    for batch in batches:
        if "labels" not in batch:
            raise DataInfError("per-token gradients need 'labels' in each batch (-100 where a "
                               "token is not scored)")
        labels = batch["labels"]
        scored = scored_positions(labels)
        for first in range(0, len(scored), rows_per_batch):
            b, t = scored[first : first + rows_per_batch].unbind(1)
            rows = {k: v[b] for k, v in batch.items() if isinstance(v, torch.Tensor)}
            rows["labels"] = torch.full_like(rows["labels"], -100)
            rows["labels"][torch.arange(len(b)), t] = labels[b, t]
            out.append(rows)
        owners += (offset + scored[:, 0]).tolist()
        positions += scored[:, 1].tolist()
        offset += len(labels)
    if not out:
        raise DataInfError("per-token gradients: no example has a scored token")
    return TokenBatches(out, torch.tensor(owners), torch.tensor(positions))


class TokenGradients:
    """Per-token gradient rows (any gradient source of R rows) with ``owners`` (R,): the
    example of each row. Estimators score it like any test source; with unit-norm methods each
    row is scaled by its example's gradient norm (see :class:`~datainf.gradients.source.
    UnitNormRows`), so that the mean of an example's token scores is its sequence score for
    every method."""

    def __init__(self, gradients: object, owners: torch.Tensor) -> None:
        self.source: GradientSource = as_gradient_source(gradients, "token gradients")
        self.block_names = self.source.block_names
        self.block_widths = dict(self.source.block_widths)
        self.num_rows = self.source.num_rows
        self.owners = torch.as_tensor(owners, dtype=torch.long)
        if self.owners.shape != (self.num_rows,):
            raise DataInfError(f"token gradients: {self.num_rows} rows but owners of shape "
                               f"{tuple(self.owners.shape)}; give one owner per row")

    def iter_block(self, name: str, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        return self.source.iter_block(name, rows)


def mean_by_owner(values: torch.Tensor, owners: torch.Tensor) -> torch.Tensor:
    """The mean over each owner's rows of ``values`` (R, ...): (owners, ...), in owner order
    (the sequence scores from the token scores)."""
    count = int(owners.max()) + 1
    sums = torch.zeros((count, *values.shape[1:]), dtype=values.dtype, device=values.device)
    sums.index_add_(0, owners.to(values.device), values)
    sizes = torch.bincount(owners, minlength=count).to(values.device, values.dtype)
    return sums / sizes.reshape(-1, *([1] * (values.ndim - 1)))


__all__ = ["TokenBatches", "TokenGradients", "mean_by_owner", "scored_positions",
           "token_batches"]
