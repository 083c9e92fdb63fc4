"""datainf side by side with the peers, on the same per-example gradients: equality where the
mathematics is the same, and the speed of the influence step.

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
  float32 everywhere (3.5 GB a copy; DataInf only: the speed of the influence step).

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
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
WORK = HERE / "work"
PEERS = ("pydvl", "dattri")
PEER_METHODS = {"pydvl": ("datainf", "exact", "lissa"), "dattri": ("datainf", "exact")}
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


def from_run(run: Path) -> tuple[dict, dict] | None:
    """The train and validation stores of a detect-mislabeled run, in float64."""
    from datainf.gradients.store import GradientStore

    if not (run / "gradients" / "val" / "manifest.json").exists():
        return None
    stores = [GradientStore.open(run / "gradients" / split) for split in ("train", "val")]
    return tuple({name: s.read_block(name).double().clone() for name in s.block_names}
                 for s in stores)


def ours(method: str, train: dict, test: dict, damping: dict, lissa: dict) -> tuple:
    """(our (m, n) scores, seconds of fit + score)."""
    from datainf import Damping, DataInf, Exact, LiSSA

    kwargs = {"damping": Damping(per_block=damping), "progress": False}
    est = {"datainf": lambda: DataInf(**kwargs), "exact": lambda: Exact(**kwargs),
           "lissa": lambda: LiSSA(**kwargs, max_iterations=lissa["iterations"], tol=1e-10,
                                  scale=lissa["scale"])}[method]()
    start = time.perf_counter()
    scores = est.fit(train).score(test)
    return scores, time.perf_counter() - start


def peer(name: str, dataset: dict, label: str) -> dict:
    """Run ``name``'s runner on ``dataset`` in its environment; its results."""
    source, out = WORK / f"{label}-{name}-in.pt", WORK / f"{label}-{name}-out.pt"
    torch.save(dataset, source)
    python = HERE / ".venvs" / name / "bin" / "python"
    subprocess.run([str(python), str(HERE / f"run_{name}.py"), str(source), str(out)],
                   check=True)
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
    for name in peers:
        single = name == "dattri"
        damping = {k: one for k in per_block} if single else per_block
        wanted = [x for x in methods.get(name, ()) if x in PEER_METHODS[name]]
        if not wanted:
            continue
        lissa = {"iterations": 2000, "scale": None}
        if "lissa" in wanted:  # one scale both use: 1.1 x the largest eigenvalue, any block
            from datainf.methods import LiSSA

            est = LiSSA(damping=damping, progress=False).fit(train)
            lissa["scale"] = max(est.scale_.values())
        dtype = next(iter(train.values())).dtype
        dataset = {"train": train, "test": test, "damping": damping, "methods": wanted,
                   "dtype": str(dtype).removeprefix("torch."),
                   "lissa_iterations": lissa["iterations"], "lissa_scale": lissa["scale"]}
        theirs = peer(name, dataset, label)
        for method in wanted:
            mine, seconds = ours(method, train, test, damping,
                                 {"iterations": lissa["iterations"],
                                  "scale": {k: lissa["scale"] for k in damping}})
            raw = theirs[method]["scores"]
            relation, factor = CONVENTIONS.get((name, method), OPPOSITE)
            measured = float((raw * mine).sum() / (mine * mine).sum())
            found = compare(raw / factor(n), mine)
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


def markdown(rows: list[dict]) -> str:
    lines = ["| set | peer | method | theirs = | damping | Pearson | max rel. diff "
             "| peer s | our s | peer / ours |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['set']} | {r['peer']} | {r['method']} | {r['relation']} | "
                     f"{r['damping']} | {r['pearson']:.9f} | {r['max_rel_diff']:.1e} | "
                     f"{r['peer_seconds']:.3f} | {r['our_seconds']:.3f} | "
                     f"{r['peer_seconds'] / r['our_seconds']:.1f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the equality checks only, small")
    parser.add_argument("--peers", default=",".join(PEERS))
    parser.add_argument("--sets", default="quick,bbc,qqp", help="which comparison sets")
    parser.add_argument("--no-install", action="store_true",
                        help="use the peers' environments as they are")
    args = parser.parse_args()
    peers = tuple(args.peers.split(","))
    if not args.no_install:
        subprocess.run(["bash", str(HERE / "install.sh"), *peers], check=True)
    WORK.mkdir(exist_ok=True)
    rows: list[dict] = []
    everything = {p: PEER_METHODS[p] for p in peers}
    sets = ("quick",) if args.quick else tuple(args.sets.split(","))
    if "quick" in sets:
        train, test = generated(200, 20, {"a": 64, "b": 48, "c": 16}, seed=0)
        run_set("quick", train, test, peers, everything, rows)
    if "bbc" in sets:
        bbc = from_run(ROOT / "runs" / "detect-mislabeled")
        if bbc is None:
            print("\nbbc: skipped (no runs/detect-mislabeled: run `make run` first)")
        else:
            run_set("bbc", *bbc, peers, {p: ("datainf", "exact") for p in peers}, rows)
    if "qqp" in sets:
        widths = {f"layer{i}.lora_{ab}": 4096 for i in range(24) for ab in "AB"}
        train, test = generated(4500, 100, widths, seed=1, dtype=torch.float32)
        run_set("qqp", train, test, peers, {p: ("datainf",) for p in peers}, rows)
    table = markdown(rows)
    (WORK / "peers.md").write_text(table)
    print("\n" + table)
    bad = [r for r in rows if r["max_rel_diff"] > 1e-5]
    if bad:
        print("NOT EQUAL to 1e-5: " + ", ".join(f"{r['set']} {r['peer']} {r['method']}"
                                                for r in bad))
        sys.exit(1)


if __name__ == "__main__":
    main()
