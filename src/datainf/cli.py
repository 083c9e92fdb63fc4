"""The ``datainf`` command. Errors become one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import sys
import traceback
import warnings
from pathlib import Path
from typing import NoReturn

from .errors import DataInfError

DAMPING_HELP = "the damping constant: see --damping-rule"
DAMPING_RULE_HELP = ("relative: lambda_l = DAMPING x the mean squared gradient entry of block l "
                     "(the paper's); absolute: lambda_l = DAMPING for every block")


def _demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # LiSSA's non-convergence is reported
        result = run_demo(n_train=args.n_train, seed=args.seed,
                          process_group=getattr(args, "process_group", None))
    if not _main_rank(args):  # rank 0 of a torchrun run reports
        return
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


def _run_config(args: argparse.Namespace):
    """The detect-mislabeled Config of the command line's data, model and scoring options."""
    from .data.text import builtin_dataset
    from .jobs.detect_mislabeled import Config

    text_columns = tuple(args.text_column or ["text"])
    builtin = builtin_dataset(args.data)  # its default sizes; None: all of a file
    rate = builtin.learning_rate if builtin and builtin.learning_rate else Config.learning_rate
    return Config(
        data=args.data, text_columns=text_columns, label_column=args.label_column,
        id_column=args.id_column,
        val_data=args.val_data, val_fraction=args.val_fraction,
        train_size=args.train_size or (builtin.train_size if builtin else None),
        val_size=args.val_size or (builtin.val_size if builtin else None),
        noise=args.noise, model=args.model, adapter=args.adapter, lora_r=args.lora_r,
        lora_alpha=args.lora_alpha, lora_targets=tuple(args.lora_targets.split(",")),
        epochs=args.epochs, max_epochs=args.max_epochs, patience=args.patience,
        batch_size=args.batch_size,
        learning_rate=rate if args.learning_rate is None else args.learning_rate,
        max_length=args.max_length, device=args.device, seed=args.seed,
        methods=tuple(args.methods.split(",")), blocks=args.blocks, grouping=args.grouping,
        damping=args.damping, damping_rule=args.damping_rule, rank_by=args.rank_by,
        top=args.top, drop_top=args.drop_top,
        out=args.out, progress=False if args.quiet else None,
        process_group=getattr(args, "process_group", None),
    )


def _detect_mislabeled(args: argparse.Namespace) -> None:
    from .jobs.detect_mislabeled import run

    _quiet_libraries()
    config = _run_config(args)
    summary = run(config)
    if summary is None:  # a rank of a torchrun run other than 0: rank 0 reports
        return
    best = {k: v for k, v in summary["methods"].items() if "auc" in v}
    line = ", ".join(f"{v['label']} {v['auc']:.3f}" for v in best.values())
    flipped = summary.get("n_flipped")
    print(f"datainf: {summary['n_train']} training examples scored"
          + (f" ({flipped} labels flipped on purpose by --noise {config.noise:g}, to measure "
             "detection; --noise 0 ranks your labels as given)" if flipped else "") + "; "
          + (f"AUC of finding them: {line}; " if line else "")
          + f"report: {config.out}/report.html")


EXPERIMENT_DEFAULTS = {
    # ranks, and the built-in data's size: 25 fine-tunes of the approximation study fit in
    # 30 minutes on a 2-core CPU at 400 training and 100 validation articles of 64 tokens
    "approximation": {"ranks": "1,2,4,8,16", "runs": 5},
    "mislabeled": {"ranks": "4", "runs": 5},
    # 13 fine-tunes a run (the run's own, 4 rankings x 3 shares)
    "removal": {"ranks": "4", "runs": 3},
}
# built-in data at the experiments' size; 1e-3 because 400 examples give 100 steps in 4 epochs,
# too few at 3e-4 to fit (validation accuracy 0.52 on BBC News against 0.85 at 1e-3)
EXPERIMENT_DATA = {"train_size": 400, "val_size": 100, "learning_rate": 1e-3}
QUICK = {"train_size": 40, "val_size": 20, "max_length": 16, "epochs": 1, "max_epochs": 1,
         "runs": 2}


def _experiment(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from .data.text import builtin_dataset
    from .experiments import EXPERIMENTS, Settings
    from .jobs.detect_mislabeled import DEMO_NOISE

    _quiet_libraries()
    config = _run_config(args)
    if args.noise is None:  # the studies measure detection: flipped labels on any data
        config = replace(config, noise=DEMO_NOISE)
    if builtin_dataset(args.data) is not None:  # built-in data at the experiments' size
        config = replace(config, **{k: getattr(args, k) or v for k, v in
                                    EXPERIMENT_DATA.items()})
    # one training budget for every cell (no second round, no early stop unless asked): the
    # removal study's retrainings then differ in their data only
    config = replace(config, max_epochs=args.max_epochs or config.epochs)
    runs = args.runs if args.runs is not None else EXPERIMENT_DEFAULTS[args.experiment]["runs"]
    ranks = args.ranks or EXPERIMENT_DEFAULTS[args.experiment]["ranks"]
    if args.quick:
        config = replace(config, **{k: v for k, v in QUICK.items() if k != "runs"})
        runs = args.runs if args.runs is not None else QUICK["runs"]
        ranks = args.ranks or ",".join(ranks.split(",")[:2])
    try:
        ranks = tuple(int(r) for r in ranks.split(","))
    except ValueError:
        raise DataInfError(f"--ranks takes comma-separated integers, not {ranks!r}") from None
    out = args.out or f"runs/experiment-{args.experiment}"
    extra = {"quick": bool(args.quick)}
    if args.experiment == "removal":
        try:
            extra["shares"] = tuple(float(x) / 100 for x in args.shares.split(","))
        except ValueError:
            raise DataInfError(f"--shares takes comma-separated percentages, not "
                               f"{args.shares!r}") from None
        if not all(0 < x < 1 for x in extra["shares"]):
            raise DataInfError(f"--shares must be percentages between 0 and 100, not "
                               f"{args.shares!r}")
    settings = Settings(base=config, ranks=ranks, runs=runs, out=out, cache=args.cache,
                        extra=extra)
    EXPERIMENTS[args.experiment](settings)
    if _main_rank(args):
        print(f"datainf: experiment {args.experiment} done; report: {out}/report.html")


class Parser(argparse.ArgumentParser):
    """argparse with usage errors on one line: ``datainf: error: ...`` and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"datainf: error: {message} (see `{self.prog} --help`)\n")


class Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default unless it has none (None) or the help text names it. In
    descriptions and epilogs, indented lines (the examples) keep their line breaks; the other
    lines are filled as paragraphs (blank lines between them)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out, paragraph = [], []

        def flush() -> None:
            if paragraph:
                out.append(super(Help, self)._fill_text(" ".join(paragraph), width, indent))
                paragraph.clear()

        for line in text.splitlines():
            if line.startswith(" ") or not line.strip():
                flush()
                out.append(indent + line if line.strip() else "")
            else:
                paragraph.append(line.strip())
        flush()
        return "\n".join(out)


DETECT_EPILOG = """\
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
"""


EXPLAIN_GENERATION_EPILOG = """\
data: JSON lines, one example a line: {"prompt": ..., "response": ...} or {"messages": [{"role":
..., "content": ...}, ...]} (TRL's chat format: the last assistant turn is the response, the
turns before it the prompt); other keys are kept and shown. A query without a response is
answered by the model (greedy) and that answer is explained. Examples longer than --max-length
tokens are refused, never cut.

outputs (in --out): scores.npz (one queries x training-examples float64 array per method, the
paper's sign: negative = helpful), top.jsonl (per query, the --top most helpful and most harmful
training examples), report.html, summary.json, the adapter and the gradient stores.

examples:
  datainf explain-generation --train train.jsonl --queries queries.jsonl --out runs/explain
  datainf explain-generation --model DIR --adapter ADAPTER_DIR --train train.jsonl \\
      --queries queries.jsonl --methods datainf,cosine --out runs/explain
"""


def _add_explain_generation(sub) -> None:
    from .jobs.explain_generation import Config as G

    g = sub.add_parser(
        "explain-generation",
        help="which fine-tuning examples made the LLM answer like that",
        formatter_class=Help,
        description="Influence of every fine-tuning example on the model's answers to your "
        "queries: LoRA fine-tunes the causal LM on --train (or takes --adapter), answers the "
        "queries that have no response, and scores every training example against every query.",
        epilog=EXPLAIN_GENERATION_EPILOG,
    )
    d = g.add_argument_group("data")
    d.add_argument("--train", required=True, help="fine-tuning examples (.jsonl)")
    d.add_argument("--queries", required=True, help="queries to explain (.jsonl)")
    d.add_argument("--adapter", help="an existing PEFT adapter folder for --model (skips "
                   "fine-tuning)")
    _add_lm_options(g)
    o = g.add_argument_group("outputs")
    o.add_argument("--top", type=int, default=G.top,
                   help="most helpful and most harmful training examples listed per query")
    o.add_argument("--no-matrix", action="store_true",
                   help="skip scores.npz (8 x queries x training examples bytes per method)")
    o.add_argument("--out", default=G.out, help="run folder (reused when repeated)")
    o.add_argument("--quiet", action="store_true",
                   help="no progress bars or stage lines (warnings still show)")
    g.set_defaults(run=_explain_generation)


def _add_lm_options(g: argparse.ArgumentParser) -> None:
    """The causal-LM model, fine-tuning and scoring options of explain-generation (and of the
    generation experiment, which runs the same pipeline)."""
    from .jobs.explain_generation import Config as G

    m = g.add_argument_group("model")
    m.add_argument("--model", default=G.model,
                   help="'smollm2' (shipped SmolLM2-135M-Instruct), a HF causal LM folder or "
                   "hub name")
    m.add_argument("--lora-r", type=int, default=G.lora_r, help="LoRA rank")
    m.add_argument("--lora-alpha", type=int, default=G.lora_alpha, help="LoRA alpha")
    m.add_argument("--lora-targets", default=",".join(G.lora_targets),
                   help="modules that get LoRA (comma-separated)")
    m.add_argument("--epochs", type=int, default=G.epochs, help="fine-tuning epochs")
    m.add_argument("--batch-size", type=int, default=G.batch_size, help="examples per batch")
    m.add_argument("--learning-rate", type=float, default=G.learning_rate, help="AdamW")
    m.add_argument("--max-length", type=int, default=G.max_length,
                   help="tokens of prompt and response (chat template included)")
    m.add_argument("--max-new-tokens", type=int, default=G.max_new_tokens,
                   help="tokens the model may generate to answer a query")
    m.add_argument("--seed", type=int, default=G.seed, help="seed of LoRA and the data order")
    m.add_argument("--device", default=G.device, help="cpu, cuda, cuda:1, ...")
    s = g.add_argument_group("scoring")
    s.add_argument("--methods", default=",".join(G.methods),
                   help="comma-separated: datainf, hessian_free, exact, lissa, and variants "
                   "of ours with gradients scaled to unit norm: datainf_normalized, cosine")
    s.add_argument("--blocks", help="regular expression: only the matching gradient blocks "
                   "count (e.g. 'layers\\.2[0-9]\\.')")
    s.add_argument("--damping", type=float, default=G.damping, help=DAMPING_HELP)
    s.add_argument("--damping-rule", default=G.damping_rule, metavar="{relative,absolute}",
                   help=DAMPING_RULE_HELP)


def _explain_generation(args: argparse.Namespace) -> None:
    from .jobs.explain_generation import run

    _quiet_libraries()
    config = _lm_config(args, train=args.train, queries=args.queries, adapter=args.adapter,
                        top=args.top, matrix=not args.no_matrix, out=args.out)
    summary = run(config)
    if summary is None:  # a rank of a torchrun run other than 0: rank 0 reports
        return
    print(f"datainf: {summary['n_train']} training examples scored against "
          f"{summary['n_queries']} queries; report: {config.out}/report.html")


def _lm_config(args: argparse.Namespace, **settings):
    from .jobs.explain_generation import Config

    return Config(
        model=args.model,
        lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        lora_targets=tuple(args.lora_targets.split(",")), epochs=args.epochs,
        batch_size=args.batch_size, learning_rate=args.learning_rate,
        max_length=args.max_length, max_new_tokens=args.max_new_tokens, seed=args.seed,
        device=args.device, methods=tuple(args.methods.split(",")), blocks=args.blocks,
        damping=args.damping, damping_rule=args.damping_rule,
        progress=False if args.quiet else None,
        process_group=getattr(args, "process_group", None), **settings)


EXPLAIN_IMAGE_EPILOG = """\
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
"""


def _add_explain_image(sub) -> None:
    g = sub.add_parser(
        "explain-image",
        help="which training images made the diffusion model draw that",
        formatter_class=Help,
        description="Influence of every training image on the images of your queries: LoRA "
        "fine-tunes the text-to-image model's UNet attention on --train-dir (or takes "
        "--adapter), draws the queries given only as prompts, and scores every training image "
        "against every query.",
        epilog=EXPLAIN_IMAGE_EPILOG,
    )
    d = g.add_argument_group("data")
    d.add_argument("--train-dir", required=True, help="training image folder (metadata.jsonl)")
    d.add_argument("--queries", required=True, help="query image folder (metadata.jsonl)")
    d.add_argument("--adapter", help="an existing PEFT adapter folder for the pipeline's UNet "
                   "(skips fine-tuning)")
    _add_image_options(g)
    from .jobs.explain_image import Config as I

    o = g.add_argument_group("outputs")
    o.add_argument("--top", type=int, default=I.top,
                   help="most helpful and most harmful training images shown per query")
    o.add_argument("--no-matrix", action="store_true",
                   help="skip scores.npz (8 x queries x training images bytes per method)")
    o.add_argument("--out", default=I.out, help="run folder (reused when repeated)")
    o.add_argument("--quiet", action="store_true",
                   help="no progress bars or stage lines (warnings still show)")
    g.set_defaults(run=_explain_image)


def _add_image_options(g: argparse.ArgumentParser) -> None:
    """The pipeline, fine-tuning and scoring options of explain-image (and of the diffusion
    experiment, which runs the same pipeline)."""
    from .jobs.explain_image import Config as I

    m = g.add_argument_group("model")
    m.add_argument("--pipeline", default=I.pipeline,
                   help="'digits' (the shipped digit model, pre-trained once on first use) or "
                   "a diffusers Stable Diffusion pipeline folder")
    m.add_argument("--lora-r", type=int, default=I.lora_r, help="LoRA rank")
    m.add_argument("--lora-alpha", type=int, default=I.lora_alpha, help="LoRA alpha")
    m.add_argument("--lora-targets", default=",".join(I.lora_targets),
                   help="UNet modules that get LoRA (comma-separated)")
    m.add_argument("--epochs", type=int, default=I.epochs, help="fine-tuning epochs")
    m.add_argument("--batch-size", type=int, default=I.batch_size, help="images per batch")
    m.add_argument("--learning-rate", type=float, default=I.learning_rate, help="AdamW")
    m.add_argument("--timesteps", default=",".join(map(str, I.timesteps)),
                   help="diffusion timesteps of the gradients (comma-separated, of 1000)")
    m.add_argument("--sampling-steps", type=int, default=I.sampling_steps,
                   help="DDIM steps when drawing a query")
    m.add_argument("--guidance", type=float, default=I.guidance,
                   help="classifier-free guidance scale when drawing (1 = none)")
    m.add_argument("--seed", type=int, default=I.seed,
                   help="seed of LoRA, the data order, the noise and the drawings")
    m.add_argument("--device", default=I.device, help="cpu, cuda, cuda:1, ...")
    s = g.add_argument_group("scoring")
    s.add_argument("--methods", default=",".join(I.methods),
                   help="comma-separated: datainf, hessian_free, exact, lissa, and variants "
                   "of ours with gradients scaled to unit norm: datainf_normalized, cosine")
    s.add_argument("--blocks", help="regular expression: only the matching gradient blocks "
                   "count (e.g. 'attn2')")
    s.add_argument("--damping", type=float, default=I.damping, help=DAMPING_HELP)
    s.add_argument("--damping-rule", default=I.damping_rule, metavar="{relative,absolute}",
                   help=DAMPING_RULE_HELP)


def _explain_image(args: argparse.Namespace) -> None:
    from .jobs.explain_image import run

    _quiet_libraries()
    config = _image_config(args, train_dir=args.train_dir, queries=args.queries,
                           adapter=args.adapter, top=args.top, matrix=not args.no_matrix,
                           out=args.out)
    summary = run(config)
    if summary is None:  # a rank of a torchrun run other than 0: rank 0 reports
        return
    print(f"datainf: {summary['n_train']} training images scored against "
          f"{summary['n_queries']} queries; report: {config.out}/report.html")


def _image_config(args: argparse.Namespace, **settings):
    from .jobs.explain_image import Config

    try:
        timesteps = tuple(int(t) for t in args.timesteps.split(","))
    except ValueError:
        raise DataInfError(f"--timesteps must be comma-separated integers, not "
                           f"{args.timesteps!r}") from None
    return Config(
        pipeline=args.pipeline, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        lora_targets=tuple(args.lora_targets.split(",")), epochs=args.epochs,
        batch_size=args.batch_size, learning_rate=args.learning_rate, timesteps=timesteps,
        sampling_steps=args.sampling_steps, guidance=args.guidance, seed=args.seed,
        device=args.device, methods=tuple(args.methods.split(",")), blocks=args.blocks,
        damping=args.damping, damping_rule=args.damping_rule,
        progress=False if args.quiet else None,
        process_group=getattr(args, "process_group", None), **settings)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="datainf",
        description="Influence of training examples on LoRA fine-tuned models (DataInf).",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"datainf {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the four estimators on generated gradients (seconds)",
                          formatter_class=Help,
                          description="DataInf, Exact, LiSSA and Hessian-free on the "
                          "per-example gradients of a softmax regression trained on generated "
                          "clusters with flipped labels: the AUC of each for finding them.")
    demo.add_argument("--n-train", type=int, default=2000, help="training examples generated")
    demo.add_argument("--seed", type=int, default=0, help="seed of the data and the flips")
    demo.set_defaults(run=_demo)

    from .jobs.detect_mislabeled import Config as C

    d = sub.add_parser(
        "detect-mislabeled",
        help="fine-tune a LoRA classifier, score every training example, write a report",
        formatter_class=Help,
        description="Find mislabeled training examples of a LoRA fine-tune. Without --data: "
        "MiniLM-L6 on the shipped BBC News corpus with 20% of the labels flipped (offline, "
        "a few minutes on a laptop CPU).",
        epilog=DETECT_EPILOG,
    )
    _add_run_options(d, single_run=True)
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

    _add_explain_generation(sub)
    _add_explain_image(sub)

    x = sub.add_parser("experiment", help="the paper's studies: approximation, mislabeled, "
                       "generation, diffusion; and removal",
                       description="The DataInf paper's experiments: approximation, "
                       "mislabeled and removal on the detect-mislabeled pipeline over LoRA ranks "
                       "and runs (seeds); generation on the explain-generation pipeline; "
                       "diffusion on the explain-image pipeline.")
    xs = x.add_subparsers(dest="experiment", required=True)
    for name, text in (("approximation", "each method's correlation with Exact across LoRA "
                        "ranks (the paper's Figure 1)"),
                       ("mislabeled", "AUC of every score over runs and the influence step's "
                        "runtime (Figure 2, the runtime comparison)"),
                       ("removal", "validation accuracy after removing each method's top k% "
                        "and fine-tuning again, against removing as many at random")):
        e = xs.add_parser(name, help=text.replace("%", "%%"),  # help is %-formatted
                          description=text[0].upper() + text[1:] + ".", formatter_class=Help)
        g = e.add_argument_group("experiment")
        g.add_argument("--ranks", help="comma-separated LoRA ranks (default: "
                       f"{EXPERIMENT_DEFAULTS[name]['ranks']})")
        g.add_argument("--runs", type=int, help="runs per rank (seeds 0, 1, ...; default: "
                       f"{EXPERIMENT_DEFAULTS[name]['runs']})")
        g.add_argument("--quick", action="store_true",
                       help=f"{QUICK_HELP}: 40 training and 20 validation examples of 16 "
                       "tokens, 1 epoch, 2 runs, the first two ranks")
        g.add_argument("--out", help=f"the experiment's folder (default: runs/experiment-{name})")
        g.add_argument("--cache", default="runs/experiment-cache",
                       help="fine-tunes and gradient stores, shared by the experiments")
        g.add_argument("--quiet", action="store_true", help="no progress bars or stage lines")
        if name == "removal":
            g.add_argument("--shares", default="5,10,20",
                           help="percentages of the training data removed (comma-separated)")
        _add_run_options(e, single_run=False)
        e.set_defaults(run=_experiment, adapter=None, lora_r=4, lora_alpha=8, seed=0,
                       methods="datainf", rank_by="datainf", top=50, drop_top=None,
                       max_length=64, max_epochs=None, patience=0)
        _experiment_data_help(e)
        e.description += (" Built-in data (default: BBC News) at 400 training and 100 "
                          "validation examples of 64 tokens, learning rate 1e-3. Every cell "
                          "is fine-tuned for --epochs epochs (--max-epochs: default --epochs; "
                          "--patience: default 0, no early stop), so that cells differ only "
                          "in what the experiment varies.")
    _add_generation_experiment(xs)
    _add_diffusion_experiment(xs)
    return parser


def _experiment_data_help(parser: argparse.ArgumentParser) -> None:
    """The data options' help as an experiment applies them (EXPERIMENT_DATA on built-in data,
    flipped labels on any data), not as detect-mislabeled does."""
    from .jobs.detect_mislabeled import DEMO_NOISE

    helps = {
        "train_size": f"training examples drawn (default: {EXPERIMENT_DATA['train_size']} of "
                      "built-in data; all of a file)",
        "val_size": f"validation examples drawn (default: {EXPERIMENT_DATA['val_size']} of "
                    "built-in data; --val-fraction of a file)",
        "learning_rate": f"AdamW (default: {EXPERIMENT_DATA['learning_rate']:g} on built-in "
                         "data, the job's default on a file)",
        "noise": f"share of the training labels flipped to measure detection (default: "
                 f"{DEMO_NOISE:g} on any data)",
    }
    for action in parser._actions:
        if action.dest in helps:
            action.help = helps[action.dest]


QUICK_HELP = ("a tiny version that checks the set-up, not the method (a few minutes on 2 CPU "
              "cores; its numbers mean nothing)")
GENERATION_QUICK = {"per_class": 4, "test_per_class": 1, "epochs": 1, "max_new_tokens": 4}


def _add_generation_experiment(xs) -> None:
    from .data.synthetic import TASKS
    from .experiments.generation import METHODS

    text = ("which training examples each method finds behind a test answer, on the paper's "
            "synthetic text-generation tasks (Table 2, LLM rows)")
    e = xs.add_parser("generation", help=text, formatter_class=Help,
                      description=text[0].upper() + text[1:] + ": 10 classes, 90 training and "
                      "10 test examples each, generated with --data-seed; class-detection AUC "
                      "and recall of every method, exact-match accuracy before and after "
                      "fine-tuning. The explain-generation pipeline, on its defaults.")
    g = e.add_argument_group("experiment")
    g.add_argument("--task", choices=TASKS, default=TASKS[0], help="the synthetic task")
    g.add_argument("--data-seed", type=int, default=0, help="seed of the generated examples")
    g.add_argument("--quick", action="store_true",
                   help=f"{QUICK_HELP}: a 2-layer Llama built from a config (random "
                   "weights, SmolLM2's tokenizer), 4 examples a class, 1 epoch")
    g.add_argument("--out", help="the experiment's folder (default: "
                   "runs/experiment-generation-TASK)")
    g.add_argument("--quiet", action="store_true", help="no progress bars or stage lines")
    _add_lm_options(e)
    e.set_defaults(run=_generation_experiment, methods=",".join(METHODS))


def _generation_experiment(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from .experiments.generation import Study, run

    _quiet_libraries()
    out = Path(args.out or f"runs/experiment-generation-{args.task}")
    study = Study(task=args.task, seed=args.data_seed,
                  job=_lm_config(args, out=str(out / "run"), top=3))
    if args.quick:
        from .jobs.runs import main_first
        from .models.hf import tiny_chat_model

        with main_first(study.job.process_group):  # built once, by rank 0 under torchrun
            model = tiny_chat_model(out / "tiny-model")
        quick = GENERATION_QUICK
        study = replace(study, per_class=quick["per_class"], quick=True,
                        test_per_class=quick["test_per_class"],
                        job=replace(study.job, model=str(model), epochs=quick["epochs"],
                                    max_new_tokens=quick["max_new_tokens"]))
    run(study)
    if _main_rank(args):
        print(f"datainf: experiment generation ({args.task}) done; report: {out}/report.html")


DIFFUSION_QUICK = {"per_class_train": 4, "per_class_test": 2, "classes": 3, "epochs": 1,
                   "batch_size": 4, "timesteps": (25, 525), "sampling_steps": 3}


def _add_diffusion_experiment(xs) -> None:
    from .data.image_tasks import TASKS
    from .experiments.diffusion import METHODS

    text = ("which training images each method finds behind a test image, on the style and "
            "subject tasks made from MNIST digits (Table 2, image rows)")
    e = xs.add_parser("diffusion", help=text, formatter_class=Help,
                      description=text[0].upper() + text[1:] + ": style = 3 styles, 200 "
                      "training and 50 test images each; subject = 31 handwriting instances, 3 "
                      "training and 2 test images each. Class-detection AUC and recall of "
                      "every method; Fréchet distance of drawn images before and after "
                      "fine-tuning. The explain-image pipeline, on its defaults.")
    g = e.add_argument_group("experiment")
    g.add_argument("--task", choices=TASKS, default=TASKS[0], help="the image task")
    g.add_argument("--data-seed", type=int, default=0, help="seed of the task's images")
    g.add_argument("--quick", action="store_true",
                   help=f"{QUICK_HELP}: a 2-level UNet built from a config (random "
                   "weights), 3 classes of 4 training and 2 test images, 1 epoch")
    g.add_argument("--out", help="the experiment's folder (default: "
                   "runs/experiment-diffusion-TASK)")
    g.add_argument("--quiet", action="store_true", help="no progress bars or stage lines")
    _add_image_options(e)
    e.set_defaults(run=_diffusion_experiment, methods=",".join(METHODS))


def _diffusion_experiment(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from .experiments.diffusion import Study, run

    _quiet_libraries()
    out = Path(args.out or f"runs/experiment-diffusion-{args.task}")
    study = Study(task=args.task, seed=args.data_seed,
                  job=_image_config(args, out=str(out / "run"), top=3))
    if args.quick:
        from .jobs.runs import main_first
        from .models.diffusion import tiny_digit_pipeline

        with main_first(study.job.process_group):  # built once, by rank 0 under torchrun
            pipeline = tiny_digit_pipeline(out / "tiny-pipeline")
        q = DIFFUSION_QUICK
        study = replace(study, per_class_train=q["per_class_train"], quick=True,
                        per_class_test=q["per_class_test"], classes=q["classes"],
                        job=replace(study.job, pipeline=str(pipeline), epochs=q["epochs"],
                            batch_size=q["batch_size"], timesteps=q["timesteps"],
                            sampling_steps=q["sampling_steps"]))
    run(study)
    if _main_rank(args):
        print(f"datainf: experiment diffusion ({args.task}) done; report: {out}/report.html")


def _add_run_options(d: argparse.ArgumentParser, *, single_run: bool) -> None:
    """The data, model and scoring options of one detect-mislabeled run; ``single_run=False``
    leaves out what an experiment sets per cell (adapter, LoRA rank and alpha, seed, methods)."""
    from .data.text import BUILTIN_DATASETS, DEFAULT_DATASET
    from .jobs.detect_mislabeled import DEMO_NOISE
    from .jobs.detect_mislabeled import Config as C

    def sizes(what: str) -> str:  # "900 of bbc-news, 2000 of rotten-tomatoes"
        return ", ".join(f"{getattr(b, what)} of {n}" for n, b in BUILTIN_DATASETS.items())

    g = d.add_argument_group("data")
    g.add_argument("--data", help="training data: a .csv, .tsv, .jsonl or .parquet file, "
                   "a Hugging Face dataset NAME[:CONFIG] (online; its validation split is used) "
                   f"or a built-in corpus: {', '.join(BUILTIN_DATASETS)} (default: "
                   f"{DEFAULT_DATASET})")
    g.add_argument("--text-column", action="append",
                   help="text column (give twice for sentence pairs; default: text)")
    g.add_argument("--label-column", default=C.label_column, help="label column")
    g.add_argument("--id-column", help="column of record ids, shown next to each example "
                   "(default: the column 'id' when there is one)")
    g.add_argument("--val-data", help="validation file (default: a share of --data)")
    g.add_argument("--val-fraction", type=float, default=C.val_fraction,
                   help="share of --data held out for validation when there is no --val-data")
    g.add_argument("--train-size", type=int,
                   help=f"training examples drawn (default: {sizes('train_size')}; all of "
                   "a file)")
    g.add_argument("--val-size", type=int,
                   help=f"validation examples drawn (default: {sizes('val_size')}; "
                   "--val-fraction of a file)")
    g.add_argument("--noise", type=float, default=C.noise,
                   help="share of the training labels flipped on purpose to measure detection "
                   f"(default: {DEMO_NOISE:g} on the built-in corpora, 0 on your --data)")
    m = d.add_argument_group("model")
    m.add_argument("--model", default=C.model,
                   help="'minilm' (shipped), a HF model folder or hub name")
    if single_run:
        m.add_argument("--adapter", help="an existing PEFT adapter folder (skips fine-tuning)")
        m.add_argument("--lora-r", type=int, default=C.lora_r, help="LoRA rank")
        m.add_argument("--lora-alpha", type=int, default=C.lora_alpha, help="LoRA alpha")
    m.add_argument("--lora-targets", default=",".join(C.lora_targets),
                   help="modules that get LoRA (comma-separated); the head is trained too")
    m.add_argument("--epochs", type=int, default=C.epochs,
                   help="fine-tuning epochs (one round, linear learning-rate decay)")
    m.add_argument("--max-epochs", type=int, default=C.max_epochs,
                   help="while the model is still weak on the validation set after a round, "
                   "another round follows at 3x the learning rate, up to this many epochs in "
                   "all")
    m.add_argument("--patience", type=int, default=C.patience,
                   help="stop fine-tuning once the validation loss has not improved for this "
                   "many epochs and keep the best epoch's adapter (0: run every epoch)")
    m.add_argument("--batch-size", type=int, default=C.batch_size, help="examples per batch")
    m.add_argument("--learning-rate", type=float, help=f"AdamW (default: {C.learning_rate:g}"
                   + "".join(f"; {b.learning_rate:g} on {n}" for n, b in BUILTIN_DATASETS.items()
                             if b.learning_rate) + ")")
    m.add_argument("--max-length", type=int, default=C.max_length, help="tokens per text")
    m.add_argument("--device", default=C.device, help="cpu, cuda, cuda:1, ...")
    if single_run:
        m.add_argument("--seed", type=int, default=C.seed,
                       help="seed of the split, the noise, LoRA and the head")
    s = d.add_argument_group("scoring")
    if single_run:
        s.add_argument("--methods", default=",".join(C.methods),
                       help="comma-separated; the training loss and gradient norm are always "
                       "shown; also datainf_normalized and cosine (variants of ours: gradients "
                       "scaled to unit norm first)")
    s.add_argument("--blocks", help="regular expression: only the matching gradient blocks "
                   "count (e.g. 'classifier' or 'layer\\.5\\.')")
    s.add_argument("--grouping", choices=("tensor", "module"), default=C.grouping,
                   help="one block per LoRA tensor (the paper's) or per module (A and B "
                   "together)")
    s.add_argument("--damping", type=float, default=C.damping, help=DAMPING_HELP)
    s.add_argument("--damping-rule", default=C.damping_rule, metavar="{relative,absolute}",
                   help=DAMPING_RULE_HELP)


def main(argv: list[str] | None = None) -> int:
    """Runs one command. Exit status: 0 done, 2 bad input or settings (one line on stderr),
    1 a problem of the machine (disk full, no permission: one line) or a bug (a traceback),
    130 interrupted."""
    args = build_parser().parse_args(argv)
    try:
        _join_torchrun(args)
        args.run(args)
        _finish_together(args)
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
    finally:
        _leave_torchrun(args)
    return 0


# the commands that run on several processes under torchrun
TORCHRUN_COMMANDS = ("detect-mislabeled", "explain-generation", "explain-image", "experiment",
                     "demo")


def _join_torchrun(args: argparse.Namespace) -> None:
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL for --device cuda, each
    rank on GPU LOCAL_RANK; gloo on CPUs) for the command to share its work; ranks other
    than 0 stay quiet (rank 0 reports)."""
    from .distributed import (
        init_from_environment,
        launched_by_torchrun,
        rank_device,
        world,
    )

    if not launched_by_torchrun():
        return
    if args.command not in TORCHRUN_COMMANDS:
        raise DataInfError(
            f"`datainf {args.command}` does not run on several processes yet (it would do the "
            f"same work on each); run it as one process, or use one of "
            f"{', '.join(TORCHRUN_COMMANDS)} under torchrun")
    device = getattr(args, "device", "cpu")
    args.process_group = init_from_environment(device)
    args.device = rank_device(device)
    if world(args.process_group)[0] > 0:
        args.quiet = True


def _main_rank(args: argparse.Namespace) -> bool:
    """Whether this process reports: rank 0 under torchrun, or the only process."""
    from .distributed import world

    return world(getattr(args, "process_group", None))[0] == 0


def _finish_together(args: argparse.Namespace) -> None:
    """Under torchrun, wait until every rank has finished before any leaves the group: a rank
    that tore down its connections while another still held them was seen to abort (SIGABRT,
    "terminate called without an active exception"). Only after success: a failed rank leaves
    at once and torchrun stops the others."""
    if getattr(args, "process_group", None) is not None:
        import torch.distributed as dist

        dist.barrier(group=args.process_group)


def _leave_torchrun(args: argparse.Namespace) -> None:
    """Leave the process group joined by :func:`_join_torchrun`."""
    if getattr(args, "process_group", None) is not None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
