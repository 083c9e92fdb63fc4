"""The paper's studies as commands (``datainf experiment NAME``), each registered in
:data:`EXPERIMENTS` with the pipeline it runs and its presets:

- ``approximation``: each method's correlation with Exact across LoRA ranks (paper, Figure 1);
- ``mislabeled``: AUC of every score over runs and the influence step's runtime (Figure 2 and
  the runtime comparison);
- ``removal``: validation accuracy after removing each method's most suspicious examples and
  fine-tuning again, against removing as many at random;

  (these three on the detect-mislabeled pipeline, sharing its cached fine-tunes and stores)
- ``generation``: class detection on the synthetic text-generation tasks (Table 2, LLM rows),
  on the explain-generation pipeline;
- ``diffusion``: class detection on the digit style and subject tasks (Table 2, image rows),
  on the explain-image pipeline;
- ``lds``: the linear datamodeling score of every method (not in the paper): does the score
  predict the test loss of fine-tunes on random subsets of the training data?
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from ..jobs import detect_mislabeled, explain_generation, explain_image
from . import approximation, diffusion, generation, lds, mislabeled, removal
from .common import (
    CELL_DEFAULTS,
    CELL_DESCRIPTION,
    CELL_HELPS,
    CELL_OPTIONS,
    Settings,
    cell_options,
    cell_settings,
)


@dataclass(frozen=True)
class Experiment:
    """A study's command: the ``config`` dataclass of the pipeline it runs and the options of
    it that the study takes (``layout``, shown with ``helps`` and ``defaults`` where they
    differ from the job's), its own options (flag, argparse keywords), and ``start(settings,
    **own options, process_group=...)``, which runs it and returns its folder."""

    name: str
    help: str
    description: str
    config: type
    layout: dict
    options: tuple
    start: Callable[..., str]
    defaults: dict = field(default_factory=dict)
    helps: dict = field(default_factory=dict)


def _cells(name: str, run: Callable[[Settings], object], settings: dict, **own) -> str:
    study = cell_settings(name, settings, **own)
    run(study)
    return study.out


def _cell_study(name: str, text: str, run: Callable[[Settings], object]) -> Experiment:
    return Experiment(name, text, text[0].upper() + text[1:] + "." + CELL_DESCRIPTION,
                      detect_mislabeled.Config, CELL_OPTIONS, cell_options(name),
                      partial(_cells, name, run), CELL_DEFAULTS, CELL_HELPS)


EXPERIMENTS = {e.name: e for e in (
    _cell_study("approximation", "each method's correlation with Exact across LoRA ranks (the "
                "paper's Figure 1)", approximation.run),
    _cell_study("mislabeled", "AUC of every score over runs and the influence step's runtime "
                "(Figure 2, the runtime comparison)", mislabeled.run),
    _cell_study("removal", "validation accuracy after removing each method's top k% and "
                "fine-tuning again, against removing as many at random", removal.run),
    Experiment("generation", generation.HELP, generation.DESCRIPTION, explain_generation.Config,
               explain_generation.MODEL_OPTIONS, generation.OPTIONS, generation.start,
               {"methods": ",".join(generation.METHODS)}),
    Experiment("diffusion", diffusion.HELP, diffusion.DESCRIPTION, explain_image.Config,
               explain_image.MODEL_OPTIONS, diffusion.OPTIONS, diffusion.start,
               {"methods": ",".join(diffusion.METHODS)}),
    Experiment("lds", lds.HELP, lds.DESCRIPTION, detect_mislabeled.Config, {}, lds.OPTIONS,
               lds.start),
)}

__all__ = ["EXPERIMENTS", "Experiment", "Settings"]
