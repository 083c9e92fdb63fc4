"""bergson's fastest attribution against datainf on a finished detect-mislabeled run (the same
model, fine-tuned adapter, data and label noise), in bergson's own environment (which has
datainf installed to load them). Both timed in this process, ours first (finished_run.py).

bergson's recipe, the one its README shows first (``bergson build --projection_dim 16`` then a
unit-norm query): per-example gradients of the LoRA modules (its default target set for a PEFT
model), each randomly projected to 16 x 16 per module, no preconditioner; the query is the mean
of the unit-normalised validation gradients (PreprocessConfig aggregation "mean"), and each
training example is scored on the fly by its cosine with it (bergson's Scorer): gradient
cosine similarity. bergson computes causal-LM losses itself; for this classifier its
collector's forward/backward is given the classifier's summed cross-entropy, so that its
per-example gradients are those of each example's loss: checked (untimed) by collecting the
validation examples' gradients unprojected and comparing them with ours, module by module.

    benchmarks/peers/.venvs/bergson/bin/python benchmarks/peers/run_bergson.py \
        runs/detect-mislabeled OUT.json

Its scores are positive = helpful (aligned with lowering the validation loss): -ours in sign;
the detection AUC ranks training examples by MINUS its score.
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

PROJECTION_DIM = 16  # bergson's default for build


def main() -> None:
    from bergson import (
        CollectorComputer,
        GradientProcessor,
        IndexConfig,
        InMemoryCollector,
        Scorer,
    )
    from bergson.process_grads import normalize_and_aggregate_grads
    from bergson.score.score_writer import InMemorySequenceScoreWriter
    from bergson.utils.worker_utils import extract_peft_target_modules
    from datasets import Dataset

    from datainf import collect_gradients
    from datainf.data.text import text_batches
    from datainf.metrics import spearman

    run, out = FinishedRun(Path(sys.argv[1])), sys.argv[2]
    config = run.config
    ours, our_seconds = run.ours()

    model, tokenizer = run.model_and_tokenizer()
    for p in model.parameters():  # bergson's hooks need the graph to reach the adapters
        p.requires_grad_(False)
    targets = extract_peft_target_modules(model)
    for name in targets:
        for p in model.base_model.get_submodule(name).parameters():
            p.requires_grad_(True)

    def dataset(data) -> Dataset:
        ids = tokenizer(data.texts, truncation=True, max_length=config.max_length)["input_ids"]
        return Dataset.from_dict({"input_ids": ids, "label": list(map(int, data.labels))})

    def classification(model, x, y, batch):
        """Summed cross-entropy of the batch; (N,) per-example losses. x is padded with 0."""
        lengths = torch.tensor([len(ids) for ids in batch["input_ids"]])
        mask = (torch.arange(x.shape[1]) < lengths[:, None]).long()
        logits = model(input_ids=x, attention_mask=mask).logits
        losses = F.cross_entropy(logits, torch.tensor(batch["label"]), reduction="none")
        losses.sum().backward()
        model.zero_grad(set_to_none=True)
        return losses.detach()

    def collect(data: Dataset, scorer=None, projection: int = PROJECTION_DIM):
        cfg = IndexConfig(run_path=str(Path(folder) / "run"), projection_dim=projection)
        cfg.partial_run_path.mkdir(exist_ok=True)  # where it saves a token count
        processor = GradientProcessor(projection_dim=projection or None)
        collector = InMemoryCollector(model=model.base_model, cfg=cfg, processor=processor,
                                      target_modules=targets, data=data, scorer=scorer)
        batches = [list(range(i, min(i + config.batch_size, len(data))))
                   for i in range(0, len(data), config.batch_size)]
        computer = CollectorComputer(model=model, data=data, collector=collector,
                                     batches=batches, cfg=cfg)
        computer.forward_backward = classification
        computer.run_with_collector_hooks(desc="bergson")
        return collector

    train_set, val_set = dataset(run.train), dataset(run.val)
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        queries = collect(val_set).gradients
        modules = sorted(queries)
        query = normalize_and_aggregate_grads(queries, modules, unit_normalize=True,
                                              device=torch.device("cpu"),
                                              aggregate_grads="mean")
        scorer = Scorer(query, modules, InMemorySequenceScoreWriter(len(train_set), 1),
                        torch.device("cpu"), torch.float32, unit_normalize=True)
        theirs = -collect(train_set, scorer).scores[:, 0].double()  # most harmful highest
        their_seconds = time.perf_counter() - start
        # not timed: bergson's unprojected gradients of the validation examples against ours
        unprojected = collect(val_set, projection=0).gradients
    fresh, _ = run.model_and_tokenizer()
    mine = collect_gradients(fresh, text_batches(tokenizer, run.val, config.batch_size,
                                                 config.max_length),
                             "classification", progress=False)
    differences = [float((unprojected[m] - mine[f"base_model.{m}.weight"]).abs().max()
                         / mine[f"base_model.{m}.weight"].abs().max()) for m in modules]
    result = {
        "n_train": len(run.train), "n_val": len(run.val), "tracked_modules": len(targets),
        "projection_dim": PROJECTION_DIM,
        "ours": {"seconds": our_seconds, "auc": run.auc(ours)},
        "bergson": {"seconds": their_seconds, "auc": run.auc(theirs)},
        "spearman_with_ours": spearman(ours, theirs),
        "unprojected_gradients_max_rel_diff": max(differences),
    }
    Path(out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
