"""A model name that is neither a local folder nor reachable is answered in seconds, in one
line, before --out is touched; a model that cannot generate is refused by explain-generation."""

import time

import pytest
from cli_helpers import bad, common

import datainf.models.hf as hf
from datainf import DataInfError


@pytest.fixture
def hub_down(monkeypatch):
    """The hub client online, its endpoint a closed port on this machine (nothing listens)."""
    import socket

    from huggingface_hub import constants

    with socket.socket() as s:  # a free port, closed again at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy",
                 "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def test_hub_reachable_says_no_at_once(hub_down, monkeypatch):
    from huggingface_hub import constants

    started = time.monotonic()
    assert not hf.hub_reachable()
    assert time.monotonic() - started < hf.HUB_PROBE_SECONDS + 1
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert not hf.hub_reachable()


@pytest.mark.parametrize("offline", [True, False])
def test_unreachable_hub_name_is_one_line_in_seconds(tiny_model, csv_file, tmp_path, capsys,
                                                     hub_down, monkeypatch, offline):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    out = tmp_path / "run"
    options = common(tiny_model, out)
    options[options.index("--model") + 1] = "models/nope"  # no folder "models" here
    started = time.monotonic()
    err = bad(capsys, "--data", csv_file, *options)
    assert time.monotonic() - started < 10
    assert "no local folder models/nope, and the model hub cannot be reached from here" in err
    assert err.endswith("pass a local folder, 'minilm' or 'smollm2'\n")
    assert not out.exists()


def test_generation_hint_names_only_the_chat_model(tmp_path, capsys, hub_down):
    from datainf.cli import main

    capsys.readouterr()
    train = tmp_path / "train.jsonl"
    train.write_text('{"prompt": "a", "response": "b"}\n')
    code = main(["explain-generation", "--train", str(train), "--queries", str(train),
                 "--model", "some/name", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code != 0 and err.count("\n") == 1
    assert "the model hub cannot be reached" in err
    assert err.endswith("pass a local folder or 'smollm2'\n")
    assert "minilm" not in err and not (tmp_path / "run").exists()


def test_an_encoder_is_not_a_causal_lm():
    """MiniLM (BERT) would load as BertLMHeadModel with a random LM head: refused."""
    with pytest.raises(DataInfError, match=r"minilm is not a causal language model: its "
                                           r"checkpoint has no weights for \d+ tensors"):
        hf.load_causal_lm("minilm")


def test_explain_generation_refuses_an_encoder(tmp_path, capsys, tiny_chat_model):
    """Refused before any training, in one line; the same --out then serves a causal LM."""
    from test_explain_generation import files, run

    train, queries = files.__wrapped__(tmp_path)
    out = tmp_path / "run"
    capsys.readouterr()
    assert run("minilm", train, queries, out, "--lora-targets", "query,value") != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a causal language model" in err
    assert not (out / "adapter").exists()
    assert run(tiny_chat_model, train, queries, out) == 0
