"""How far should the LoRA fine-tune go for influence to find the training images of a test
image's class? Runs `datainf experiment diffusion` (fast methods only) with fine-tunes of
different length, rank and learning rate, each in its own folder under --out (reused when
repeated), and prints the Fréchet distance after fine-tuning (lower = the model learned the
task) next to each method's class-detection AUC, recall and AUC of |score|.

    .venv/bin/python benchmarks/diffusion_fit.py --task style --out runs/diffusion-fit
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from datainf.experiments.diffusion import Study, run
from datainf.jobs.explain_image import Config

SETTINGS = [  # (LoRA rank, epochs, learning rate)
    (4, 10, 1e-3), (4, 40, 1e-3), (8, 10, 3e-3), (8, 20, 3e-3), (8, 40, 3e-3),
]
METHODS = ("datainf", "hessian_free", "datainf_normalized", "cosine")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", default="style")
    parser.add_argument("--out", default="runs/diffusion-fit")
    parser.add_argument("--settings", help="indices into SETTINGS (comma-separated)")
    args = parser.parse_args()
    chosen = [SETTINGS[int(i)] for i in args.settings.split(",")] if args.settings else SETTINGS
    print(f"{'r':>3}{'epochs':>7}{'lr':>8}{'FD after':>10}  "
          + "".join(f"{m + ' AUC/recall/|AUC|':>40}" for m in METHODS), flush=True)
    for r, epochs, lr in chosen:
        folder = Path(args.out) / f"{args.task}-r{r}-e{epochs}-lr{lr:g}"
        job = replace(Config(), lora_r=r, lora_alpha=r, epochs=epochs, learning_rate=lr,
                      methods=METHODS, progress=False, out=str(folder / "run"), top=3)
        summary = run(Study(task=args.task, job=job))
        cells = "".join(f"{v['auc']:>20.3f} / {v['recall']:.3f} / {v['auc_magnitude']:.3f}"
                        for v in summary["methods"].values())
        print(f"{r:>3}{epochs:>7}{lr:>8.0e}{summary['frechet_distance']['after']:>10.2f}  "
              f"{cells}", flush=True)


if __name__ == "__main__":
    main()
