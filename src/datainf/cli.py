"""The ``datainf`` command. Errors become one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import sys
import warnings

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="datainf",
        description="Influence of training examples on LoRA fine-tuned models (DataInf).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the four estimators on generated gradients (seconds)")
    demo.add_argument("--n-train", type=int, default=2000)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except DataInfError as error:
        print(f"datainf: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("datainf: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
