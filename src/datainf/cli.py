"""The ``datainf`` command: its parser is made from the jobs' Config dataclasses (each
setting's option declared beside it: :mod:`datainf.options`) and the registered studies
(:data:`datainf.experiments.EXPERIMENTS`). Errors become one line on stderr and a non-zero
exit."""

from __future__ import annotations

import argparse
import sys
import traceback
import warnings
from typing import NoReturn

import torch.distributed as dist
import transformers

from . import __version__
from .demo import run_demo
from .distributed import init_from_environment, launched_by_torchrun, rank_device, world
from .errors import DataInfError
from .experiments import EXPERIMENTS
from .jobs import detect_mislabeled, explain_generation, explain_image
from .options import add_options, command_line, settings_of

JOBS = {job.COMMAND.name: job for job in (detect_mislabeled, explain_generation, explain_image)}


def _demo(args: argparse.Namespace) -> None:
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
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def _job(args: argparse.Namespace) -> None:
    """One job (detect-mislabeled, explain-generation, explain-image) on its options."""
    command = JOBS[args.command].COMMAND
    _quiet_libraries()
    config = command.build(**settings_of(args, command.config, command.layout),
                           process_group=getattr(args, "process_group", None))
    summary = JOBS[args.command].run(config)
    if summary is not None:  # None: a rank of a torchrun run other than 0 (rank 0 reports)
        print(DONE[args.command](summary, config))


def _detected(summary: dict, config) -> str:
    best = {k: v for k, v in summary["methods"].items() if "auc" in v}
    line = ", ".join(f"{v['label']} {v['auc']:.3f}" for v in best.values())
    flipped = summary.get("n_flipped")
    return (f"datainf: {summary['n_train']} training examples scored"
            + (f" ({flipped} labels flipped on purpose by --noise {config.noise:g}, to measure "
               "detection; --noise 0 ranks your labels as given)" if flipped else "") + "; "
            + (f"AUC of finding them: {line}; " if line else "")
            + f"report: {config.out}/report.html")


DONE = {  # what each job says when it has finished
    "detect-mislabeled": _detected,
    "explain-generation": lambda s, c: f"datainf: {s['n_train']} training examples scored "
    f"against {s['n_queries']} queries; report: {c.out}/report.html",
    "explain-image": lambda s, c: f"datainf: {s['n_train']} training images scored against "
    f"{s['n_queries']} queries; report: {c.out}/report.html",
}


def _experiment(args: argparse.Namespace) -> None:
    """One registered study on its own options and those of the pipeline it runs."""
    study = EXPERIMENTS[args.experiment]
    _quiet_libraries()
    own = {flag[2:].replace("-", "_"): None for flag, _ in study.options}
    own = {dest: getattr(args, dest) for dest in own}
    out = study.start(settings_of(args, study.config, study.layout), **own,
                      process_group=getattr(args, "process_group", None))
    if _main_rank(args):
        task = f" ({own['task']})" if "task" in own else ""
        print(f"datainf: experiment {args.experiment}{task} done; report: {out}/report.html")


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


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="datainf",
        description="Influence of training examples on LoRA fine-tuned models (DataInf).",
    )
    parser.add_argument("--version", action="version", version=f"datainf {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the four estimators on generated gradients (seconds)",
                          formatter_class=Help,
                          description="DataInf, Exact, LiSSA and Hessian-free on the "
                          "per-example gradients of a softmax regression trained on generated "
                          "clusters with flipped labels: the AUC of each for finding them.")
    demo.add_argument("--n-train", type=int, default=2000, help="training examples generated")
    demo.add_argument("--seed", type=int, default=0, help="seed of the data and the flips")
    demo.set_defaults(handler=_demo)

    for job in JOBS.values():
        command = job.COMMAND
        p = sub.add_parser(command.name, help=command.help, formatter_class=Help,
                           description=command.description, epilog=command.epilog)
        add_options(p, command.config, command.layout)
        p.set_defaults(handler=_job)

    x = sub.add_parser("experiment", help="the paper's studies: approximation, mislabeled, "
                       "generation, diffusion; and removal",
                       description="The DataInf paper's experiments: approximation, "
                       "mislabeled and removal on the detect-mislabeled pipeline over LoRA ranks "
                       "and runs (seeds); generation on the explain-generation pipeline; "
                       "diffusion on the explain-image pipeline.")
    xs = x.add_subparsers(dest="experiment", required=True)
    for study in EXPERIMENTS.values():
        e = xs.add_parser(study.name, help=study.help.replace("%", "%%"),  # help is %-formatted
                          description=study.description, formatter_class=Help)
        g = e.add_argument_group("experiment")
        for flag, kwargs in study.options:
            g.add_argument(flag, **kwargs)
        add_options(e, study.config, study.layout, study.helps)
        e.set_defaults(handler=_experiment, **study.defaults)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs one command. Exit status: 0 done, 2 bad input or settings (one line on stderr),
    1 a problem of the machine (disk full, no permission: one line) or a bug (a traceback),
    130 interrupted."""
    args = build_parser().parse_args(argv)
    try:
        _join_torchrun(args)
        with command_line():  # messages name the options the user typed
            args.handler(args)
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
    return world(getattr(args, "process_group", None))[0] == 0


def _finish_together(args: argparse.Namespace) -> None:
    """Under torchrun, wait until every rank has finished before any leaves the group: a rank
    that tore down its connections while another still held them was seen to abort (SIGABRT,
    "terminate called without an active exception"). Only after success: a failed rank leaves
    at once and torchrun stops the others."""
    if getattr(args, "process_group", None) is not None:
        dist.barrier(group=args.process_group)


def _leave_torchrun(args: argparse.Namespace) -> None:
    """Leave the process group joined by :func:`_join_torchrun`."""
    if getattr(args, "process_group", None) is not None:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
