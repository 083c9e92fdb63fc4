"""One descent for every job: read -> lock -> model -> fine-tune -> answers -> collect ->
score -> write. What each job does at a step lives in its own module; what every job does the
same way lives here:

- :class:`Run`: the locked run folder, made once, with what every later step asks of it
  (the folder, whether this process writes the outputs, the process group, the stage times);
  each step is a ``with run.stage("name"):`` block, so every stage is a plain call;
- :meth:`Run.locked`: lock ``out`` (refused when it holds a run of other expensive
  settings), and :meth:`Run.claim` once the model has loaded;
- :func:`with_adapter`: the adapter's source, the same for every job: ``given`` (--adapter),
  ``reused`` (out/adapter of an earlier run with the same settings) or ``new`` (fresh LoRA,
  to be fine-tuned);
- :func:`fine_tuned`: fine-tune a new adapter, or read the history of a reused one;
- :func:`collected`: a gradient store, said to be reused when it was complete already;
- :func:`second_moments`, :func:`with_features`: what the methods that read more than
  gradients need (``less``: the fine-tune's Adam moments; ``repsim``: the model's features).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..distributed import world
from ..errors import DataInfError
from ..gradients.store import GradientStore
from ..identity import adapter_digest, fingerprint
from ..log import say
from ..methods import METHODS, Inputs
from ..models.hf import add_lora, load_adapter
from ..training.moments import FILE as MOMENTS_FILE
from ..training.moments import read_second_moments
from .runs import keyed_folder, main_first, record_run, run_folder, save_adapter

# the help of options that every job has
DAMPING_HELP = "the damping constant: see --damping-rule"
DAMPING_RULE_HELP = ("relative: lambda_l = DAMPING x the mean squared gradient entry of block l "
                     "(the paper's); absolute: lambda_l = DAMPING for every block")
DEVICE_HELP = "cpu, cuda, cuda:1, ..."
QUIET_HELP = "no progress bars or stage lines (warnings still show)"


@dataclass
class Run:
    """A job's run in its locked folder ``out``: ``main`` is whether this process writes the
    outputs (rank 0, or the only process); ``seconds``: stage name -> seconds (the Config's
    ``stage_seconds``, which summaries report); ``reused``: the stages taken from an earlier
    run in ``out``; ``moments``: the optimizer's second moments of an adapter fine-tuned in
    this run (every rank holds them)."""

    out: Path
    group: object | None = None
    progress: bool | None = None
    seconds: dict = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)
    moments: dict | None = None

    @classmethod
    def of(cls, config) -> Run:
        """The run of a job's ``config`` (its ``out``, ``process_group``, ``progress``; stage
        times into its ``stage_seconds``)."""
        return cls(Path(config.out), config.process_group, config.progress,
                   config.stage_seconds)

    @contextmanager
    def locked(self, record: dict) -> Iterator[Run]:
        """``out`` locked for this run: refused when it holds a run of other expensive
        settings (``record``); see :func:`datainf.jobs.runs.run_folder`."""
        with run_folder(self.out, record, self.group):
            yield self

    @property
    def main(self) -> bool:
        return world(self.group)[0] == 0

    @property
    def size(self) -> int:
        """Processes that share the run (1 without a process group)."""
        return world(self.group)[1]

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Times the block into ``seconds[name]`` (added up when a stage runs twice) and says
        how long it took."""
        start = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        self.say(f"{name}: {self.seconds[name]:.1f} s")

    def reuse(self, name: str) -> None:
        self.reused.append(name)
        self.say(f"{name}: reused from an earlier run in {self.out}")

    def say(self, message: str) -> None:
        say(message, self.progress)

    def main_first(self):
        """Rank 0 runs the block first (it writes what the others then read); see
        :func:`datainf.jobs.runs.main_first`."""
        return main_first(self.group)

    def claim(self, record: dict, outputs: tuple[str, ...]) -> None:
        """Write run.json (rank 0): from here on ``out`` belongs to ``record``'s settings; the
        outputs of an earlier run with other cheap settings are removed, so that they are
        never taken for this run's."""
        if self.main:
            record_run(self.out, record)
            for name in outputs:
                (self.out / name).unlink(missing_ok=True)


def with_adapter(base: torch.nn.Module, config, out: Path, seed: int | None = None
                 ) -> tuple[torch.nn.Module, str]:
    """(``base`` with its LoRA adapter, source): ``config.adapter`` ("given"), the adapter an
    earlier run saved in out/adapter ("reused"), or a fresh LoRA of ``config.lora_r``,
    ``lora_alpha`` and ``lora_targets``, initialised with ``seed`` (default ``config.seed``)
    ("new")."""
    saved = out / "adapter"
    if config.adapter is not None:
        return load_adapter(base, config.adapter), "given"
    if (saved / "adapter_config.json").exists():
        return load_adapter(base, saved), "reused"
    torch.manual_seed(config.seed if seed is None else seed)
    return add_lora(base, r=config.lora_r, alpha=config.lora_alpha,
                    target_modules=config.lora_targets), "new"


def fine_tuned(run: Run, source: str, model: torch.nn.Module,
               fine_tune: Callable[[dict], dict]) -> dict | None:
    """The training history: for a new adapter, ``fine_tune(second_moments)`` (the
    "fine-tuning" stage; it fills the dict with the optimizer's second moments of the adapter
    it keeps), then ``model``'s adapter saved with its history and moments in out/adapter,
    whole or not at all (rank 0); the saved training.json of a reused one; None for a given
    one."""
    if source == "new":
        with run.stage("fine-tuning"):
            run.moments = {}
            history = fine_tune(run.moments)
            if run.main:
                save_adapter(model, run.out, history, run.moments)
        return history
    if source == "reused":
        run.reuse("fine-tuning")
        return json.loads((run.out / "adapter" / "training.json").read_text())
    return None


def collected(run: Run, name: str, paths: list[Path], collect: Callable[[], object]):
    """``collect()`` as the stage ``name``, said to be reused when every store at ``paths``
    was complete before it."""
    again = all(GradientStore.is_complete(p) for p in paths)
    with run.stage(name):
        result = collect()
    if again:
        run.reuse(name)
    return result



def query_folder(out: Path, config, source: str, queries: str, **settings) -> Path:
    """out/query: what a run keeps of its queries (answers or drawings, gradients), kept while
    the queries file or folder, the adapter and ``settings`` (how the answers are made) stay
    the same; emptied otherwise."""
    adapter = Path(config.adapter) if config.adapter else out / "adapter"
    return keyed_folder(out / "query", {
        "queries": fingerprint(queries), **settings,
        "adapter": source if source == "given" else "trained here",
        "adapter_fingerprint": adapter_digest(adapter)})


def check_second_moments(config) -> None:
    """Before anything is loaded: a given ``config.adapter`` without the optimizer's second
    moments is refused when one of ``config.methods`` needs them."""
    if config.adapter is not None and _needing(config.methods):
        _read_moments(Path(config.adapter), _needing(config.methods), given=True)


def second_moments(run: Run, config, source: str) -> dict | None:
    """Adam's second moments of the run's adapter when one of ``config.methods`` needs them
    (``less``), else None: those of the fine-tune when it ran here (every rank has them; rank
    0's file may not be written yet), else read from the adapter's folder (given, or
    out/adapter), refused when it has none."""
    needing = _needing(config.methods)
    if not needing:
        return None
    if source == "new":
        return run.moments
    folder = Path(config.adapter) if source == "given" else run.out / "adapter"
    return _read_moments(folder, needing, given=source == "given")


def _needing(methods) -> list[str]:
    """The ``methods`` that need the optimizer's second moments."""
    return [m for m in methods if METHODS[m].second_moments]


def _read_moments(folder: Path, needing: list[str], given: bool) -> dict:
    moments = read_second_moments(folder)
    if moments is None:
        fix = ("pass an adapter that datainf fine-tuned, or leave it out of --methods" if given
               else f"delete {folder} to fine-tune again, or leave it out of --methods")
        raise DataInfError(
            f"{needing[0]} needs the second moments of the optimizer that trained the adapter, "
            f"and {folder} has no {MOMENTS_FILE} (datainf keeps them beside the adapters it "
            f"trains since this version; an adapter trained elsewhere has none): {fix}")
    return moments


def reads_features(methods) -> bool:
    """Whether one of ``methods`` reads the model's representations (``repsim``)."""
    return any(METHODS[m].reads == "representations" for m in methods)


def with_features(run: Run, inputs: Inputs, methods, features: Callable[[], tuple]) -> Inputs:
    """``inputs`` with the (train, test) representations of ``features()`` (the
    "representations" stage) when one of ``methods`` reads them."""
    if not reads_features(methods):
        return inputs
    with run.stage("representations"):
        train, test = features()
    inputs.train_features, inputs.test_features = train, test
    return inputs
