"""The ``datainf`` command. Errors become one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import sys
import traceback
import warnings
from typing import NoReturn

from .errors import DataInfError


def _demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # LiSSA's non-convergence is reported
        result = run_demo(n_train=args.n_train, seed=args.seed)
    print(f"Softmax regression on generated clusters: {result['n_train']} training examples, "
          f"{result['flipped']} with flipped labels, {result['n_val']} validation examples, "
          f"seed {result['seed']}.")
    print("Detection of the flipped labels (AUC; 0.5 = chance), scores on the mean "
          "validation loss:")
    print(f"  {'method':<24}{'AUC':>8}{'seconds':>10}")
    for label, r in result["methods"].items():
        note = "" if r.get("converged", True) else "  (did not converge)"
        print(f"  {label:<24}{r['auc']:>8.3f}{r['seconds']:>10.3f}{note}")


def _quiet_libraries() -> None:
    """Keep transformers' load reports and deprecation notes out of the job's output."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def _detect_mislabeled(args: argparse.Namespace) -> None:
    from .mislabeled import Config, run

    _quiet_libraries()

    text_columns = tuple(args.text_column or ["text"])
    config = Config(
        data=args.data, text_columns=text_columns, label_column=args.label_column,
        id_column=args.id_column,
        val_data=args.val_data, val_fraction=args.val_fraction,
        train_size=args.train_size or (Config.train_size if args.data is None else None),
        val_size=args.val_size or (Config.val_size if args.data is None else None),
        noise=args.noise, model=args.model, adapter=args.adapter, lora_r=args.lora_r,
        lora_alpha=args.lora_alpha, lora_targets=tuple(args.lora_targets.split(",")),
        epochs=args.epochs, max_epochs=args.max_epochs, patience=args.patience,
        batch_size=args.batch_size, learning_rate=args.learning_rate,
        max_length=args.max_length, device=args.device, seed=args.seed,
        methods=tuple(args.methods.split(",")), blocks=args.blocks, grouping=args.grouping,
        damping=args.damping, rank_by=args.rank_by, top=args.top, drop_top=args.drop_top,
        out=args.out, progress=False if args.quiet else None,
    )
    summary = run(config)
    best = {k: v for k, v in summary["methods"].items() if "auc" in v}
    line = ", ".join(f"{v['label']} {v['auc']:.3f}" for v in best.values())
    print(f"datainf: {summary['n_train']} training examples scored; "
          + (f"AUC: {line}; " if line else "")
          + f"report: {config.out}/report.html")


class Parser(argparse.ArgumentParser):
    """argparse with usage errors on one line: ``datainf: error: ...`` and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"datainf: error: {message} (see `{self.prog} --help`)\n")


class Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default unless it has none (None) or the help text names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


DETECT_EPILOG = """\
outputs (in --out): summary.json (settings, sizes, AUC and seconds per method), scores.csv (every
training example: its row in your file, text, given label, the model's label and probability,
every score and rank), suspects.csv (the --top most suspicious by --rank-by, with a suggested
label), report.html, cleaned.csv (with --drop-top), the adapter and the gradient stores.

--noise (default 0.2) flips that share of YOUR training labels on purpose, so that the report
can measure how well each score finds wrong labels (AUC). To rank your data as it is, use
--noise 0.

examples:
  datainf detect-mislabeled                                  # shipped BBC News, offline
  datainf detect-mislabeled --data train.csv --text-column review --label-column stars \\
      --noise 0 --drop-top 100 --out runs/reviews
"""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="datainf",
        description="Influence of training examples on LoRA fine-tuned models (DataInf).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the four estimators on generated gradients (seconds)",
                          formatter_class=Help,
                          description="DataInf, Exact, LiSSA and Hessian-free on the "
                          "per-example gradients of a softmax regression trained on generated "
                          "clusters with flipped labels: the AUC of each for finding them.")
    demo.add_argument("--n-train", type=int, default=2000, help="training examples generated")
    demo.add_argument("--seed", type=int, default=0, help="seed of the data and the flips")
    demo.set_defaults(run=_demo)

    from .mislabeled import Config as C

    d = sub.add_parser(
        "detect-mislabeled",
        help="fine-tune a LoRA classifier, score every training example, write a report",
        formatter_class=Help,
        description="Find mislabeled training examples of a LoRA fine-tune. Without --data: "
        "MiniLM-L6 on the shipped BBC News corpus with 20% of the labels flipped (offline, "
        "a few minutes on a laptop CPU).",
        epilog=DETECT_EPILOG,
    )
    g = d.add_argument_group("data")
    g.add_argument("--data", help="training data: a .csv, .tsv, .jsonl or .parquet file, or "
                   "a Hugging Face dataset NAME[:CONFIG] (online; its validation split is used)")
    g.add_argument("--text-column", action="append",
                   help="text column (give twice for sentence pairs; default: text)")
    g.add_argument("--label-column", default=C.label_column, help="label column")
    g.add_argument("--id-column", help="column of record ids, shown next to each example "
                   "(default: the column 'id' when there is one)")
    g.add_argument("--val-data", help="validation file (default: a share of --data)")
    g.add_argument("--val-fraction", type=float, default=C.val_fraction,
                   help="share of --data held out for validation when there is no --val-data")
    g.add_argument("--train-size", type=int,
                   help="training examples drawn (default: 900 of the built-in data; all of "
                   "--data)")
    g.add_argument("--val-size", type=int,
                   help="validation examples drawn (default: 100 of the built-in data; "
                   "--val-fraction of --data)")
    g.add_argument("--noise", type=float, default=C.noise,
                   help="share of YOUR training labels flipped on purpose to measure detection "
                   "(0 ranks the data as it is)")
    m = d.add_argument_group("model")
    m.add_argument("--model", default=C.model,
                   help="'minilm' (shipped), a HF model folder or hub name")
    m.add_argument("--adapter", help="an existing PEFT adapter folder (skips fine-tuning)")
    m.add_argument("--lora-r", type=int, default=C.lora_r, help="LoRA rank")
    m.add_argument("--lora-alpha", type=int, default=C.lora_alpha, help="LoRA alpha")
    m.add_argument("--lora-targets", default=",".join(C.lora_targets),
                   help="modules that get LoRA (comma-separated); the head is trained too")
    m.add_argument("--epochs", type=int, default=C.epochs,
                   help="fine-tuning epochs (one round, linear learning-rate decay)")
    m.add_argument("--max-epochs", type=int, default=C.max_epochs,
                   help="while the model is still weak on the validation set after a round, "
                   "another round follows, up to this many epochs in all")
    m.add_argument("--patience", type=int, default=C.patience,
                   help="stop fine-tuning once the validation loss has not improved for this "
                   "many epochs and keep the best epoch's adapter (0: run every epoch)")
    m.add_argument("--batch-size", type=int, default=C.batch_size, help="examples per batch")
    m.add_argument("--learning-rate", type=float, default=C.learning_rate, help="AdamW")
    m.add_argument("--max-length", type=int, default=C.max_length, help="tokens per text")
    m.add_argument("--device", default=C.device, help="cpu, cuda, cuda:1, ...")
    m.add_argument("--seed", type=int, default=C.seed,
                   help="seed of the split, the noise, LoRA and the head")
    s = d.add_argument_group("scoring")
    s.add_argument("--methods", default=",".join(C.methods),
                   help="comma-separated; the training loss and gradient norm are always shown")
    s.add_argument("--blocks", help="regular expression: only the matching gradient blocks "
                   "count (e.g. 'classifier' or 'layer\\.5\\.')")
    s.add_argument("--grouping", choices=("tensor", "module"), default=C.grouping,
                   help="one block per LoRA tensor (the paper's) or per module (A and B "
                   "together)")
    s.add_argument("--damping", type=float, default=C.damping,
                   help="relative damping constant (lambda_l = c x mean squared gradient)")
    o = d.add_argument_group("outputs")
    o.add_argument("--rank-by", default=C.rank_by,
                   help="the score that orders the suspects (a method or 'loss', 'grad_norm')")
    o.add_argument("--top", type=int, default=C.top,
                   help="suspects listed in the report and suspects.csv")
    o.add_argument("--drop-top", type=int, metavar="K",
                   help="write cleaned.csv: your data without the K most suspicious examples")
    o.add_argument("--out", default=C.out, help="run folder (reused when repeated)")
    o.add_argument("--quiet", action="store_true",
                   help="no progress bars or stage lines (warnings still show)")
    d.set_defaults(run=_detect_mislabeled)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs one command. Exit status: 0 done, 2 bad input or settings (one line on stderr),
    1 a problem of the machine (disk full, no permission: one line) or a bug (a traceback),
    130 interrupted."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except DataInfError as error:
        print(f"datainf: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("datainf: interrupted; run the same command again to go on from the last "
              "finished stage", file=sys.stderr)
        return 130
    except OSError as error:  # the machine's, not the code's: disk full, read-only, ...
        where = f" ({error.filename})" if error.filename else ""
        print(f"datainf: error: {error.strerror or error}{where}; free space or choose a "
              "writable --out, then run the same command again", file=sys.stderr)
        return 1
    except Exception:
        traceback.print_exc()
        print("datainf: this is a bug in datainf, not a problem with your input: please report "
              "it to the datainf issue tracker with the command and the traceback above",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
