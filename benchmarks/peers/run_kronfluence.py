"""kronfluence's EK-FAC against datainf on a finished detect-mislabeled run (the same model,
fine-tuned adapter, data and label noise), run in kronfluence's own environment (which has
datainf installed to load them). Both are timed in this process, ours first:

- ours: per-example gradients of the training and validation examples (collect_gradients,
  in memory) + DataInf's influence on the mean validation loss;
- kronfluence: EK-FAC factors on the training set + pairwise scores of every validation
  example against every training example (its recommended damping), averaged over the
  validation examples.

    benchmarks/peers/.venvs/kronfluence/bin/python benchmarks/peers/run_kronfluence.py \
        runs/detect-mislabeled OUT.json

kronfluence's scores are g_query^T H^-1 g_train: positive = helpful, i.e. -ours; the
detection AUC ranks training examples by MINUS its mean score (most harmful first).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def main() -> None:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments
    from kronfluence.task import Task

    from datainf import DataInf, collect_gradients
    from datainf.data.text import text_batches
    from datainf.jobs.detect_mislabeled import Config, load_data
    from datainf.metrics import detection_auc
    from datainf.models.hf import load_adapter, load_classifier

    run, out = Path(sys.argv[1]), sys.argv[2]
    record = json.loads((run / "run.json").read_text())
    names = {f.name for f in dataclasses.fields(Config)}
    config = Config(**{k: tuple(v) if isinstance(v, list) else v
                       for k, v in record.items() if k in names})
    train, val, _ = load_data(config)

    def model_and_tokenizer():
        base, tokenizer = load_classifier(config.model, len(train.classes),
                                          id2label=dict(enumerate(train.classes)))
        return load_adapter(base, run / "adapter").eval(), tokenizer

    # ---- ours: gradients (train, val) + DataInf on the mean validation loss
    model, tokenizer = model_and_tokenizer()
    start = time.perf_counter()
    grads = {split: collect_gradients(model, text_batches(tokenizer, data, config.batch_size,
                                                          config.max_length),
                                      "classification", progress=False)
             for split, data in (("train", train), ("val", val))}
    ours = DataInf(progress=False).fit(grads["train"]).score(grads["val"], aggregate=True)
    our_seconds = time.perf_counter() - start
    del grads

    # ---- kronfluence: EK-FAC factors + pairwise scores
    model, tokenizer = model_and_tokenizer()
    tracked = [name for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear)
               and any(p.requires_grad for p in module.parameters(recurse=False))]

    def dataset(data):
        encoded = tokenizer(data.texts, truncation=True, max_length=config.max_length,
                            padding="max_length", return_tensors="pt")
        encoded["labels"] = torch.as_tensor(data.labels)
        return [{k: v[i] for k, v in encoded.items()} for i in range(len(data))]

    class Classification(Task):
        def _logits(self, batch, model):
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            return model(**inputs).logits

        def compute_train_loss(self, batch, model, sample=False):
            logits = self._logits(batch, model)
            if sample:  # the true Fisher: labels drawn from the model
                with torch.no_grad():
                    labels = torch.multinomial(logits.softmax(-1), 1).flatten()
            else:
                labels = batch["labels"]
            return F.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model):
            return F.cross_entropy(self._logits(batch, model), batch["labels"], reduction="sum")

        def get_influence_tracked_modules(self):
            return tracked

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    task = Classification()
    model = prepare_model(model, task)
    with tempfile.TemporaryDirectory() as folder:
        analyzer = Analyzer("bbc", model=model, task=task, cpu=True, disable_tqdm=True,
                            output_dir=folder)
        train_set, val_set = dataset(train), dataset(val)
        start = time.perf_counter()
        analyzer.fit_all_factors("ekfac", dataset=train_set,
                                 per_device_batch_size=config.batch_size,
                                 factor_args=FactorArguments(strategy="ekfac"),
                                 overwrite_output_dir=True)
        factor_seconds = time.perf_counter() - start
        analyzer.compute_pairwise_scores(
            "scores", "ekfac", query_dataset=val_set, train_dataset=train_set,
            per_device_query_batch_size=len(val_set),
            per_device_train_batch_size=config.batch_size, overwrite_output_dir=True)
        their_seconds = time.perf_counter() - start
        scores = analyzer.load_pairwise_scores("scores")  # (m, n), written to its folder
    theirs = -scores["all_modules"].double().mean(0)  # (n,), most harmful highest
    result = {
        "n_train": len(train), "n_val": len(val), "tracked_modules": len(tracked),
        "ours": {"seconds": our_seconds, "auc": detection_auc(ours, train.flipped)},
        "kronfluence": {"seconds": their_seconds, "factor_seconds": factor_seconds,
                        "auc": detection_auc(theirs, train.flipped)},
        "spearman_with_ours": float(torch.corrcoef(torch.stack([
            ours.argsort().argsort().double(), theirs.argsort().argsort().double()]))[0, 1]),
    }
    Path(out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
