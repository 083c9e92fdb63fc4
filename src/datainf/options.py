"""A setting and its command-line option, declared once, where the setting is.

``option(default, help, ...)`` is a dataclass field whose metadata says how the command line
shows the setting (its help, flag, metavar) and turns text into its value (``kind``);
:func:`add_options` adds the options of a Config dataclass to an argparse parser, one group of
``--help`` after another as a :class:`Command` lays them out, and :func:`settings_of` reads
the parsed values back as the Config's keyword arguments.

Kinds: ``value`` (int, float or str: the default's type, or ``type``), ``list`` (comma-
separated: a tuple of strings), ``ints`` (comma-separated integers), ``repeat`` (the option
given again for each value), ``on`` (a switch that sets the setting to True), ``off`` (a
switch that sets the setting to False), ``quiet`` (a
switch that sets ``progress`` to False, None otherwise).

Messages name a setting as whoever set it typed it: :func:`said` gives ``--max-length 8``
inside :func:`command_line` (where the ``datainf`` command runs) and ``max_length=8`` from
Python.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import MISSING, dataclass, field

from .errors import DataInfError

AS_DEFAULT = object()  # shown: the setting's own default


def option(default=MISSING, help: str = "", *,  # noqa: A002
           factory: Callable | None = None, flag: str | None = None, kind: str = "value",
           type: type | None = None, metavar: str | None = None,  # noqa: A002
           choices: tuple | None = None, shown=AS_DEFAULT, required: bool = False):
    """A dataclass field with its option. ``flag``: the option's name (default: ``--`` and
    the setting's name with dashes); ``shown``: the default the option has and ``--help``
    shows (default: the setting's; None: none, the job resolves an absent option)."""
    metadata = {"help": help, "flag": flag, "kind": kind, "type": type, "metavar": metavar,
                "choices": choices, "shown": shown, "required": required}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Command:
    """A job's face on the command line: the options of its ``config`` dataclass, ``layout`` =
    --help's groups, each with the names of the settings it lists, in order."""

    name: str
    help: str
    description: str
    config: type
    layout: dict[str, tuple[str, ...]]
    epilog: str | None = None
    make: Callable[..., object] | None = None  # the Config of the settings (default: config)

    def build(self, **settings) -> object:
        """The run's Config of the command's settings."""
        return (self.make or self.config)(**settings)


def add_options(parser: argparse.ArgumentParser, config: type, layout: dict,
                helps: dict[str, str] | None = None) -> None:
    """The options of the ``config`` dataclass's settings named in ``layout`` (group ->
    names), each group an argument group; ``helps`` replaces the help of some."""
    found = {f.name: f for f in dataclasses.fields(config)}
    for title, names in layout.items():
        group = parser.add_argument_group(title)
        for name in names:
            setting = found[name]
            group.add_argument(flag_of(setting), dest=dest_of(setting),
                               help=(helps or {}).get(name, setting.metadata["help"]),
                               **_argument(setting, setting.metadata))


def flag_of(setting: dataclasses.Field) -> str:
    return setting.metadata.get("flag") or "--" + setting.name.replace("_", "-")


def dest_of(setting: dataclasses.Field) -> str:
    """Where argparse keeps the option's value: its flag's name (``--no-matrix``: no_matrix)."""
    return flag_of(setting)[2:].replace("-", "_")


def _argument(setting: dataclasses.Field, spec) -> dict:
    kind = spec["kind"]
    if kind in ("on", "off", "quiet"):
        return {"action": "store_true"}
    own = setting.default if setting.default is not MISSING else None
    shown = own if spec["shown"] is AS_DEFAULT else spec["shown"]
    if kind in ("list", "ints") and shown is not None:
        shown = ",".join(map(str, shown))
    argument = {"default": None if kind == "repeat" else shown}
    if kind == "repeat":
        argument["action"] = "append"
    elif kind == "value":
        kind_type = spec["type"] or (type(own) if own is not None else str)
        if kind_type is not str:
            argument["type"] = kind_type
    for key in ("metavar", "choices", "required"):
        if spec[key]:
            argument[key] = spec[key]
    return argument


def settings_of(args: argparse.Namespace, config: type, layout: dict) -> dict:
    """The Config keyword arguments of the options in ``layout`` as ``args`` holds them: lists
    and integers parsed, switches turned into their settings; an absent option without a
    default gives None, ``repeat`` options given no value are left out."""
    found = {f.name: f for f in dataclasses.fields(config)}
    settings = {}
    for name in (n for names in layout.values() for n in names):
        kind, value = found[name].metadata["kind"], getattr(args, dest_of(found[name]))
        if kind == "on":
            value = bool(value)
        elif kind == "off":
            value = not value
        elif kind == "quiet":
            value = False if value else None
        elif kind == "repeat":
            if value is None:
                continue
            value = tuple(value)
        elif kind == "list" and value is not None:
            value = tuple(value.split(","))
        elif kind == "ints" and value is not None:
            try:
                value = tuple(int(t) for t in value.split(","))
            except ValueError:
                raise DataInfError(f"{flag_of(found[name])} must be comma-separated integers, "
                                   f"not {value!r}") from None
        settings[name] = value
    return settings


_COMMAND_LINE: ContextVar[bool] = ContextVar("datainf_command_line", default=False)


@contextmanager
def command_line() -> Iterator[None]:
    """Within: messages name each setting as the option a user typed (the ``datainf``
    command runs in it); outside, as the keyword a Python caller gave."""
    token = _COMMAND_LINE.set(True)
    try:
        yield
    finally:
        _COMMAND_LINE.reset(token)


def said(name: str, *value: object, flag: str | None = None, quoted: bool = False) -> str:
    """How a message names the setting ``name`` and, when given, its value: ``--max-length 8``
    on the command line (``flag``: an option named otherwise than the setting; ``quoted``: the
    value as repr, ``--rank-by 'exact'``), ``max_length=8`` from Python (the value as repr)."""
    if _COMMAND_LINE.get():
        option = flag or "--" + name.replace("_", "-")
        return f"{option} {value[0]!r}" if quoted and value else \
            f"{option} {value[0]}" if value else option
    return f"{name}={value[0]!r}" if value else name
