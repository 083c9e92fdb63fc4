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

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.images import ImageExample, load_images, read_image, read_image_folder, save_png
from ..errors import DataInfError
from ..methods import LABELS
from .pairwise import PairwiseOptions, kept, matrix_folder, save_matrices, score_queries
from .runs import (
    Stages,
    adapter_digest,
    check_numbers,
    fingerprint,
    is_main,
    keyed_folder,
    main_first,
    record_run,
    run_folder,
    save_adapter,
    say,
    settings_json,
    warn,
    warn_unconverged,
    write_atomic,
)

OUTPUTS = ("scores.npz", "top.jsonl", "summary.json", "report.html")
SAMPLES = 8  # training prompts drawn before and after fine-tuning for the report


@dataclass
class Config(PairwiseOptions):
    """Settings of one explain-image run. Those in ``EXPENSIVE`` decide the adapter and the
    training gradients."""

    train_dir: str = ""
    queries: str = ""
    # how messages name the two folders: the options, or what a study made them from
    folder_names: tuple[str, str] = ("--train-dir", "--queries")
    pipeline: str = "digits"
    adapter: str | None = None
    # rank 8 for 40 epochs at 3e-3: the digit model learns the style task's styles
    # (benchmarks/diffusion_finetune.py, README)
    lora_r: int = 8
    lora_alpha: int = 8
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    epochs: int = 40
    batch_size: int = 32
    learning_rate: float = 3e-3
    timesteps: tuple[int, ...] = (25, 225, 425, 525, 725, 925)
    seed: int = 0
    # cheap: may change between runs on the same --out
    sampling_steps: int = 50
    # classifier-free guidance; at 3 the digit model's drawings fall apart (README)
    guidance: float = 1.5
    out: str = "runs/explain-image"
    progress: bool | None = None
    stage_seconds: dict = field(default_factory=dict)

    EXPENSIVE = ("pipeline", "adapter", "lora_r", "lora_alpha", "lora_targets", "epochs",
                 "batch_size", "learning_rate", "timesteps", "seed")

    def expensive(self) -> dict:
        return settings_json(self, self.EXPENSIVE)


def check_settings(config: Config) -> None:
    """Every setting, before anything is loaded."""
    from ..devices import check_device
    from ..models.hf import check_adapter_folder

    config.check_scoring()
    check_numbers(config, {"epochs": 1, "batch_size": 1, "lora_r": 1, "top": 1,
                           "sampling_steps": 1, "query_batch": 1, "guidance": 1},
                  ("learning_rate", "damping", "lora_alpha"))
    if not config.timesteps or any(not 0 <= t < 1000 for t in config.timesteps):
        raise DataInfError(f"--timesteps must be integers in [0, 1000), not "
                           f"{list(config.timesteps)}")
    check_device(config.device)
    if config.adapter is not None:
        check_adapter_folder(config.adapter)


# ---------------------------------------------------------------- stage 2: adapter
def load_model(config: Config, out: Path):
    """(pipeline, UNet with its LoRA adapter, source): ``source`` is "given", "reused" or
    "new" (fresh LoRA, to be fine-tuned)."""
    from ..models.diffusion import load_pipeline
    from ..models.hf import add_lora, load_adapter

    pipeline = load_pipeline(config.pipeline, progress=config.progress)
    saved = out / "adapter"
    if config.adapter is not None:
        unet, source = load_adapter(pipeline.unet, config.adapter), "given"
    elif (saved / "adapter_config.json").exists():
        unet, source = load_adapter(pipeline.unet, saved), "reused"
    else:
        torch.manual_seed(config.seed)
        unet = add_lora(pipeline.unet, r=config.lora_r, alpha=config.lora_alpha,
                        target_modules=config.lora_targets)
        source = "new"
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
                  out: Path) -> dict:
    """LoRA fine-tuning on the noise-prediction loss (random timesteps and noise from a
    generator seeded with ``config.seed``); the adapter is saved to out/adapter whole or not
    at all, with training.json (loss per epoch)."""
    from ..models.diffusion import noise_prediction_loss, with_noise
    from ..training.finetune import train_loop

    generator = torch.Generator().manual_seed(config.seed)

    def batches(order):  # noise drawn per batch, in the order the loss used to draw it
        for batch in image_batches(pipeline, pixels, prompts, config.batch_size, order):
            yield with_noise(batch, pipeline.scheduler, generator)

    losses = train_loop(
        unet, len(prompts), batches,
        lambda module, b: noise_prediction_loss(module, pipeline.scheduler, b, generator),
        epochs=config.epochs, batch_size=config.batch_size, learning_rate=config.learning_rate,
        seed=config.seed, progress=config.progress, process_group=config.process_group)
    history = {"epoch_losses": [round(x, 5) for x in losses], "epochs_run": len(losses)}
    if is_main(config.process_group):
        save_adapter(unet, out, history)
    return history


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
    images = fitted_images(config, pipeline, [ImageExample(q.text, files[j], q.line)
                                              for j, q in enumerate(queries)],
                           config.folder_names[1])
    return images, files, seeds


def fitted_images(config: Config, pipeline, examples: list[ImageExample], what: str
                  ) -> np.ndarray:
    """The examples' images fitted to the pipeline (uint8 (n, H, W, C)), saying how many had
    to be converted, cropped or resized."""
    images, changed = load_images(examples, size=pipeline.image_size,
                                  channels=pipeline.channels, what=what)
    if changed and is_main(config.process_group):  # changes the data: shown even with --quiet
        warn(f"{what}: {changed} images converted, cropped or resized to "
             f"{pipeline.image_size} x {pipeline.image_size}")
    return images


# ---------------------------------------------------------------- stage 4: gradients
def gradients(config: Config, pipeline, unet, images: np.ndarray, prompts: list[str],
              path: Path):
    """(store, reused): per-example gradients of the noise-prediction MSE at
    ``config.timesteps`` (noise seeded per example and timestep) at ``path``."""
    from ..gradients.collect import collect_gradients
    from ..gradients.store import GradientStore
    from ..gradients.tasks import Diffusion
    from ..models.diffusion import to_pixels

    reused = GradientStore.is_complete(path)
    pixels = to_pixels(np.moveaxis(images, -1, 1), pipeline.image_size)
    task = Diffusion(timesteps=tuple(config.timesteps), seed=config.seed,
                     scheduler=pipeline.scheduler)
    # batches are encoded as they are needed (latents of a VAE, text states), not all at once
    store = collect_gradients(unet, image_batches(pipeline, pixels, prompts, config.batch_size),
                              task, out=str(path), num_examples=len(prompts),
                              progress=config.progress, process_group=config.process_group)
    return store, reused


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
                  tops: dict, seconds: dict, notes: dict, matrix_folder: Path | None,
                  drawn: dict, extra: dict) -> dict:
    """scores.npz, top.jsonl, report.html, then summary.json (last: its presence says the run
    is complete). Returns the summary."""
    from ..report import explain_image_page

    if matrix_folder is not None:
        save_matrices(matrix_folder, tops, out)
    rows = []
    for j, query in enumerate(queries):
        row = {"query": j, "line": query.line, "text": query.text,
               "file": str(query_files[j]), "generated": seeds[j] is not None,
               "seed": seeds[j], **kept(query)}
        for method, per_query in tops.items():
            row[method] = {side: [{"train": i, "file_name": train[i].file.name,
                                   "line": train[i].line, "text": train[i].text, "score": s,
                                   "rank": r + 1, **kept(train[i])}
                                  for r, (i, s) in enumerate(per_query[j][side])]
                           for side in ("helpful", "harmful")}
        rows.append(row)
    write_atomic(out / "top.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    summary = {
        "command": "explain-image",
        "config": settings_json(config, leave_out=("stage_seconds",)),
        "n_train": len(train), "n_queries": len(queries),
        "generated_images": int(sum(s is not None for s in seeds)),
        "methods": {m: {"label": LABELS[m], "seconds": round(s, 4), **notes.get(m, {})}
                    for m, s in seconds.items()},
        "sign": "negative = helpful (up-weighting the training image lowers the query's "
                "loss), positive = harmful",
        "outputs": [name for name in OUTPUTS if name != "scores.npz" or matrix_folder],
        **extra,
    }
    summary["stage_seconds"] = {k: round(v, 2) for k, v in config.stage_seconds.items()}
    page = explain_image_page(summary, rows, list(tops), train_images, query_images_, drawn)
    write_atomic(out / "report.html", page)
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    return summary



# ---------------------------------------------------------------- the job
@dataclass
class Prepared:
    """The expensive stages' results, in the locked run folder ``out``."""

    out: Path
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
    train_store: object
    query_store: object
    stages: Stages


@contextmanager
def prepared(config: Config):
    """Runs (or reuses) every expensive stage and yields their results while ``out`` stays
    locked. Settings and folders are checked before anything expensive; ``out`` is claimed
    (its run.json written) only once the model and adapter have loaded."""
    from ..models.diffusion import to_pixels

    check_settings(config)
    stages = Stages(config.stage_seconds, lambda m: say(m, config.progress), config.out)
    train = stages.timed("data", read_image_folder, config.train_dir,
                         what=config.folder_names[0])
    queries = read_image_folder(config.queries, what=config.folder_names[1], need_image=False)
    for example in queries:  # an unreadable query image is refused before any fine-tuning
        if example.file is not None:
            read_image(example, config.folder_names[1])
    record = {**config.expensive(), "train_fingerprint": fingerprint(config.train_dir)}
    group = config.process_group
    with run_folder(Path(config.out), record, group) as out:
        pipeline, unet, source = stages.timed("model", load_model, config, out)
        train_images = fitted_images(config, pipeline, train, config.folder_names[0])
        if is_main(group):
            record_run(out, record)
            for name in OUTPUTS:  # never leave results of other settings next to this run's
                (out / name).unlink(missing_ok=True)
        prompts = [e.text for e in train]
        history = None
        if source == "new":
            pixels = to_pixels(np.moveaxis(train_images, -1, 1), pipeline.image_size)
            history = stages.timed("fine-tuning", train_adapter, config, pipeline, unet,
                                   pixels, prompts, out)
        elif source == "reused":
            stages.reuse("fine-tuning")
            history = json.loads((out / "adapter" / "training.json").read_text())
        with main_first(group):  # rank 0 draws the queries; the others read its files
            folder = _query_folder(out, config, source)
            q_images, q_files, seeds = stages.timed("query images", query_images, config,
                                                    pipeline, unet, queries, folder)
        train_store, again = stages.timed("gradients", gradients, config, pipeline, unet,
                                          train_images, prompts, out / "gradients" / "train")
        query_store, again_q = stages.timed("query gradients", gradients, config, pipeline,
                                            unet, q_images, [q.text for q in queries],
                                            folder / "gradients")
        if again:
            stages.reuse("gradients")
        if again_q:
            stages.reuse("query gradients")
        yield Prepared(out, train, queries, train_images, q_images, q_files, seeds, pipeline,
                       unet, source, history, train_store, query_store, stages)


def _query_folder(out: Path, config: Config, source: str) -> Path:
    """out/query: the drawn query images and the queries' gradients, kept while the queries
    folder, the adapter and the drawing settings stay the same (otherwise emptied)."""
    adapter = Path(config.adapter) if config.adapter else out / "adapter"
    return keyed_folder(out / "query", {
        "queries": fingerprint(config.queries), "sampling_steps": config.sampling_steps,
        "guidance": config.guidance, "adapter": source if source == "given" else "trained here",
        "adapter_fingerprint": adapter_digest(adapter)})


def run(config: Config) -> dict | None:
    """Every stage; returns the summary (also written to out/summary.json). With a process
    group, rank 0 writes the outputs and returns the summary; other ranks None."""
    main = is_main(config.process_group)
    with prepared(config) as p, matrix_folder(p.out, config.matrix and main) as folder:
        tops, seconds, notes = p.stages.timed("scoring", score_queries, p.train_store,
                                              p.query_store, folder=folder, **config.scoring())
        if not main:
            return None
        warn_unconverged(notes)
        drawn = p.stages.timed("samples", samples, config, p.pipeline, p.unet,
                               [e.text for e in p.train])
        extra = {"pipeline": str(p.pipeline.path), "image_size": p.pipeline.image_size,
                 "adapter": p.source, "training": p.history, "reused_stages": p.stages.reused}
        return p.stages.timed("report", write_outputs, config, p.out, p.train, p.queries,
                              p.train_images, p.query_images, p.query_files, p.seeds, tops,
                              seconds, notes, folder, drawn, extra)


__all__ = ["Config", "prepared", "run"]
