"""Does a score predict what retraining would do? The linear datamodeling score (LDS; Park et
al., TRAK, 2023) of every method.

One fine-tune on all n training examples gives every method's pairwise scores s[j, i] (test
example j, training example i; the paper's sign: negative = up-weighting i lowers j's loss).
M subsets S_k, each a random share ``fraction`` of the training examples (drawn from the seed
and k alone, so that adding subsets keeps the earlier ones), are each fine-tuned from the same
initialisation with the same recipe and seed (only the data differ); their test losses are
the actual values. A method predicts

    predicted[k, j] = sum_{i in S_k} s[j, i]

(a first-order model: leaving i out changes j's loss by about -s[j, i] / n, so the loss of a
subset model grows with the scores of what it kept); LDS_j = Spearman over k of predicted[k, j]
against actual[k, j] (:func:`datainf.metrics.lds`), reported as the mean over test examples
with its 95% t interval. A random score (standard normal, seeded) is the zero line.

Each subset model's test losses are written to ``out/subsets/`` as soon as it is trained (the
model is not kept): an interrupted study goes on where it stopped, and a larger ``--subsets``
adds subsets to those already there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..data.chat import encode_all
from ..data.image_tasks import TASKS as IMAGE_TASKS
from ..data.image_tasks import make_image_task
from ..data.synthetic import TASKS as TEXT_TASKS
from ..data.synthetic import make_task
from ..data.text import builtin_dataset
from ..errors import DataInfError
from ..files import write_atomic
from ..gradients.tasks import CausalLM, Diffusion, batch_size
from ..jobs import detect_mislabeled, explain_generation, explain_image
from ..jobs.detect_mislabeled import scoring_inputs
from ..jobs.pairwise import matrix_folder, score_queries
from ..methods import LABELS, PAIRWISE, score_each
from ..methods.damping import damping_rule
from ..metrics import lds
from ..models.diffusion import to_pixels
from ..models.tiny import tiny_chat_model, tiny_digit_pipeline
from ..report import figure_png, study_page
from .common import CORRELATION, QUICK_HELP, interval, interval_bars, write_files
from .diffusion import write_image_folder
from .generation import chat_row

TASKS = ("classification", "generation", "diffusion")
METHODS = ("datainf", "exact", "lissa", "hessian_free", "datainf_normalized", "cosine", "less",
           "repsim")
NAMES = {**LABELS, "random": "random scores (zero line)"}
# what the field publishes (other models and data: a scale, not a like-for-like comparison)
PUBLISHED = (
    ("bergson, GPT-2 fine-tune: EK-FAC", "0.26-0.47"),
    ("bergson, GPT-2 fine-tune: TrackStar (the form of our `less`)", "0.18"),
    ("bergson, GPT-2 fine-tune: MAGIC (several training runs)", "0.98"),
)
# the classification task on this 2-core CPU: 200 training and 100 validation articles of
# 64 tokens; a subset fine-tune (100 articles, 4 epochs) takes 34-64 s on one thread beside
# other work, so that 32 subsets and the full run fit in 45 minutes (measured: 20 min; 48
# subsets gave the same ranking)
CLASSIFICATION = {"train_size": 200, "val_size": 100, "max_length": 64, "learning_rate": 1e-3,
                  "epochs": 4}
# generation: SmolLM2 on 10 classes of a synthetic task, 10 training and 2 test examples a
# class; diffusion: the digit model on 3 styles, 40 training and 10 test images a style
GENERATION = {"train_per_class": 10, "test_per_class": 2, "epochs": 3}
DIFFUSION = {"train_per_class": 40, "test_per_class": 10, "epochs": 40}
SUBJECT = {"train_per_class": 3, "test_per_class": 2}  # 31 subjects: the diffusion study's
DEFAULT_SUBSETS = 32
QUICK_SUBSETS = 4
QUICK_SIZES = {
    "classification": {"train_size": 24, "val_size": 8, "max_length": 16, "epochs": 1},
    "generation": {"train_per_class": 2, "test_per_class": 1, "epochs": 1},
    "diffusion": {"train_per_class": 4, "test_per_class": 2, "epochs": 1, "batch_size": 4,
                  "timesteps": (25, 525)},
}


@dataclass
class Study:
    """The settings of one LDS study: ``job`` = the pipeline's Config of the full fine-tune
    (its ``out`` inside the study's folder)."""

    task: str
    out: Path
    job: object
    subsets: int = DEFAULT_SUBSETS
    fraction: float = 0.5
    runs: int = 1
    seed: int = 0
    quick: bool = False
    data: str | None = None     # generation, diffusion: the task of their data module
    sizes: dict = field(default_factory=dict)
    subset_seconds: list = field(default_factory=list)  # of each subset model, as written

    def check(self) -> None:
        if self.subsets < 3:
            raise DataInfError(f"--subsets must be at least 3 (the LDS is a rank correlation "
                               f"over subsets), not {self.subsets}")
        if not 0 < self.fraction < 1:
            raise DataInfError(f"--fraction must lie strictly between 0 and 1, not "
                               f"{self.fraction}")
        if self.runs < 1:
            raise DataInfError(f"--runs must be at least 1, not {self.runs}")
        unknown = [m for m in self.job.methods if m not in PAIRWISE]
        if unknown:
            raise DataInfError(f"--methods: {', '.join(unknown)} give no pairwise scores; "
                               f"choose from {', '.join(PAIRWISE)}")


@dataclass
class Kind:
    """What a kind of task gives the study: the full run's pairwise scores per method ((m, n),
    negative = helpful), and ``losses(kept, seed, folder)``: the (m,) test losses of a model
    fine-tuned from the same initialisation on the training positions ``kept`` with ``seed``,
    in the scratch ``folder``."""

    n_train: int
    n_test: int
    scores: dict[str, np.ndarray]
    losses: Callable[[np.ndarray, int, Path], np.ndarray]
    settings: dict  # what decides the subset models (their losses are kept for these alone)


def subset(k: int, n: int, fraction: float, seed: int) -> np.ndarray:
    """The sorted training positions of subset ``k``: round(fraction n) of the n, drawn from
    (seed, k) alone, so that subset k is the same whatever the number of subsets."""
    size = max(1, min(n - 1, round(fraction * n)))
    rng = np.random.default_rng([seed, k])
    return np.sort(rng.choice(n, size=size, replace=False))


def run(study: Study) -> dict:
    """The full fine-tune's scores, every missing subset model's test losses, the LDS of every
    method; writes summary.json, lds.csv and report.html into ``study.out``."""
    study.check()
    started = time.perf_counter()
    kind = KINDS[study.task](study)
    losses = subset_losses(study, kind)
    masks = np.zeros((study.subsets, kind.n_train))
    for k in range(study.subsets):
        masks[k, subset(k, kind.n_train, study.fraction, study.seed)] = 1.0
    actual = np.mean([losses[k] for k in range(study.subsets)], axis=1)  # (M, m): runs averaged
    scores = dict(kind.scores)
    scores["random"] = np.random.default_rng(study.seed).standard_normal(
        (kind.n_test, kind.n_train))
    # predicted loss of test j after training on S_k: the sum of j's scores over S_k
    predicted = {m: masks @ s.T for m, s in scores.items()}
    per_test = {m: lds(p, actual) for m, p in predicted.items()}
    summary = {
        "experiment": "lds", "task": study.task, "quick": study.quick,
        "n_train": kind.n_train, "n_test": kind.n_test, "subsets": study.subsets,
        "fraction": study.fraction, "runs": study.runs, "seed": study.seed,
        "settings": kind.settings,
        "lds": {m: interval(v, CORRELATION) for m, v in per_test.items()},
        "by_subsets": by_subsets(predicted, actual),
        "actual_loss": {"mean": round(float(actual.mean()), 4),
                        "spread_over_subsets": round(float(actual.std(0).mean()), 4)},
        "seconds": round(time.perf_counter() - started, 1),
        "full_run_seconds": {k: round(v, 1) for k, v in study.job.stage_seconds.items()},
        "subset_seconds": interval(study.subset_seconds, (0.0, np.inf)),
        "published": [list(p) for p in PUBLISHED],
    }
    summary["separated_at"] = separated_at(summary["by_subsets"])
    rows = [{"method": m, "test_example": j, "lds": float(v)}
            for m, values in per_test.items() for j, v in enumerate(values)]
    write_files(study.out, "lds", summary, pd.DataFrame(rows),
                _report(summary, predicted, actual, per_test))
    return summary


def subset_losses(study: Study, kind: Kind) -> dict[int, list[np.ndarray]]:
    """{k: [test losses of each run]} of every subset, read from ``out/subsets`` when there,
    fine-tuned (and written at once) when not. Subsets kept for other settings are refused."""
    folder = study.out / "subsets"
    folder.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(json.dumps({"settings": kind.settings, "fraction": study.fraction,
                                     "seed": study.seed}, sort_keys=True).encode()).hexdigest()
    record = folder / "settings.json"
    if record.exists() and json.loads(record.read_text())["key"] != key:
        raise DataInfError(f"{folder} holds subset models' losses of other settings (task, "
                           "data, model, fine-tuning, --fraction or --seed); give another --out "
                           "or remove that folder")
    write_atomic(record, json.dumps({"key": key, "settings": kind.settings,
                                     "fraction": study.fraction, "seed": study.seed}, indent=1))
    losses = {}
    for k in range(study.subsets):
        kept = subset(k, kind.n_train, study.fraction, study.seed)
        losses[k] = []
        for r in range(study.runs):
            file = folder / f"subset-{k:04d}-run-{r}.json"
            if not file.exists():
                _say(study, f"subset {k + 1} of {study.subsets}, run {r + 1} of {study.runs}")
                scratch = study.out / "scratch"
                shutil.rmtree(scratch, ignore_errors=True)
                start = time.perf_counter()
                values = kind.losses(kept, study.seed + r, scratch)
                shutil.rmtree(scratch, ignore_errors=True)
                write_atomic(file, json.dumps({
                    "subset": k, "run": r, "seed": study.seed + r, "kept": kept.tolist(),
                    "test_loss": [float(v) for v in values],
                    "seconds": round(time.perf_counter() - start, 1)}))
            saved = json.loads(file.read_text())
            if saved["kept"] != kept.tolist():  # the draw is the study's: never another
                raise DataInfError(f"{file} holds another subset; remove {folder}")
            losses[k].append(np.asarray(saved["test_loss"], dtype=np.float64))
            study.subset_seconds.append(saved["seconds"])
    return losses


def by_subsets(predicted: dict[str, np.ndarray], actual: np.ndarray) -> dict:
    """The LDS of every method on the first M' subsets, M' = 8, 16, 32, ... up to M: how the
    intervals narrow as subsets are added."""
    total = actual.shape[0]
    counts = sorted({c for c in (8, 16, 32, 64, 128, 256) if c < total} | {total})
    out = {}
    for count in counts:
        if count < 3:
            continue
        out[str(count)] = {m: interval(_lds_or_nan(p[:count], actual[:count]), CORRELATION)
                           for m, p in predicted.items()}
    return out


def _lds_or_nan(predicted: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """lds, with NaN for the test examples whose losses do not vary over these few subsets."""
    varies = ~(actual == actual[:1]).all(0) & ~(predicted == predicted[:1]).all(0)
    values = np.full(actual.shape[1], np.nan)
    if varies.any():
        values[varies] = lds(predicted[:, varies], actual[:, varies])
    return values


def separated_at(by: dict) -> dict | None:
    """The fewest subsets at which the leading methods stand apart: the best method and those
    whose 95% intervals overlap its ("best": that group, best first) lie wholly above every
    other method's interval (and the random line's): {"subsets", "best"}; None when no count
    separates them."""
    for count, values in by.items():
        known = {m: v for m, v in values.items() if v["low"] is not None}
        if len(known) < 2:
            continue
        first = max(known, key=lambda m: known[m]["mean"])
        group = [m for m in sorted(known, key=lambda m: -known[m]["mean"])
                 if known[m]["high"] >= known[first]["low"]]
        rest = [v for m, v in known.items() if m not in group]
        if rest and min(known[m]["low"] for m in group) > max(v["high"] for v in rest):
            return {"subsets": int(count), "best": group}
    return None


# ---------------------------------------------------------------- the kinds of task
def classification(study: Study) -> Kind:
    """detect-mislabeled's pipeline without label noise: the validation examples are the
    test examples, their cross-entropy under the given labels the loss."""
    job = study.job
    with detect_mislabeled.prepared(job) as p:
        inputs = scoring_inputs(job, p.inputs)

        def pairwise(method: str, est, val) -> np.ndarray:
            return est.score(val).cpu().numpy()  # (m, n)

        scores, _, _ = score_each(job.methods, inputs, pairwise,
                                  damping=damping_rule(job.damping_rule, job.damping),
                                  progress=False, device=job.device)
        n_train, n_test = len(p.train), len(p.val)

    def losses(kept: np.ndarray, seed: int, folder: Path) -> np.ndarray:
        left_out = tuple(int(i) for i in np.setdiff1d(np.arange(n_train), kept))
        # the run's seed moves LoRA, the head and the order, never the split
        again = replace(job, exclude=left_out, training_seed=seed, out=str(folder),
                        stage_seconds={}, progress=False)
        with detect_mislabeled.prepared(again, with_gradients=False) as q:
            return np.asarray(q.preds.val_loss, dtype=np.float64)

    settings = {k: v for k, v in job.expensive().items() if k not in ("exclude", "seed")}
    return Kind(n_train, n_test, scores, losses, {"task": "classification", **settings})


def pairwise_matrices(out: Path, job, inputs) -> dict[str, np.ndarray]:
    """Every method of ``job`` (an explain-* Config) scored as its command scores: the (m, n)
    matrices, read back from the temporary folder they are written to."""
    with matrix_folder(out) as folder:
        score_queries(inputs, folder=folder, **{**job.scoring(), "matrix": True})
        return {m: np.load(folder / f"{m}.npy") for m in job.methods}


@torch.no_grad()
def task_losses(task, model, batches) -> np.ndarray:
    """Each example's loss under ``task`` (the mean over its passes: a diffusion task's
    timesteps), rows numbered across the batches as a gradient store numbers them (a
    diffusion task's noise depends on the row): (m,) float64."""
    out, first = [], 0
    for batch in batches:
        rows = torch.arange(first, first + batch_size(batch))
        out.append(torch.stack([task.losses(model, batch, rows, p)
                                for p in range(task.num_passes)]).mean(0).double().cpu())
        first += len(rows)
    return torch.cat(out).numpy()


def generation(study: Study) -> Kind:
    """explain-generation's pipeline on a synthetic task: the test examples with their true
    responses are the queries, the loss on their ``loss_on`` tokens the test loss."""
    job = study.job
    data = study.out / "data"
    data.mkdir(parents=True, exist_ok=True)
    sizes = study.sizes  # make_task's per_class counts the test examples too
    train, test = make_task(study.data,
                            per_class=sizes["train_per_class"] + sizes["test_per_class"],
                            test_per_class=sizes["test_per_class"], seed=study.seed)
    for name, rows in (("train.jsonl", train), ("test.jsonl", test)):
        write_atomic(data / name, "".join(json.dumps(chat_row(r)) + "\n" for r in rows))
    job = replace(job, train=str(data / "train.jsonl"), queries=str(data / "test.jsonl"))
    with explain_generation.prepared(job) as p:
        scores = pairwise_matrices(p.run.out, job, p.inputs)
        tokenizer, examples, queries = p.tokenizer, p.train, p.queries
    encoded = encode_all(tokenizer, examples, [e.response for e in examples],
                         max_length=job.max_length, what="the training examples")
    tests = encode_all(tokenizer, queries, [q.response for q in queries],
                       max_length=job.max_length, what="the test examples")
    task = CausalLM()

    def losses(kept: np.ndarray, seed: int, folder: Path) -> np.ndarray:
        config = replace(job, seed=seed, progress=False)
        model, _, _ = explain_generation.load_model(config, folder)  # a fresh LoRA
        explain_generation.train_adapter(config, model, tokenizer, encoded.subset(kept))
        model.eval()
        return task_losses(task, model,
                           explain_generation.scored_batches(config, tokenizer, tests))

    # what decides a subset model (not --run: the study fine-tunes, never takes a trainer's)
    settings = {k: v for k, v in job.expensive().items() if k not in ("seed", "run")}
    return Kind(len(examples), len(queries), scores, losses,
                {"task": "generation", "data": study.data, **study.sizes, **settings,
                 "loss_on": job.loss_on})


def diffusion(study: Study) -> Kind:
    """explain-image's pipeline on a digit image task: the test images with their prompts are
    the queries; the test loss is the noise-prediction MSE at the gradients' timesteps and
    noise (seeded per example), averaged over the timesteps."""
    job = study.job
    train, test = make_image_task(study.data, per_class_train=study.sizes["train_per_class"],
                                  per_class_test=study.sizes["test_per_class"], seed=study.seed)
    data = study.out / "data"
    for name, rows in (("train", train), ("test", test)):
        write_image_folder(data / name, rows)
    job = replace(job, train_dir=str(data / "train"), queries=str(data / "test"),
                  folder_names=("the study's training images", "the study's test images"))
    with explain_image.prepared(job) as p:
        scores = pairwise_matrices(p.run.out, job, p.inputs)
        train_images, query_images = p.train_images, p.query_images
        prompts, query_prompts = [e.text for e in p.train], [q.text for q in p.queries]

    def losses(kept: np.ndarray, seed: int, folder: Path) -> np.ndarray:
        config = replace(job, seed=seed, progress=False)
        pipeline, unet, _ = explain_image.load_model(config, folder)  # a fresh LoRA
        pixels = to_pixels(np.moveaxis(train_images[kept], -1, 1), pipeline.image_size)
        explain_image.train_adapter(config, pipeline, unet, pixels, [prompts[i] for i in kept])
        unet.eval()
        # the noise of the test gradients (the job's seed, not the run's): the same in every
        # subset model
        task = Diffusion(timesteps=tuple(job.timesteps), seed=job.seed,
                         scheduler=pipeline.scheduler)
        queries = to_pixels(np.moveaxis(query_images, -1, 1), pipeline.image_size)
        return task_losses(task, unet, explain_image.image_batches(
            pipeline, queries, query_prompts, job.batch_size))

    settings = {k: v for k, v in job.expensive().items() if k != "seed"}
    return Kind(len(train), len(test), scores, losses,
                {"task": "diffusion", "data": study.data, **study.sizes, **settings})


KINDS = {"classification": classification, "generation": generation, "diffusion": diffusion}


# ---------------------------------------------------------------- the command
HELP = ("does the score predict what retraining would do: the linear datamodeling score of "
        "every method, from fine-tunes on random halves of the training data")
DESCRIPTION = (
    HELP[0].upper() + HELP[1:] + ". classification: MiniLM + LoRA on BBC News "
    f"({CLASSIFICATION['train_size']} training and {CLASSIFICATION['val_size']} test articles "
    f"of {CLASSIFICATION['max_length']} tokens); generation: SmolLM2 + LoRA on a synthetic task "
    f"(default sentence-transformations, {GENERATION['train_per_class']} training and "
    f"{GENERATION['test_per_class']} test examples a class); diffusion: the digit model + LoRA "
    f"on an image task (default style, {DIFFUSION['train_per_class']} training and "
    f"{DIFFUSION['test_per_class']} test images a class); {DEFAULT_SUBSETS} subsets of half the "
    "training data by default.")
OPTIONS = (
    ("--task", {"choices": TASKS, "default": TASKS[0], "help": "the kind of task"}),
    ("--subsets", {"type": int, "default": None,
                   "help": f"subset fine-tunes (default: {DEFAULT_SUBSETS})"}),
    ("--fraction", {"type": float, "default": 0.5,
                    "help": "share of the training examples each subset keeps"}),
    ("--runs", {"type": int, "default": 1,
                "help": "fine-tunes per subset (seeds --seed, --seed + 1, ..., the same for "
                        "every subset), whose test losses are averaged"}),
    ("--methods", {"default": None,
                   "help": "comma-separated (default: " + ",".join(METHODS) + "; diffusion: "
                           "without repsim)"}),
    ("--data", {"default": None,
                "help": "classification: a built-in dataset name or a CSV/JSONL file (default: "
                        "BBC News); generation: a synthetic task (" + ", ".join(TEXT_TASKS)
                        + "); diffusion: an image task (" + ", ".join(IMAGE_TASKS) + ")"}),
    ("--model", {"default": None,
                 "help": "classification: 'minilm' (shipped, the default), a HF model folder "
                         "or hub name; generation: 'smollm2' (shipped, the default) or a causal "
                         "LM; diffusion: 'digits' (the default) or a diffusers pipeline folder"}),
    ("--train-size", {"type": int, "default": None,
                      "help": "classification: training examples (default: "
                              f"{CLASSIFICATION['train_size']} of built-in data, all of a "
                              "file); generation and diffusion: per class"}),
    ("--seed", {"type": int, "default": 0,
                "help": "seed of the data, LoRA, the order and the subsets"}),
    ("--quick", {"action": "store_true",
                 "help": f"{QUICK_HELP}: a few examples, 1 epoch, 4 subsets; generation and "
                         "diffusion on tiny models built from a config"}),
    ("--out", {"help": "the experiment's folder (default: runs/experiment-lds-TASK)"}),
    ("--quiet", {"action": "store_true", "help": "no progress bars or stage lines"}),
)


def start(settings: dict, *, task: str, subsets: int | None, fraction: float, runs: int,
          methods: str | None, data: str | None, model: str | None, train_size: int | None,
          seed: int, quick: bool, out: str | None, quiet: bool,
          process_group: object | None = None) -> str:
    """Runs the study from its command's options; returns its folder."""
    if process_group is not None:
        raise DataInfError("experiment lds runs in one process (its fine-tunes are small); "
                           "start it without torchrun")
    folder = Path(out or f"runs/experiment-lds-{task}")
    chosen = tuple(m for m in (methods or "").split(",") if m) or tuple(
        m for m in METHODS if task != "diffusion" or m != "repsim")
    common = {"methods": chosen, "out": str(folder / "full"),
              "progress": False if quiet else None}
    count = subsets if subsets is not None else (QUICK_SUBSETS if quick else DEFAULT_SUBSETS)
    study = Study(task=task, out=folder, job=None, subsets=count, fraction=fraction, runs=runs,
                  seed=seed, quick=quick)
    if task == "classification":
        # built-in data at the study's sizes and rate; a file: all of it, the job's rate
        sizes = dict(CLASSIFICATION) if builtin_dataset(data) is not None else {
            k: CLASSIFICATION[k] for k in ("max_length", "epochs")}
        sizes.update(QUICK_SIZES[task] if quick else {})
        if train_size is not None:
            sizes["train_size"] = train_size
        study.job = detect_mislabeled.from_command(
            **settings, **({"data": data} if data else {}),
            **({"model": model} if model else {}), **sizes, max_epochs=sizes["epochs"],
            patience=0, noise=0.0, seed=seed, **common)
        study.sizes = sizes
        return _started(study)
    names = TEXT_TASKS if task == "generation" else IMAGE_TASKS
    study.data = data or names[0]
    if study.data not in names:
        raise DataInfError(f"--data for {task} is one of its tasks: {', '.join(names)}; not "
                           f"{study.data!r}")
    preset = {**(GENERATION if task == "generation" else DIFFUSION),
              **(SUBJECT if study.data == "subject" else {}),
              **(QUICK_SIZES[task] if quick else {})}
    if train_size is not None:
        preset["train_per_class"] = train_size
    study.sizes = {k: preset[k] for k in ("train_per_class", "test_per_class")}
    if task == "generation":
        name = str(tiny_chat_model(folder / "tiny-model")) if quick else (model or "smollm2")
        study.job = explain_generation.Config(model=name, epochs=preset["epochs"], seed=seed,
                                              **common)
    else:
        name = str(tiny_digit_pipeline(folder / "tiny-pipeline")) if quick else (
            model or "digits")
        extra = {k: preset[k] for k in ("batch_size", "timesteps") if k in preset}
        study.job = explain_image.Config(pipeline=name, epochs=preset["epochs"], seed=seed,
                                         **extra, **common)
    return _started(study)


def _started(study: Study) -> str:
    run(study)
    return str(study.out)


def _say(study: Study, message: str) -> None:
    if study.job.progress is not False:
        logging.getLogger("datainf.experiment").info(message)


def _report(summary: dict, predicted: dict, actual: np.ndarray, per_test: dict) -> str:
    methods = list(summary["lds"])
    bars = figure_png(lambda ax: (
        interval_bars(ax, ["LDS"], {NAMES[m]: {"LDS": summary["lds"][m]} for m in methods},
                      "LDS: Spearman of predicted and actual test loss (mean over test "
                      "examples, 95% interval)"),
        ax.axhline(0, color="grey", linestyle=":")))
    scatters = []
    for m in methods:  # the test example of the method's median LDS
        values = per_test[m]
        j = int(np.argsort(values)[len(values) // 2])

        def draw(ax, m=m, j=j, value=values[j]):
            ax.scatter(predicted[m][:, j], actual[:, j], s=12)
            ax.set_xlabel(f"predicted: sum of {NAMES[m]} scores over the subset")
            ax.set_ylabel(f"actual loss of test example {j}")
            ax.set_title(f"{NAMES[m]}: test example {j}, LDS {value:.3f} (median)", fontsize=9)
            ax.grid(alpha=0.3)

        scatters.append((NAMES[m], figure_png(draw, size=(5.0, 3.6))))
    return study_page("lds_study.html", f"LDS study: {summary['task']}", summary=summary,
                      methods=methods, names=NAMES, bars=bars, scatters=scatters)
