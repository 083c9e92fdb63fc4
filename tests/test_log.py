"""The library speaks through ``logging.getLogger("datainf")``: its stage lines show by
default, a Python caller silences or redirects them with logging alone, and warnings still
show when the stage lines are silenced; its messages name a setting as the caller typed it."""

import logging

import pytest

from datainf.cli import main
from datainf.errors import DataInfError
from datainf.jobs.detect_mislabeled import Config, run


def tiny_run(tiny_model, data, out, **settings) -> Config:
    quick = {"epochs": 1, "max_epochs": 1, "batch_size": 8, "max_length": 16,
             "methods": ("datainf",), "train_size": None, "val_size": None}
    return Config(data=str(data), model=tiny_model, out=str(out), **{**quick, **settings})


def test_stage_lines_silenced_and_redirected_with_logging(tiny_model, csv_file, tmp_path,
                                                          capsys):
    run(tiny_run(tiny_model, csv_file, tmp_path / "a"))
    assert "[datainf] fine-tuning: " in capsys.readouterr().out

    logger = logging.getLogger("datainf")
    records: list[logging.LogRecord] = []
    caught = logging.Handler()
    caught.emit = records.append
    level = logger.level
    logger.setLevel(logging.WARNING)
    logger.addHandler(caught)
    try:  # noise 0.9 of 60 labels: the data stage warns
        run(tiny_run(tiny_model, csv_file, tmp_path / "b", noise=0.9))
    finally:
        logger.setLevel(level)
        logger.removeHandler(caught)
    shown = capsys.readouterr()
    assert "[datainf]" not in shown.out
    assert "datainf: warning: " in shown.err
    assert records and all(r.levelno == logging.WARNING for r in records)
    assert any(r.getMessage() in shown.err for r in records)


def test_messages_name_settings_as_the_caller_typed_them(tiny_model, csv_file, tmp_path,
                                                         capsys):
    """A Python caller reads the keyword it gave, a command-line user the option."""
    with pytest.raises(DataInfError, match=r"^batch_size must be at least 1, not 0$"):
        run(tiny_run(tiny_model, csv_file, tmp_path / "a", batch_size=0))
    with pytest.raises(DataInfError, match=r"^device='gpu' is not a device name"):
        run(tiny_run(tiny_model, csv_file, tmp_path / "a", device="gpu"))
    capsys.readouterr()
    assert main(["detect-mislabeled", "--data", str(csv_file), "--model", tiny_model,
                 "--batch-size", "0", "--out", str(tmp_path / "b")]) == 2
    assert "datainf: error: --batch-size must be at least 1, not 0" in capsys.readouterr().err
