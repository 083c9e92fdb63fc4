"""The ``explain-image`` job: which training images made the diffusion model draw that?

Stages (the expensive ones are written to ``out`` once and reused when the job is repeated with
the same settings; new queries reuse the adapter and the training gradients):

1. data      --train-dir and --queries image folders (see :mod:`datainf.data.images`) -> recomputed
2. adapter   LoRA fine-tuning of the UNet's attention on --train-dir (or --adapter)
                                                                              -> out/adapter/
3. images    the queries given only as a prompt, drawn by the fine-tuned model with a recorded
             seed                                                           -> out/query/
4. gradients per-example gradients of the noise-prediction loss at fixed timesteps with
             per-example seeded noise (gradients.tasks.Diffusion)       -> out/gradients/,
                                                                                out/query/
5. scores    every method's pairwise influence -> scores.npz, top.jsonl, summary.json,
             report.html (always recomputed)

Scores have the paper's sign: NEGATIVE = the training image helps (up-weighting it lowers the
query's loss), positive = harmful.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.images import ImageExample, load_images, read_image, read_image_folder, save_png
from ..devices import check_device
from ..errors import DataInfError
from ..gradients.collect import collect_gradients
from ..gradients.store import GradientStore
from ..gradients.tasks import Diffusion
from ..identity import fingerprint
from ..log import warn
from ..methods import Inputs
from ..models.diffusion import load_pipeline, noise_prediction_loss, to_pixels, with_noise
from ..models.hf import check_adapter_folder
from ..options import Command, option, said
from ..report import explain_image_page
from ..training.finetune import train_loop
from .pairwise import (
    OUTPUT_OPTIONS,
    OUTPUTS,
    SCORING_OPTIONS,
    PairwiseOptions,
    Scored,
    kept,
    scored,
)
from .pairwise import write_outputs as write_pairwise
from .pipeline import (
    QUIET_HELP,
    Run,
    check_second_moments,
    collected,
    fine_tuned,
    query_folder,
    reads_features,
    second_moments,
    with_adapter,
)
from .runs import check_numbers, settings_json

QUERY_NOISE = ("shared", "own")  # --query-noise: the Diffusion task's noise stream 0 or 1
SAMPLES = 8  # training prompts drawn before and after fine-tuning for the report


@dataclass
class Config(PairwiseOptions):
    """Settings of one explain-image run. Those in ``EXPENSIVE`` decide the adapter and the
    training gradients."""

    blocks: str | None = option(
        None, "regular expression: only the matching gradient blocks count (e.g. 'attn2')")
    top: int = option(5, "most helpful and most harmful training images shown per query")
    matrix: bool = option(
        True, "skip scores.npz (8 x queries x training images bytes per method)",
        flag="--no-matrix", kind="off")
    train_dir: str = option("", "training image folder (metadata.jsonl)", required=True,
                            shown=None)
    queries: str = option("", "query image folder (metadata.jsonl)", required=True, shown=None)
    # how messages name the two folders: the options, or what a study made them from
    folder_names: tuple[str, str] = ("--train-dir", "--queries")
    pipeline: str = option(
        "digits", "'digits' (the shipped digit model, pre-trained once on first use) or a "
        "diffusers Stable Diffusion pipeline folder")
    adapter: str | None = option(
        None, "an existing PEFT adapter folder for the pipeline's UNet (skips fine-tuning)")
    # rank 8 for 40 epochs at 3e-3: the digit model learns the style task's styles
    # (benchmarks/diffusion_finetune.py, README)
    lora_r: int = option(8, "LoRA rank")
    lora_alpha: int = option(8, "LoRA alpha")
    lora_targets: tuple[str, ...] = option(
        ("to_q", "to_k", "to_v", "to_out.0"), "UNet modules that get LoRA (comma-separated)",
        kind="list")
    epochs: int = option(40, "fine-tuning epochs")
    batch_size: int = option(32, "images per batch")
    learning_rate: float = option(3e-3, "AdamW")
    timesteps: tuple[int, ...] = option(
        (25, 225, 425, 525, 725, 925),
        "diffusion timesteps of the gradients (comma-separated, of 1000)", kind="ints")
    seed: int = option(0, "seed of LoRA, the data order, the noise and the drawings")
    query_noise: str = option(
        "shared", "noise of a query's gradients: 'shared' = that of the training image at the "
        "same position (the authors' notebook), 'own' = drawn for the queries alone",
        choices=QUERY_NOISE)
    # cheap: may change between runs on the same --out
    sampling_steps: int = option(50, "DDIM steps when drawing a query")
    # classifier-free guidance; at 3 the digit model's drawings fall apart (README)
    guidance: float = option(1.5, "classifier-free guidance scale when drawing (1 = none)")
    out: str = option("runs/explain-image", "run folder (reused when repeated)")
    progress: bool | None = option(None, QUIET_HELP, flag="--quiet", kind="quiet")
    stage_seconds: dict = field(default_factory=dict)

    EXPENSIVE = ("pipeline", "adapter", "lora_r", "lora_alpha", "lora_targets", "epochs",
                 "batch_size", "learning_rate", "timesteps", "seed")


MODEL_OPTIONS = {  # the diffusion study runs the same pipeline with these
    "model": ("pipeline", "lora_r", "lora_alpha", "lora_targets", "epochs", "batch_size",
              "learning_rate", "timesteps", "query_noise", "sampling_steps", "guidance", "seed",
              "device"),
    "scoring": SCORING_OPTIONS}
COMMAND = Command(
    "explain-image",
    help="which training images made the diffusion model draw that",
    description="Influence of every training image on the images of your queries: LoRA "
    "fine-tunes the text-to-image model's UNet attention on --train-dir (or takes --adapter), "
    "draws the queries given only as prompts, and scores every training image against every "
    "query.",
    config=Config,
    layout={"data": ("train_dir", "queries", "adapter"), **MODEL_OPTIONS,
            "outputs": OUTPUT_OPTIONS},
    epilog="""\
data: image folders in Hugging Face's ImageFolder convention: image files and a metadata.jsonl
with one row per image, {"file_name": "0001.png", "text": "the prompt", ...}; other keys are
kept and shown. Rows are taken in sorted file-name order. In --queries, a row without
file_name is a prompt: the fine-tuned model draws it (seed: the row's "seed", else --seed plus
the row's position) and that image is explained. Images are converted to the model's colour
mode, centre-cropped to a square and resized to its size, with a message.

outputs (in --out): scores.npz (one queries x training-images float64 array per method, the
paper's sign: negative = helpful), top.jsonl, report.html (image grids), summary.json, the
adapter and the gradient stores.

examples:
  datainf explain-image --train-dir my_images/ --queries queries/ --out runs/explain-img
  datainf explain-image --pipeline SD_FOLDER --adapter ADAPTER_DIR --train-dir my_images/ \\
      --queries queries/ --out runs/explain-img
""")


def check_settings(config: Config) -> None:
    """Every setting, before anything is loaded."""
    config.check_scoring()
    check_numbers(config, {"epochs": 1, "batch_size": 1, "lora_r": 1, "top": 1,
                           "sampling_steps": 1, "query_batch": 1, "guidance": 1},
                  ("learning_rate", "damping", "lora_alpha"))
    if not config.timesteps or any(not 0 <= t < 1000 for t in config.timesteps):
        raise DataInfError(f"{said('timesteps')} must be integers in [0, 1000), not "
                           f"{list(config.timesteps)}")
    check_device(config.device)
    if reads_features(config.methods):
        raise DataInfError(
            "repsim is not offered for images: the UNet has no one representation of an image "
            "(its features depend on the timestep and the noise drawn); leave it out of "
            f"{said('methods')}")
    if config.adapter is not None:
        check_adapter_folder(config.adapter)
        check_second_moments(config)


# ---------------------------------------------------------------- stage 2: adapter
def load_model(config: Config, out: Path):
    """(pipeline, UNet with its LoRA adapter, source): see
    :func:`datainf.jobs.pipeline.with_adapter`."""
    pipeline = load_pipeline(config.pipeline, progress=config.progress)
    unet, source = with_adapter(pipeline.unet, config, out)
    return pipeline, unet.to(config.device), source


def image_batches(pipeline, pixels: torch.Tensor, prompts: list[str], batch_size: int,
                  order=None):
    """Batches of {"pixel_values": the UNet's inputs (latents with a VAE), "encoder_hidden_
    states": the prompts' text states}, in ``order`` (default: file order)."""
    order = np.arange(len(prompts)) if order is None else order
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        yield {"pixel_values": pipeline.encode(pixels[rows]),
               "encoder_hidden_states": pipeline.conditioning([prompts[i] for i in rows])}


def train_adapter(config: Config, pipeline, unet, pixels: torch.Tensor, prompts: list[str],
                  second_moments: dict | None = None) -> dict:
    """LoRA fine-tuning on the noise-prediction loss (random timesteps and noise from a
    generator seeded with ``config.seed``); returns the history (loss per epoch) and fills
    ``second_moments`` (see :func:`datainf.training.finetune.train_loop`)."""
    generator = torch.Generator().manual_seed(config.seed)

    def batches(order):  # noise drawn per batch, in the order the loss used to draw it
        for batch in image_batches(pipeline, pixels, prompts, config.batch_size, order):
            yield with_noise(batch, pipeline.scheduler, generator)

    losses = train_loop(
        unet, len(prompts), batches,
        lambda module, b: noise_prediction_loss(module, pipeline.scheduler, b, generator),
        epochs=config.epochs, batch_size=config.batch_size, learning_rate=config.learning_rate,
        seed=config.seed, progress=config.progress, process_group=config.process_group,
        second_moments=second_moments)
    return {"epoch_losses": [round(x, 5) for x in losses], "epochs_run": len(losses)}


# ---------------------------------------------------------------- stage 3: query images
def query_images(config: Config, pipeline, unet, queries: list[ImageExample],
                 folder: Path) -> tuple[np.ndarray, list[Path], list[int | None]]:
    """(uint8 images (m, H, W, C), their files, the seed of each generated one (None for a
    given image)). Prompt-only queries are drawn with seed = the row's "seed", else
    ``config.seed`` + the row's position, and kept as folder/generated/line-N.png."""
    seeds = [None if q.file is not None else (q.seed if q.seed is not None else config.seed + j)
             for j, q in enumerate(queries)]
    drawn = folder / "generated"
    drawn.mkdir(exist_ok=True)
    files = [q.file if q.file is not None else drawn / f"line-{q.line}-seed-{seeds[j]}.png"
             for j, q in enumerate(queries)]
    todo = [j for j, q in enumerate(queries) if q.file is None and not files[j].exists()]
    if todo:
        drawings = pipeline.draw(unet, [queries[j].text for j in todo], [seeds[j] for j in todo],
                                 steps=config.sampling_steps, guidance=config.guidance,
                                 batch=config.query_batch)
        for j, image in zip(todo, drawings, strict=True):
            save_png(image, files[j])
    images = fitted_images(pipeline, [ImageExample(q.text, files[j], q.line)
                                              for j, q in enumerate(queries)],
                           config.folder_names[1])
    return images, files, seeds


def fitted_images(pipeline, examples: list[ImageExample], what: str, main: bool = True
                  ) -> np.ndarray:
    """The examples' images fitted to the pipeline (uint8 (n, H, W, C)), saying how many had
    to be converted, cropped or resized."""
    images, changed = load_images(examples, size=pipeline.image_size,
                                  channels=pipeline.channels, what=what)
    if changed and main:  # changes the data: shown even with --quiet (rank 0 says it)
        warn(f"{what}: {changed} images converted, cropped or resized to "
             f"{pipeline.image_size} x {pipeline.image_size}")
    return images


# ---------------------------------------------------------------- stage 4: gradients
def gradients(config: Config, pipeline, unet, images: np.ndarray, prompts: list[str],
              path: Path, queries: bool = False) -> GradientStore:
    """Per-example gradients of the noise-prediction MSE at ``config.timesteps`` (noise
    seeded per example and timestep; the queries' from their own stream with
    ``--query-noise own``), in the store at ``path``."""
    pixels = to_pixels(np.moveaxis(images, -1, 1), pipeline.image_size)
    stream = QUERY_NOISE.index(config.query_noise) if queries else 0
    task = Diffusion(timesteps=tuple(config.timesteps), seed=config.seed,
                     scheduler=pipeline.scheduler, noise_stream=stream)
    # batches are encoded as they are needed (latents of a VAE, text states), not all at once
    return collect_gradients(unet, image_batches(pipeline, pixels, prompts, config.batch_size),
                             task, out=str(path), num_examples=len(prompts),
                             progress=config.progress, process_group=config.process_group)


# ---------------------------------------------------------------- outputs
def samples(config: Config, pipeline, unet, prompts: list[str]) -> dict:
    """Up to SAMPLES distinct training prompts drawn by the base model and by the fine-tuned
    one (same seeds): {"prompts", "seeds", "before", "after"} with uint8 images."""
    chosen = list(dict.fromkeys(prompts))[:SAMPLES]
    seeds = [config.seed + i for i in range(len(chosen))]
    draw = {"steps": config.sampling_steps, "guidance": config.guidance}
    with unet.disable_adapter():
        before = pipeline.draw(unet, chosen, seeds, **draw)
    after = pipeline.draw(unet, chosen, seeds, **draw)
    return {"prompts": chosen, "seeds": seeds, "before": before, "after": after}


def write_outputs(config: Config, out: Path, train: list[ImageExample],
                  queries: list[ImageExample], train_images: np.ndarray,
                  query_images_: np.ndarray, query_files: list[Path], seeds: list[int | None],
                  scores: Scored, drawn: dict, extra: dict) -> dict:
    """scores.npz, top.jsonl, report.html and summary.json (see
    :func:`datainf.jobs.pairwise.write_outputs`). Returns the summary."""
    rows = [{"query": j, "line": q.line, "text": q.text, "file": str(query_files[j]),
             "generated": seeds[j] is not None, "seed": seeds[j], **kept(q)}
            for j, q in enumerate(queries)]

    def entry(i: int, score: float, rank: int) -> dict:
        return {"train": i, "file_name": train[i].file.name, "line": train[i].line,
                "text": train[i].text, "score": score, "rank": rank, **kept(train[i])}

    head = {"command": "explain-image",
            "config": settings_json(config, leave_out=("stage_seconds",)),
            "n_train": len(train), "n_queries": len(queries),
            "generated_images": int(sum(s is not None for s in seeds))}
    sign = ("negative = helpful (up-weighting the training image lowers the query's loss), "
            "positive = harmful")
    return write_pairwise(config, out, scores, rows, entry, head, sign, extra,
                          lambda summary, rows: explain_image_page(
                              summary, rows, list(scores.tops), train_images, query_images_,
                              drawn))


# ---------------------------------------------------------------- the job
@dataclass
class Prepared:
    """The expensive stages' results, in the locked run folder ``run.out``."""

    run: Run
    train: list[ImageExample]
    queries: list[ImageExample]
    train_images: np.ndarray
    query_images: np.ndarray
    query_files: list[Path]
    seeds: list[int | None]
    pipeline: object
    unet: object
    source: str
    history: dict | None
    train_store: GradientStore
    query_store: GradientStore
    inputs: Inputs              # what the methods score: the two stores, the moments


@contextmanager
def prepared(config: Config) -> Iterator[Prepared]:
    """Runs (or reuses) every expensive stage and yields their results while ``out`` stays
    locked. Settings and folders are checked before anything expensive; ``out`` is claimed
    (its run.json written) only once the model and adapter have loaded."""
    check_settings(config)
    run = Run.of(config)
    with run.stage("data"):
        train = read_image_folder(config.train_dir, what=config.folder_names[0])
    queries = read_image_folder(config.queries, what=config.folder_names[1], need_image=False)
    for example in queries:  # an unreadable query image is refused before any fine-tuning
        if example.file is not None:
            read_image(example, config.folder_names[1])
    record = {**config.expensive(), "train_fingerprint": fingerprint(config.train_dir)}
    with run.locked(record):
        with run.stage("model"):
            pipeline, unet, source = load_model(config, run.out)
        train_images = fitted_images(pipeline, train, config.folder_names[0], run.main)
        run.claim(record, OUTPUTS)
        prompts = [e.text for e in train]
        history = fine_tuned(run, source, unet, lambda moments: train_adapter(
            config, pipeline, unet, to_pixels(np.moveaxis(train_images, -1, 1),
                                              pipeline.image_size), prompts, moments))
        moments = second_moments(run, config, source)
        with run.main_first():  # rank 0 draws the queries; the others read its files
            folder = query_folder(run.out, config, source, config.queries,
                                  sampling_steps=config.sampling_steps, guidance=config.guidance,
                                  query_noise=config.query_noise)
            with run.stage("query images"):
                q_images, q_files, seeds = query_images(config, pipeline, unet, queries, folder)
        train_path, query_path = run.out / "gradients" / "train", folder / "gradients"
        train_store = collected(run, "gradients", [train_path], lambda: gradients(
            config, pipeline, unet, train_images, prompts, train_path))
        query_store = collected(run, "query gradients", [query_path], lambda: gradients(
            config, pipeline, unet, q_images, [q.text for q in queries], query_path,
            queries=True))
        inputs = Inputs(train_store, query_store, second_moments=moments)
        yield Prepared(run, train, queries, train_images, q_images, q_files, seeds, pipeline,
                       unet, source, history, train_store, query_store, inputs)


def run(config: Config) -> dict | None:
    """Every stage; returns the summary (also written to out/summary.json). With a process
    group, rank 0 writes the outputs and returns the summary; other ranks None."""
    with prepared(config) as p, scored(p.run, config, p.inputs) as scores:
        if not p.run.main:
            return None
        with p.run.stage("samples"):
            drawn = samples(config, p.pipeline, p.unet, [e.text for e in p.train])
        extra = {"pipeline": str(p.pipeline.path), "image_size": p.pipeline.image_size,
                 "adapter": p.source, "training": p.history, "reused_stages": p.run.reused}
        with p.run.stage("report"):
            return write_outputs(config, p.run.out, p.train, p.queries, p.train_images,
                                 p.query_images, p.query_files, p.seeds, scores, drawn, extra)


__all__ = ["Config", "prepared", "run"]
