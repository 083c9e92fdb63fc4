"""How much LoRA fine-tuning does the shipped digit model need to learn a task of the diffusion
study? Fine-tunes the UNet's attention on the task's training images with several settings and
prints, per setting, the last epoch's loss, the seconds, and the Fréchet distance to the test
images of images drawn from the test prompts (as `datainf experiment diffusion` measures it).

    .venv/bin/python benchmarks/diffusion_finetune.py --task style
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
import torch

from datainf.data.image_tasks import make_image_task
from datainf.experiments.diffusion import SIZES, _features
from datainf.jobs.explain_image import Config, train_adapter
from datainf.metrics import frechet_distance
from datainf.models.diffusion import load_pipeline, to_pixels, to_uint8
from datainf.models.hf import add_lora

SETTINGS = [  # (LoRA rank, epochs, learning rate)
    (4, 10, 1e-3), (4, 40, 1e-3), (8, 40, 1e-3), (8, 40, 3e-3), (16, 40, 1e-3),
    (16, 40, 3e-3), (8, 40, 1e-2), (8, 80, 3e-3), (16, 80, 3e-3),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", default="style")
    parser.add_argument("--settings", help="indices into SETTINGS (comma-separated; default: "
                        "all)")
    args = parser.parse_args()
    chosen = [SETTINGS[int(i)] for i in args.settings.split(",")] if args.settings else SETTINGS
    train_n, test_n = SIZES[args.task]
    train, test = make_image_task(args.task, per_class_train=train_n, per_class_test=test_n)
    images = np.stack([r["image"] for r in train])[..., None]
    test_images = np.stack([r["image"] for r in test])[..., None]
    pixels = to_pixels(images[..., 0], 16)
    small = lambda x: to_uint8(to_pixels(x[..., 0], 16))  # noqa: E731
    features = _features(small(images), [f"{r['class']}/{r['digit']}" for r in train], 0)
    real = features(small(test_images))
    prompts = [r["text"] for r in train]
    seeds = list(range(1000, 1000 + len(test)))
    print(f"{'r':>3}{'epochs':>7}{'lr':>8}{'loss':>8}{'seconds':>9}{'FD after':>10}", flush=True)
    for r, epochs, lr in chosen:
        pipeline = load_pipeline("digits", progress=False)
        torch.manual_seed(0)
        unet = add_lora(pipeline.unet, r=r, alpha=r,
                        target_modules=("to_q", "to_k", "to_v", "to_out.0"))
        config = replace(Config(), lora_r=r, lora_alpha=r, epochs=epochs, learning_rate=lr,
                         progress=False)
        start = time.perf_counter()
        history = _train(config, pipeline, unet, pixels, prompts)
        seconds = time.perf_counter() - start
        drawn = pipeline.draw(unet, [t["text"] for t in test], seeds,
                              steps=config.sampling_steps, guidance=config.guidance)
        distance = frechet_distance(features(drawn), real)
        print(f"{r:>3}{epochs:>7}{lr:>8.0e}{history['epoch_losses'][-1]:>8.4f}"
              f"{seconds:>9.1f}{distance:>10.2f}", flush=True)


def _train(config, pipeline, unet, pixels, prompts):
    return train_adapter(config, pipeline, unet, pixels, prompts)


if __name__ == "__main__":
    main()
