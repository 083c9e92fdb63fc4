"""The on-disk gradient store: per-example gradients of n examples, one matrix per block.

Layout of a store folder::

    manifest.json         what the store holds and what produced it (see below)
    block-00000.f32       block 0: an (n, d_0) row-major matrix, raw float32 (".bf16": raw
    block-00001.f32       bfloat16 words), row i = example i's gradient; one file per block
    ...
    row_sq_norms.f64      an (L, n) row-major float64 matrix: entry (l, i) = ||g_il||^2

File names come from the block's index, never from the parameter name; the manifest maps each
block name to its file and width. Every file is preallocated to its full size when the store is
created, so a full disk fails then, with a clear message, not halfway through a collection.

Rows are appended in order by a gradient collector (:meth:`GradientStore.write_rows`); each call
writes the rows, forces them to disk and only then commits a new manifest, which is replaced
atomically. A process killed at any point leaves a manifest that describes only durable rows,
and :meth:`GradientStore.create_or_resume` carries on from there.

Several processes (torch.distributed ranks) fill one store on a shared file system in
*shards*: a store made for W shards splits its rows as
:func:`~datainf.distributed.shard` does, each shard is appended in order by one
process, which commits its progress to its own ``shard-SSSSS-of-WWWWW.json`` (replaced
atomically, like the manifest) instead of the manifest. Whoever writes the last missing row
marks the manifest complete (:meth:`GradientStore.finish`). A process that dies leaves its
shard's durable rows committed; running it again (alone, or any number of processes) computes
only the missing rows.

A complete store is a :class:`~datainf.gradients.source.GradientSource`: estimators read it
block by block in row chunks that are views of memory maps, so memory does not grow with n.

``manifest.json`` holds ``format``, ``version``, ``blocks`` (list of ``{name, width, file}``),
``norms_file``, ``num_rows``, ``dtype``, ``identity`` (the caller's description of what produced
the gradients: model and adapter fingerprints, task, data), ``rows_complete``, ``data_hash``,
``complete``, ``shards`` (1 when absent), ``created`` and ``updated`` (UTC, ISO 8601). In a
store of several shards, ``rows_complete`` and ``data_hash`` stay 0 and "" until it is complete.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import re
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..distributed import shard
from ..errors import DataInfError
from .source import as_matrix, check_finite

FORMAT = "datainf-gradient-store"
VERSION = 1
MANIFEST = "manifest.json"
NORMS_FILE = "row_sq_norms.f64"
_MANIFEST_TMP = ".manifest.json.tmp"
_SHARD_FILE = "shard-{:05d}-of-{:05d}.json"
# dtype name -> (torch dtype, bytes per element, file suffix)
DTYPES = {"float32": (torch.float32, 4, "f32"), "bfloat16": (torch.bfloat16, 2, "bf16")}
# every file name a store writes; a folder holding only these is an interrupted creation
_OUR_FILES = re.compile(r"block-\d{5,}\.(f32|bf16)|row_sq_norms\.f64|\.manifest\.json\.tmp(\.\d+)?"
                        r"|\.?shard-\d{5,}-of-\d{5,}\.json(\.tmp)?")
# how a differing identity key reads in messages ("made for another model")
_WHAT = {
    "model": "another model",
    "adapter": "another adapter",
    "data": "other data",
    "task": "another task",
}
_NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG)


class GradientStore:
    """Per-example gradients on disk: block name -> (n, d_l) matrix, written in row chunks.

    Make one with :meth:`create_or_resume` (to write) or :meth:`open` (to read a complete store).

    Attributes
    ----------
    path: the store's folder.
    block_names: block names in store order; block_widths: name -> d_l (elements per row).
    num_rows: n, the number of examples the store is made for.
    dtype: "float32" or "bfloat16", how the gradients are stored.
    identity: the JSON dict describing what produced the gradients (checked on resume).
    rows_complete: how many rows are written and durable (in one shard: rows
        0..rows_complete-1).
    data_hash: the running hash the collector passed with the last commit ("" before any).
    shards: in how many shards the store is filled (see :meth:`shard_progress`).
    """

    def __init__(self, path: Path, manifest: dict, writable: bool) -> None:
        self.path = path
        self._manifest = manifest
        self._writable = writable
        self.block_names = tuple(b["name"] for b in manifest["blocks"])
        self.block_widths = {b["name"]: b["width"] for b in manifest["blocks"]}
        self._files = {b["name"]: path / b["file"] for b in manifest["blocks"]}
        self.num_rows: int = manifest["num_rows"]
        self.dtype: str = manifest["dtype"]
        self.identity: dict = json.loads(json.dumps(manifest["identity"]))  # a copy
        self.data_hash: str = manifest["data_hash"]
        self.shards: int = manifest.get("shards", 1)
        self._bounds = [shard(self.num_rows, s, self.shards) for s in range(self.shards)]
        self._read_progress()

    def _read_progress(self) -> None:
        """Each shard's [rows written, data hash]: from the manifest in a store of one shard,
        otherwise from the shard files (absent: nothing written yet)."""
        if self.shards == 1:
            self._progress = [[self._manifest["rows_complete"], self.data_hash]]
        else:
            self._progress = [self._shard_file_progress(s) for s in range(self.shards)]
        self.rows_complete: int = sum(done for done, _ in self._progress)

    def _shard_file_progress(self, index: int) -> list:
        file = self.path / _SHARD_FILE.format(index, self.shards)
        if not file.exists():  # (a complete store's shard: written, its data hash unknown)
            lo, hi = self._bounds[index]
            return [hi - lo, None] if self._manifest["complete"] else [0, ""]
        try:
            record = json.loads(file.read_text(encoding="utf-8"))
            lo, hi = self._bounds[index]
            done, digest = record["rows_complete"], record["data_hash"]
            if not (isinstance(done, int) and 0 <= done <= hi - lo and isinstance(digest, str)):
                raise ValueError(f"rows_complete {done!r} does not fit shard {lo}..{hi - 1}")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataInfError(
                f"{file} of the gradient store is damaged ({e}); delete it and run the "
                "collection again (that shard is then computed again)"
            ) from e
        return [done, digest]

    @property
    def complete(self) -> bool:
        """True when every row is written (and, for several shards, the store finished)."""
        return bool(self._manifest["complete"])

    def shard_progress(self, index: int) -> tuple[int, int, int, str]:
        """(start, stop, written, data_hash) of shard ``index``: its rows are start..stop-1,
        of which start..start+written-1 are durable; ``data_hash`` came with the last commit
        (None for a complete store whose shard file was deleted)."""
        lo, hi = self._bounds[index]
        done, digest = self._progress[index]
        return lo, hi, done, digest

    def __repr__(self) -> str:
        return (
            f"GradientStore({str(self.path)!r}, {self.rows_complete} of {self.num_rows} rows, "
            f"{len(self.block_names)} blocks, {self.dtype})"
        )

    # ------------------------------------------------------------ opening
    @classmethod
    def create_or_resume(
        cls,
        path: str | os.PathLike,
        widths: Mapping[str, int],
        num_rows: int,
        identity: dict,
        dtype: str = "float32",
        shards: int = 1,
    ) -> GradientStore:
        """Create a store for ``num_rows`` examples at ``path``, or reopen it to append.

        ``widths`` maps block name -> d_l (number of parameters in the block); ``identity`` is a
        JSON-serialisable dict saying what produces the gradients (e.g. model and adapter
        fingerprints, task, data). A new store is preallocated to its full size:
        ``num_rows * sum(d_l) * (4 or 2)`` bytes of gradients plus ``8 * num_rows * L`` of norms.

        If ``path`` already holds a store, it must have been made with the same blocks and
        widths, number of rows, dtype and identity; it is then reopened for appending from
        ``rows_complete`` (it may be complete already). Any difference raises a DataInfError
        naming what differs. A folder with other files and no manifest is never written into.
        ``shards``: in how many shards a new store is filled (an existing one keeps its own).
        """
        path = Path(path)
        wanted = _new_manifest(widths, num_rows, identity, dtype, shards)
        if (path / MANIFEST).exists():
            stored = _read_manifest(path)
            _check_matches(path, stored, wanted)
            store = cls(path, stored, writable=True)
            store._check_files()
            return store
        _clear_for_creation(path)
        _allocate(path, wanted)
        _write_manifest(path, wanted)
        return cls(path, wanted, writable=True)

    @classmethod
    def open(cls, path: str | os.PathLike) -> GradientStore:
        """Open a complete store read-only; an incomplete one is refused."""
        path = Path(path)
        if not (path / MANIFEST).exists():
            raise DataInfError(
                f"there is no gradient store at {path} (no {MANIFEST}); check the path, or "
                "collect the gradients first"
            )
        store = cls(path, _read_manifest(path), writable=False)
        store._check_files()
        if not store.complete:
            raise DataInfError(store._incomplete_message())
        return store

    @staticmethod
    def is_complete(path: str | os.PathLike) -> bool:
        """Whether ``path`` holds a complete store (False for none or an interrupted one,
        which :meth:`create_or_resume` then finishes)."""
        path = Path(path)
        return (path / MANIFEST).exists() and bool(_read_manifest(path).get("complete"))

    # ------------------------------------------------------------ writing
    def write_rows(self, start: int, grads: Mapping[str, torch.Tensor], data_hash: str) -> None:
        """Append rows start..start+b-1 and commit them, with ``data_hash``, to the manifest
        (in a store of several shards: to the file of the shard holding them).

        ``grads`` maps every block name of the store to a (b, d_l) floating tensor (any device,
        any float dtype; converted to the store's dtype). ``start`` must be the first row not
        yet written of its shard (of the store: ``rows_complete``), and the rows must not run
        past the shard. The rows and their squared norms (float64, of the stored values)
        are written and forced to disk before the commit, so no record ever claims rows that
        are not durable. NaN or infinite values raise a DataInfError naming the block and
        example, and nothing of the chunk is committed.
        """
        if not self._writable:
            raise DataInfError(
                f"the gradient store at {self.path} was opened read-only; use "
                "GradientStore.create_or_resume to append rows"
            )
        if not isinstance(data_hash, str):
            raise DataInfError(f"data_hash must be a string, not {type(data_hash).__name__}")
        if self.complete:
            raise DataInfError(
                f"the gradient store at {self.path} is complete ({self.num_rows} of "
                f"{self.num_rows} rows); there is nothing left to write"
            )
        index = next((s for s, (lo, hi) in enumerate(self._bounds) if lo <= start < hi), 0)
        lo, hi, done, _ = self.shard_progress(index)
        if start != lo + done:
            where = f"shard {index} of the gradient store at {self.path} holds rows {lo}.." \
                f"{lo + done - 1}" if self.shards > 1 else \
                f"the gradient store at {self.path} holds {done} of {self.num_rows} rows"
            raise DataInfError(f"rows must be written in order: {where}, so the next write "
                               f"starts at row {lo + done}, not {start}")
        chunks = self._checked_chunk(start, grads, room=hi - start)
        end = start + next(iter(chunks.values())).shape[0]
        try:
            self._write_chunk(start, chunks)
            if self.shards == 1:
                manifest = {**self._manifest, "rows_complete": end, "data_hash": data_hash,
                            "complete": end == self.num_rows, "updated": _now()}
                _write_manifest(self.path, manifest)
                self._manifest = manifest
                self.data_hash = data_hash
            else:
                record = {"start": lo, "stop": hi, "rows_complete": end - lo,
                          "data_hash": data_hash, "updated": _now()}
                _write_json(self.path / _SHARD_FILE.format(index, self.shards), record)
        except OSError as e:
            kept = f"the store keeps its first {start} of {self.num_rows} rows" \
                if self.shards == 1 else f"shard {index} keeps its rows {lo}..{start - 1}"
            raise DataInfError(
                f"could not write rows {start}..{end - 1} to the gradient store at {self.path} "
                f"({e}); {kept}, which are intact. Fix the cause (free disk space, check the "
                f"disk) and run the collection again: it resumes from row {start}"
            ) from e
        self._progress[index] = [end - lo, data_hash]
        self.rows_complete += end - start

    def finish(self) -> bool:
        """Mark a store filled in shards complete once every shard is (whichever process
        writes the last row does it; doing it twice is harmless). True when complete."""
        if self.complete or self.shards == 1:
            return self.complete
        self._manifest = _read_manifest(self.path)  # finished by another process?
        self._read_progress()  # the other processes' shards
        if self.complete:
            return True
        if self.rows_complete < self.num_rows:
            return False
        hashes = "".join(digest for _, digest in self._progress)
        manifest = {**self._manifest, "rows_complete": self.num_rows, "complete": True,
                    "data_hash": hashlib.sha256(hashes.encode()).hexdigest(), "updated": _now()}
        _write_manifest(self.path, manifest)
        self._manifest, self.data_hash = manifest, manifest["data_hash"]
        return True

    def _checked_chunk(self, start: int, grads: Mapping[str, object],
                       room: int) -> dict[str, torch.Tensor]:
        """Validate one chunk of at most ``room`` rows; return it as contiguous CPU tensors
        of the store's dtype."""
        where = f"gradient store {self.path}, rows from {start}"
        if not isinstance(grads, Mapping):
            raise DataInfError(f"{where}: pass a mapping block name -> (rows, d) tensor")
        missing = [b for b in self.block_names if b not in grads]
        extra = [str(b) for b in grads if b not in self.block_widths]
        if missing or extra:
            raise DataInfError(
                f"{where}: the chunk has other blocks than the store (missing {missing}, extra "
                f"{extra}); pass exactly the blocks the store was created with"
            )
        torch_dtype = DTYPES[self.dtype][0]
        out, first = {}, None
        for name in self.block_names:
            value = as_matrix(name, grads[name], where)
            rows, width = value.shape
            if width != self.block_widths[name]:
                raise DataInfError(
                    f"{where}: block {name!r} has {width} columns but the store holds "
                    f"{self.block_widths[name]}; collect with the model the store was made for"
                )
            if first is None:
                first = (name, rows)
                if rows == 0 or rows > room:
                    of = f"of {self.num_rows}" if self.shards == 1 else "in this shard"
                    raise DataInfError(
                        f"{where}: the chunk has {rows} rows but the store has room for "
                        f"{room} more ({of}); pass 1 to {room} rows"
                    )
            elif rows != first[1]:
                raise DataInfError(
                    f"{where}: block {name!r} has {rows} rows but block {first[0]!r} has "
                    f"{first[1]}; every block needs one row per example"
                )
            check_finite(name, value, start, where)
            stored = value.detach().to(device="cpu", dtype=torch_dtype).contiguous()
            if not torch.isfinite(stored).all():
                bad = start + int((~torch.isfinite(stored)).any(dim=1).nonzero()[0])
                raise DataInfError(
                    f"{where}: block {name!r} of example {bad} is too large for {self.dtype} "
                    "(it overflows to infinity); check that example's loss"
                )
            out[name] = stored
        return out

    def _write_chunk(self, start: int, chunks: dict[str, torch.Tensor]) -> None:
        """Write rows and squared row norms at their offsets, then force them to disk."""
        itemsize = DTYPES[self.dtype][1]
        norms_fd = os.open(self.path / self._manifest["norms_file"], os.O_WRONLY)
        try:
            for index, name in enumerate(self.block_names):
                chunk = chunks[name]
                offset = start * self.block_widths[name] * itemsize
                _write_file(self._files[name], chunk.view(torch.uint8).numpy(), offset)
                # ||g_il||^2 of the stored values, summed in float64
                norms = chunk.double().square().sum(dim=1)
                _pwrite_all(norms_fd, norms.numpy(), (index * self.num_rows + start) * 8)
            _sync(norms_fd)
        finally:
            os.close(norms_fd)

    # ------------------------------------------------------------ reading
    def iter_block(self, name: str, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(start, chunk)``: chunk is rows start..start+b-1 of block ``name``, (b, d_l).

        b = ``rows`` (the last chunk may be shorter); every block is cut at the same rows.
        Chunks are views of a private memory map: changing them does not change the store.
        Once the caller asks for the next chunk, the pages of the previous one are released
        from this process's resident memory (madvise DONTNEED; touching them again re-reads
        the file), so reading a block end to end keeps memory flat whatever n is.
        """
        self._check_readable(name)  # now, not when the chunks are first asked for
        return self._chunks(name, max(1, int(rows)))

    def _chunks(self, name: str, step: int) -> Iterator[tuple[int, torch.Tensor]]:
        torch_dtype, itemsize, _ = DTYPES[self.dtype]
        width, n = self.block_widths[name], self.num_rows
        row_bytes = width * itemsize
        with open(self._files[name], "rb") as handle:
            mapped = mmap.mmap(handle.fileno(), n * row_bytes, access=mmap.ACCESS_COPY)
        for start in range(0, n, step):
            stop = min(n, start + step)
            chunk = torch.frombuffer(mapped, dtype=torch_dtype, count=(stop - start) * width,
                                     offset=start * row_bytes)
            yield start, chunk.view(stop - start, width)
            first_page = start * row_bytes // mmap.PAGESIZE * mmap.PAGESIZE
            mapped.madvise(mmap.MADV_DONTNEED, first_page, stop * row_bytes - first_page)

    def read_block(self, name: str) -> torch.Tensor:
        """The whole (n, d_l) block ``name``, memory-mapped (no copy, pages read on access)."""
        self._check_readable(name)
        torch_dtype = DTYPES[self.dtype][0]
        width = self.block_widths[name]
        flat = _map(self._files[name], self.num_rows * width, torch_dtype)
        return flat.view(self.num_rows, width)

    def row_sq_norms(self, name: str) -> torch.Tensor:
        """||g_il||^2 for every row i of block ``name``: float64, shape (n,), memory-mapped.

        Computed in float64 from the values as stored (after any bfloat16 rounding).
        """
        self._check_readable(name)
        index, n = self.block_names.index(name), self.num_rows
        norms = _map(
            self.path / self._manifest["norms_file"], len(self.block_names) * n, torch.float64
        )
        return norms[index * n : (index + 1) * n]

    def _check_readable(self, name: str) -> None:
        if name not in self.block_widths:
            raise DataInfError(
                f"the gradient store at {self.path} has no block {name!r}; its blocks are "
                f"{list(self.block_names)}"
            )
        if not self.complete:
            raise DataInfError(self._incomplete_message())

    def _incomplete_message(self) -> str:
        missing = [str(s) for s in range(self.shards)
                   if self._progress[s][0] < self._bounds[s][1] - self._bounds[s][0]]
        shards = f" (shards {', '.join(missing)} of {self.shards} are not finished)" \
            if self.shards > 1 else ""
        return (
            f"the gradient store at {self.path} has {self.rows_complete} of {self.num_rows} "
            f"rows{shards}; run the collection again to finish it"
        )

    def _check_files(self) -> None:
        """Every data file exists with the size the manifest implies."""
        itemsize = DTYPES[self.dtype][1]
        sizes = {f: self.num_rows * self.block_widths[b] * itemsize for b, f in self._files.items()}
        sizes[self.path / self._manifest["norms_file"]] = self.num_rows * len(self.block_names) * 8
        for file, size in sizes.items():
            actual = file.stat().st_size if file.is_file() else None
            if actual != size:
                found = "is missing" if actual is None else f"has {actual} bytes"
                raise DataInfError(
                    f"the gradient store at {self.path} is damaged: {file.name} {found}, "
                    f"expected {size}; delete {self.path} and collect the gradients again"
                )


# ---------------------------------------------------------------- manifest
def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _new_manifest(widths: Mapping[str, int], num_rows: int, identity: dict, dtype: str,
                  shards: int = 1) -> dict:
    """Validate the arguments of create_or_resume and build the manifest of an empty store."""
    if not isinstance(shards, int) or isinstance(shards, bool) or shards < 1:
        raise DataInfError(f"shards must be a positive integer, not {shards!r}")
    if dtype not in DTYPES:
        raise DataInfError(f"dtype must be one of {list(DTYPES)}, not {dtype!r}")
    if not isinstance(num_rows, int) or isinstance(num_rows, bool) or num_rows < 1:
        raise DataInfError(f"num_rows must be a positive integer, not {num_rows!r}")
    if not isinstance(widths, Mapping) or not widths:
        raise DataInfError("widths must be a non-empty mapping block name -> number of elements")
    for name, width in widths.items():
        if not isinstance(width, int) or isinstance(width, bool) or width < 1:
            raise DataInfError(f"block {name!r} has width {width!r}; widths must be positive")
    if not isinstance(identity, dict):
        raise DataInfError(f"identity must be a dict, not {type(identity).__name__}")
    try:
        identity = json.loads(json.dumps(identity, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise DataInfError(
            f"identity must be JSON-serialisable (strings, numbers, lists, dicts): {e}"
        ) from e
    suffix = DTYPES[dtype][2]
    now = _now()
    return {
        "format": FORMAT,
        "version": VERSION,
        "blocks": [
            {"name": str(name), "width": width, "file": f"block-{i:05d}.{suffix}"}
            for i, (name, width) in enumerate(widths.items())
        ],
        "norms_file": NORMS_FILE,
        "num_rows": num_rows,
        "dtype": dtype,
        "identity": identity,
        "rows_complete": 0,
        "data_hash": "",
        "complete": False,
        "shards": shards,
        "created": now,
        "updated": now,
    }


def _read_manifest(path: Path) -> dict:
    """Load and sanity-check ``path/manifest.json``; anything odd is a DataInfError."""
    file = path / MANIFEST
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataInfError(
            f"the manifest {file} of the gradient store does not parse ({e}); the store is "
            f"damaged: delete {path} and collect the gradients again"
        ) from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataInfError(
            f"{file} is not the manifest of a datainf gradient store; use another path"
        )
    if not isinstance(manifest.get("version"), int) or manifest["version"] > VERSION:
        raise DataInfError(
            f"the gradient store at {path} has format version {manifest.get('version')!r}, "
            f"newer than this datainf reads ({VERSION}); upgrade datainf or use another path"
        )
    try:
        _check_manifest_fields(manifest)
    except (KeyError, TypeError, ValueError, AssertionError) as e:
        raise DataInfError(
            f"the manifest {file} of the gradient store is damaged ({type(e).__name__}: {e}); "
            f"delete {path} and collect the gradients again"
        ) from e
    return manifest


def _check_manifest_fields(m: dict) -> None:
    """Raise (KeyError, TypeError, ValueError) when a field is missing or inconsistent."""
    if m["dtype"] not in DTYPES:
        raise ValueError(f"unknown dtype {m['dtype']!r}")
    n, done = m["num_rows"], m["rows_complete"]
    if not (isinstance(n, int) and isinstance(done, int) and 0 <= done <= n and n >= 1):
        raise ValueError(f"rows_complete {done!r} and num_rows {n!r} do not fit")
    if m["complete"] != (done == n) or not isinstance(m["data_hash"], str):
        raise ValueError("complete or data_hash is inconsistent")
    shards = m.get("shards", 1)
    if not (isinstance(shards, int) and shards >= 1) or (shards > 1 and 0 < done < n):
        raise ValueError(f"shards {shards!r} does not fit rows_complete {done!r}")
    if not isinstance(m["identity"], dict) or not m["blocks"]:
        raise ValueError("identity or blocks are missing")
    files = [b["file"] for b in m["blocks"]] + [m["norms_file"]]
    if not all(isinstance(f, str) and _OUR_FILES.fullmatch(f) for f in files):
        raise ValueError(f"unexpected file names {files}")  # never a path out of the folder
    if len(set(files)) != len(files) or len({b["name"] for b in m["blocks"]}) < len(m["blocks"]):
        raise ValueError("block names or files repeat")
    for block in m["blocks"]:
        if not (isinstance(block["name"], str) and isinstance(block["width"], int)):
            raise TypeError(f"block {block['name']!r} has width {block['width']!r}")
        if block["width"] < 1:
            raise ValueError(f"block {block['name']!r} has width {block['width']}")


def _check_matches(path: Path, stored: dict, wanted: dict) -> None:
    """Refuse to resume a store made for other settings, naming every difference."""
    diffs = []
    keys = sorted(set(stored["identity"]) | set(wanted["identity"]))
    for key in keys:
        details = _differences(key, stored["identity"].get(key), wanted["identity"].get(key))
        if details:
            diffs.append(f"{_WHAT.get(key, f'another {key}')} ({'; '.join(details)})")
    old = {b["name"]: b["width"] for b in stored["blocks"]}
    new = {b["name"]: b["width"] for b in wanted["blocks"]}
    if old != new:
        missing, extra = sorted(set(new) - set(old)), sorted(set(old) - set(new))
        widths = [f"{b!r}: {old[b]} vs {new[b]}" for b in old if b in new and old[b] != new[b]]
        parts = []
        if missing:
            parts.append(f"blocks here but not in the store: {missing}")
        if extra:
            parts.append(f"blocks in the store but not here: {extra}")
        if widths:
            parts.append(f"widths in the store vs here: {', '.join(widths)}")
        diffs.append(f"other blocks ({'; '.join(parts)})")
    if stored["num_rows"] != wanted["num_rows"]:
        diffs.append(
            f"another number of examples ({stored['num_rows']} in the store vs "
            f"{wanted['num_rows']} now)"
        )
    if stored["dtype"] != wanted["dtype"]:
        diffs.append(f"another dtype ({stored['dtype']} in the store vs {wanted['dtype']} now)")
    if diffs:
        raise DataInfError(
            f"the gradient store at {path} was made for {' and '.join(diffs)}; use another path "
            f"for these gradients, or delete {path} to collect them again"
        )


def _differences(key: str, old: object, new: object) -> list[str]:
    """'key: old in the store vs new now' for every differing (nested) entry of the identity."""
    if old == new:
        return []
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            line
            for sub in sorted(set(old) | set(new))
            for line in _differences(f"{key}.{sub}", old.get(sub), new.get(sub))
        ]
    return [f"{key}: {_short(old)} in the store vs {_short(new)} now"]


def _short(value: object) -> str:
    if value is None:
        return "(none)"
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= 24 else text[:16] + "…"


def _write_manifest(path: Path, manifest: dict) -> None:
    """Replace ``path/manifest.json`` atomically: temp file, fsync, rename, fsync folder."""
    _write_json(path / MANIFEST, manifest)


def _write_json(file: Path, record: dict) -> None:
    """Replace ``file`` atomically: a temp file of this process, fsync, rename, fsync folder
    (processes finishing a store together never write into one temp file)."""
    tmp = file.with_name(f".{file.name}.tmp")
    if file.name == MANIFEST:
        tmp = file.with_name(f"{_MANIFEST_TMP}.{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, file)
    _sync_folder(file.parent)


# ------------------------------------------------------------------- files
def _clear_for_creation(path: Path) -> None:
    """Make sure ``path`` is absent, empty or the remains of an interrupted creation."""
    if path.exists() and not path.is_dir():
        raise DataInfError(f"{path} exists and is not a folder; choose another path for the store")
    if not path.exists():
        return
    entries = os.listdir(path)
    if not all(_OUR_FILES.fullmatch(e) for e in entries):
        raise DataInfError(
            f"{path} holds files but no {MANIFEST}: it is not a datainf gradient store, and "
            "datainf does not write into it. Choose another path, or empty the folder"
        )
    for entry in entries:  # only our own files: a creation was killed before its manifest
        (path / entry).unlink()


def _allocate(path: Path, manifest: dict) -> None:
    """Create every data file at its full size; on failure remove what was made and explain."""
    itemsize = DTYPES[manifest["dtype"]][1]
    n = manifest["num_rows"]
    sizes = {b["file"]: n * b["width"] * itemsize for b in manifest["blocks"]}
    sizes[manifest["norms_file"]] = n * len(manifest["blocks"]) * 8
    total = sum(sizes.values())
    made_folder = not path.exists()
    made: list[Path] = []
    try:
        path.mkdir(parents=True, exist_ok=True)
        for name, size in sizes.items():
            made.append(path / name)
            with open(path / name, "wb") as f:
                _preallocate(f.fileno(), size)
                os.fsync(f.fileno())
        _sync_folder(path)
    except OSError as e:
        for file in made:
            file.unlink(missing_ok=True)
        if made_folder and path.exists():
            path.rmdir()
        needed = f"{total} bytes ({total / 2**30:.2f} GiB) for {n} examples"
        if e.errno in _NO_SPACE:
            raise DataInfError(
                f"not enough disk space for the gradient store at {path}: it needs {needed} "
                f"in {manifest['dtype']} ({e.strerror}). Free space there, choose a path on a "
                "larger disk, or store bfloat16 (half the size)"
            ) from e
        raise DataInfError(
            f"could not create the gradient store at {path}, which needs {needed}: {e}. "
            "Check that the folder can be written, or choose another path"
        ) from e


def _preallocate(fd: int, size: int) -> None:
    """Reserve ``size`` bytes on disk (ENOSPC now, not SIGBUS later); sparse where unsupported."""
    if hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, 0, size)
    else:  # macOS, Windows: no reservation; writes still fail with OSError, never SIGBUS
        os.ftruncate(fd, size)


def _write_file(file: Path, data, offset: int) -> None:
    """Write a contiguous byte array at ``offset`` of an existing file and force it to disk."""
    fd = os.open(file, os.O_WRONLY)
    try:
        _pwrite_all(fd, data, offset)
        _sync(fd)
    finally:
        os.close(fd)


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while len(view):
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _sync(fd: int) -> None:
    """Force a data file's written bytes to disk (fdatasync where there is one)."""
    getattr(os, "fdatasync", os.fsync)(fd)


def _sync_folder(path: Path) -> None:
    """Make a rename in ``path`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _map(file: Path, count: int, dtype: torch.dtype) -> torch.Tensor:
    """``count`` elements of ``file`` as a 1-D tensor on a private (copy-on-write) memory map."""
    return torch.from_file(str(file), shared=False, size=count, dtype=dtype)
