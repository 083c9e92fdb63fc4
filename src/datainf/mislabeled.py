"""The ``detect-mislabeled`` job: which training examples of a LoRA fine-tune are mislabeled?

Stages (each expensive one is written to ``out`` once and reused when the job is repeated with
the same settings; an interrupted run goes on from the last finished stage):

1. data     load, split, inject label noise (seeded)                     -> recomputed (cheap)
2. adapter  LoRA fine-tuning of the classifier                          -> out/adapter/
3. predict  per-example training loss, validation accuracy              -> out/predictions.npz
4. gradients per-example gradients of training and validation examples -> out/gradients/{train,val}
5. scores   every method's score of every training example, metrics     -> summary.json,
            scores.csv, report.html (always recomputed)

Every score is oriented so that HIGHER = MORE SUSPICIOUS: influence on the mean validation loss
(positive = harmful, the paper's convention), self-influence g^T H^-1 g, the training loss and
the gradient norm.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .blocks import blocks_matching, group_by_module
from .data import TextData, load_splits
from .errors import DataInfError
from .metrics import detection_auc

METHODS = {
    "datainf": "DataInf",
    "exact": "Exact",
    "lissa": "LiSSA",
    "hessian_free": "Hessian-free",
    "datainf_self": "DataInf self-influence",
}
REFERENCES = {"loss": "Training loss", "grad_norm": "Gradient norm"}
DEFAULT_METHODS = tuple(METHODS)


@dataclass
class Config:
    """Settings of one run. Those in ``EXPENSIVE`` decide the adapter and gradients."""

    data: str | None = None             # None: the shipped BBC News corpus
    text_columns: tuple[str, ...] = ("text",)
    label_column: str = "label"
    id_column: str | None = None        # None: a column named "id" when there is one
    val_data: str | None = None
    val_fraction: float = 0.1
    train_size: int | None = 900        # BBC News default; None: every remaining example
    val_size: int | None = 100
    noise: float = 0.2
    model: str = "minilm"
    adapter: str | None = None
    lora_r: int = 4
    lora_alpha: int = 8
    lora_targets: tuple[str, ...] = ("query", "value")
    epochs: int = 4
    batch_size: int = 16
    learning_rate: float = 3e-4
    max_length: int = 128
    device: str = "cpu"
    seed: int = 0
    # cheap: may change between runs on the same --out
    methods: tuple[str, ...] = DEFAULT_METHODS
    blocks: str | None = None
    grouping: str = "tensor"            # "tensor" (the paper's) or "module"
    damping: float = 0.1
    out: str = "runs/detect-mislabeled"
    progress: bool | None = None
    stage_seconds: dict = field(default_factory=dict)

    EXPENSIVE = ("data", "text_columns", "label_column", "id_column", "val_data", "val_fraction",
                 "train_size", "val_size", "noise", "model", "adapter", "lora_r", "lora_alpha",
                 "lora_targets", "epochs", "batch_size", "learning_rate", "max_length", "seed")

    def expensive(self) -> dict:
        return {k: _jsonable(getattr(self, k)) for k in self.EXPENSIVE}


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


# ---------------------------------------------------------------- stage 1: data
def load_data(config: Config) -> tuple[TextData, TextData, dict]:
    """Training and validation data, with label noise injected into training when asked, and
    what reading them found (see :func:`datainf.data.load_splits`)."""
    train, val, info = load_splits(config)
    return train, val, info


# ---------------------------------------------------------------- run folder
def check_run_folder(config: Config, train: TextData) -> Path:
    """Create ``out`` or check that it holds a run made with the same expensive settings."""
    out = Path(config.out)
    record = {**config.expensive(), "data_fingerprint": train.fingerprint()}
    path = out / "run.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            raise DataInfError(f"{path} is damaged; delete {out} or choose another --out") from None
        differ = [f"{k} ({old.get(k)!r} there, {record[k]!r} now)"
                  for k in record if old.get(k) != record[k]]
        if differ:
            raise DataInfError(
                f"--out {out} holds a run made with other settings: " + "; ".join(differ[:4])
                + ". Use another --out, or delete that folder"
            )
    elif out.exists() and any(out.iterdir()):
        raise DataInfError(f"--out {out} is not empty and holds no datainf run; choose another "
                           "--out or empty it")
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, json.dumps(record, indent=2))
    return out


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------- stage 2: adapter
def build_model(config: Config, train: TextData, out: Path, progress):
    """The LoRA classifier: loaded from out/adapter when present, else fine-tuned and saved."""
    from .finetune import finetune
    from .models import add_lora, load_adapter, load_classifier

    torch.manual_seed(config.seed)
    id2label = dict(enumerate(train.classes))
    base, tokenizer = load_classifier(config.model, len(train.classes), id2label=id2label)
    saved = out / "adapter"
    if config.adapter is not None:
        return load_adapter(base, config.adapter).to(config.device), tokenizer, None
    if (saved / "adapter_config.json").exists():
        model = load_adapter(base, saved).to(config.device)
        history = json.loads((saved / "training.json").read_text())
        return model, tokenizer, history
    torch.manual_seed(config.seed)
    model = add_lora(base, r=config.lora_r, alpha=config.lora_alpha,
                     target_modules=config.lora_targets).to(config.device)
    losses = finetune(model, tokenizer, train, epochs=config.epochs,
                      batch_size=config.batch_size, learning_rate=config.learning_rate,
                      max_length=config.max_length, seed=config.seed, progress=progress)
    history = {"epoch_losses": losses}
    tmp = out / "adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    (tmp / "training.json").write_text(json.dumps(history))
    os.replace(tmp, saved)
    return model, tokenizer, history


# ---------------------------------------------------------------- stage 3: predictions
def predictions(config: Config, model, tokenizer, train: TextData, val: TextData, out: Path):
    """(training losses, validation accuracy), cached in out/predictions.npz."""
    from .finetune import predict
    from .models import model_fingerprint

    path = out / "predictions.npz"
    fingerprint = model_fingerprint(model)
    if path.exists():
        saved = np.load(path)
        if "model" in saved.files and str(saved["model"]) == fingerprint:  # else predict again
            return saved["train_loss"], float(saved["val_accuracy"])
    train_loss, _ = predict(model, tokenizer, train, batch_size=config.batch_size,
                            max_length=config.max_length)
    _, val_pred = predict(model, tokenizer, val, batch_size=config.batch_size,
                          max_length=config.max_length)
    accuracy = float((val_pred == val.labels).mean())
    tmp = out / "predictions.tmp.npz"
    np.savez(tmp, train_loss=train_loss, val_accuracy=accuracy, model=fingerprint)
    os.replace(tmp, path)
    return train_loss, accuracy


# ---------------------------------------------------------------- stage 4: gradients
def gradients(config: Config, model, tokenizer, train: TextData, val: TextData, out: Path,
              progress):
    from .data import text_batches
    from .gradients import collect_gradients

    stores = {}
    for split, data in (("train", train), ("val", val)):
        batches = text_batches(tokenizer, data, config.batch_size, config.max_length)
        stores[split] = collect_gradients(model, batches, "classification",
                                          out=str(out / "gradients" / split),
                                          progress=progress)
    return stores["train"], stores["val"]


# ---------------------------------------------------------------- stage 5: scores
def score_all(config: Config, train_store, val_store, train_loss: np.ndarray):
    """Every chosen method's scores (higher = more suspicious) and its seconds."""
    from .methods import DataInf, Exact, HessianFree, LiSSA

    unknown = [m for m in config.methods if m not in METHODS]
    if unknown:
        raise DataInfError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if config.grouping not in ("tensor", "module"):
        raise DataInfError(f"--grouping must be 'tensor' or 'module', not {config.grouping!r}")
    train = blocks_matching(train_store, config.blocks)
    val = blocks_matching(val_store, config.blocks)
    if config.grouping == "module":
        train, val = group_by_module(train), group_by_module(val)
    kwargs = {"damping": config.damping, "progress": False, "device": config.device}
    make = {"datainf": DataInf, "exact": Exact, "lissa": LiSSA, "hessian_free": HessianFree}
    scores, seconds, notes = {}, {}, {}
    for method in config.methods:
        start = time.perf_counter()
        if method == "datainf_self":
            values = DataInf(**kwargs).fit(train).self_influence()
        else:
            est = make[method](**kwargs)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                values = est.fit(train).score(val, aggregate=True)
            if method == "lissa":
                notes[method] = {"converged": est.converged_}
        seconds[method] = time.perf_counter() - start
        scores[method] = values.cpu().numpy()
    start = time.perf_counter()
    scores["loss"] = np.asarray(train_loss, dtype=np.float64)
    seconds["loss"] = 0.0  # a by-product of the prediction stage
    sq = sum(train.row_sq_norms(name).numpy() for name in train.block_names)
    scores["grad_norm"] = np.sqrt(sq)
    seconds["grad_norm"] = time.perf_counter() - start
    return scores, seconds, notes, dict(train.block_widths)


def write_outputs(config: Config, out: Path, train: TextData, val: TextData, scores: dict,
                  seconds: dict, notes: dict, summary_extra: dict) -> dict:
    """summary.json, scores.csv and report.html, each written whole or not at all."""
    import pandas as pd

    from .report import write_report

    labels = {**METHODS, **REFERENCES}
    methods = {}
    for key, values in scores.items():
        entry = {"label": labels[key], "seconds": round(seconds[key], 4)}
        if train.flipped is not None:
            entry["auc"] = round(detection_auc(values, train.flipped), 4)
        entry.update(notes.get(key, {}))
        methods[key] = entry
    summary = {
        "config": {k: _jsonable(v) for k, v in asdict(config).items()
                   if k not in ("stage_seconds", "progress")},
        "classes": train.classes,
        "n_train": len(train), "n_val": len(val),
        "n_flipped": None if train.flipped is None else int(train.flipped.sum()),
        **summary_extra,
        "methods": methods,
        "stage_seconds": {k: round(v, 2) for k, v in config.stage_seconds.items()},
        "sign_convention": "every score: higher = more suspicious (influence on the mean "
                           "validation loss: positive = harmful)",
    }
    table = pd.DataFrame({"index": np.arange(len(train)), "text": train.texts})
    if train.ids:
        table.insert(1, "id", train.ids)
    if train.pairs is not None:
        table["text_pair"] = train.pairs
    table["given_label"] = [train.classes[i] for i in train.labels]
    if train.original is not None:
        table["original_label"] = [train.classes[i] for i in train.original]
        table["flipped"] = train.flipped
    for key, values in scores.items():
        table[f"{key}_score"] = values
        table[f"{key}_rank"] = pd.Series(-values).rank(method="first").astype(int).values
    tmp_csv = out / "scores.csv.tmp"
    table.to_csv(tmp_csv, index=False)
    html = write_report(summary, table, scores, train.flipped)
    _write_atomic(out / "report.html", html)
    os.replace(tmp_csv, out / "scores.csv")
    _write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def run(config: Config) -> dict:
    """Run every stage; returns the summary (also written to out/summary.json)."""
    stage = config.stage_seconds

    def timed(name, fn, *args):
        start = time.perf_counter()
        result = fn(*args)
        stage[name] = stage.get(name, 0.0) + time.perf_counter() - start
        _say(config, f"{name}: {stage[name]:.1f} s")
        return result

    train, val, data_info = timed("data", load_data, config)
    out = check_run_folder(config, train)
    for name in ("summary.json", "report.html", "scores.csv"):  # never leave stale results
        (out / name).unlink(missing_ok=True)
    model, tokenizer, history = timed("fine-tuning", build_model, config, train, out,
                                      config.progress)
    train_loss, accuracy = timed("predictions", predictions, config, model, tokenizer, train,
                                 val, out)
    train_store, val_store = timed("gradients", gradients, config, model, tokenizer, train, val,
                                   out, config.progress)
    scores, seconds, notes, blocks = timed("scoring", score_all, config, train_store,
                                           val_store, train_loss)
    extra = {"val_accuracy": round(accuracy, 4), "training": history,
             "blocks": {"count": len(blocks), "parameters": int(sum(blocks.values()))},
             "data": data_info}
    summary = timed("report", write_outputs, config, out, train, val, scores, seconds, notes,
                    extra)
    return summary


def _say(config: Config, message: str) -> None:
    if config.progress is not False:
        print(f"[datainf] {message}", flush=True)
