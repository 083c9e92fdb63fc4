"""Per-block gradients: the one input format every estimator reads.

A *gradient source* holds, for n examples, one row per example in each of L blocks:
block ``name`` is an ``(n, d_l)`` matrix whose row i is the gradient of example i's loss with
respect to that block's parameters, flattened. Sources come in three shapes:

- a mapping ``name -> (n, d_l) tensor`` (in memory);
- a list or tuple of such mappings, each holding consecutive rows (row chunks), so that
  callers never need all rows at once;
- any object with the attributes of :class:`GradientSource` (the on-disk store is one).

Estimators read sources block by block, in row chunks, so memory does not grow with n.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from ..errors import DataInfError
from ..options import said


@runtime_checkable
class GradientSource(Protocol):
    """What an estimator needs of a set of per-example gradients."""

    block_names: tuple[str, ...]
    block_widths: dict[str, int]
    num_rows: int

    def iter_block(self, name: str, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(start, chunk)`` with ``chunk`` of shape (b, d_l) holding rows start..start+b.

        ``rows`` is a hint for b; every block of one source must be cut at the same rows
        when given the same hint, so that chunks of different blocks line up.
        """
        ...


def as_matrix(name: str, value: object, where: str) -> torch.Tensor:
    """Check one block: a finite-dtype 2-D tensor (numpy arrays are accepted and wrapped)."""
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise DataInfError(
            f"{where}: block {name!r} is a {type(value).__name__}, not a tensor; "
            "pass a torch.Tensor or numpy array of shape (examples, parameters)"
        )
    if value.ndim != 2:
        raise DataInfError(
            f"{where}: block {name!r} has shape {tuple(value.shape)}; a block must be 2-D "
            "(examples, parameters): flatten each example's gradient into one row"
        )
    if not value.is_floating_point():
        raise DataInfError(
            f"{where}: block {name!r} has dtype {value.dtype}; gradients must be floating point"
        )
    return value


class InMemoryGradients:
    """A mapping ``name -> (n, d_l)`` tensor, cut into row chunks on demand (views, no copy)."""

    def __init__(self, blocks: Mapping[str, object], where: str = "gradients") -> None:
        if len(blocks) == 0:
            raise DataInfError(f"{where}: no blocks were given; pass at least one (n, d) tensor")
        self.blocks = {str(k): as_matrix(str(k), v, where) for k, v in blocks.items()}
        rows = {name: t.shape[0] for name, t in self.blocks.items()}
        first_name, first_rows = next(iter(rows.items()))
        for name, n in rows.items():
            if n != first_rows:
                raise DataInfError(
                    f"{where}: block {name!r} has {n} rows but block {first_name!r} has "
                    f"{first_rows}; every block needs one row per example"
                )
        self.block_names = tuple(self.blocks)
        self.block_widths = {name: t.shape[1] for name, t in self.blocks.items()}
        self.num_rows = first_rows

    def iter_block(self, name: str, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        block = self.blocks[name]
        for start in range(0, self.num_rows, max(1, rows)):
            yield start, block[start : start + rows]


class ChunkedGradients:
    """A list of mappings, each holding the same blocks for consecutive rows.

    The chunks are used as they were given: the ``rows`` hint of :meth:`iter_block` is ignored.
    """

    def __init__(self, chunks: Sequence[Mapping[str, object]], where: str = "gradients") -> None:
        self.chunks = [InMemoryGradients(c, f"{where}, chunk {i}") for i, c in enumerate(chunks)]
        if not self.chunks:
            raise DataInfError(f"{where}: the list of chunks is empty; pass at least one chunk")
        first = self.chunks[0]
        for i, chunk in enumerate(self.chunks[1:], start=1):
            if set(chunk.block_names) != set(first.block_names):
                missing = sorted(set(first.block_names) - set(chunk.block_names))
                extra = sorted(set(chunk.block_names) - set(first.block_names))
                raise DataInfError(
                    f"{where}: chunk {i} has other blocks than chunk 0 "
                    f"(missing {missing}, extra {extra}); every chunk needs the same blocks"
                )
            for name in first.block_names:
                if chunk.block_widths[name] != first.block_widths[name]:
                    raise DataInfError(
                        f"{where}: block {name!r} has {chunk.block_widths[name]} columns in "
                        f"chunk {i} but {first.block_widths[name]} in chunk 0"
                    )
        self.block_names = first.block_names
        self.block_widths = dict(first.block_widths)
        self.num_rows = sum(c.num_rows for c in self.chunks)

    def iter_block(self, name: str, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        start = 0
        for chunk in self.chunks:
            if chunk.num_rows:
                yield start, chunk.blocks[name]
            start += chunk.num_rows


def as_gradient_source(gradients: object, where: str = "gradients") -> GradientSource:
    """Wrap any accepted gradient input as a :class:`GradientSource` (see the module docstring)."""
    if isinstance(gradients, Mapping):
        return InMemoryGradients(gradients, where)
    if isinstance(gradients, (list, tuple)):
        return ChunkedGradients(gradients, where)
    if isinstance(gradients, GradientSource):
        return gradients
    if isinstance(gradients, Iterator):
        raise DataInfError(
            f"{where}: got a one-shot iterator; estimators read the gradients more than once. "
            "Pass a list of chunks, a mapping of tensors, or a gradient store"
        )
    raise DataInfError(
        f"{where}: cannot read gradients from a {type(gradients).__name__}; pass a mapping "
        "block name -> (n, d) tensor, a list of such mappings (row chunks), or a gradient store"
    )


def check_finite(name: str, chunk: torch.Tensor, start: int, where: str) -> None:
    """Raise naming the first example whose gradient in block ``name`` is NaN or infinite."""
    bad = (~torch.isfinite(chunk)).any(dim=1).nonzero()
    if len(bad):
        row = start + int(bad[0])
        raise DataInfError(
            f"{where}: block {name!r} has a NaN or infinite gradient in example {row}; "
            "recompute that example's gradient (check its loss) or drop it"
        )


def squared_row_norms(name: str, chunks: Iterable[tuple[int, torch.Tensor]],
                      where: str) -> torch.Tensor:
    """||g_i||^2 of every row of block ``name`` given as (start, chunk) pairs, float64 (n,),
    computed in the chunks' dtype (float64 again where float32 overflows). A NaN or infinite
    entry raises a DataInfError naming the block and example."""
    norms = []
    for start, chunk in chunks:
        norm = torch.linalg.vector_norm(chunk, dim=1)
        if not torch.isfinite(norm).all():
            check_finite(name, chunk, start, where)
            norm = torch.linalg.vector_norm(chunk.double(), dim=1)  # float32 overflow
        norms.append(norm.double() ** 2)
    return torch.cat(norms)


def check_same_blocks(train: GradientSource, test: GradientSource) -> None:
    """Test gradients must have exactly the training blocks, with the same widths."""
    missing = [b for b in train.block_names if b not in test.block_widths]
    extra = [b for b in test.block_names if b not in train.block_widths]
    if missing or extra:
        raise DataInfError(
            f"test gradients do not have the training blocks: missing {missing}, extra {extra}; "
            "compute both with the same model, adapter and block selection"
        )
    for name in train.block_names:
        if train.block_widths[name] != test.block_widths[name]:
            raise DataInfError(
                f"block {name!r} has {test.block_widths[name]} columns in the test gradients "
                f"but {train.block_widths[name]} in the training gradients; "
                "compute both with the same model and adapter"
            )


class BlockSubset:
    """The blocks of ``source`` whose names are in ``names`` (a view; nothing is copied)."""

    def __init__(self, source: GradientSource, names: Sequence[str]) -> None:
        unknown = [n for n in names if n not in source.block_widths]
        if unknown:
            raise DataInfError(f"blocks {unknown[:3]} are not in the gradients")
        self.source = source
        self.block_names = tuple(names)
        self.block_widths = {n: source.block_widths[n] for n in names}
        self.num_rows = source.num_rows
        self.owners = getattr(source, "owners", None)  # per-token rows keep their owners
        if hasattr(source, "row_sq_norms"):
            self.row_sq_norms = source.row_sq_norms

    def iter_block(self, name: str, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        return self.source.iter_block(name, rows)


class RowRange:
    """Rows ``start:stop`` of a gradient source (a view). Per-token rows keep their owners,
    numbered from 0 (cut a range at owner boundaries: an owner's norm is that of its rows
    in the range)."""

    def __init__(self, source: GradientSource, start: int, stop: int) -> None:
        self.source, self.start, self.stop = source, start, stop
        self.block_names = source.block_names
        self.block_widths = source.block_widths
        self.num_rows = stop - start
        owners = getattr(source, "owners", None)
        self.owners = None if owners is None else \
            owners[start:stop].unique(return_inverse=True)[1]

    def iter_block(self, name: str, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        for first, chunk in self.source.iter_block(name, rows):
            lo, hi = max(first, self.start), min(first + len(chunk), self.stop)
            if lo < hi:
                yield lo - self.start, chunk[lo - first : hi - first]


class UnitNormRows:
    """``source`` with every row scaled to unit Euclidean norm over all its blocks (a view):

        g_i -> g_i / ||g_i||,    ||g_i||^2 = sum_l ||g_il||^2

    so that inner products become cosines. A row of norm 0 stays 0. The norms come from the
    source's ``row_sq_norms`` when it keeps them (a store), otherwise from one pass over it.

    A source with ``owners`` (per-token rows: :class:`datainf.gradients.tokens.TokenGradients`)
    has each row scaled by the norm of its owner's gradient, the mean of the owner's rows,
    g_t -> g_t / ||mean_{s of t's owner} g_s||, so that an owner's mean row is its unit
    gradient (the token scores then average to the sequence's score).
    """

    def __init__(self, source: GradientSource, where: str = "gradients") -> None:
        self.source = source
        self.block_names = source.block_names
        self.block_widths = dict(source.block_widths)
        self.num_rows = source.num_rows
        self.owners = getattr(source, "owners", None)
        per_block = {name: self._sq_norms(name, where) for name in source.block_names}
        if self.owners is None:
            total = sum(per_block.values())
        else:  # each row's owner's squared norm
            total = sum(self._owner_sq_norms(name) for name in source.block_names)[self.owners]
        self.scale = torch.where(total > 0, total.rsqrt(), torch.zeros_like(total))
        self._sq = {name: sq * self.scale**2 for name, sq in per_block.items()}

    def _owner_sq_norms(self, name: str) -> torch.Tensor:
        """||mean of owner o's rows of block name||^2 for every owner o (float64)."""
        count = int(self.owners.max()) + 1
        sums = torch.zeros(count, self.block_widths[name], dtype=torch.float64)
        for start, chunk in self.source.iter_block(name, 4096):
            sums.index_add_(0, self.owners[start : start + len(chunk)], chunk.double().cpu())
        sizes = torch.bincount(self.owners, minlength=count).double()
        return (sums / sizes[:, None]).square().sum(1)

    def _sq_norms(self, name: str, where: str) -> torch.Tensor:
        if hasattr(self.source, "row_sq_norms"):
            return self.source.row_sq_norms(name).to(torch.float64)
        chunks = ((start, chunk.double()) for start, chunk in self.source.iter_block(name, 4096))
        return squared_row_norms(name, chunks, where).cpu()

    def row_sq_norms(self, name: str) -> torch.Tensor:
        """||g_il||^2 / ||g_i||^2 for every row i (float64, shape (n,))."""
        return self._sq[name]

    def iter_block(self, name: str, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        for start, chunk in self.source.iter_block(name, rows):
            scale = self.scale[start : start + len(chunk)].to(chunk.device, chunk.dtype)
            yield start, chunk * scale[:, None]


class ScaledColumns:
    """``source`` with the columns of every block multiplied by a fixed vector (a view):

        g_il -> p_l * g_il     (entrywise; p_l of width d_l, float64 products rounded back)

    ``scales``: block -> (d_l,) tensor; a block of :class:`GroupedBlocks` takes its members'
    scales in order; a block k times as wide as its scales (k passes concatenated, as the
    diffusion task's timesteps are) takes them k times."""

    def __init__(self, source: GradientSource, scales: Mapping[str, torch.Tensor],
                 what: str = "scales") -> None:
        self.source = source
        self.block_names = source.block_names
        self.block_widths = dict(source.block_widths)
        self.num_rows = source.num_rows
        self.owners = getattr(source, "owners", None)  # per-token rows keep their owners
        groups = getattr(source, "groups", {})
        self.scales = {}
        for name in source.block_names:
            members = [name] if name in scales else groups.get(name, [name])
            missing = [m for m in members if m not in scales]
            if missing:
                raise DataInfError(f"{what}: none for gradient block {missing[0]!r}; they hold "
                                   f"{len(scales)} blocks such as {list(scales)[:2]}")
            vector = torch.cat([torch.as_tensor(scales[m]).flatten() for m in members])
            width = source.block_widths[name]
            if width % len(vector):
                raise DataInfError(f"{what}: block {name!r} has {width} columns but "
                                   f"{len(vector)} scales")
            # a row of several passes (the diffusion task's timesteps) holds one copy a pass
            self.scales[name] = vector.double().repeat(width // len(vector))

    def iter_block(self, name: str, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        for start, chunk in self.source.iter_block(name, rows):
            scale = self.scales[name].to(chunk.device)
            yield start, (chunk.double() * scale).to(chunk.dtype)


def blocks_pattern(pattern: str) -> re.Pattern:
    """The compiled ``blocks`` regular expression (``--blocks``)."""
    try:
        return re.compile(pattern)
    except re.error as error:
        raise DataInfError(
            f"{said('blocks', pattern, quoted=True)} is not a valid regular expression: {error}"
        ) from None


def names_matching(names: Sequence[str], pattern: str) -> list[str]:
    """The ``names`` in which the regular expression ``pattern`` is found; at least one."""
    regex = blocks_pattern(pattern)
    chosen = [n for n in names if regex.search(n)]
    if not chosen:
        raise DataInfError(
            f"no gradient block matches {said('blocks', pattern, quoted=True)}; block names look "
            f"like {list(names[:2])}"
        )
    return chosen


def blocks_matching(source: GradientSource, pattern: str | None) -> GradientSource:
    """The blocks whose name matches the regular expression ``pattern`` (all when None)."""
    if pattern is None:
        return source
    return BlockSubset(source, names_matching(source.block_names, pattern))


class GroupedBlocks:
    """Blocks of ``source`` joined column-wise into larger blocks: ``groups`` maps a new block
    name to the source blocks it holds, in order. Row i of a group is the concatenation of row i
    of its members; its squared norm is the sum of theirs."""

    def __init__(self, source: GradientSource, groups: Mapping[str, Sequence[str]]) -> None:
        self.source = source
        self.groups = {name: list(members) for name, members in groups.items()}
        self.block_names = tuple(self.groups)
        self.block_widths = {g: sum(source.block_widths[m] for m in ms)
                             for g, ms in self.groups.items()}
        self.num_rows = source.num_rows
        self.owners = getattr(source, "owners", None)  # per-token rows keep their owners
        if hasattr(source, "row_sq_norms"):
            self.row_sq_norms = lambda name: sum(source.row_sq_norms(m)
                                                 for m in self.groups[name])

    def iter_block(self, name: str, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        members = [self.source.iter_block(m, rows) for m in self.groups[name]]
        for parts in zip(*members, strict=True):
            yield parts[0][0], torch.cat([chunk for _, chunk in parts], dim=1)


_PARAMETER_SUFFIX = re.compile(r"(\.(lora_[AB]|lora_embedding_[AB]|modules_to_save)\.[^.]+)?"
                               r"\.(weight|bias)$")


def module_of(parameter: str) -> str:
    """The module a parameter belongs to: '...query.lora_A.default.weight' -> '...query'."""
    return _PARAMETER_SUFFIX.sub("", parameter)


def group_by_module(source: GradientSource) -> GradientSource:
    """One block per module (LoRA A and B of a layer together, a head's weight and bias
    together) instead of one per tensor (the paper's and the default grouping)."""
    groups: dict[str, list[str]] = {}
    for name in source.block_names:
        groups.setdefault(module_of(name), []).append(name)
    return GroupedBlocks(source, groups)
