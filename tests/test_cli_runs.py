"""detect-mislabeled's run folder and settings: every mistake is refused before any expensive
work, in one line, leaving --out usable for the corrected command; what a resumed run reused is
reported as reused; a bug (not a user mistake) shows its traceback and says it is a bug."""

import fcntl
import json
import subprocess

import pandas as pd
import pytest
from cli_helpers import bad, cli, common, make_texts
from tolerances import FLOAT32_PASS, relative

import datainf.jobs.detect_mislabeled as job


@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if fine-tuning starts: the refusal must come before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("fine-tuning started before the settings were checked")

    monkeypatch.setattr(job, "train_adapter", refuse)


def files(folder):
    """Every file under ``folder`` with its bytes (what a refused run must leave untouched)."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("option, value, message", [
    ("--methods", "datainf,tracin", "unknown methods ['tracin']"),
    ("--blocks", "no_such_layer", "no gradient block matches --blocks 'no_such_layer'"),
    ("--blocks", "query(", "not a valid regular expression"),
    ("--rank-by", "exact", "--rank-by 'exact' is not among the scores computed"),
    ("--batch-size", "0", "--batch-size must be at least 1, not 0"),
    ("--epochs", "0", "--epochs must be at least 1, not 0"),
    ("--learning-rate", "-1", "--learning-rate must be positive"),
    ("--device", "cuda", "--device cuda: this torch has no CUDA device"),
    ("--device", "gpu", "--device 'gpu' is not a device name"),
    ("--damping-rule", "fixed", "--damping-rule must be one of relative, absolute, not 'fixed'"),
    ("--adapter", "nowhere", "the adapter folder nowhere does not exist"),
])
def test_bad_setting_leaves_out_usable(tiny_model, csv_file, tmp_path, capsys, no_training,
                                       monkeypatch, option, value, message):
    """A refused setting writes nothing: no run.json that would refuse the corrected command."""
    monkeypatch.setattr(job.torch.cuda, "is_available", lambda: False)  # also on GPU machines
    out = tmp_path / "run"
    err = bad(capsys, "--data", csv_file, "--methods", "datainf,hessian_free",
              *common(tiny_model, out), option, value)
    assert message in err
    assert not out.exists()
    monkeypatch.undo()
    assert cli("--data", csv_file, "--methods", "datainf", *common(tiny_model, out)) == 0


def test_bad_setting_on_a_finished_run_keeps_its_results(tiny_model, csv_file, tmp_path,
                                                         capsys):
    """--blocks matching nothing, on a finished run: refused; report, summary, scores kept."""
    out = tmp_path / "run"
    args = ["--data", csv_file, "--methods", "datainf", *common(tiny_model, out)]
    assert cli(*args) == 0
    before = files(out)
    err = bad(capsys, *args, "--blocks", "no_such_layer")
    assert "no gradient block matches" in err
    assert files(out) == before


def test_adapter_of_another_model_is_one_line(tiny_model, csv_file, tmp_path, capsys):
    """An adapter trained on another base model (other widths): one line, nothing written."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    other = tmp_path / "other-model"
    config = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=32, num_labels=3)
    BertForSequenceClassification(config).save_pretrained(other)
    BertTokenizerFast.from_pretrained(tiny_model).save_pretrained(other)
    first = tmp_path / "first"
    assert cli("--data", csv_file, "--methods", "datainf", *common(str(other), first)) == 0
    out = tmp_path / "run"
    err = bad(capsys, "--data", csv_file, "--adapter", first / "adapter", "--methods",
              "datainf", *common(tiny_model, out))
    assert f"the adapter in {first / 'adapter'} does not fit the model" in err
    assert "pass the base model it was trained on" in err
    assert not out.exists()


def test_out_is_a_file(tiny_model, csv_file, tmp_path, capsys):
    (tmp_path / "report.txt").write_text("mine")
    err = bad(capsys, "--data", csv_file, *common(tiny_model, tmp_path / "report.txt"))
    assert "is a file; choose a folder" in err
    assert (tmp_path / "report.txt").read_text() == "mine"


def test_out_on_a_read_only_file_system(tiny_model, csv_file, tmp_path, capsys):
    mount = tmp_path / "ro"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a read-only file system here: {done.stderr.decode().strip()}")
    try:
        err = bad(capsys, "--data", csv_file, *common(tiny_model, mount / "run"))
        assert "cannot write to --out" in err and "Read-only file system" in err
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_second_run_on_the_same_out_is_refused(tiny_model, csv_file, tmp_path, capsys):
    """While a run holds --out (its lock), a second run says so and touches nothing."""
    out = tmp_path / "run"
    args = ["--data", csv_file, "--methods", "datainf", *common(tiny_model, out)]
    assert cli(*args) == 0
    before = files(out)
    with open(out / ".lock") as other_run:
        fcntl.flock(other_run, fcntl.LOCK_EX | fcntl.LOCK_NB)
        err = bad(capsys, *args)
    assert f"--out {out} is in use by another datainf run" in err
    assert files(out) == before
    assert cli(*args) == 0  # the lock ends with the run that held it


def test_two_processes_at_once(tiny_model, csv_file, tmp_path):
    """Two real processes on one --out: one runs, the other is refused in one line."""
    import sys

    out = tmp_path / "run"
    command = [sys.executable, "-m", "datainf", "detect-mislabeled", "--quiet", "--data",
               str(csv_file), "--methods", "datainf", *map(str, common(tiny_model, out)),
               "--epochs", "20"]  # a run long enough that both surely overlap
    runs = [subprocess.Popen(command, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    codes = [r.wait(timeout=300) for r in runs]
    errors = [r.stderr.read() for r in runs]
    assert sorted(codes) == [0, 2], errors
    refused = errors[codes.index(2)]
    assert "is in use by another datainf run" in refused and "Traceback" not in refused
    assert json.loads((out / "summary.json").read_text())["n_train"] == 54


def test_no_flipped_label_is_refused_before_training(tiny_model, tmp_path, capsys, no_training):
    texts, labels = make_texts(12, seed=1)
    pd.DataFrame({"text": texts, "label": labels}).to_csv(tmp_path / "small.csv", index=False)
    err = bad(capsys, "--data", tmp_path / "small.csv", "--noise", "0.02",
              *common(tiny_model, tmp_path / "run"))
    assert "flips 0 of the 11 training labels" in err and "--noise 0" in err
    assert not (tmp_path / "run").exists()


def test_reused_stages_are_reported_as_reused(tiny_model, csv_file, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--data", csv_file, "--methods", "datainf", *common(tiny_model, out)]
    assert cli(*args) == 0
    first = json.loads((out / "summary.json").read_text())
    assert first["reused_stages"] == [] and first["adapter"] == "new"
    assert {"model", "fine-tuning", "predictions", "gradients"} <= set(first["stage_seconds"])
    assert main_verbose(args, capsys).count("reused from an earlier run") == 3
    second = json.loads((out / "summary.json").read_text())
    assert second["reused_stages"] == ["fine-tuning", "predictions", "gradients"]
    assert second["adapter"] == "reused" and "fine-tuning" not in second["stage_seconds"]
    assert "<td>fine-tuning</td><td>reused from an earlier run</td>" in \
        (out / "report.html").read_text()


def main_verbose(args, capsys):
    """The command without --quiet; returns what it printed."""
    from datainf.cli import main

    capsys.readouterr()
    assert main(["detect-mislabeled", *map(str, args)]) == 0
    return capsys.readouterr().out


def test_a_bug_shows_its_traceback_and_says_so(tiny_model, csv_file, tmp_path, capsys,
                                               monkeypatch):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(job, "score_all", broken)
    assert cli("--data", csv_file, "--methods", "datainf", *common(tiny_model,
                                                                   tmp_path / "run")) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError" in err
    assert "this is a bug in datainf" in err


def test_usage_errors_are_one_line(capsys):
    from datainf.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["detect-mislabeled", "--batch-size", "many"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("datainf: error: argument --batch-size: invalid int value")
    assert err.count("\n") == 1


def test_help_names_outputs_and_the_deliberate_noise(capsys):
    from datainf.cli import main

    with pytest.raises(SystemExit):
        main(["detect-mislabeled", "--help"])
    text = capsys.readouterr().out
    assert "(default: None)" not in text
    assert text.count("default") - text.count("(default: ") >= 2  # the hand-written defaults
    assert "default: text) (default" not in text
    for output in ("summary.json", "scores.csv", "suspects.csv", "report.html", "cleaned.csv"):
        assert output in text
    flat = " ".join(text.split())
    assert "on purpose" in flat and "0 on your --data" in flat and "examples:" in text
    # the examples keep their lines
    assert "\n  datainf detect-mislabeled --data train.csv --text-column review" in text
    assert "\n      --drop-top 100 --out runs/reviews" in text
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    demo = capsys.readouterr().out
    assert "training examples generated" in demo and "(default: 2000)" in demo


def test_help_of_the_experiments_and_the_version(capsys):
    from datainf import __version__
    from datainf.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"datainf {__version__}\n"
    with pytest.raises(SystemExit):
        main(["experiment", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "option_strings" not in text and "top k% and fine-tuning again" in text
    with pytest.raises(SystemExit):
        main(["experiment", "removal", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    # the options' defaults as the experiment applies them, as its description says
    assert "400 training and 100 validation examples of 64 tokens, learning rate 1e-3" in text
    assert "(default: 400 of built-in data; all of a file)" in text
    assert "(default: 0.001 on built-in data" in text and "(default: 0.2 on any data)" in text
    assert "in seconds" not in text and "its numbers mean nothing" in text


def test_unit_gradient_variants(tiny_model, csv_file, tmp_path):
    """--methods takes the normalized variants; their scores are the engine's on the run's own
    stores (cosine = minus the cosine similarity with the mean validation gradient)."""
    import json

    import pandas as pd

    from datainf import HessianFree
    from datainf.gradients.store import GradientStore

    out = tmp_path / "run"
    assert cli("--data", csv_file, "--methods", "datainf,datainf_normalized,cosine",
               *common(tiny_model, str(out))) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert {"datainf_normalized", "cosine"} <= set(summary["methods"])
    table = pd.read_csv(out / "scores.csv")
    train, val = (GradientStore.open(out / "gradients" / s) for s in ("train", "val"))
    expected = HessianFree(normalize=True).fit(train).score(val, aggregate=True)
    assert relative(table["cosine_score"].to_numpy(), expected) < FLOAT32_PASS  # tolerances.py
    assert "Cosine" in (out / "report.html").read_text()


def test_demo_with_nothing_flipped_names_the_option(capsys):
    from datainf.cli import main

    assert main(["demo", "--n-train", "10"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--n-train 10 with seed 0: 0 of the 10 labels flipped" in err
    assert "give --n-train 50 or more" in err
