"""What detect-mislabeled gives a user to act on: suspects.csv with file rows and suggested labels,
--rank-by, --drop-top's cleaned.csv, and a report with the per-label breakdown and warnings."""

import json

import numpy as np
import pandas as pd
import pytest
from cli_helpers import cli, common, make_texts

from datainf.data.text import TextData
from datainf.jobs.detect_mislabeled import Predictions, model_quality


@pytest.fixture
def csv_with_ids(tmp_path):
    texts, labels = make_texts(60, seed=1)
    path = tmp_path / "train.csv"
    pd.DataFrame({"id": [f"doc-{i:03d}" for i in range(60)], "text": texts,
                  "label": labels}).to_csv(path, index=False)
    return path


def test_suspects_point_at_the_users_rows(tiny_model, csv_with_ids, tmp_path):
    out = tmp_path / "run"
    assert cli("--data", csv_with_ids, "--methods", "datainf,hessian_free", "--top", "10",
               *common(tiny_model, out)) == 0
    original = pd.read_csv(csv_with_ids)
    suspects = pd.read_csv(out / "suspects.csv", keep_default_na=False)
    assert len(suspects) == 10
    assert list(suspects["rank"]) == list(range(1, 11))
    assert suspects["datainf_score"].is_monotonic_decreasing
    for _, r in suspects.iterrows():  # row and id lead back to the user's record
        assert original.loc[r["row"], "text"] == r["text"]
        assert original.loc[r["row"], "id"] == r["id"]
    for column in ("given_label", "suggested_label", "model_label", "model_probability",
                   "given_label_probability", "datainf_score", "hessian_free_score"):
        assert column in suspects
    disagree = suspects["model_label"] != suspects["given_label"]
    assert (suspects["suggested_label"] == suspects["model_label"].where(disagree, "")).all()
    assert ((suspects["model_probability"] > 0) & (suspects["model_probability"] <= 1)).all()
    table = pd.read_csv(out / "scores.csv")
    assert sorted(table["row"]) == sorted(set(table["row"])) and len(table) == 54
    page = (out / "report.html").read_text()
    assert "<th>row</th><th>id</th><th>given label</th><th>model says (probability)</th>" in page
    first = suspects.iloc[0]
    assert f"<td>1</td><td>{first['row']}</td><td class='id'>{first['id']}</td>" in page
    assert f"{first['model_label']} ({first['model_probability']:.2f})" in page


def test_rank_by_orders_the_suspects(tiny_model, csv_with_ids, tmp_path):
    out = tmp_path / "run"
    assert cli("--data", csv_with_ids, "--methods", "datainf,hessian_free", "--rank-by",
               "hessian_free", *common(tiny_model, out)) == 0
    suspects = pd.read_csv(out / "suspects.csv")
    assert suspects["hessian_free_score"].is_monotonic_decreasing
    assert "Top 50 suspects by Hessian-free" in (out / "report.html").read_text()
    assert cli("--data", csv_with_ids, "--methods", "datainf,hessian_free", "--rank-by",
               "loss", *common(tiny_model, out)) == 0
    assert pd.read_csv(out / "suspects.csv")["loss_score"].is_monotonic_decreasing


def test_drop_top_writes_a_cleaned_copy(tiny_model, csv_with_ids, tmp_path):
    out = tmp_path / "run"
    assert cli("--data", csv_with_ids, "--methods", "datainf", "--drop-top", "5",
               *common(tiny_model, out)) == 0
    original = pd.read_csv(csv_with_ids)
    cleaned = pd.read_csv(out / "cleaned.csv")
    suspects = pd.read_csv(out / "suspects.csv")
    dropped = set(suspects["row"].head(5))
    assert len(cleaned) == 60 - 5 and not dropped & set(cleaned["original_row"])
    # the position in the file this run read: not "row", which the next run's suspects.csv
    # gives as the position in cleaned.csv
    assert list(cleaned.columns) == ["original_row", "id", "text", "label"]
    kept = original.drop(index=sorted(dropped))
    # the user's own labels (no noise on a user's file by default), in file order
    assert list(cleaned["label"]) == list(kept["label"])
    assert list(cleaned["text"]) == list(kept["text"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cleaned"] == {"dropped": 5, "rows": 55}
    # the cleaned copy is a valid input for the next run
    assert cli("--data", out / "cleaned.csv", "--methods", "datainf", "--noise", "0",
               *common(tiny_model, tmp_path / "again")) == 0


def test_breakdown_per_label_and_weak_model_warning(tiny_model, csv_with_ids, tmp_path,
                                                   capsys):
    out = tmp_path / "run"
    # one epoch at a tiny learning rate: the model stays at chance
    assert cli("--data", csv_with_ids, "--methods", "datainf", "--top", "12",
               *common(tiny_model, out), "--epochs", "1", "--learning-rate", "1e-6") == 0
    err = capsys.readouterr().err
    assert "datainf: warning: the fine-tuned model is weak" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model_quality"]["weak"] is True
    page = (out / "report.html").read_text()
    assert "<p class='warning'>the fine-tuned model is weak" in page
    suspects = pd.read_csv(out / "suspects.csv")
    section = page.split("<h2>Suspects per given label</h2>")[1].split("</table>")[0]
    counts = suspects["given_label"].value_counts()
    for label, count in counts.items():
        size = int((pd.read_csv(out / "scores.csv")["given_label"] == label).sum())
        assert f"<tr><td>{label}</td><td>{size}</td><td>{count}</td>" in section
    assert section.count("<tr>") == 1 + 3  # header and the three labels


def test_model_quality_rule():
    def quality(correct: int, labels):
        val = TextData(texts=["x"] * len(labels), labels=np.array(labels), classes=["a", "b"])
        probs = np.zeros((len(labels), 2))
        probs[np.arange(len(labels)), labels] = 1  # right on every example ...
        probs[correct:] = probs[correct:, ::-1]    # ... but the first `correct` ones
        preds = Predictions(np.zeros(1), np.zeros((1, 2)), np.zeros(len(labels)), probs)
        return model_quality(preds, val)

    labels = [0] * 8 + [1] * 2  # majority rate 0.8
    assert quality(8, labels)["weak"] and quality(8, labels)["majority_rate"] == 0.8
    assert quality(8, labels)["val_accuracy"] == 0.8
    assert not quality(9, labels)["weak"]  # 0.9 closes half the gap to 1.0
    assert "warning" in quality(8, labels) and "warning" not in quality(10, labels)


def test_many_classes_do_not_flood_the_header(tiny_model, tmp_path):
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(400)]
    rows = [{"text": f"{words[2 * c]} {words[2 * c + 1]} {rng.choice(words)}",
             "label": f"class-{c:03d}"} for c in range(200) for _ in range(3)]
    pd.DataFrame(rows).to_csv(tmp_path / "many.csv", index=False)
    out = tmp_path / "run"
    assert cli("--data", tmp_path / "many.csv", "--noise", "0", "--methods", "datainf",
               "--val-fraction", "0.34", *common(tiny_model, out), "--epochs", "1",
               "--max-epochs", "1") == 0  # one epoch: only the header is looked at
    page = (out / "report.html").read_text()
    header = page.split("<h2>")[0]
    assert "200 classes (class-000, class-001" in header and "and 188 more)" in header
    assert "class-150" not in header
