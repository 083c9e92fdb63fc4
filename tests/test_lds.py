"""experiment lds: the subset bookkeeping (each subset model sees its subset, one seed for all),
the LDS of scores that do and do not predict a known linear loss, resume after an interruption
computing only what is missing, other settings refused, and --quick end to end."""

import json
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from datainf import DataInfError
from datainf.cli import main
from datainf.experiments import lds
from datainf.jobs import detect_mislabeled

N_TRAIN, N_TEST = 12, 20


def linear_kind(calls, weights, fail_after=None, settings=None):
    """A task whose test loss is known: loss_j(S) = sum over i in S of weights[j, i] (a model
    that is exactly linear in the data). ``calls`` records (kept, seed) of each fine-tune."""
    def make(study):
        def losses(kept, seed, folder):
            if fail_after is not None and len(calls) >= fail_after:
                raise KeyboardInterrupt  # the study stopped while fine-tuning
            calls.append((kept.tolist(), seed))
            return weights[:, kept].sum(1)

        scores = {"datainf": weights, "cosine": -weights}  # a perfect and a reversed predictor
        return lds.Kind(N_TRAIN, N_TEST, scores, losses, settings or {"task": "linear"})
    return make


def study(tmp_path, subsets=6, **kw):
    job = SimpleNamespace(methods=("datainf", "cosine"), progress=False, stage_seconds={})
    return lds.Study(task="linear", out=tmp_path / "lds", job=job, subsets=subsets, **kw)


@pytest.fixture
def weights():
    return np.random.default_rng(1).standard_normal((N_TEST, N_TRAIN))


def test_subsets_fixed_by_seed_and_index():
    a = lds.subset(3, 100, 0.5, seed=0)
    assert len(a) == 50 and len(set(a.tolist())) == 50 and (np.diff(a) > 0).all()
    assert np.array_equal(a, lds.subset(3, 100, 0.5, seed=0))  # whatever the count of subsets
    assert not np.array_equal(a, lds.subset(4, 100, 0.5, seed=0))
    assert not np.array_equal(a, lds.subset(3, 100, 0.5, seed=1))
    assert len(lds.subset(0, 10, 0.3, seed=0)) == 3


def test_lds_of_a_known_linear_loss(tmp_path, weights, monkeypatch):
    calls = []
    monkeypatch.setitem(lds.KINDS, "linear", linear_kind(calls, weights))
    summary = lds.run(study(tmp_path, subsets=8))
    # every subset model trained on exactly its subset, with the one seed
    assert [kept for kept, _ in calls] == [lds.subset(k, N_TRAIN, 0.5, 0).tolist()
                                           for k in range(8)]
    assert {seed for _, seed in calls} == {0}
    # the scores that equal the loss's weights predict it perfectly, their negation reversely
    assert summary["lds"]["datainf"]["mean"] == pytest.approx(1.0, abs=1e-12)
    assert summary["lds"]["cosine"]["mean"] == pytest.approx(-1.0, abs=1e-12)
    assert -1 < summary["lds"]["random"]["mean"] < 1
    table = pd.read_csv(tmp_path / "lds" / "lds.csv")
    assert len(table) == 3 * N_TEST
    assert summary["separated_at"] == {"subsets": 8, "best": ["datainf"]}
    assert "LDS per method" in (tmp_path / "lds" / "report.html").read_text()


def test_interrupted_study_computes_only_what_is_missing(tmp_path, weights, monkeypatch):
    calls = []
    monkeypatch.setitem(lds.KINDS, "linear", linear_kind(calls, weights, fail_after=3))
    with pytest.raises(KeyboardInterrupt):
        lds.run(study(tmp_path))
    saved = sorted(p.name for p in (tmp_path / "lds" / "subsets").glob("subset-*.json"))
    assert saved == [f"subset-{k:04d}-run-0.json" for k in range(3)]
    assert not (tmp_path / "lds" / "summary.json").exists()
    again = []
    monkeypatch.setitem(lds.KINDS, "linear", linear_kind(again, weights))
    first = lds.run(study(tmp_path))
    assert [kept for kept, _ in again] == [lds.subset(k, N_TRAIN, 0.5, 0).tolist()
                                           for k in range(3, 6)]
    # more subsets later: only the new ones are fine-tuned, the LDS recomputed on all
    more = []
    monkeypatch.setitem(lds.KINDS, "linear", linear_kind(more, weights))
    summary = lds.run(study(tmp_path, subsets=9))
    assert [kept for kept, _ in more] == [lds.subset(k, N_TRAIN, 0.5, 0).tolist()
                                          for k in range(6, 9)]
    assert summary["subsets"] == 9 and first["subsets"] == 6


def test_runs_average_seeds_the_same_for_every_subset(tmp_path, weights, monkeypatch):
    calls = []
    monkeypatch.setitem(lds.KINDS, "linear", linear_kind(calls, weights))
    lds.run(study(tmp_path, subsets=4, runs=2, seed=5))
    assert [seed for _, seed in calls] == [5, 6] * 4


def test_other_settings_refused(tmp_path, weights, monkeypatch):
    monkeypatch.setitem(lds.KINDS, "linear", linear_kind([], weights))
    lds.run(study(tmp_path, subsets=3))
    monkeypatch.setitem(lds.KINDS, "linear", linear_kind([], weights, settings={"task": "x"}))
    with pytest.raises(DataInfError, match="holds subset models' losses of other settings"):
        lds.run(study(tmp_path, subsets=3))
    with pytest.raises(DataInfError, match="--fraction must lie strictly between 0 and 1"):
        lds.run(study(tmp_path, fraction=1.0))
    with pytest.raises(DataInfError, match="--subsets must be at least 3"):
        lds.run(study(tmp_path, subsets=2))


def test_classification_subset_is_the_kept_examples(tiny_model, csv_file):
    """A subset model of the classification task trains on the full run's training examples
    at the kept positions, on the same split."""
    job = detect_mislabeled.from_command(data=str(csv_file), model=tiny_model, noise=0.0)
    train, _, _ = detect_mislabeled.load_data(job)
    kept = lds.subset(0, len(train), 0.5, 0)
    left_out = tuple(int(i) for i in np.setdiff1d(np.arange(len(train)), kept))
    for training_seed in (None, 3):  # a run's own seed moves LoRA and the order, not the split
        part, _, _ = detect_mislabeled.load_data(
            replace(job, exclude=left_out, training_seed=training_seed))
        assert part.texts == [train.texts[i] for i in kept]


def test_quick_end_to_end(tiny_model, csv_file, tmp_path):
    out = tmp_path / "lds"
    args = ["experiment", "lds", "--quick", "--quiet", "--data", str(csv_file), "--model",
            tiny_model, "--out", str(out), "--methods", "datainf,hessian_free,cosine"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["quick"] is True and summary["subsets"] == 4
    assert set(summary["lds"]) == {"datainf", "hessian_free", "cosine", "random"}
    assert summary["n_test"] == 8 and summary["n_train"] == 24
    assert len(list((out / "subsets").glob("subset-*.json"))) == 4
    assert not (out / "scratch").exists()  # the subset models are not kept
    assert main([*args, "--subsets", "2"]) == 2  # refused in one line


@pytest.mark.parametrize("task, n_train, n_test", [("generation", 20, 10),
                                                   ("diffusion", 12, 6)])
def test_quick_generation_and_diffusion(task, n_train, n_test, tmp_path):
    """--quick on the tiny chat model (2 examples of 10 classes) and the tiny digit pipeline
    (4 images of 3 styles): scores from the command's pipeline, subset models trained and
    their test losses kept."""
    out = tmp_path / task
    assert main(["experiment", "lds", "--task", task, "--quick", "--quiet", "--out", str(out),
                 "--methods", "datainf,less"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["n_train"], summary["n_test"]) == (n_train, n_test)
    assert set(summary["lds"]) == {"datainf", "less", "random"}
    losses = [json.loads(p.read_text()) for p in sorted((out / "subsets").glob("subset-*"))]
    assert [len(x["kept"]) for x in losses] == [n_train // 2] * 4
    assert all(len(x["test_loss"]) == n_test and np.isfinite(x["test_loss"]).all()
               for x in losses)
    # the subset models differ in their data: their test losses differ
    assert len({tuple(x["test_loss"]) for x in losses}) == 4


def test_separation_of_a_leading_group():
    """Two methods level at the top (overlapping intervals) and apart from the rest: the group
    is named, at the first count where it stands apart."""
    def v(mean, half):
        return {"mean": mean, "low": mean - half, "high": mean + half, "n": 50}

    by = {"8": {"a": v(0.90, 0.05), "b": v(0.88, 0.05), "c": v(0.80, 0.06)},
          "16": {"a": v(0.93, 0.02), "b": v(0.92, 0.02), "c": v(0.80, 0.03)}}
    assert lds.separated_at(by) == {"subsets": 16, "best": ["a", "b"]}
    by["16"]["c"] = v(0.90, 0.01)  # now level with the leaders: no separation
    assert lds.separated_at(by) is None
