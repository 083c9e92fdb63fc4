"""The paper's experiments as commands: --quick runs end to end on the shipped MiniLM and BBC
News, numbers that follow from the cached stores, the cache shared between experiments, an
interrupted experiment going on, and bad settings refused in one line."""

import json

import numpy as np
import pandas as pd
import pytest
from cli_helpers import common

from datainf import DataInf, Exact
from datainf.cli import main
from datainf.gradients.store import GradientStore
from datainf.metrics import pearson


def experiment(name, tmp_path, *args):
    return main(["experiment", name, "--quiet", "--out", str(tmp_path / name), "--cache",
                 str(tmp_path / "cache"), *map(str, args)])


def adapters(cache):
    """Every cached adapter file with its modification time."""
    return {p: p.stat().st_mtime_ns for p in cache.glob("*/adapter/adapter_model.safetensors")}


@pytest.mark.slow
def test_quick_runs_share_the_cache(tmp_path):
    """approximation --quick at rank 4, then mislabeled --quick (rank 4): the second trains
    nothing; the numbers follow from the cached gradient stores."""
    assert experiment("approximation", tmp_path, "--quick", "--ranks", "4") == 0
    summary = json.loads((tmp_path / "approximation" / "summary.json").read_text())
    table = pd.read_csv(tmp_path / "approximation" / "approximation.csv")
    assert summary["ranks"] == [4] and summary["runs"] == 2 and summary["quick"] is True
    from datainf.experiments.common import QUICK_NOTE

    assert QUICK_NOTE in (tmp_path / "approximation" / "report.html").read_text()
    for stats in summary["per_rank"]["4"].values():  # intervals inside [-1, 1] and [0, 1]
        assert all(-1 <= stats[k][e] <= 1 for k in ("pearson", "spearman") for e in
                   ("low", "high"))
        assert 0 <= stats["top10_overlap"]["low"] <= stats["top10_overlap"]["high"] <= 1
    assert len(table) == 2 * 5 and set(table["method"]) == {
        "datainf", "lissa", "hessian_free", "datainf_normalized", "cosine"}
    assert table[["pearson", "spearman"]].abs().le(1 + 1e-12).all().all()
    assert table["top10_overlap"].between(0, 1).all()
    # the Pearson correlation of a cell, recomputed from its cached stores
    cache = tmp_path / "cache"
    cell = sorted(cache.glob("r4-s0-*"))[0]
    train, val = (GradientStore.open(cell / "gradients" / s) for s in ("train", "val"))
    expected = pearson(DataInf().fit(train).score(val, aggregate=True),
                       Exact().fit(train).score(val, aggregate=True))
    got = table.query("seed == 0 and method == 'datainf'")["pearson"].item()
    assert got == pytest.approx(expected, rel=1e-6)
    first = adapters(cache)
    assert len(first) == 2
    assert experiment("mislabeled", tmp_path, "--quick") == 0
    assert adapters(cache) == first  # shared: nothing trained again
    summary = json.loads((tmp_path / "mislabeled" / "summary.json").read_text())
    assert set(summary["auc"]) == {"datainf", "exact", "lissa", "hessian_free", "datainf_self",
                                   "cosine", "less", "repsim", "loss", "grad_norm"}
    assert summary["auc"]["datainf"]["n"] == 2
    assert {"exact_over_datainf", "lissa_over_datainf"} <= set(summary["ratios"])
    table = pd.read_csv(tmp_path / "mislabeled" / "mislabeled.csv")
    assert table["auc"].between(0, 1).all() and len(table) == 2 * 10
    for name in ("approximation", "mislabeled"):
        page = (tmp_path / name / "report.html").read_text()
        assert page.count("data:image/png;base64,") >= 2


def test_interrupted_experiment_goes_on(tiny_model, csv_file, tmp_path, monkeypatch, capsys):
    import datainf.experiments.approximation as approximation

    args = ["--data", csv_file, *common(tiny_model, "unused")[:2], "--epochs", "1",
            "--max-epochs", "1", "--max-length", "16", "--runs", "2", "--ranks", "1"]
    calls = []
    original = approximation.scores_of

    def interrupted(config, p):
        calls.append(config.seed)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(config, p)

    monkeypatch.setattr(approximation, "scores_of", interrupted)
    assert experiment("approximation", tmp_path, *args) == 130
    assert not (tmp_path / "approximation" / "summary.json").exists()
    done = adapters(tmp_path / "cache")
    assert len(done) == 2  # both cells were prepared; the second was interrupted in scoring
    monkeypatch.setattr(approximation, "scores_of", original)
    assert experiment("approximation", tmp_path, *args) == 0
    assert adapters(tmp_path / "cache") == done
    assert len(pd.read_csv(tmp_path / "approximation" / "approximation.csv")) == 2 * 5


@pytest.mark.parametrize("option, value, message", [
    ("--ranks", "0", "--ranks must be positive integers"),
    ("--ranks", "one,two", "--ranks takes comma-separated integers"),
    ("--runs", "0", "--runs must be at least 1"),
])
def test_bad_settings(tmp_path, capsys, option, value, message):
    assert experiment("mislabeled", tmp_path, "--quick", option, value) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "cache").exists()


def test_intervals_in_the_summary_follow_mean_interval():
    from datainf.experiments.common import interval
    from datainf.metrics import mean_interval

    values = [0.61, 0.72, 0.55, 0.68]
    mean, low, high = mean_interval(np.array(values))
    assert interval(values) == {"mean": round(mean, 4), "low": round(low, 4),
                                "high": round(high, 4), "n": 4}
    assert interval([0.5]) == {"mean": 0.5, "low": None, "high": None, "n": 1}
    assert interval([]) == {"mean": None, "low": None, "high": None, "n": 0}


def test_removal_retrains_without_each_methods_top(tiny_model, csv_file, tmp_path):
    args = ["--data", csv_file, "--model", tiny_model, "--epochs", "1", "--max-epochs", "1",
            "--max-length", "16", "--runs", "1", "--shares", "10,20"]
    assert experiment("removal", tmp_path, *args) == 0
    table = pd.read_csv(tmp_path / "removal" / "removal.csv")
    n = table.query("method == 'none'")["n_train"].item()
    assert len(table) == 1 + 4 * 2
    for _, row in table[table["method"] != "none"].iterrows():
        assert row["removed"] == int(np.ceil(row["share"] * n))
        assert row["n_train"] == n - row["removed"]
        assert 0 <= row["flipped_removed"] <= row["removed"]
    # the examples removed by the training loss are its top 10%, read back from the cache
    cache = tmp_path / "cache"
    base = next(p for p in cache.iterdir() if not json.loads(
        (p / "run.json").read_text())["exclude"])
    loss = np.load(base / "predictions.npz")["train_loss"]
    top = sorted(np.argsort(-loss, kind="stable")[: int(np.ceil(0.1 * n))].tolist())
    excluded = [json.loads((p / "run.json").read_text())["exclude"] for p in cache.iterdir()]
    assert top in excluded
    summary = json.loads((tmp_path / "removal" / "summary.json").read_text())
    assert set(summary["accuracy"]) == {"none@0", *(f"{m}@{s}" for m in
                                        ("datainf", "hessian_free", "loss", "random")
                                        for s in ("0.1", "0.2"))}
    # the gain over random is paired by run, and every ranking has one
    assert set(summary["gain_over_random"]) == {f"{m}@{s}" for m in
                                                ("datainf", "hessian_free", "loss")
                                                for s in ("0.1", "0.2")}
    row = table.set_index(["method", "share"])["val_accuracy"]
    assert summary["gain_over_random"]["loss@0.2"]["mean"] == pytest.approx(
        row["loss", 0.2] - row["random", 0.2], abs=1e-4)
    assert summary["verdict"] in (tmp_path / "removal" / "report.html").read_text()
    # every cell was trained on the same budget: one round of --epochs, no early stop
    for p in cache.iterdir():
        history = json.loads((p / "adapter" / "training.json").read_text())
        assert history["rounds"] == 1 and history["epochs_run"] == 1


def test_gain_over_random_and_verdict_by_hand():
    """Two runs: loss-ranked removal gains 0.10 and 0.12 over random at 20%, DataInf -0.02 and
    +0.04; the interval of the loss's gain lies above zero (t interval by hand), DataInf's
    does not, so the verdict names the training loss."""
    from datainf.experiments.removal import gains_over_random, verdict

    rows = []
    accuracy = {("random", 0): 0.70, ("random", 1): 0.60, ("loss", 0): 0.80, ("loss", 1): 0.72,
                ("datainf", 0): 0.68, ("datainf", 1): 0.64, ("hessian_free", 0): 0.70,
                ("hessian_free", 1): 0.60}
    for (method, seed), acc in accuracy.items():
        rows.append({"rank": 4, "seed": seed, "method": method, "share": 0.2,
                     "val_accuracy": acc})
    gains = gains_over_random(pd.DataFrame(rows))
    # loss: gains 0.10, 0.12 -> mean 0.11, sd 0.01414, t(0.975, 1) = 12.706: 0.11 +- 0.127
    assert gains["loss@0.2"]["mean"] == pytest.approx(0.11)
    assert gains["loss@0.2"]["low"] == pytest.approx(0.11 - 12.7062 * 0.01414 / np.sqrt(2),
                                                     abs=2e-4)
    assert gains["loss@0.2"]["low"] < 0  # two runs: too wide to call
    assert gains["datainf@0.2"]["mean"] == pytest.approx(0.01)
    assert "No ranking beat random removal clearly" in verdict(
        {"gain_over_random": gains}, (0.2,))
    # three runs, the loss always +0.10 or +0.12: a clear gain
    rows += [{"rank": 4, "seed": 2, "method": m, "share": 0.2, "val_accuracy": a}
             for m, a in (("random", 0.5), ("loss", 0.61), ("datainf", 0.5),
                          ("hessian_free", 0.5))]
    gains = gains_over_random(pd.DataFrame(rows))
    said = verdict({"gain_over_random": gains}, (0.2,))
    assert said.startswith("Act on Training loss") and "+0.110" in said


def test_no_verdict_from_one_run_or_identical_runs():
    """Two runs with the same gain (a zero-width interval) or one run: no verdict."""
    from datainf.experiments.removal import gains_over_random, verdict

    for seeds in ((0, 1), (0,)):
        rows = [{"rank": 4, "seed": seed, "method": m, "share": 0.2, "val_accuracy": a}
                for seed in seeds for m, a in (("random", 0.5), ("loss", 0.6),
                                               ("datainf", 0.5), ("hessian_free", 0.5))]
        gains = gains_over_random(pd.DataFrame(rows))
        assert gains["loss@0.2"]["mean"] == pytest.approx(0.1)
        said = verdict({"gain_over_random": gains}, (0.2,))
        assert said.startswith("No verdict: too few runs for an interval"), said


def test_intervals_stay_inside_the_range_of_the_quantity():
    from datainf.experiments.common import POSITIVE, UNIT, interval

    auc = interval([0.99, 0.2], UNIT)  # t interval 0.595 +- 5.02
    assert auc["mean"] == pytest.approx(0.595) and (auc["low"], auc["high"]) == (0.0, 1.0)
    seconds = interval([0.1, 3.0], POSITIVE)
    assert seconds["low"] == 0.0 and seconds["high"] > 3.0
    one = interval([0.5], UNIT)
    assert one["low"] is None and one["high"] is None and one["n"] == 1


@pytest.mark.slow
def test_generation_quick(tmp_path):
    """experiment generation --quick: the synthetic task written as JSON lines, every method's
    class-detection AUC and recall recomputed from the run's own stores, accuracy before and
    after fine-tuning, the report; a second run reuses every expensive stage."""
    from datainf.experiments.generation import METHODS
    from datainf.metrics import class_detection

    out = tmp_path / "gen"
    assert main(["experiment", "generation", "--quick", "--quiet", "--task", "math",
                 "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_train"] == 30 and summary["n_test"] == 10
    from datainf.experiments.common import QUICK_NOTE

    assert summary["quick"] is True and QUICK_NOTE in (out / "report.html").read_text()
    assert set(summary["methods"]) == set(METHODS)
    assert {"before", "after"} <= set(summary["accuracy"])
    assert "converged" in summary["methods"]["lissa"]
    train = [json.loads(x) for x in (out / "data" / "train.jsonl").read_text().splitlines()]
    test = [json.loads(x) for x in (out / "data" / "test.jsonl").read_text().splitlines()]
    assert sorted({r["class"] for r in train}) == list(range(10))
    stores = [GradientStore.open(out / "run" / p) for p in ("gradients/train",
                                                            "query/gradients")]
    scores = DataInf().fit(stores[0]).score(stores[1]).numpy()
    expected = class_detection(scores, np.array([r["class"] for r in train]),
                               np.array([r["class"] for r in test]))
    assert summary["methods"]["datainf"]["auc"] == pytest.approx(expected["auc"].mean(),
                                                                 abs=1e-4)
    assert summary["methods"]["datainf"]["recall"] == pytest.approx(
        expected["recall"].mean(), abs=1e-4)
    assert "paper AUC / recall" in (out / "report.html").read_text()
    assert main(["experiment", "generation", "--quick", "--quiet", "--task", "math",
                 "--out", str(out)]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["methods"]["datainf"]["auc"] == summary["methods"]["datainf"]["auc"]
    assert "fine-tuning" not in again["stage_seconds"]
    assert {"fine-tuning", "gradients"} <= set(again["reused_stages"])
    assert "gradients reused" in (out / "report.html").read_text()


@pytest.mark.parametrize("task, n_train, n_test", [("style", 12, 6), ("subject", 12, 6)])
def test_diffusion_quick(tmp_path, task, n_train, n_test, capsys):
    """experiment diffusion --quick: the image task written as ImageFolders, every method's
    class-detection AUC and recall recomputed from the run's own stores, Fréchet distances
    before and after fine-tuning, the report; a second run reuses every expensive stage."""
    from datainf.experiments.diffusion import METHODS
    from datainf.metrics import class_detection

    out = tmp_path / "diff"
    assert main(["experiment", "diffusion", "--quick", "--quiet", "--task", task,
                 "--out", str(out)]) == 0
    # the study's messages name its own folders, not options the user never gave
    err = capsys.readouterr().err
    assert "--train-dir" not in err and "the study's training images: " in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_train"] == n_train and summary["n_test"] == n_test
    assert len(summary["classes"]) == 3 and set(summary["methods"]) == set(METHODS)
    assert set(summary["frechet_distance"]) == {"before", "after", "training images"}
    assert all(np.isfinite(v) and v >= -1e-6 for v in summary["frechet_distance"].values())
    rows = {name: [json.loads(x) for x in (out / "data" / name / "metadata.jsonl")
                   .read_text().splitlines()] for name in ("train", "test")}
    stores = [GradientStore.open(out / "run" / p) for p in ("gradients/train",
                                                            "query/gradients")]
    scores = DataInf().fit(stores[0]).score(stores[1]).numpy()
    expected = class_detection(scores, np.array([r["class"] for r in rows["train"]]),
                               np.array([r["class"] for r in rows["test"]]))
    assert summary["methods"]["datainf"]["auc"] == pytest.approx(expected["auc"].mean(),
                                                                 abs=1e-4)
    assert summary["methods"]["datainf"]["recall"] == pytest.approx(
        expected["recall"].mean(), abs=1e-4)
    page = (out / "report.html").read_text()
    assert "paper AUC / recall" in page and page.count("data:image/png;base64,") >= 1 + 3 * 7
    assert main(["experiment", "diffusion", "--quick", "--quiet", "--task", task,
                 "--out", str(out)]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["methods"]["datainf"]["auc"] == summary["methods"]["datainf"]["auc"]
    assert again["frechet_distance"] == summary["frechet_distance"]
    assert {"fine-tuning", "gradients", "query gradients"} <= set(again["reused_stages"])


def test_verdict_on_the_loss_when_accuracy_is_unclear():
    """Accuracy gains unclear, but removing DataInf's top 20% lowers the validation loss by
    0.08-0.10 against random in all three runs: the verdict says so, with the interval."""
    from datainf.experiments.removal import gains_over_random, verdict

    rows = []
    for seed, (rand, di) in enumerate([(1.15, 1.06), (1.12, 1.03), (1.19, 1.09)]):
        for method, loss, acc in (("random", rand, 0.70), ("datainf", di, 0.70 + 0.02 * seed),
                                  ("hessian_free", rand, 0.70), ("loss", rand + 0.01, 0.69)):
            rows.append({"rank": 4, "seed": seed, "method": method, "share": 0.2,
                         "val_accuracy": acc, "val_loss": loss})
    table = pd.DataFrame(rows)
    summary = {"gain_over_random": gains_over_random(table),
               "loss_change_over_random": gains_over_random(table, "val_loss")}
    said = verdict(summary, (0.2,))
    assert said.startswith("No ranking beat random removal clearly on validation accuracy")
    assert summary["loss_change_over_random"]["datainf@0.2"]["mean"] == pytest.approx(-0.0933,
                                                                                      abs=1e-4)
    assert "by DataInf lowered it by 0.093" in said
