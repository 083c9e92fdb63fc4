"""What datainf finds and keeps outside its code: the installed asset packages (shipped
models and corpora, located but never imported: their ``__init__`` may pull heavy
dependencies), its cache folder, and the one way a folder is built there: in a hidden
temporary folder next to the target, renamed into place in one step, so that an interrupted
build is never taken for a complete one."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import DataInfError


def default_cache_dir() -> Path:
    """Where converted and pre-trained models are kept: ``$DATAINF_CACHE`` if set, else
    ``~/.cache/datainf``."""
    env = os.environ.get("DATAINF_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "datainf"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` if given, else :func:`default_cache_dir`."""
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def package_dir(package: str, pip: str, what: str | None = None) -> Path:
    """The folder of the installed package ``package``; ``pip``: the command that installs it,
    ``what``: what it ships, for the message when it is missing."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataInfError(f"{what or f'the asset package {package!r}'} is not installed; run "
                           f"`make setup`, or `{pip}` in your environment")
    return Path(next(iter(spec.submodule_search_locations)))


def built_once(target: Path, build: Callable[[Path], None],
               complete: Callable[[Path], bool], what: str) -> Path:
    """``target``, made by ``build(folder)`` on first use: in a hidden ``.tmp-*`` folder next to
    it, renamed into place once complete (a failed build removes its folder; a killed one
    leaves a ``.tmp-*`` folder that is ignored and can be deleted). When another process
    finishes first, its copy is used. A ``target`` that exists without being ``complete`` is
    refused (``what``: what it should hold)."""
    if complete(target):
        return target
    if target.exists():
        raise DataInfError(f"the cache folder {target} exists but holds no complete {what}; "
                           "delete it and try again")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: use its copy
            if not complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
