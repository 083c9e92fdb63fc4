"""The ``detect-mislabeled`` job: which training examples of a LoRA fine-tune are mislabeled?

Stages (each expensive one is written to ``out`` once and reused when the job is repeated with
the same settings; an interrupted run goes on from the last finished stage):

1. data     load, split, inject label noise (seeded)                     -> recomputed (cheap)
2. adapter  LoRA fine-tuning of the classifier                          -> out/adapter/
3. predict  per-example training loss, validation accuracy              -> out/predictions.npz
4. gradients per-example gradients of training and validation examples -> out/gradients/{train,val}
5. scores   every method's score of every training example, metrics     -> summary.json,
            scores.csv, report.html (always recomputed)

With ``--run`` (a folder of :class:`datainf.integrations.DataInfCallback` on a Trainer's
classifier) the training examples, model, adapter and training gradients are the trainer's:
stage 2 is skipped, the predictions are made on the examples' own tokens, and only the
validation gradients are collected.

Every score is oriented so that HIGHER = MORE SUSPICIOUS: influence on the mean validation loss
(positive = harmful, the paper's convention), self-influence g^T H^-1 g, the training loss and
the gradient norm.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..data.text import (
    BUILTIN_DATASETS,
    DEFAULT_DATASET,
    TextData,
    builtin_dataset,
    load_splits,
    run_splits,
    text_batches,
)
from ..devices import check_device
from ..errors import DataInfError
from ..files import write_atomic
from ..gradients.collect import collect_gradients
from ..gradients.representations import representations
from ..gradients.source import blocks_matching, blocks_pattern, group_by_module, names_matching
from ..gradients.store import GradientStore
from ..identity import model_fingerprint
from ..integrations import CallbackRun, given_store, read_callback_run
from ..log import say, warn
from ..methods import LABELS, METHODS, Inputs, score_each
from ..methods.damping import damping_rule
from ..metrics import detection_auc
from ..models.hf import check_adapter_folder, check_model_name, load_classifier
from ..options import Command, option, said
from ..report import write_report
from ..training.finetune import finetune, predict
from .pipeline import (
    DAMPING_HELP,
    DAMPING_RULE_HELP,
    DEVICE_HELP,
    QUIET_HELP,
    Run,
    check_second_moments,
    collected,
    fine_tuned,
    second_moments,
    with_adapter,
    with_features,
)
from .runs import check_numbers, settings_json, warn_unconverged
from .suspects import cleaned_table, score_table, suspect_table

REFERENCES = {"loss": "Training loss", "grad_norm": "Gradient norm"}
OUTPUTS = ("summary.json", "report.html", "scores.csv", "suspects.csv", "cleaned.csv")
WEAK_GAP = 0.25  # see is_weak
ESCALATION = 3   # a round after a weak one runs at this times the learning rate
# labels flipped by default on the built-in corpora only: a demonstration measures detection;
# a user's run looks for the errors in the labels as given
DEMO_NOISE = 0.2
# the paper's four, self-influence, and cosine (README "Defaults from the evidence")
DEFAULT_METHODS = ("datainf", "exact", "lissa", "hessian_free", "datainf_self", "cosine")


def _sizes(what: str) -> str:  # "900 of bbc-news, 2000 of rotten-tomatoes"
    return ", ".join(f"{getattr(b, what)} of {n}" for n, b in BUILTIN_DATASETS.items())


@dataclass
class Config:
    """Settings of one run. Those in ``EXPENSIVE`` decide the adapter and gradients. Each
    field's option: :mod:`datainf.options`."""

    data: str | None = option(  # None: the shipped BBC News corpus
        None, "training data: a .csv, .tsv, .jsonl or .parquet file, a Hugging Face dataset "
        "NAME[:CONFIG] (online; its validation split is used) or a built-in corpus: "
        f"{', '.join(BUILTIN_DATASETS)} (default: {DEFAULT_DATASET})")
    text_columns: tuple[str, ...] = option(
        ("text",), "text column (give twice for sentence pairs; default: text)",
        flag="--text-column", kind="repeat")
    label_column: str = option("label", "label column")
    id_column: str | None = option(  # None: a column named "id" when there is one
        None, "column of record ids, shown next to each example (default: the column 'id' "
        "when there is one)")
    val_data: str | None = option(None, "validation file (default: a share of --data)")
    run: str | None = option(
        None, "instead of --data, --model and --adapter: a run folder that "
        "datainf.integrations.DataInfCallback wrote at the end of your Trainer's training of a "
        "sequence classifier (its model, adapter, training examples and their gradients); "
        "needs --val-data")
    val_fraction: float = option(
        0.1, "share of --data held out for validation when there is no --val-data")
    train_size: int | None = option(  # BBC News default; None: every remaining example
        900, f"training examples drawn (default: {_sizes('train_size')}; all of a file)",
        shown=None)
    val_size: int | None = option(
        100, f"validation examples drawn (default: {_sizes('val_size')}; --val-fraction of a "
        "file)", shown=None)
    # share of training labels flipped on purpose to measure detection; None: DEMO_NOISE on
    # the built-in corpora, 0 on a user's data
    noise: float | None = option(
        None, "share of the training labels flipped on purpose to measure detection (default: "
        f"{DEMO_NOISE:g} on the built-in corpora, 0 on your --data)", type=float)
    model: str = option("minilm", "'minilm' (shipped), a HF model folder or hub name")
    adapter: str | None = option(
        None, "an existing PEFT adapter folder (skips fine-tuning)")
    lora_r: int = option(4, "LoRA rank")
    lora_alpha: int = option(8, "LoRA alpha")
    lora_targets: tuple[str, ...] = option(
        ("query", "value"), "modules that get LoRA (comma-separated); the head is trained too",
        kind="list")
    epochs: int = option(  # per round; see train_adapter
        4, "fine-tuning epochs (one round, linear learning-rate decay)")
    max_epochs: int = option(  # more rounds while the model is weak, up to this
        12, "while the model is still weak on the validation set after a round, another round "
        "follows at 3x the learning rate, up to this many epochs in all")
    patience: int = option(
        1, "stop fine-tuning once the validation loss has not improved for this many epochs "
        "and keep the best epoch's adapter (0: run every epoch)")
    batch_size: int = option(16, "examples per batch")
    learning_rate: float = option(
        3e-4, "AdamW (default: 0.0003" + "".join(
            f"; {b.learning_rate:g} on {n}" for n, b in BUILTIN_DATASETS.items()
            if b.learning_rate) + ")", shown=None)
    max_length: int = option(128, "tokens per text")
    device: str = option("cpu", DEVICE_HELP)
    seed: int = option(0, "seed of the split, the noise, LoRA and the head")
    # cheap: may change between runs on the same --out
    methods: tuple[str, ...] = option(
        DEFAULT_METHODS, "comma-separated; the training loss and gradient norm are always "
        "shown; also datainf_normalized and cosine (variants of ours: gradients scaled to unit "
        "norm first)", kind="list")
    blocks: str | None = option(
        None, "regular expression: only the matching gradient blocks count (e.g. 'classifier' "
        "or 'layer\\.5\\.')")
    grouping: str = option(
        "tensor", "one block per LoRA tensor (the paper's) or per module (A and B together)",
        choices=("tensor", "module"))
    damping: float = option(0.1, DAMPING_HELP)
    damping_rule: str = option(  # or "absolute" (methods.damping.damping_rule)
        "relative", DAMPING_RULE_HELP, metavar="{relative,absolute}")
    rank_by: str = option(
        "datainf", "the score that orders the suspects (a method or 'loss', 'grad_norm')")
    top: int = option(50, "suspects listed in the report and suspects.csv")
    drop_top: int | None = option(
        None, "write cleaned.csv: your data without the K most suspicious examples", type=int,
        metavar="K")
    # training examples (positions in the training split, after noise) left out of the run:
    # the removal experiment's retraining
    exclude: tuple[int, ...] = ()
    # the seed of LoRA, the head and the data order when it is not --seed (None): the LDS
    # study's repeated fine-tunes of one subset, on the same split
    training_seed: int | None = None
    out: str = option("runs/detect-mislabeled", "run folder (reused when repeated)")
    progress: bool | None = option(None, QUIET_HELP, flag="--quiet", kind="quiet")
    stage_seconds: dict = field(default_factory=dict)
    # torch.distributed: the ranks share fine-tuning (DDP), gradients (a shard each) and
    # scoring; rank 0 writes the outputs. None: one process
    process_group: object | None = None

    EXPENSIVE = ("data", "run", "text_columns", "label_column", "id_column", "val_data",
                 "val_fraction",
                 "train_size", "val_size", "noise", "model", "adapter", "lora_r", "lora_alpha",
                 "lora_targets", "epochs", "max_epochs", "patience", "batch_size", "learning_rate",
                 "max_length", "seed", "exclude", "training_seed")

    def __post_init__(self) -> None:
        if self.noise is None:
            demo = self.run is None and builtin_dataset(self.data) is not None
            self.noise = DEMO_NOISE if demo else 0.0

    def expensive(self) -> dict:
        return settings_json(self, self.EXPENSIVE)


def from_command(**settings) -> Config:
    """The Config of the command's settings: the sizes and learning rate left out (None) are
    the built-in corpus's (all of a file; the job's learning rate)."""
    builtin = builtin_dataset(settings.get("data"))
    rate = builtin.learning_rate if builtin and builtin.learning_rate else Config.learning_rate
    defaults = {"train_size": builtin.train_size if builtin else None,
                "val_size": builtin.val_size if builtin else None, "learning_rate": rate}
    return Config(**{**settings, **{k: settings.get(k) or v for k, v in defaults.items()}})


COMMAND = Command(
    "detect-mislabeled",
    help="fine-tune a LoRA classifier, score every training example, write a report",
    description="Find mislabeled training examples of a LoRA fine-tune. Without --data: "
    "MiniLM-L6 on the shipped BBC News corpus with 20% of the labels flipped (offline, a few "
    "minutes on a laptop CPU).",
    config=Config,
    layout={"data": ("data", "run", "text_columns", "label_column", "id_column", "val_data",
                     "val_fraction", "train_size", "val_size", "noise"),
            "model": ("model", "adapter", "lora_r", "lora_alpha", "lora_targets", "epochs",
                      "max_epochs", "patience", "batch_size", "learning_rate", "max_length",
                      "device", "seed"),
            "scoring": ("methods", "blocks", "grouping", "damping", "damping_rule"),
            "outputs": ("rank_by", "top", "drop_top", "out", "progress")},
    epilog="""\
outputs (in --out): summary.json (settings, sizes, AUC and seconds per method), scores.csv (every
training example: its row in your file, text, given label, the model's label and probability,
every score and rank), suspects.csv (the --top most suspicious by --rank-by, with a suggested
label), report.html, cleaned.csv (with --drop-top), the adapter and the gradient stores.

--noise flips that share of the training labels on purpose, so that the report can measure
how well each score finds wrong labels (AUC). Default: 0.2 on the built-in corpora (a
demonstration), 0 on your --data (the errors in your labels as given are looked for); the
suspects and cleaned.csv always show the labels of your file.

examples:
  datainf detect-mislabeled                                  # shipped BBC News, offline
  datainf detect-mislabeled --data train.csv --text-column review --label-column stars \\
      --drop-top 100 --out runs/reviews
  datainf detect-mislabeled --run runs/my-classifier --val-data val.csv   # DataInfCallback's
""",
    make=from_command)


# ---------------------------------------------------------------- stage 1: data
def load_data(config: Config, given: CallbackRun | None = None
              ) -> tuple[TextData, TextData, dict]:
    """Training and validation data, with label noise injected into training when asked, and
    what reading them found (see :func:`datainf.data.load_splits`); with ``given``, its
    training examples and ``--val-data`` (:func:`datainf.data.run_splits`)."""
    if given is not None:
        return run_splits(config, given.examples, given.record["classes"])
    train, val, info = load_splits(config)
    if config.exclude:
        if max(config.exclude) >= len(train) or min(config.exclude) < 0:
            raise DataInfError(f"exclude holds positions outside the {len(train)} training "
                               "examples")
        keep = np.setdiff1d(np.arange(len(train)), np.asarray(config.exclude))
        train = train.subset(keep)
    return train, val, info


# ---------------------------------------------------------------- settings
def check_settings(config: Config) -> None:
    """Refuse unusable settings before anything is read, trained or written."""
    unknown = [m for m in config.methods if m not in METHODS]
    if unknown:
        raise DataInfError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if config.rank_by not in (*config.methods, *REFERENCES):
        raise DataInfError(f"{said('rank_by', config.rank_by, quoted=True)} is not among the "
                           "scores computed"
                           f" ({', '.join((*config.methods, *REFERENCES))}); add it to "
                           f"{said('methods')} or pick one of those")
    if config.grouping not in ("tensor", "module"):
        raise DataInfError(f"{said('grouping')} must be 'tensor' or 'module', not "
                           f"{config.grouping!r}")
    if config.blocks is not None:
        blocks_pattern(config.blocks)
    check_second_moments(config)
    check_numbers(config, {"epochs": 1, "max_epochs": 1, "patience": 0, "batch_size": 1,
                           "lora_r": 1, "max_length": 2, "top": 1, "train_size": 2,
                           "val_size": 1}, ("learning_rate", "damping", "lora_alpha"))
    damping_rule(config.damping_rule, config.damping)  # refuses an unknown rule
    if config.drop_top is not None and config.drop_top < 0:
        raise DataInfError(f"{said('drop_top')} must be 0 or more, not {config.drop_top}")
    if config.drop_top and config.noise:
        raise DataInfError(
            f"{said('drop_top', config.drop_top)} with {said('noise', config.noise)}: "
            "the top suspects would be mostly labels this run flipped on purpose, and "
            f"cleaned.csv would lose correct rows of your file; add {said('noise', 0)} to clean "
            "the labels as given"
        )
    if not 0 <= config.noise < 1:
        raise DataInfError(f"{said('noise')} must be in [0, 1), not {config.noise}")
    if not 0 < config.val_fraction < 1:
        raise DataInfError(f"{said('val_fraction')} must be in (0, 1), not "
                           f"{config.val_fraction}")
    check_device(config.device)
    if config.run is not None:
        check_run_settings(config)
        return
    check_model_name(config.model)
    if config.adapter is not None:
        check_adapter_folder(config.adapter)


def check_run_settings(config: Config) -> None:
    """``--run``: the trainer brought the data, model and adapter; what it cannot bring."""
    if config.data is not None or config.adapter is not None:
        raise DataInfError("--run brings the training examples, the model and the adapter; "
                           "give it without --data and --adapter")
    if config.val_data is None:
        raise DataInfError("--run needs --val-data: a file of labelled examples that the "
                           "influence is measured on (with --text-column and --label-column; "
                           "labels as the classifier's class names or ids)")
    if config.noise:
        raise DataInfError("--run: the trainer has already trained on its labels, so none can "
                           "be flipped on purpose; leave --noise out")
    if config.drop_top:
        raise DataInfError("--run: --drop-top writes your data file without the suspects, and "
                           "a run's data are the trainer's dataset; drop the rows that "
                           "suspects.csv names (its 'row': the dataset's index) yourself")
    given = read_callback_run(config.run, "classification")  # refused now, not after loading
    check_second_moments(replace(config, adapter=str(given.adapter)))


def check_data(config: Config, train: TextData, val: TextData) -> None:
    """Enough data for a fine-tune and, with noise, for an AUC."""
    if len(train) < 2 or len(val) < 1:
        raise DataInfError(f"{len(train)} training and {len(val)} validation examples are too "
                           "few; give more data")
    if config.drop_top and config.drop_top >= len(train):
        raise DataInfError(f"{said('drop_top', config.drop_top)} would drop every one of the "
                           f"{len(train)} training examples; give a K below {len(train)}")
    if train.flipped is not None and not 0 < train.flipped.sum() < len(train):
        raise DataInfError(
            f"{said('noise', config.noise)} flips {int(train.flipped.sum())} of the "
            f"{len(train)} training labels, so there is nothing to detect; raise "
            f"{said('noise')}, give more data, or use {said('noise', 0)} to rank the data as it "
            "is"
        )


# ---------------------------------------------------------------- run folder




def run_record(config: Config, train: TextData, given: CallbackRun | None = None) -> dict:
    """What run.json holds: the settings that decide the adapter and gradients (with ``--run``,
    also when the trainer's run was made)."""
    record = {**config.expensive(), "data_fingerprint": train.fingerprint()}
    if given is not None:
        record["run_created"] = given.record["created"]
    return record


def recorded_settings(out: Path) -> dict:
    """The settings the run.json of a run at ``out`` records, as Config keyword arguments
    (data, model and fine-tuning; the others keep their defaults)."""
    record = json.loads((Path(out) / "run.json").read_text())
    names = {f.name for f in dataclasses.fields(Config)}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in record.items() if k in names}


# ---------------------------------------------------------------- stage 2: adapter
def training_seed(config: Config) -> int:
    """The seed of LoRA, the head and the data order: ``training_seed``, else ``seed``."""
    return config.seed if config.training_seed is None else config.training_seed


def load_model(config: Config, train: TextData, out: Path):
    """The classifier (its head initialised with the training seed) with its LoRA adapter,
    before any training: (model, tokenizer, source); see
    :func:`datainf.jobs.pipeline.with_adapter`."""
    torch.manual_seed(training_seed(config))
    id2label = dict(enumerate(train.classes))
    base, tokenizer = load_classifier(config.model, len(train.classes), id2label=id2label)
    model, source = with_adapter(base, config, out, seed=training_seed(config))
    if config.blocks is not None:
        names_matching([n for n, p in model.named_parameters() if p.requires_grad],
                       config.blocks)
    return model.to(config.device), tokenizer, source


def train_adapter(config: Config, model, tokenizer, train: TextData, val: TextData,
                  second_moments: dict | None = None) -> dict:
    """LoRA fine-tuning that goes on while the model is weak and stops on the validation loss;
    returns the training history and fills ``second_moments`` with the optimizer's second
    moments of the kept epoch (see :func:`datainf.training.finetune.train_loop`).

    Training runs in rounds of ``epochs`` epochs, each with its own linear learning-rate decay.
    After a round, a model that is still weak on the validation set (:func:`is_weak`) gets
    another round at ``ESCALATION`` (3) times the previous peak learning rate, up to
    ``max_epochs`` in all: short or hard texts that the first round under-fits get the training
    they need, while data the first round fits is not trained further (influence scores tell
    less once the model has fit the validation set: see the README). After every epoch the mean
    validation loss is measured; with ``patience`` p > 0, training stops once it has not
    improved for p epochs, and the adapter of the epoch with the lowest validation loss is kept
    (p = 0: the last epoch's is kept).
    """
    history: dict = {"val_losses": [], "val_accuracy": [], "epoch_losses": [], "rounds": 0}
    best: dict = {"loss": float("inf"), "epoch": 0, "state": None, "moments": {}}
    moments: dict = {}

    def after_epoch(_epoch_in_round: int, train_loss: float) -> bool:
        losses, probs = predict(model, tokenizer, val, batch_size=config.batch_size,
                                max_length=config.max_length)
        history["epoch_losses"].append(train_loss)
        history["val_losses"].append(round(float(losses.mean()), 5))
        history["val_accuracy"].append(round(accuracy(probs, val.labels), 4))
        epoch = len(history["val_losses"])
        if history["val_losses"][-1] < best["loss"]:
            best.update(loss=history["val_losses"][-1], epoch=epoch,
                        state={n: p.detach().clone() for n, p in model.named_parameters()
                               if p.requires_grad}, moments=dict(moments))
        history["stopped_on_val_loss"] = 0 < config.patience <= epoch - best["epoch"]
        return history["stopped_on_val_loss"]

    rounds = max(1, config.max_epochs // config.epochs)
    history["learning_rates"] = []
    for round_ in range(rounds):
        rate = config.learning_rate * ESCALATION**round_
        history["learning_rates"].append(rate)
        finetune(model, tokenizer, train, epochs=config.epochs,
                 batch_size=config.batch_size, learning_rate=rate,
                 max_length=config.max_length, seed=training_seed(config) + round_,
                 progress=config.progress,
                 on_epoch=after_epoch, process_group=config.process_group,
                 second_moments=moments)
        history["rounds"] += 1
        if history["stopped_on_val_loss"] or not is_weak(history["val_accuracy"][-1], val):
            break
        if round_ + 1 < rounds:
            say(f"the model is still weak after {len(history['val_losses'])} epochs "
                 f"(validation accuracy {history['val_accuracy'][-1]:.3f}): training goes on "
                 f"at learning rate {rate * ESCALATION:g}", config.progress)
    history["epochs_run"] = len(history["val_losses"])
    history["kept_epoch"] = history["epochs_run"]
    if config.patience > 0 and best["epoch"] < history["epochs_run"]:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in best["state"]:
                    param.copy_(best["state"][name])
        history["kept_epoch"] = best["epoch"]
        moments = best["moments"]
    if second_moments is not None:
        second_moments.update(moments)
    return history


# ---------------------------------------------------------------- stage 3: predictions
@dataclass
class Predictions:
    """The fine-tuned model's view of the data: losses under the given labels, shape (n,), and
    class probabilities, shape (n, classes), of the training and validation examples."""

    train_loss: np.ndarray
    train_probs: np.ndarray
    val_loss: np.ndarray
    val_probs: np.ndarray

    def val_accuracy(self, val: TextData) -> float:
        return accuracy(self.val_probs, val.labels)


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Share of examples whose most probable class is their label; probs (n, classes)."""
    return float((probs.argmax(1) == labels).mean())


def predictions(config: Config, model, tokenizer, train: TextData, val: TextData,
                run: Run) -> tuple[Predictions, bool]:
    """(predictions, reused), cached in out/predictions.npz for the model's weights (written
    by rank 0 only)."""
    path = run.out / "predictions.npz"
    fingerprint = model_fingerprint(model)
    keys = [f.name for f in dataclasses.fields(Predictions)]
    if path.exists():
        saved = np.load(path)
        if set(keys) <= set(saved.files) and str(saved["model"]) == fingerprint:
            return Predictions(**{k: saved[k] for k in keys}), True
    found = {}
    for split, data in (("train", train), ("val", val)):
        found[f"{split}_loss"], found[f"{split}_probs"] = predict(
            model, tokenizer, data, batch_size=config.batch_size, max_length=config.max_length)
    if run.main:
        tmp = run.out / "predictions.tmp.npz"
        np.savez(tmp, model=fingerprint, **found)
        os.replace(tmp, path)
    return Predictions(**found), False


# ---------------------------------------------------------------- stage 4: gradients
def gradients(config: Config, model, tokenizer, splits: dict[str, TextData], out: Path
              ) -> list[GradientStore]:
    """The stores of ``splits`` (name -> data; in that order): per-example gradients in
    out/gradients/{name}."""
    stores = []
    for split, data in splits.items():
        batches = text_batches(tokenizer, data, config.batch_size, config.max_length)
        stores.append(collect_gradients(model, batches, "classification",
                                        out=str(out / "gradients" / split),
                                        progress=config.progress,
                                        process_group=config.process_group))
    return stores


def features(config: Config, model, tokenizer, data: TextData) -> torch.Tensor:
    """The representations repsim compares, (n, d): the features the classifier's head
    reads."""
    batches = text_batches(tokenizer, data, config.batch_size, config.max_length)
    return representations(model, batches, "classification")


# ---------------------------------------------------------------- stage 5: scores
def scoring_inputs(config: Config, inputs: Inputs) -> Inputs:
    """``inputs`` with the gradient blocks that ``config.blocks`` selects, grouped as
    ``config.grouping`` says."""
    train = blocks_matching(inputs.train, config.blocks)
    val = blocks_matching(inputs.test, config.blocks)
    if config.grouping == "module":
        train, val = group_by_module(train), group_by_module(val)
    return replace(inputs, train=train, test=val)


def score_all(config: Config, inputs: Inputs, train_loss: np.ndarray):
    """Every chosen method's scores (higher = more suspicious) and its seconds."""
    inputs = scoring_inputs(config, inputs)
    train = inputs.train

    def score(method: str, est, val) -> np.ndarray:
        if METHODS[method].self_influence:
            return est.self_influence().cpu().numpy()
        return est.score(val, aggregate=True).cpu().numpy()

    scores, seconds, notes = score_each(
        config.methods, inputs, score, damping=damping_rule(config.damping_rule, config.damping),
        progress=False, device=config.device, process_group=config.process_group)
    start = time.perf_counter()
    scores["loss"] = np.asarray(train_loss, dtype=np.float64)
    seconds["loss"] = 0.0
    notes["loss"] = {"by_product": True}  # of the prediction stage
    sq = sum(train.row_sq_norms(name).numpy() for name in train.block_names)
    scores["grad_norm"] = np.sqrt(sq)
    seconds["grad_norm"] = time.perf_counter() - start
    return scores, seconds, notes, dict(train.block_widths)


def write_outputs(config: Config, out: Path, train: TextData, val: TextData,
                  preds: Predictions, scores: dict, seconds: dict, notes: dict,
                  summary_extra: dict) -> dict:
    """summary.json, scores.csv, suspects.csv, cleaned.csv (with --drop-top) and report.html,
    each written whole or not at all; summary.json last, as the mark of a finished run."""
    labels = {**LABELS, **REFERENCES}
    methods = {}
    for key, values in scores.items():
        entry = {"label": labels[key], "seconds": round(seconds[key], 4)}
        if train.flipped is not None:
            entry["auc"] = round(detection_auc(values, train.flipped), 4)
        entry.update(notes.get(key, {}))
        methods[key] = entry
    table = score_table(train, preds, scores)
    suspects = suspect_table(table, config.rank_by, config.top)
    outputs = {"scores.csv": table, "suspects.csv": suspects}
    if config.drop_top:
        dropped = table.sort_values(f"{config.rank_by}_rank")["row"].head(config.drop_top)
        outputs["cleaned.csv"] = cleaned_table(config, train, val, dropped)
    summary = {
        "config": settings_json(config, leave_out=("stage_seconds", "progress")),
        "classes": train.classes,
        "n_train": len(train), "n_val": len(val),
        "n_flipped": None if train.flipped is None else int(train.flipped.sum()),
        **summary_extra,
        "methods": methods,
        "stage_seconds": {k: round(v, 2) for k, v in config.stage_seconds.items()},
        "outputs": sorted([*outputs, "report.html", "summary.json"]),
        "sign_convention": "every score: higher = more suspicious (influence on the mean "
                           "validation loss: positive = harmful)",
    }
    if config.drop_top:
        summary["cleaned"] = {"dropped": int(min(config.drop_top, len(train))),
                              "rows": len(outputs["cleaned.csv"])}
    for name, frame in outputs.items():
        tmp = out / f"{name}.tmp"
        frame.to_csv(tmp, index=False)
        os.replace(tmp, out / name)
    write_atomic(out / "report.html", write_report(summary, table, suspects, scores,
                                                    train.flipped))
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    return summary


@dataclass
class Prepared:
    """What the expensive stages leave for scoring: the data, the fine-tuned model, its
    predictions and the two gradient stores, in the locked run folder ``run.out``."""

    run: Run
    train: TextData
    val: TextData
    data_info: dict
    model: object
    tokenizer: object
    source: str                 # the adapter: "new", "reused" or "given"
    history: dict | None
    preds: Predictions
    train_store: GradientStore | None
    val_store: GradientStore | None
    inputs: Inputs | None = None  # what the methods score (None without gradients)


@contextmanager
def prepared(config: Config, *, with_gradients: bool = True) -> Iterator[Prepared]:
    """Runs (or reuses) every expensive stage for ``config`` and yields their results while
    ``config.out`` stays locked. Every setting is checked before anything expensive happens,
    and ``out`` is claimed (its run.json written) only once the data, the model and the
    adapter have loaded. ``with_gradients=False`` stops after the predictions (the stores are
    then None)."""
    check_settings(config)
    run = Run.of(config)
    given = read_callback_run(config.run, "classification") if config.run else None
    if given is not None:  # the trainer's model and adapter
        config = replace(config, model=given.record["base_model"], adapter=str(given.adapter))
    with run.stage("data"):
        train, val, data_info = load_data(config, given)
    check_data(config, train, val)
    for note in data_info.get("notes", []) if run.main else []:
        warn(note)
    record = run_record(config, train, given)
    with run.locked(record):
        with run.stage("model"):
            model, tokenizer, source = load_model(config, train, run.out)
        run.claim(record, OUTPUTS)
        history = fine_tuned(run, source, model, lambda moments: train_adapter(
            config, model, tokenizer, train, val, moments))
        moments = second_moments(run, config, source) if with_gradients else None
        with run.main_first():  # the other ranks then read rank 0's predictions
            with run.stage("predictions"):
                preds, again = predictions(config, model, tokenizer, train, val, run)
        if again:
            run.reuse("predictions")
        train_store = val_store = inputs = None
        if with_gradients:
            splits = {"train": train, "val": val} if given is None else {"val": val}
            paths = [run.out / "gradients" / split for split in splits]
            stores = collected(run, "gradients" if given is None else "validation gradients",
                               paths, lambda: gradients(config, model, tokenizer, splits,
                                                        run.out))
            train_store, val_store = stores[0], stores[-1]
            if given is not None:  # the trainer's: made by the callback, for this adapter
                train_store = given_store(given, model)
                run.reuse("gradients")
            inputs = with_features(run, Inputs(train_store, val_store, second_moments=moments),
                                   config.methods, lambda: tuple(
                                       features(config, model, tokenizer, data)
                                       for data in (train, val)))
        yield Prepared(run, train, val, data_info, model, tokenizer, source, history, preds,
                       train_store, val_store, inputs)


def run(config: Config) -> dict | None:
    """Run every stage; returns the summary (also written to out/summary.json). With a
    process group, rank 0 writes the outputs and returns the summary; other ranks None."""
    with prepared(config) as p:
        with p.run.stage("scoring"):
            scores, seconds, notes, blocks = score_all(config, p.inputs, p.preds.train_loss)
        if not p.run.main:
            return None
        quality = model_quality(p.preds, p.val)
        if quality["weak"]:
            warn(quality["warning"])
        warn_unconverged(notes)
        extra = {"val_accuracy": round(quality["val_accuracy"], 4), "model_quality": quality,
                 "training": p.history, "adapter": p.source, "reused_stages": p.run.reused,
                 "blocks": {"count": len(blocks), "parameters": int(sum(blocks.values()))},
                 "data": p.data_info, "processes": p.run.size}
        with p.run.stage("report"):
            return write_outputs(config, p.run.out, p.train, p.val, p.preds, scores, seconds,
                                 notes, extra)


def majority_rate(data: TextData) -> float:
    """Share of the most frequent class: the accuracy of always answering it."""
    return float(np.bincount(data.labels, minlength=len(data.classes)).max() / len(data))


def is_weak(accuracy: float, val: TextData) -> bool:
    """A model is weak when it closes less than a quarter (``WEAK_GAP``) of the gap between
    always answering the most frequent class and a perfect score: its gradients then say
    little about which labels are wrong."""
    majority = majority_rate(val)
    return accuracy - majority < WEAK_GAP * (1 - majority)


def model_quality(preds: Predictions, val: TextData) -> dict:
    """Validation accuracy against the majority-class rate, and a warning when weak."""
    accuracy = preds.val_accuracy(val)
    majority = majority_rate(val)
    weak = is_weak(accuracy, val)
    quality = {"val_accuracy": accuracy, "majority_rate": round(majority, 4), "weak": weak}
    if weak:
        quality["warning"] = (
            f"the fine-tuned model is weak: validation accuracy {accuracy:.3f} against "
            f"{majority:.3f} for always answering the most frequent class, so the scores mean "
            f"little; train longer ({said('max_epochs')}), with a higher "
            f"{said('learning_rate')}, or on more data")
    return quality
