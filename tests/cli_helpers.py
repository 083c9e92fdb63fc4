"""Shared pieces of the tests that run the ``datainf`` command on a tiny BERT classifier."""

import numpy as np

from datainf.cli import main

WORDS = {
    "sport": "match goal team player score league coach win cup season",
    "money": "market shares profit bank price trade growth tax firm stock",
    "tech": "software phone chip data users network mobile computer web digital",
}


def make_texts(n: int, seed: int):
    """``n`` eight-word texts drawn from each class's words, classes in turn."""
    rng = np.random.default_rng(seed)
    classes = sorted(WORDS)
    labels = [classes[i % len(classes)] for i in range(n)]
    texts = [" ".join(rng.choice(WORDS[c].split(), size=8)) for c in labels]
    return texts, labels


def cli(*args):
    """``datainf detect-mislabeled --quiet ARGS``; returns the exit code."""
    return main(["detect-mislabeled", "--quiet", *map(str, args)])


def common(tiny_model, out):
    """Options that make a run on the tiny model take seconds."""
    return ["--model", tiny_model, "--out", out, "--epochs", "3", "--max-epochs", "3",
            "--batch-size", "8", "--max-length", "16", "--learning-rate", "3e-3", "--lora-r", "2"]


def bad(capsys, *args):
    """Runs the command, expects a non-zero exit and one line on stderr; returns that line."""
    capsys.readouterr()  # what earlier commands printed
    code = cli(*args)
    err = capsys.readouterr().err
    assert code != 0
    assert err.startswith("datainf: error: ") and err.count("\n") == 1, err
    return err
