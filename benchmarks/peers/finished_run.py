"""A finished detect-mislabeled run, loaded for a whole-pipeline peer (run_kronfluence.py,
run_bergson.py): its settings, data (with the same label noise) and fine-tuned adapter, and
our influence step on it, timed. Imported in the peer's environment, which has datainf."""

from __future__ import annotations

import time
from pathlib import Path

import torch


class FinishedRun:
    """``run``: the --out folder of a finished ``datainf detect-mislabeled``."""

    def __init__(self, run: Path):
        from datainf.jobs.detect_mislabeled import Config, load_data, recorded_settings

        self.run = run
        self.config = Config(**recorded_settings(run))
        self.train, self.val, _ = load_data(self.config)

    def model_and_tokenizer(self) -> tuple[torch.nn.Module, object]:
        """A fresh copy of the fine-tuned classifier (eval mode) and its tokenizer."""
        from datainf.models.hf import load_adapter, load_classifier

        classes = self.train.classes
        base, tokenizer = load_classifier(self.config.model, len(classes),
                                          id2label=dict(enumerate(classes)))
        return load_adapter(base, self.run / "adapter").eval(), tokenizer

    def ours(self) -> tuple[torch.Tensor, float]:
        """Our influence step: per-example gradients of the training and validation examples
        (in memory) + DataInf's influence of each training example on the mean validation loss.
        Returns ((n,) scores, positive = harmful; seconds, model loading excluded)."""
        from datainf import DataInf, collect_gradients
        from datainf.data.text import text_batches

        model, tokenizer = self.model_and_tokenizer()
        c = self.config
        start = time.perf_counter()
        grads = {split: collect_gradients(model, text_batches(tokenizer, data, c.batch_size,
                                                              c.max_length),
                                          "classification", progress=False)
                 for split, data in (("train", self.train), ("val", self.val))}
        scores = DataInf(progress=False).fit(grads["train"]).score(grads["val"], aggregate=True)
        return scores, time.perf_counter() - start

    def auc(self, harmful: torch.Tensor) -> float:
        """Mislabeled-detection AUC of ``harmful`` (n,), higher = more likely flipped."""
        from datainf.metrics import detection_auc

        return detection_auc(harmful, self.train.flipped)

