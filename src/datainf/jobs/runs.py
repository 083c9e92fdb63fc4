"""A job's run folder (``--out``): locked while a run works in it, refused when it holds a run
of other expensive settings, claimed by ``run.json`` only once the run has loaded what it
needs; and the stage lines and warnings every job prints.

A job's expensive stages (fine-tuning, gradients) are written into the folder once and reused
when the job is repeated with the same settings (``record``: what decides them)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import fields
from pathlib import Path

from ..distributed import broadcast_flag, world
from ..errors import DataInfError
from ..files import write_atomic
from ..log import warn
from ..options import said
from ..training.moments import save_second_moments

LOCK = ".lock"


@contextmanager
def run_folder(out: Path, record: dict, group: object | None = None) -> Iterator[Path]:
    """``out``, locked for this run, after checking that it is new, empty or holds a run made
    with the same expensive settings (``record``). Nothing is written but the lock file; a
    folder this run created is removed again when the run fails before :func:`record_run`.

    With a process group, rank 0 does all this and holds the lock for the ranks of the run;
    the others go on once it has (and stop if it could not)."""
    if world(group)[0] > 0:
        if not broadcast_flag(False, group):
            raise DataInfError(f"rank 0 could not claim {said('out', str(out))} (see its "
                               "error); this rank stops too")
        yield out
        return
    with ExitStack() as stack:
        try:
            folder = stack.enter_context(_locked_run_folder(out, record))
        except BaseException:
            broadcast_flag(False, group)
            raise
        broadcast_flag(True, group)
        yield folder


@contextmanager
def main_first(group: object | None) -> Iterator[None]:
    """Runs the body on rank 0 first (it writes what the other ranks then read), then on the
    other ranks; when rank 0 fails, the others stop with a DataInfError instead of waiting.
    Without a group: just the body."""
    if world(group)[0] > 0:
        if not broadcast_flag(False, group):
            raise DataInfError("rank 0 stopped (see its error); this rank stops too")
        yield
        return
    try:
        yield
    except BaseException:
        broadcast_flag(False, group)
        raise
    broadcast_flag(True, group)


def is_main(group: object | None) -> bool:
    """Whether this process writes a run's outputs (rank 0, or the only process)."""
    return world(group)[0] == 0


@contextmanager
def _locked_run_folder(out: Path, record: dict) -> Iterator[Path]:
    if out.exists() and not out.is_dir():
        raise DataInfError(f"{said('out', str(out))} is a file; choose a folder")
    created = not out.exists()
    if not created and (out / "run.json").exists():
        check_same_run(out, record)
    elif not created and any(p.name != LOCK for p in out.iterdir()):
        raise DataInfError(f"{said('out', str(out))} is not empty and holds no datainf run; choose "
                           f"another {said('out')} or empty it")
    try:
        out.mkdir(parents=True, exist_ok=True)
        handle = open(out / LOCK, "a")  # noqa: SIM115 (held for the whole run)
    except OSError as error:
        raise DataInfError(f"cannot write to {said('out', str(out))} ({error.strerror}); choose a "
                           "folder you can write to") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataInfError(f"{said('out', str(out))} is in use by another datainf run; "
                               f"wait for it to finish or choose another {said('out')}") from None
    except BaseException:
        handle.close()
        raise
    try:
        if (out / "run.json").exists():  # another run may have started it meanwhile
            check_same_run(out, record)
        yield out
    except BaseException:
        if created and not (out / "run.json").exists():  # leave nothing behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        handle.close()


def check_same_run(out: Path, record: dict) -> None:
    """Refuses ``out`` when its run.json differs from ``record``, naming what differs."""
    path = out / "run.json"
    try:
        old = json.loads(path.read_text())
    except ValueError:
        raise DataInfError(f"{path} is damaged; delete {out} or choose another {said('out')}"
                           ) from None
    differ = [f"{k} ({old.get(k)!r} there, {record[k]!r} now)"
              for k in record if old.get(k) != record[k]]
    if differ:
        raise DataInfError(
            f"{said('out', str(out))} holds a run made with other settings: "
            + "; ".join(differ[:4]) + f". Use another {said('out')}, or delete that folder"
        )


def record_run(out: Path, record: dict) -> None:
    """Write run.json: from here on ``out`` belongs to this run's settings."""
    write_atomic(out / "run.json", json.dumps(record, indent=2))


def save_adapter(model, out: Path, history: dict, second_moments: dict | None = None) -> None:
    """The model's PEFT adapter, its training history (training.json) and the optimizer's
    second moments (see :mod:`datainf.training.moments`) into out/adapter, whole or not at
    all: written beside it, then renamed over any older one."""
    tmp = out / "adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    (tmp / "training.json").write_text(json.dumps(history, indent=2))
    save_second_moments(second_moments or {}, tmp)
    shutil.rmtree(out / "adapter", ignore_errors=True)
    os.replace(tmp, out / "adapter")


def keyed_folder(folder: Path, key: dict) -> Path:
    """``folder`` (created), kept while its key.json equals ``key``, emptied otherwise: for
    what a run may keep across repeats only while its inputs stay (a job's query answers and
    gradients)."""
    path = folder / "key.json"
    if folder.exists() and (not path.exists() or json.loads(path.read_text()) != key):
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(key))
    return folder


def settings_json(settings: object, names: Iterable[str] | None = None,
                  leave_out: tuple[str, ...] = ()) -> dict:
    """Attributes of the dataclass ``settings`` as JSON values (tuples as lists): ``names``,
    or every field but ``leave_out``. What run.json compares and summaries record."""
    if names is None:  # (a process group is how a run is done, not a setting)
        names = [f.name for f in fields(settings)
                 if f.name not in leave_out and f.name != "process_group"]
    return {k: list(v) if isinstance(v, tuple) else v
            for k, v in ((k, getattr(settings, k)) for k in names)}


def check_numbers(settings: object, at_least: dict[str, float],
                  positive: tuple[str, ...] = ()) -> None:
    """Each ``at_least`` setting (None allowed) is >= its bound, each ``positive`` one > 0;
    otherwise a DataInfError naming the setting (``--max-length`` on the command line)."""
    for name, low in at_least.items():
        value = getattr(settings, name)
        if value is not None and value < low:
            raise DataInfError(f"{said(name)} must be at least {low}, not {value}")
    for name in positive:
        if not getattr(settings, name) > 0:
            raise DataInfError(f"{said(name)} must be positive, not "
                               f"{getattr(settings, name)}")


def warn_unconverged(notes: dict) -> None:
    """A warning for every method whose iterations stopped before converging (LiSSA): its
    scores are approximate."""
    for method, note in notes.items():
        if note.get("converged") is False:
            warn(f"{method} did not converge in {note['iterations']} iterations (relative "
                 f"residual {note['relative_residual']:.2g}): its scores are approximate; "
                 "raise --damping, or rank by datainf or exact")
