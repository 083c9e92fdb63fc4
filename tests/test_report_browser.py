"""The report as a user sees it: a real run's report.html rendered in headless Chromium and
checked by scripts/check_report.py (skipped where no Chromium is installed)."""

import importlib.util
import json
import re
from pathlib import Path

import pandas as pd
import pytest
from cli_helpers import cli, common, make_texts

from datainf.cli import main

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_report.py"
_spec = importlib.util.spec_from_file_location("check_report", SCRIPT)
check_report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_report)

pytestmark = pytest.mark.skipif(
    check_report.chromium() is None,
    reason="chromium is not installed: apt-get install chromium (.ci/run installs it)")


@pytest.fixture(scope="module")
def report(tiny_model, tmp_path_factory):
    """report.html of a run on a CSV with ids and one record without a label (a data note)."""
    folder = tmp_path_factory.mktemp("browser")
    texts, labels = make_texts(60, seed=3)
    labels[5] = ""
    pd.DataFrame({"id": [f"doc-{i:03d}" for i in range(60)], "text": texts,
                  "label": labels}).to_csv(folder / "train.csv", index=False)
    out = folder / "run"
    # one epoch at a tiny learning rate keeps the model at chance on any machine: weak
    # --noise: flipped labels on purpose, so that the page has its detection plot
    assert cli("--data", folder / "train.csv", "--noise", "0.2", "--methods",
               "datainf,hessian_free", "--top", "12", *common(tiny_model, out), "--epochs", "1",
               "--learning-rate", "1e-6") == 0
    return out / "report.html"


def test_the_rendered_report_shows_everything(report):
    summary = json.loads((report.parent / "summary.json").read_text())
    # what the check must find on the page: the plot, ids, the weak-model and data warnings
    assert summary["n_flipped"] and summary["model_quality"]["weak"]
    assert summary["data"]["notes"]
    shot = report.with_suffix(".png")
    assert check_report.check(report, shot) == []
    assert shot.stat().st_size > 10_000


def test_the_check_finds_what_is_missing(report, tmp_path):
    page = report.read_text()
    for name in ("summary.json", "suspects.csv", "scores.csv"):
        (tmp_path / name).write_bytes((report.parent / name).read_bytes())
    broken = tmp_path / "report.html"
    # no suspects table, no weak-model warning, a plot that is no PNG
    page = re.sub(r"(<h2>Top \d+ suspects.*?</p>\s*)<table[^>]*>.*?</table>", r"\1", page,
                  count=1, flags=re.S)
    page = page.replace("<p class='warning'>the fine-tuned model is weak", "<p>", 1)
    page = re.sub(r"base64,[^']+'", "base64,AAAA'", page, count=1)
    broken.write_text(page)
    problems = check_report.check(broken, tmp_path / "shot.png")
    assert "the per-label table" not in " ".join(problems)
    assert len(problems) == 3, problems
    assert problems[0].startswith("the detection-curve image does not decode")
    assert problems[1] == "no suspects table (under 'Top N suspects by ...')"
    assert problems[2].startswith("no weak-model warning")


@pytest.fixture(scope="module")
def token_report(tiny_chat_model, tmp_path_factory):
    """report.html of explain-generation --per-token on a tiny Llama (two queries)."""
    folder = tmp_path_factory.mktemp("tokens")
    rows = [{"prompt": f"Name a {topic}.", "response": word}
            for topic, words in (("colour", ("red", "blue green")), ("animal", ("cat", "dog")))
            for word in words * 2]
    for name, records in (("train.jsonl", rows), ("queries.jsonl", rows[::4])):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    out = folder / "run"
    assert main(["explain-generation", "--train", str(folder / "train.jsonl"), "--queries",
                 str(folder / "queries.jsonl"), "--model", tiny_chat_model, "--out", str(out),
                 "--epochs", "1", "--batch-size", "4", "--methods", "datainf,cosine",
                 "--top", "2", "--per-token", "--quiet"]) == 0
    return out / "report.html"


def test_the_token_view_draws_every_token(token_report, tmp_path):
    """Each response token by token, the training examples' tokens, and, opened at a token,
    that token's examples as tokens.jsonl lists them; the check finds a page whose script is
    gone."""
    shot = tmp_path / "shot.png"
    assert check_report.check(token_report, shot) == []
    assert shot.stat().st_size > 10_000
    for name in ("tokens.jsonl", "summary.json"):
        (tmp_path / name).write_bytes((token_report.parent / name).read_bytes())
    broken = tmp_path / "report.html"
    broken.write_text(re.sub(r"<script>.*?</script>", "", token_report.read_text(), flags=re.S))
    problems = check_report.check(broken, tmp_path / "broken.png")
    assert any("token spans for" in p for p in problems), problems
