"""datainf's messages: stage lines (INFO) and warnings (WARNING), all through
``logging.getLogger("datainf")`` (the studies through its child ``"datainf.experiment"``).

As transformers does for its own logger, datainf installs one handler on it when first
imported: stage lines go to stdout as ``[datainf] ...`` (``[datainf experiment] ...``),
warnings to stderr as ``datainf: warning: ...``; ``propagate`` is off so that a handler on the
root logger does not print them twice. A library user silences the stage lines with

    logging.getLogger("datainf").setLevel(logging.WARNING)

and everything with ``logging.ERROR``; or removes the handler and turns ``propagate`` back on
to send datainf's records through their own logging set-up.
"""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger("datainf")


class _Lines(logging.Handler):
    """Prints a record as the commands always have: stage lines on the stdout of the moment,
    warnings and errors on its stderr (looked up per record, so redirections hold)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.levelno >= logging.WARNING:
                print(f"datainf: warning: {message}", file=sys.stderr, flush=True)
            else:
                print(f"[{record.name.replace('.', ' ')}] {message}", flush=True)
        except Exception:  # noqa: BLE001 (logging's own convention)
            self.handleError(record)


if not any(isinstance(h, _Lines) for h in logger.handlers):
    logger.addHandler(_Lines())
    logger.setLevel(logging.INFO)
    logger.propagate = False


def say(message: str, progress: bool | None = None) -> None:
    """A stage line (INFO), unless this call's progress is silenced (``progress=False``)."""
    if progress is not False:
        logger.info(message)


def warn(message: str) -> None:
    """A warning the user must see (WARNING): shown even when progress is silenced."""
    logger.warning(message)
