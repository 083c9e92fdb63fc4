"""kronfluence's EK-FAC against datainf on a finished detect-mislabeled run (the same model,
fine-tuned adapter, data and label noise), run in kronfluence's own environment (which has
datainf installed to load them). Both are timed in this process, ours first:

- ours: per-example gradients of the training and validation examples (in memory) +
  DataInf's influence on the mean validation loss (finished_run.py);
- kronfluence: EK-FAC factors on the training set + pairwise scores of every validation
  example against every training example (its recommended damping), averaged over the
  validation examples.

    benchmarks/peers/.venvs/kronfluence/bin/python benchmarks/peers/run_kronfluence.py \
        runs/detect-mislabeled OUT.json

kronfluence's scores are g_query^T H^-1 g_train: positive = helpful, i.e. -ours; the
detection AUC ranks training examples by MINUS its mean score (most harmful first).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

from finished_run import FinishedRun  # noqa: E402


def main() -> None:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments
    from kronfluence.task import Task

    from datainf.metrics import spearman

    run, out = FinishedRun(Path(sys.argv[1])), sys.argv[2]
    config, train, val = run.config, run.train, run.val
    ours, our_seconds = run.ours()

    # ---- kronfluence: EK-FAC factors + pairwise scores
    model, tokenizer = run.model_and_tokenizer()
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
        "ours": {"seconds": our_seconds, "auc": run.auc(ours)},
        "kronfluence": {"seconds": their_seconds, "factor_seconds": factor_seconds,
                        "auc": run.auc(theirs)},
        "spearman_with_ours": spearman(ours, theirs),
    }
    Path(out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
