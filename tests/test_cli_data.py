"""detect-mislabeled on awkward data files, through the CLI (tiny model, seconds each)."""

import json

import pandas as pd
import pytest
from cli_helpers import bad, cli, common, make_texts


def frame(n=48, seed=1, **extra) -> pd.DataFrame:
    texts, labels = make_texts(n, seed=seed)
    return pd.DataFrame({"text": texts, "label": labels, **extra})


def run_ok(capsys, tiny_model, out, *args):
    """A run that succeeds: (summary, scores table, stderr)."""
    assert cli(*args, "--methods", "datainf", *common(tiny_model, out)) == 0
    err = capsys.readouterr().err
    return json.loads((out / "summary.json").read_text()), pd.read_csv(out / "scores.csv"), err


def nothing_written(out) -> bool:
    return not (out / "summary.json").exists() and not (out / "report.html").exists()


def test_incomplete_records_dropped_and_bare_carriage_returns(tiny_model, tmp_path, capsys):
    df = frame(54)
    df.loc[[3, 8, 20], "label"] = ["", "NaN", " "]
    df.loc[30, "text"] = ""
    df.loc[[5, 40], "text"] = ["goal team\rmatch win", "bank\rprofit"]  # unquoted when written
    df.to_csv(tmp_path / "train.csv", index=False)
    out = tmp_path / "run"
    summary, table, err = run_ok(capsys, tiny_model, out, "--data", tmp_path / "train.csv")
    note = (f"dropped 4 of 54 rows of {tmp_path / 'train.csv'}: 3 with no label, 1 with an "
            "empty text")
    assert f"datainf: warning: {note}\n" in err
    assert summary["data"]["dropped"] == {"missing_label": 3, "empty_text": 1}
    assert note in summary["data"]["notes"]
    assert summary["classes"] == ["money", "sport", "tech"]
    assert summary["n_train"] + summary["n_val"] == 50
    assert not {3, 8, 20, 30} & set(table["row"])
    assert all(table["text"][i] == df.text[r].replace("\r", "\n")
               for i, r in enumerate(table["row"]))


def test_mostly_missing_labels_refused(tiny_model, tmp_path, capsys):
    df = frame(40)
    df.loc[:24, "label"] = ""
    df.to_csv(tmp_path / "train.csv", index=False)
    out = tmp_path / "run"
    err = bad(capsys, "--data", tmp_path / "train.csv", *common(tiny_model, out))
    assert "25 of 40 records have no label or an empty text" in err
    assert "--label-column" in err and nothing_written(out)


def test_numeric_labels_one_class_each(tiny_model, tmp_path, capsys):
    df = frame(48)
    df["label"] = [{"money": "1", "sport": "2.0", "tech": "3"}[y] for y in df.label]
    df.loc[df.index[::2], "label"] = df.label[::2].str.replace("1", "1.0")
    df.to_csv(tmp_path / "train.csv", index=False)
    out = tmp_path / "run"
    summary, table, err = run_ok(capsys, tiny_model, out, "--data", tmp_path / "train.csv")
    assert summary["classes"] == ["1", "2", "3"]
    note = [n for n in summary["data"]["notes"] if n.startswith("the labels are numbers")]
    assert note and "rewrote 24 of them as integers" in note[0]
    assert f"datainf: warning: {note[0]}" in err
    assert set(table["given_label"].astype(str)) <= {"1", "2", "3"}


def test_bad_json_line(tiny_model, tmp_path, capsys):
    lines = frame(30).to_json(orient="records", lines=True).splitlines()
    lines[16] = lines[16].replace(',"label"', ' "label"')
    (tmp_path / "x.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    err = bad(capsys, "--data", tmp_path / "x.jsonl", *common(tiny_model, out))
    assert err == (f"datainf: error: data file {tmp_path / 'x.jsonl'}, line 17: not valid JSON "
                   "(Expecting ',' delimiter); fix or remove that line\n")
    assert nothing_written(out)


def test_high_noise_warns(tiny_model, tmp_path, capsys):
    frame(40).to_csv(tmp_path / "train.csv", index=False)
    out = tmp_path / "run"
    summary, _, err = run_ok(capsys, tiny_model, out, "--data", tmp_path / "train.csv",
                             "--noise", "0.7")
    assert "datainf: warning: --noise 0.7 flips 70% of the training labels: most labels will " \
        "then be wrong" in err
    assert summary["n_flipped"] == 25 and summary["data"]["notes"][0].startswith("--noise 0.7")


def test_missing_local_model_and_data_paths(tiny_model, tmp_path, capsys, monkeypatch):
    """Values that look like local paths are not sent to the hub (which would take a minute)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    frame(30).to_csv(tmp_path / "train.csv", index=False)
    options = common(tiny_model, tmp_path / "run")
    at = options.index("--model")
    err = bad(capsys, "--data", "train.csv", *options[:at], "--model", "models/nope",
              *options[at + 2:])
    assert "the model folder models/nope does not exist; pass an existing folder" in err
    err = bad(capsys, "--data", "models/x.xlsx", *options)
    assert "data file models/x.xlsx does not exist; datainf reads .csv" in err
    assert "Hugging Face" not in err and nothing_written(tmp_path / "run")


def test_rows_and_ids_in_scores(tiny_model, tmp_path, capsys):
    df = frame(40, key=[f"k{i}" for i in range(40)])
    df.loc[6, "label"] = ""
    df.to_csv(tmp_path / "train.csv", index=False)
    out = tmp_path / "run"
    _, table, _ = run_ok(capsys, tiny_model, out, "--data", tmp_path / "train.csv",
                         "--id-column", "key")
    assert list(table["id"]) == [f"k{r}" for r in table["row"]]
    assert list(table["text"]) == [df.text[r] for r in table["row"]] and 6 not in set(table.row)
    err = bad(capsys, "--data", tmp_path / "train.csv", "--id-column", "name",
              *common(tiny_model, tmp_path / "o"))
    assert "no column 'name'" in err and "--id-column" in err


def test_builtin_corpus_by_name(tiny_model, tmp_path, capsys):
    summary, table, _ = run_ok(capsys, tiny_model, tmp_path / "run", "--data", "rotten-tomatoes",
                               "--train-size", 30, "--val-size", 12)
    assert summary["classes"] == ["fresh", "rotten"]
    assert (summary["n_train"], summary["n_val"]) == (30, 12) and len(table) == 30
    assert table["id"].str.fullmatch(r"[a-z0-9_]+/\d+").all()


@pytest.mark.parametrize("data, defaults", [(None, (900, 100, 3e-4)),
                                            ("bbc-news", (900, 100, 3e-4)),
                                            ("rotten-tomatoes", (2000, 400, 1e-3)),
                                            ("train.csv", (None, None, 3e-4))])
def test_defaults_of_builtin_corpora(data, defaults, monkeypatch):
    """Without --train-size / --val-size / --learning-rate: the built-in corpus's, else all of
    a file at Config's rate; given ones win."""
    from datainf.jobs import detect_mislabeled as mislabeled

    seen = []
    monkeypatch.setattr(mislabeled, "run", lambda config: seen.append(config) or
                        {"methods": {}, "n_train": 0})
    given = [] if data is None else ["--data", data]
    assert cli(*given) == 0
    assert (seen[0].train_size, seen[0].val_size, seen[0].learning_rate) == defaults
    assert cli(*given, "--train-size", 50, "--val-size", 9, "--learning-rate", 2e-3) == 0
    assert (seen[1].train_size, seen[1].val_size, seen[1].learning_rate) == (50, 9, 2e-3)
