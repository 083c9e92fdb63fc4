"""datainf side by side with pyDVL, dattri, kronfluence, bergson and cleanlab, in one run.

On the same per-example gradients: equality where the mathematics is the same, and the speed
of the influence step; on the same fine-tuned model: the time and detection AUC of finding the
mislabeled examples.

    .venv/bin/python benchmarks/peers/compare.py            # installs the peers, every set
    .venv/bin/python benchmarks/peers/compare.py --quick    # the equality checks at CI size

Each peer runs in its own environment (benchmarks/peers/install.sh) through a small runner
(run_PEER.py) that feeds it our gradients through a model whose per-example gradients are
exactly them (gradient_model.py). Everything is float64, so equal mathematics gives equal
numbers to rounding (the quick and bbc sets; qqp is float32). Sets:

- ``quick``: generated, n = 200 training and m = 20 test rows, blocks of 64, 48 and 16;
- ``bbc``: the default detect-mislabeled run's stores (runs/detect-mislabeled: MiniLM-L6 +
  LoRA r 4 on BBC News, n = 900, m = 100 validation examples), when that run exists;
- ``qqp``: generated at the paper's QQP size, n = 4500, 48 blocks of 4096, m = 100, in
  float32 everywhere (3.5 GB a copy; DataInf only: the speed of the influence step). pyDVL
  only: dattri's DataInf at this size runs out of 24 GB with the training rows in one batch and
  takes ~95 min in batches (run it with ``--sets qqp --peers dattri``);
- ``pipeline``: the whole-pipeline peers on the default detect-mislabeled run: cleanlab's K-fold
  out-of-fold label quality against our whole pipeline, fine-tuning included (run_cleanlab.py;
  where runs/detect-mislabeled is missing, the run of ours it times becomes it), then
  kronfluence's EK-FAC and bergson's projected gradient cosine against our influence step on
  the same adapter (run_kronfluence.py, run_bergson.py).

Conventions, reconciled here (each comparison is after these documented factors only; the
factor measured by least squares is printed beside it):
- sign: ours is positive = harmful (up-weighting raises the test loss); pyDVL's "up"
  influence and dattri's attribution are positive = helpful: theirs = -ours;
- scale: pyDVL's InverseHarmonicMeanInfluence (its DataInf) comes out as -ours / n, n the
  training examples of the batch it is fitted on (one batch here), the same factor for every
  entry: rankings are unchanged, magnitudes are n times smaller. Its Exact and LiSSA, and
  dattri's DataInf and explicit inverse, have no such factor;
- damping: ours is lambda_l = 0.1 x the block's mean squared entry; pyDVL takes one absolute
  lambda per block (given ours); dattri one lambda for all blocks, so its comparisons use
  one absolute lambda on our side too (Damping(absolute=...)).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
WORK = HERE / "work"
PEERS = ("pydvl", "dattri", "kronfluence", "bergson", "cleanlab")
GRADIENT_PEERS = ("pydvl", "dattri")
QQP_PEERS = ("pydvl",)  # dattri: ~95 min at this size (see above)
RUN = ROOT / "runs" / "detect-mislabeled"
FOLDS = 5  # cleanlab's default cv_n_folds
# whole-pipeline peer -> (what it runs, what of ours it is timed against)
PIPELINE = {  # in this order: cleanlab's runner makes the default run where it is missing
    "cleanlab": (f"{FOLDS}-fold out-of-fold LoRA fine-tunes + label quality",
                 "whole pipeline: `datainf detect-mislabeled`"),
    "kronfluence": ("EK-FAC factors + pairwise scores (its default damping)",
                    "influence step: gradients + DataInf"),
    "bergson": ("gradients projected to 16 x 16 a module, cosine with the mean validation "
                "gradient", "influence step: gradients + DataInf"),
}
PEER_METHODS = {"pydvl": ("datainf", "exact", "lissa"), "dattri": ("datainf", "exact", "lissa")}
# (peer, method) -> (how theirs relates to ours, the factor f(n) with theirs = f(n) x ours)
CONVENTIONS = {("pydvl", "datainf"): ("-ours / n", lambda n: -1.0 / n)}
OPPOSITE = ("-ours", lambda n: -1.0)


def generated(n: int, m: int, widths: dict[str, int], seed: int,
              dtype: torch.dtype = torch.float64) -> tuple[dict, dict]:
    """Training and test gradients with uneven row norms."""
    g = torch.Generator().manual_seed(seed)

    def rows(k: int) -> dict[str, torch.Tensor]:
        scale = torch.rand(k, 1, generator=g, dtype=torch.float64) * 2 + 0.1
        return {name: (torch.randn(k, d, generator=g, dtype=torch.float64) * scale).to(dtype)
                for name, d in widths.items()}

    return rows(n), rows(m)


def from_run(run: Path) -> tuple[dict, dict]:
    """The train and validation stores of a detect-mislabeled run, in float64."""
    from datainf.gradients.store import GradientStore

    stores = [GradientStore.open(run / "gradients" / split) for split in ("train", "val")]
    return tuple({name: s.read_block(name).double().clone() for name in s.block_names}
                 for s in stores)


def ours(method: str, train: dict, test: dict, damping: dict, lissa_scale: float | None):
    """(our (m, n) scores, seconds of fit + score, the fitted estimator). LiSSA: one scale for
    every block, up to 2000 passes, stopping at a residual of 1e-10."""
    from datainf import Damping, DataInf, Exact, LiSSA

    kwargs = {"damping": Damping(per_block=damping), "progress": False}
    est = {"datainf": lambda: DataInf(**kwargs), "exact": lambda: Exact(**kwargs),
           "lissa": lambda: LiSSA(**kwargs, max_iterations=2000, tol=1e-10,
                                  scale=lissa_scale)}[method]()
    start = time.perf_counter()
    scores = est.fit(train).score(test)
    return scores, time.perf_counter() - start, est


def peer(name: str, dataset: dict, label: str) -> dict:
    """Run ``name``'s runner on ``dataset`` in its environment; its results."""
    source, out = WORK / f"{label}-{name}-in.pt", WORK / f"{label}-{name}-out.pt"
    torch.save(dataset, source)
    python = HERE / ".venvs" / name / "bin" / "python"
    subprocess.run([str(python), str(HERE / f"run_{name}.py"), str(source), str(out)],
                   check=True)
    source.unlink()  # 3.5 GB at the QQP size
    return torch.load(out)


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Pearson, Spearman and the largest difference relative to the largest |score|."""
    from datainf.metrics import pearson, spearman

    x, y = a.flatten().numpy(), b.flatten().numpy()
    return {"pearson": pearson(x, y), "spearman": spearman(x, y),
            "max_rel_diff": float(np.abs(x - y).max() / np.abs(y).max())}


def run_set(label: str, train: dict, test: dict, peers: tuple[str, ...], methods: dict,
            rows: list[dict]) -> None:
    from datainf.methods import DataInf

    widths = {k: v.shape[1] for k, v in train.items()}
    n, m = len(next(iter(train.values()))), len(next(iter(test.values())))
    per_block = DataInf(progress=False).fit(train).damping_  # our rule, resolved
    one = float(np.mean(list(per_block.values())))  # a single lambda, for dattri
    print(f"\n{label}: n = {n}, m = {m}, {len(widths)} blocks, {sum(widths.values())} "
          "parameters")
    for name in (p for p in peers if p in PEER_METHODS):
        single = name == "dattri"
        damping = {k: one for k in per_block} if single else per_block
        wanted = [x for x in methods.get(name, ()) if x in PEER_METHODS[name]]
        if not wanted:
            continue
        scale = None
        if "lissa" in wanted:  # one scale both use: 1.1 x the largest eigenvalue, any block
            from datainf.methods import LiSSA

            scale = max(LiSSA(damping=damping, progress=False).fit(train).scale_.values())
        mine = {method: ours(method, train, test, damping, scale) for method in wanted}
        # dattri's LiSSA runs a fixed depth: as many passes as ours needed to reach 1e-10
        # (pyDVL stops at its own tolerance, up to 2000)
        iterations = (max(c.iterations for c in mine["lissa"][2].convergence_.values())
                      if "lissa" in mine else None)
        dtype = next(iter(train.values())).dtype
        dataset = {"train": train, "test": test, "damping": damping, "methods": wanted,
                   "dtype": str(dtype).removeprefix("torch."), "lissa_iterations": iterations,
                   "lissa_max_iterations": 2000, "lissa_scale": scale}
        theirs = peer(name, dataset, label)
        for method in wanted:
            scores, seconds, _ = mine[method]
            raw = theirs[method]["scores"]
            relation, factor = CONVENTIONS.get((name, method), OPPOSITE)
            measured = float((raw * scores).sum() / (scores * scores).sum())
            found = compare(raw / factor(n), scores)
            row = {"set": label, "peer": name, "method": method, "relation": relation,
                   "measured_factor": measured, "factor": factor(n),
                   "damping": "one lambda" if single else "per block", **found,
                   "our_seconds": seconds, "peer_seconds": theirs[method]["seconds"]}
            rows.append(row)
            print(f"  {name} {method}: theirs = {relation} (factor {factor(n):.6g}, measured "
                  f"{measured:.6g}), Pearson {found['pearson']:.9f}, "
                  f"Spearman {found['spearman']:.9f}, max rel diff {found['max_rel_diff']:.2e}; "
                  f"{theirs[method]['seconds']:.3f} s vs ours {seconds:.3f} s "
                  f"({theirs[method]['seconds'] / seconds:.1f}x)")


def ensure_run(run: Path) -> None:
    """The default detect-mislabeled run at ``run``, made now if it is not there."""
    if (run / "summary.json").exists():
        return
    print(f"\nno finished run at {run}: running the default detect-mislabeled first")
    subprocess.run([sys.executable, "-m", "datainf", "detect-mislabeled", "--out", str(run),
                    "--quiet"], check=True)


def run_pipeline(run: Path, peers: tuple[str, ...], rows: list[dict]) -> None:
    """Each whole-pipeline peer's runner on ``run``, in its environment; a row each."""
    for name in (p for p in PIPELINE if p in peers):
        if name != "cleanlab":
            ensure_run(run)
        out = WORK / f"pipeline-{name}.json"
        python = HERE / ".venvs" / name / "bin" / "python"
        extra = [str(FOLDS)] if name == "cleanlab" else []
        log = WORK / f"pipeline-{name}.log"
        print(f"\npipeline: {name} (its output: {log.relative_to(ROOT)}) ...", flush=True)
        with log.open("w") as sink:
            done = subprocess.run([str(python), str(HERE / f"run_{name}.py"), str(run),
                                   str(out), *extra], stdout=sink, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            sys.exit(f"{name}'s runner failed (exit {done.returncode}); the end of its "
                     f"output:\n{log.read_text()[-3000:]}")
        result = json.loads(out.read_text())
        what, ours_what = PIPELINE[name]
        row = {"peer": name, "what": what, "peer_seconds": result[name]["seconds"],
               "peer_auc": result[name]["auc"], "ours": ours_what,
               "our_seconds": result["ours"]["seconds"], "our_auc": result["ours"]["auc"]}
        rows.append(row)
        print(f"  {name}: {row['peer_seconds']:.1f} s, AUC {row['peer_auc']:.3f}; ours "
              f"{row['our_seconds']:.1f} s, AUC {row['our_auc']:.3f} "
              f"({row['peer_seconds'] / row['our_seconds']:.2f}x)")


def markdown(columns: dict[str, str], rows: list[dict]) -> str:
    """A markdown table: ``columns`` maps each header to a format string of a row's fields."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(f.format(**r, ratio=r["peer_seconds"] / r["our_seconds"])
                                for f in columns.values()) + " |" for r in rows]
    return "\n".join(lines) + "\n"


GRADIENT_TABLE = {"set": "{set}", "peer": "{peer}", "method": "{method}",
                  "theirs =": "{relation}", "damping": "{damping}", "Pearson": "{pearson:.9f}",
                  "max rel. diff": "{max_rel_diff:.1e}", "peer s": "{peer_seconds:.3f}",
                  "our s": "{our_seconds:.3f}", "peer / ours": "{ratio:.1f}x"}
PIPELINE_TABLE = {"peer": "{peer}", "what it runs": "{what}", "peer s": "{peer_seconds:.1f}",
                  "peer AUC": "{peer_auc:.3f}", "ours, timed": "{ours}",
                  "our s": "{our_seconds:.1f}", "our AUC": "{our_auc:.3f}",
                  "peer / ours": "{ratio:.2f}x"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the equality checks only, small")
    parser.add_argument("--peers", help=f"some of {','.join(PEERS)} (default: all; the qqp "
                        f"set then runs {','.join(QQP_PEERS)} only)")
    parser.add_argument("--sets", default="quick,bbc,qqp,pipeline",
                        help="which comparison sets")
    parser.add_argument("--no-install", action="store_true",
                        help="use the peers' environments as they are")
    args = parser.parse_args()
    sets = ("quick",) if args.quick else tuple(args.sets.split(","))
    peers = tuple(args.peers.split(",")) if args.peers else PEERS
    if unknown := set(peers) - set(PEERS):
        parser.error(f"unknown peers {sorted(unknown)}; choose from {','.join(PEERS)}")
    if args.quick or "pipeline" not in sets:
        peers = tuple(p for p in peers if p in GRADIENT_PEERS)
    if not args.no_install:
        subprocess.run(["bash", str(HERE / "install.sh"), *peers], check=True)
    WORK.mkdir(exist_ok=True)
    started = time.perf_counter()
    rows: list[dict] = []
    everything = {p: PEER_METHODS[p] for p in GRADIENT_PEERS}
    if "quick" in sets:
        train, test = generated(200, 20, {"a": 64, "b": 48, "c": 16}, seed=0)
        run_set("quick", train, test, peers, everything, rows)
    pipeline: list[dict] = []
    if "pipeline" in sets:  # cleanlab first: where RUN is missing, its run of ours makes it
        run_pipeline(RUN, peers, pipeline)
    if "bbc" in sets:
        ensure_run(RUN)
        run_set("bbc", *from_run(RUN), peers, {p: ("datainf", "exact") for p in peers}, rows)
    if "qqp" in sets:
        widths = {f"layer{i}.lora_{ab}": 4096 for i in range(24) for ab in "AB"}
        train, test = generated(4500, 100, widths, seed=1, dtype=torch.float32)
        qqp_peers = peers if args.peers else QQP_PEERS
        run_set("qqp", train, test, qqp_peers, {p: ("datainf",) for p in peers}, rows)
        del train, test
    table = markdown(GRADIENT_TABLE, rows)
    if pipeline:
        table += "\n" + markdown(PIPELINE_TABLE, pipeline)
    (WORK / "peers.md").write_text(table)
    print("\n" + table)
    print(f"everything above: {time.perf_counter() - started:.0f} s "
          "(installation not counted)")
    bad = [r for r in rows if r["max_rel_diff"] > 1e-5]
    if bad:
        print("NOT EQUAL to 1e-5: " + ", ".join(f"{r['set']} {r['peer']} {r['method']}"
                                                for r in bad))
        sys.exit(1)


if __name__ == "__main__":
    main()
