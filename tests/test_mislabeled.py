"""detect-mislabeled end to end on a tiny BERT built from a config (seconds), through the CLI."""

import json
import os

import numpy as np
import pandas as pd
import pytest
from cli_helpers import bad, cli, common, make_texts
from tolerances import FLOAT32_PASS, relative


def test_end_to_end_outputs(tiny_model, csv_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli("--data", csv_file, "--noise", "0.2", *common(tiny_model, out)) == 0
    assert "report:" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_train"] == 54 and summary["n_val"] == 6 and summary["n_flipped"] == 11
    expected = {"datainf", "exact", "lissa", "hessian_free", "datainf_self", "cosine", "loss",
                "grad_norm"}
    assert set(summary["methods"]) == expected
    for entry in summary["methods"].values():
        assert 0 <= entry["auc"] <= 1 and entry["seconds"] >= 0
    assert "converged" in summary["methods"]["lissa"]
    assert set(summary["stage_seconds"]) >= {"fine-tuning", "gradients", "scoring"}
    table = pd.read_csv(out / "scores.csv")
    assert len(table) == 54
    assert table["flipped"].sum() == 11
    # the file's labels stay given_label; trained_label is what this run flipped
    assert (table["given_label"] != table["trained_label"]).sum() == 11
    assert (table["given_label"] != table["trained_label"]).equals(table["flipped"])
    for key in expected:
        assert sorted(table[f"{key}_rank"]) == list(range(1, 55))
        top = table.loc[table[f"{key}_rank"] == 1, f"{key}_score"].item()
        assert top == table[f"{key}_score"].max()
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and "Top 50 suspects" in page
    assert page.count("<tr>") >= 7 + 50
    # the DataInf score in the CSV is the aggregate influence of the stored gradients
    from datainf import DataInf
    from datainf.gradients.store import GradientStore

    train = GradientStore.open(out / "gradients" / "train")
    val = GradientStore.open(out / "gradients" / "val")
    scores = DataInf().fit(train).score(val, aggregate=True).numpy()
    # the job's float32 rows in its own chunks: one float32 pass (tests/tolerances.py)
    assert relative(table["datainf_score"].to_numpy(), scores) < FLOAT32_PASS
    # the settings read back from run.json make the same run (as the peer benchmarks use it)
    from datainf.jobs.detect_mislabeled import Config, recorded_settings

    record = json.loads((out / "run.json").read_text())
    del record["data_fingerprint"]
    assert Config(**recorded_settings(out)).expensive() == record


def test_rerun_reuses_adapter_and_gradients(tiny_model, csv_file, tmp_path):
    out = tmp_path / "run"
    args = ["--data", csv_file, *common(tiny_model, out)]
    assert cli(*args, "--methods", "datainf") == 0
    stamps = {p: p.stat().st_mtime_ns for p in [out / "adapter" / "adapter_model.safetensors",
                                                  out / "gradients" / "train" / "manifest.json"]}
    first = pd.read_csv(out / "scores.csv")
    all_parameters = json.loads((out / "summary.json").read_text())["blocks"]["parameters"]
    assert cli(*args, "--methods", "datainf,hessian_free", "--blocks", "classifier") == 0
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    second = json.loads((out / "summary.json").read_text())
    assert set(second["methods"]) == {"datainf", "hessian_free", "loss", "grad_norm"}
    assert second["blocks"]["count"] == 2  # classifier weight and bias
    assert cli(*args, "--methods", "datainf", "--grouping", "module") == 0
    third = json.loads((out / "summary.json").read_text())
    assert third["blocks"]["count"] == 2 * 2 + 1  # query and value of 2 layers, the head
    assert third["blocks"]["parameters"] == all_parameters
    assert not np.allclose(pd.read_csv(out / "scores.csv")["datainf_score"],
                           first["datainf_score"])


def test_absolute_damping_rule(tiny_model, csv_file, tmp_path):
    """--damping-rule absolute: one lambda = --damping for every block (rescoring a finished
    run: the fine-tune and gradients are reused)."""
    from datainf import Damping, DataInf, Exact
    from datainf.gradients.store import GradientStore

    out = tmp_path / "run"
    args = ["--data", csv_file, *common(tiny_model, out), "--methods", "datainf,exact"]
    assert cli(*args) == 0
    by_relative_rule = pd.read_csv(out / "scores.csv")
    assert cli(*args, "--damping-rule", "absolute", "--damping", "1e-3") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["damping_rule"] == "absolute"
    assert summary["config"]["damping"] == 1e-3
    table = pd.read_csv(out / "scores.csv")
    train = GradientStore.open(out / "gradients" / "train")
    val = GradientStore.open(out / "gradients" / "val")
    for name, cls in (("datainf", DataInf), ("exact", Exact)):
        scores = cls(Damping(absolute=1e-3)).fit(train).score(val, aggregate=True).numpy()
        assert relative(table[f"{name}_score"].to_numpy(), scores) < FLOAT32_PASS
        assert not np.allclose(table[f"{name}_score"], by_relative_rule[f"{name}_score"],
                               rtol=1e-3)


@pytest.mark.parametrize("noise", [["--noise", "0"], []])
def test_no_noise_gives_ranking_without_auc(tiny_model, csv_file, tmp_path, capsys, noise):
    """On a user's file the default is no noise: the labels as given are ranked."""
    out = tmp_path / "run"
    assert cli("--data", csv_file, *noise, "--methods", "datainf",
               *common(tiny_model, out)) == 0
    assert "on purpose" not in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_flipped"] is None and summary["config"]["noise"] == 0
    assert all("auc" not in m for m in summary["methods"].values())
    table = pd.read_csv(out / "scores.csv")
    assert "flipped" not in table.columns and "trained_label" not in table.columns
    given = pd.read_csv(csv_file)["label"]
    assert list(table["given_label"]) == list(given[table["row"]])


def test_noise_is_the_default_of_the_built_in_corpora_only():
    from datainf.jobs.detect_mislabeled import DEMO_NOISE, Config

    assert Config().noise == Config(data="rotten-tomatoes").noise == DEMO_NOISE == 0.2
    assert Config(data="train.csv").noise == 0 and Config(data="x.csv", noise=0.1).noise == 0.1


def test_noise_is_said_on_the_console(tiny_model, csv_file, tmp_path, capsys):
    assert cli("--data", csv_file, "--noise", "0.2", "--methods", "datainf",
               *common(tiny_model, tmp_path / "run")) == 0
    assert "(11 labels flipped on purpose by --noise 0.2, to measure detection; --noise 0 " \
        "ranks your labels as given)" in capsys.readouterr().out


def test_drop_top_with_noise_is_refused_first(tiny_model, csv_file, tmp_path, capsys):
    """cleaned.csv would lose correct rows for flips the tool made: refused before any work."""
    err = bad(capsys, "--data", csv_file, "--noise", "0.2", "--drop-top", "5",
              *common(tiny_model, tmp_path / "run"))
    assert "--drop-top 5 with --noise 0.2" in err and "add --noise 0" in err
    assert not (tmp_path / "run").exists()


def test_sentence_pairs_and_separate_validation_file(tiny_model, tmp_path):
    texts, labels = make_texts(40, seed=2)
    pairs, _ = make_texts(40, seed=3)
    pd.DataFrame({"a": texts, "b": pairs, "y": labels}).to_json(
        tmp_path / "train.jsonl", orient="records", lines=True)
    vt, vl = make_texts(9, seed=4)
    pd.DataFrame({"a": vt, "b": vt, "y": vl}).to_parquet(tmp_path / "val.parquet")
    out = tmp_path / "run"
    assert cli("--data", tmp_path / "train.jsonl", "--val-data", tmp_path / "val.parquet",
               "--text-column", "a", "--text-column", "b", "--label-column", "y",
               "--methods", "datainf", *common(tiny_model, out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_train"] == 40 and summary["n_val"] == 9
    assert "text_pair" in pd.read_csv(out / "scores.csv").columns


# ------------------------------------------------------------------ bad input
def test_missing_file(tiny_model, tmp_path, capsys):
    err = bad(capsys, "--data", tmp_path / "nope.csv", *common(tiny_model, tmp_path / "o"))
    assert "does not exist" in err


def test_missing_column(tiny_model, csv_file, tmp_path, capsys):
    err = bad(capsys, "--data", csv_file, "--label-column", "category",
              *common(tiny_model, tmp_path / "o"))
    assert "no column 'category'" in err and "['text', 'label']" in err


def test_empty_file(tiny_model, tmp_path, capsys):
    (tmp_path / "empty.csv").write_text("text,label\n")
    err = bad(capsys, "--data", tmp_path / "empty.csv", *common(tiny_model, tmp_path / "o"))
    assert "has no rows" in err


def test_single_class(tiny_model, tmp_path, capsys):
    pd.DataFrame({"text": ["a b"] * 20, "label": ["x"] * 20}).to_csv(tmp_path / "one.csv")
    err = bad(capsys, "--data", tmp_path / "one.csv", *common(tiny_model, tmp_path / "o"))
    assert "single class" in err


def test_unseen_validation_label(tiny_model, csv_file, tmp_path, capsys):
    pd.DataFrame({"text": ["goal"], "label": ["weather"]}).to_csv(tmp_path / "v.csv")
    err = bad(capsys, "--data", csv_file, "--val-data", tmp_path / "v.csv",
              *common(tiny_model, tmp_path / "o"))
    assert "['weather'] never occur in the training data" in err


def test_invalid_utf8(tiny_model, tmp_path, capsys):
    (tmp_path / "latin1.csv").write_bytes("text,label\ncaf\xe9 ol\xe9,a\nb,b\n".encode("latin-1"))
    err = bad(capsys, "--data", tmp_path / "latin1.csv", *common(tiny_model, tmp_path / "o"))
    assert "not valid UTF-8" in err


@pytest.mark.parametrize("noise", ["1", "-0.1", "1.5"])
def test_noise_out_of_range(tiny_model, csv_file, tmp_path, capsys, noise):
    err = bad(capsys, "--data", csv_file, "--noise", noise, *common(tiny_model, tmp_path / "o"))
    assert "--noise must be in [0, 1)" in err


def test_out_with_other_settings(tiny_model, csv_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli("--data", csv_file, "--methods", "datainf", *common(tiny_model, out)) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    err = bad(capsys, "--data", csv_file, "--methods", "datainf", *common(tiny_model, out),
              "--epochs", "2")
    assert "holds a run made with other settings: epochs (3 there, 2 now)" in err
    # the earlier run is left exactly as it was: nothing lost, nothing half-written
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_out_folder_with_foreign_files(tiny_model, csv_file, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    err = bad(capsys, "--data", csv_file, *common(tiny_model, out))
    assert "not empty and holds no datainf run" in err
    assert (out / "thesis.tex").read_text() == "precious"


def test_interrupted_run_goes_on_from_last_stage(tiny_model, csv_file, tmp_path, capsys,
                                                 monkeypatch):
    """Ctrl-C during scoring: exit 130, no summary; the rerun reuses adapter and gradients."""
    import datainf.jobs.detect_mislabeled as job

    out = tmp_path / "run"
    args = ["--data", csv_file, "--methods", "datainf", *common(tiny_model, out)]

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    original = job.score_all
    monkeypatch.setattr(job, "score_all", interrupted)
    assert cli(*args) == 130
    assert "run the same command again" in capsys.readouterr().err
    assert not (out / "summary.json").exists() and not (out / "report.html").exists()
    stamp = os.stat(out / "adapter" / "adapter_model.safetensors").st_mtime_ns
    monkeypatch.setattr(job, "score_all", original)
    assert cli(*args) == 0
    assert os.stat(out / "adapter" / "adapter_model.safetensors").st_mtime_ns == stamp
    assert (out / "summary.json").exists()


def test_interrupted_gradients_are_finished_on_rerun(tiny_model, csv_file, tmp_path, capsys,
                                                    monkeypatch):
    """Ctrl-C while the training gradients are written: the rerun finishes the store (only
    the missing rows) instead of refusing it as incomplete."""
    from datainf.gradients.store import GradientStore

    out = tmp_path / "run"
    args = ["--data", csv_file, "--methods", "datainf", *common(tiny_model, out)]
    original = GradientStore.write_rows
    calls = []

    def interrupted(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, *a, **k)

    monkeypatch.setattr(GradientStore, "write_rows", interrupted)
    assert cli(*args) == 130
    manifest = json.loads((out / "gradients" / "train" / "manifest.json").read_text())
    assert 0 < manifest["rows_complete"] < manifest["num_rows"]
    monkeypatch.setattr(GradientStore, "write_rows", original)
    capsys.readouterr()
    assert cli(*args) == 0
    assert GradientStore.open(out / "gradients" / "train").complete
    assert "gradients" not in json.loads((out / "summary.json").read_text())["reused_stages"]


@pytest.mark.slow
def test_real_minilm_on_bbc_news_reduced(tmp_path):
    """The built-in default path (shipped MiniLM-L6 and BBC News), in a reduced size."""
    out = tmp_path / "run"
    assert cli("--out", out, "--train-size", "120", "--val-size", "30", "--epochs", "2",
               "--max-length", "32", "--batch-size", "16", "--methods",
               "datainf,exact,hessian_free,datainf_self") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_train"] == 120 and summary["n_flipped"] == 24
    assert summary["classes"] == ["business", "entertainment", "politics", "sports", "tech"]
    assert summary["blocks"]["count"] == 4 * 6 + 2  # LoRA A/B on query/value of 6 layers, head
    # even this small run separates flipped labels better than chance
    assert summary["methods"]["loss"]["auc"] > 0.6
    assert summary["methods"]["datainf"]["auc"] > 0.5


def test_hub_dataset_name_goes_through_datasets(tiny_model, tmp_path, monkeypatch):
    """A --data that is no file is loaded with datasets.load_dataset (stubbed: tests stay
    offline), with its train and validation splits."""
    import sys
    import types

    calls = []

    class Rows(dict):
        column_names = property(lambda self: list(self))

    def load_dataset(path, config, split):
        calls.append((path, config, split))
        texts, labels = make_texts(45 if split == "train" else 9, seed=len(calls))
        return Rows(sentence1=texts, sentence2=texts, label=labels)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    out = tmp_path / "run"
    assert cli("--data", "nyu-mll/glue:mrpc", "--text-column", "sentence1", "--text-column",
               "sentence2", "--methods", "datainf", *common(tiny_model, out)) == 0
    assert calls == [("nyu-mll/glue", "mrpc", "train"), ("nyu-mll/glue", "mrpc", "validation")]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_train"] == 45 and summary["n_val"] == 9


def test_hub_dataset_without_datasets_package(tiny_model, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    err = bad(capsys, "--data", "nyu-mll/glue:mrpc", *common(tiny_model, tmp_path / "o"))
    assert "pip install datasets" in err


@pytest.mark.parametrize("patience", [0, 1])
def test_stop_on_validation_loss_keeps_the_best_epoch(tiny_model, csv_file, tmp_path, patience):
    """With patience, training stops once the validation loss stops improving and the saved
    adapter is the best epoch's: its validation loss is the lowest one seen."""
    out = tmp_path / "run"
    assert cli("--data", csv_file, "--methods", "datainf", *common(tiny_model, out),
               "--epochs", "8", "--max-epochs", "8", "--learning-rate", "1e-1", "--patience",
               str(patience)) == 0
    history = json.loads((out / "summary.json").read_text())["training"]
    val_losses = history["val_losses"]
    assert len(val_losses) == len(history["epoch_losses"]) == history["epochs_run"]
    if patience == 0:
        assert history["epochs_run"] == 8 and history["kept_epoch"] == 8
    else:
        best = int(np.argmin(val_losses)) + 1
        assert history["kept_epoch"] == best
        assert history["epochs_run"] == 8 or history["epochs_run"] - best == patience
    saved = np.load(out / "predictions.npz")
    # the history keeps the loss rounded to 5 decimals (+-5e-6, which is more than 1e-4 of a
    # loss below 0.05); the prediction pass then recomputes it in float32 (~1e-7 of it)
    assert saved["val_loss"].mean() == pytest.approx(val_losses[history["kept_epoch"] - 1],
                                                     abs=5e-6 + 1e-6)


def test_a_weak_model_gets_more_rounds(tiny_model, csv_file, tmp_path):
    """A model still weak after a round of --epochs gets another, up to --max-epochs, unless
    the validation loss stopped improving; one that is no longer weak is not trained further."""
    from datainf.jobs.detect_mislabeled import WEAK_GAP

    def weak(accuracy, summary):
        majority = summary["model_quality"]["majority_rate"]
        return accuracy - majority < WEAK_GAP * (1 - majority)

    out = tmp_path / "run"
    # a learning rate too small to learn anything: weak after every round, so every round
    # runs (the flat validation loss would stop it, so no patience here)
    assert cli("--data", csv_file, "--methods", "datainf", *common(tiny_model, out),
               "--epochs", "1", "--max-epochs", "3", "--learning-rate", "1e-6",
               "--patience", "0") == 0
    history = json.loads((out / "summary.json").read_text())["training"]
    assert history["rounds"] == 3 and history["epochs_run"] == 3
    # each round after a weak one at 3x the learning rate
    assert history["learning_rates"] == pytest.approx([1e-6, 3e-6, 9e-6])
    # with patience, the flat validation loss ends training after the second epoch
    assert cli("--data", csv_file, "--methods", "datainf", *common(tiny_model, tmp_path / "p"),
               "--epochs", "1", "--max-epochs", "3", "--learning-rate", "1e-6") == 0
    history = json.loads((tmp_path / "p" / "summary.json").read_text())["training"]
    assert history["epochs_run"] == 2 and history["stopped_on_val_loss"]
    # a learning rate that learns: every round but the last ended weak; the last one ended
    # not weak, on the validation loss, or at --max-epochs
    out = tmp_path / "learns"
    assert cli("--data", csv_file, "--methods", "datainf", *common(tiny_model, out),
               "--epochs", "2", "--max-epochs", "12", "--learning-rate", "1e-2") == 0
    summary = json.loads((out / "summary.json").read_text())
    history = summary["training"]
    ends = [history["val_accuracy"][min(2 * r, history["epochs_run"]) - 1]
            for r in range(1, history["rounds"] + 1)]
    assert all(weak(a, summary) for a in ends[:-1])
    assert (not weak(ends[-1], summary) or history["stopped_on_val_loss"]
            or history["epochs_run"] == 12)


def test_drop_top_of_every_training_example_is_refused_first(tiny_model, csv_file, tmp_path,
                                                              capsys):
    err = bad(capsys, "--data", csv_file, "--drop-top", "54",
              *common(tiny_model, tmp_path / "run"))
    assert "--drop-top 54 would drop every one of the 54 training examples" in err
    assert not (tmp_path / "run").exists()
