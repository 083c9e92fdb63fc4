"""Is a --model / --data value a local file or folder, or a Hugging Face hub name?

One rule for models and data sets, so that a mistyped local path is reported at once ("does not
exist") instead of being sent to the hub (about a minute of network retries, then a confusing
error). Hub names look like ``name``, ``org/name`` or, for data sets, ``org/name:config``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# a file suffix: a dot, a letter, up to 4 more letters or digits (".csv", ".xlsx", ".bin",
# ".mp4"); a digit right after the dot is a version number of a hub name ("Qwen2.5-0.5B",
# "pythia-1.4b"), not a suffix
_SUFFIX = re.compile(r"\.[A-Za-z][A-Za-z0-9]{0,4}$")
# the config part of a hub data set name NAME:CONFIG ("mrpc", "wikitext-2-raw-v1")
_CONFIG = re.compile(r"[A-Za-z0-9_.\-]+")
# suffixes of local files longer than the pattern allows
_LONG_SUFFIXES = (".parquet", ".safetensors", ".jsonl")


def looks_like_local_path(name: str | os.PathLike) -> bool:
    """True when ``name`` is meant as a local file or folder rather than a hub name.

    That is when it starts with ".", "/" or "~", contains a backslash or more than one "/",
    ends in a file suffix (".csv", ".xlsx", ...; the CONFIG of a data set name ``NAME:CONFIG``
    is no suffix), or when its first path component exists here (``models/x`` when there is a
    folder ``models``). Existing paths are local too.
    """
    if isinstance(name, os.PathLike):
        return True
    if not name:
        return False
    if name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1:
        return True
    if Path(name).exists() or Path(name.split("/", 1)[0]).exists():
        return True
    base, colon, config = name.partition(":")
    if not colon or not _CONFIG.fullmatch(config):
        base = name  # no hub NAME:CONFIG: the whole value is judged
    last = base.rsplit("/", 1)[-1]
    return bool(_SUFFIX.search(last)) or last.lower().endswith(_LONG_SUFFIXES)
