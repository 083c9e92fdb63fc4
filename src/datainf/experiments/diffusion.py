"""The paper's text-to-image study (Table 2, image rows): which training images does each
method find behind a test image, on the style and subject tasks of :mod:`datainf.data.image_tasks`?

It runs the explain-image pipeline itself (one pipeline, two front doors): the task's training
images are the fine-tuning data (written as an ImageFolder), its test images, with their
prompts, the queries. Per method, on the pairwise scores: the class-detection AUC and recall
(see :func:`datainf.metrics.class_detection`), mean and standard deviation over test images.
Whether the fine-tune learned: the Fréchet distance between the test images and images drawn
from the test prompts before and after fine-tuning, in the feature space of a small classifier
(one hidden layer of 64 ReLU units, scikit-learn) trained here on the task's training images
to tell class and digit apart.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..data.image_tasks import TASKS, make_image_task
from ..data.images import save_png
from ..files import write_atomic
from ..jobs import explain_image
from ..jobs.runs import is_main, main_first
from ..methods import LABELS
from ..metrics import frechet_distance
from ..models.tiny import tiny_digit_pipeline
from ..report import stage_line, study_page
from .classes import score_classes
from .common import QUICK_HELP, write_files

METHODS = ("datainf", "hessian_free", "lissa", "datainf_normalized", "cosine", "less")
# the paper's Table 2 (Stable Diffusion v1.5): (AUC, recall)
PAPER = {"style": {"hessian_free": (0.692, 0.533), "datainf": (0.820, 0.687)},
         "subject": {"hessian_free": (0.820, 0.210), "datainf": (0.865, 0.315)}}
# (training, test) images per class: the paper's 600 / 150 over 3 styles; 31 subjects with 3
# training images each (and 2 test images each, ours)
SIZES = {"style": (200, 50), "subject": (3, 2)}


@dataclass
class Study:
    """The task, its size, and the explain-image settings used for it."""

    task: str
    job: explain_image.Config
    per_class_train: int | None = None
    per_class_test: int | None = None
    classes: int | None = None
    seed: int = 0
    shown: int = 3           # test images shown with their top training images
    quick: bool = False      # --quick: the report says its numbers mean nothing


HELP = ("which training images each method finds behind a test image, on the style and "
        "subject tasks made from MNIST digits (Table 2, image rows)")
DESCRIPTION = (HELP[0].upper() + HELP[1:] + ": style = 3 styles, 200 training and 50 test "
               "images each; subject = 31 handwriting instances, 3 training and 2 test images "
               "each. Class-detection AUC and recall of every method; Fréchet distance of drawn "
               "images before and after fine-tuning. The explain-image pipeline, on its "
               "defaults.")
QUICK = {"per_class_train": 4, "per_class_test": 2, "classes": 3, "epochs": 1, "batch_size": 4,
         "timesteps": (25, 525), "sampling_steps": 3}
OPTIONS = (("--task", {"choices": TASKS, "default": TASKS[0], "help": "the image task"}),
           ("--data-seed", {"type": int, "default": 0, "help": "seed of the task's images"}),
           ("--quick", {"action": "store_true",
                        "help": f"{QUICK_HELP}: a 2-level UNet built from a config (random "
                                "weights), 3 classes of 4 training and 2 test images, 1 epoch"}),
           ("--out", {"help": "the experiment's folder (default: "
                              "runs/experiment-diffusion-TASK)"}),
           ("--quiet", {"action": "store_true", "help": "no progress bars or stage lines"}))


def start(settings: dict, *, task: str, data_seed: int, quick: bool, out: str | None,
          quiet: bool, process_group: object | None = None) -> str:
    """Runs the study from its command's options (``settings``: the explain-image ones,
    :data:`~datainf.jobs.explain_image.MODEL_OPTIONS`); returns its folder."""
    folder = Path(out or f"runs/experiment-diffusion-{task}")
    job = explain_image.Config(**settings, out=str(folder / "run"), top=3,
                               progress=False if quiet else None, process_group=process_group)
    study = Study(task=task, seed=data_seed, job=job)
    if quick:
        with main_first(process_group):  # built once, by rank 0 under torchrun
            pipeline = tiny_digit_pipeline(folder / "tiny-pipeline")
        q = QUICK
        study = replace(study, per_class_train=q["per_class_train"], quick=True,
                        per_class_test=q["per_class_test"], classes=q["classes"],
                        job=replace(job, pipeline=str(pipeline), epochs=q["epochs"],
                                    batch_size=q["batch_size"], timesteps=q["timesteps"],
                                    sampling_steps=q["sampling_steps"]))
    run(study)
    return str(folder)


def write_task(study: Study, data: Path, write: bool = True
               ) -> tuple[list[dict], list[dict]]:
    """The task's rows, written (unless ``write`` is False) as ImageFolders data/train and
    data/test (28 x 28 PNGs)."""
    train_n, test_n = SIZES[study.task]
    train, test = make_image_task(study.task, per_class_train=study.per_class_train or train_n,
                                  per_class_test=study.per_class_test or test_n,
                                  classes=study.classes, seed=study.seed)
    for name, rows in (("train", train), ("test", test)) if write else ():
        write_image_folder(data / name, rows)
    return train, test


def write_image_folder(folder: Path, rows: list[dict]) -> None:
    """Rows of :func:`~datainf.data.image_tasks.make_image_task` as an ImageFolder (28 x 28
    PNGs and metadata.jsonl with text, class, digit and style), replacing what was there."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    meta = []
    for i, row in enumerate(rows):
        save_png(row["image"][..., None], folder / f"{i:04d}.png")
        meta.append({"file_name": f"{i:04d}.png", "text": row["text"],
                     "class": row["class"], "digit": row["digit"], "style": row["style"]})
    write_atomic(folder / "metadata.jsonl", "".join(json.dumps(m) + "\n" for m in meta))


def run(study: Study) -> dict:
    """Writes summary.json, diffusion.csv and report.html into the job's parent folder
    (``--out``) and returns the summary."""
    out = Path(study.job.out).parent
    data = out / "data"
    group = study.job.process_group
    with main_first(group):  # rank 0 writes the images the others read
        train, test = write_task(study, data, write=is_main(group))
    job = replace(study.job, train_dir=str(data / "train"), queries=str(data / "test"),
                  folder_names=("the study's training images", "the study's test images"))
    train_classes = np.array([r["class"] for r in train])
    test_classes = np.array([r["class"] for r in test])
    with explain_image.prepared(job) as p:
        table, methods, tops = score_classes(p, job, train_classes, test_classes)
        with p.run.main_first(), p.run.stage("samples"):  # rank 0 draws; the others read
            quality = _samples(job, p, train, test)
        history = p.history
        stage_seconds = {k: round(v, 1) for k, v in job.stage_seconds.items()}
        reused = list(p.run.reused)
        shown = _shown(study, tops, p.train_images, p.query_images, train, test)
    summary = {
        "experiment": "diffusion", "quick": study.quick, "task": study.task,
        "n_train": len(train),
        "n_test": len(test), "classes": sorted(set(train_classes.tolist())),
        "pipeline": job.pipeline, "lora_r": job.lora_r, "epochs": job.epochs,
        "learning_rate": job.learning_rate, "timesteps": list(job.timesteps),
        "frechet_distance": quality["distance"], "training": history,
        "stage_seconds": stage_seconds, "reused_stages": reused,
        "methods": methods,
        "paper": {m: {"auc": a, "recall": r} for m, (a, r) in PAPER.get(study.task, {}).items()},
    }
    if is_main(group):
        write_files(out, "diffusion", summary, table, _report(summary, shown, quality))
    return summary


def _features(train_images: np.ndarray, labels: list[str], seed: int):
    """A function images (n, H, W, 1) uint8 -> (n, 64) features: the hidden layer of an MLP
    trained on the training images to tell their labels apart."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    x = train_images.reshape(len(train_images), -1) / 255.0
    with warnings.catch_warnings():  # features, not a classifier to report: fitting long enough
        warnings.simplefilter("ignore", ConvergenceWarning)
        net = MLPClassifier(hidden_layer_sizes=(64,), max_iter=500, random_state=seed)
        net.fit(x, labels)

    def features(images: np.ndarray) -> np.ndarray:
        flat = images.reshape(len(images), -1) / 255.0
        return np.maximum(flat @ net.coefs_[0] + net.intercepts_[0], 0)

    return features


def _samples(job: explain_image.Config, p, train: list[dict], test: list[dict]) -> dict:
    """Images drawn from the test prompts before (adapter off) and after fine-tuning, seeds
    1000 + j, and their Fréchet distances to the test images; kept in the run folder while
    the adapter stays."""
    path = p.run.out / "query" / "samples.npz"
    if path.exists():
        drawn = dict(np.load(path))
    else:
        prompts, seeds = [r["text"] for r in test], [1000 + j for j in range(len(test))]
        draw = {"steps": job.sampling_steps, "guidance": job.guidance,
                "batch": job.query_batch}
        drawn = {}
        with p.unet.disable_adapter():
            drawn["before"] = p.pipeline.draw(p.unet, prompts, seeds, **draw)
        drawn["after"] = p.pipeline.draw(p.unet, prompts, seeds, **draw)
        np.savez(p.run.out / "query" / "samples.tmp.npz", **drawn)
        (p.run.out / "query" / "samples.tmp.npz").replace(path)
    labels = [f"{r['class']}/{r['digit']}" for r in train]
    features = _features(p.train_images, labels, job.seed)
    real = features(p.query_images)
    distance = {k: round(frechet_distance(features(v), real), 3) for k, v in drawn.items()}
    distance["training images"] = round(frechet_distance(features(p.train_images), real), 3)
    return {"distance": distance, **drawn}


def _shown(study: Study, tops: dict, train_images, query_images, train: list[dict],
           test: list[dict]) -> list[dict]:
    """A few test images (spread over the classes) with DataInf's three most helpful and most
    harmful training images: the paper's Figure 3."""
    per = max(1, len(test) // study.shown)
    method = "datainf" if "datainf" in tops else next(iter(tops))
    shown = []
    for j in range(0, len(test), per)[: study.shown]:
        top = tops[method][j]
        shown.append({"test": test[j] | {"image": query_images[j]},
                      "helpful": [train[i] | {"image": train_images[i], "score": s}
                                  for i, s in top["helpful"][:3]],
                      "harmful": [train[i] | {"image": train_images[i], "score": s}
                                  for i, s in top["harmful"][:3]]})
    return shown


def _report(summary: dict, shown: list[dict], quality: dict) -> str:
    count = min(12, len(quality["after"]))
    picks = np.linspace(0, len(quality["after"]) - 1, count).round().astype(int)
    return study_page("diffusion_study.html", f"diffusion study: {summary['task']}",
                      summary=summary, shown=shown,
                      distance=quality["distance"],
                      samples=[(quality["before"][j], quality["after"][j]) for j in picks],
                      labels=LABELS,
                      timing=stage_line(summary["stage_seconds"], summary["reused_stages"]))
