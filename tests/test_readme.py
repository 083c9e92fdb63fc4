"""Every code block of the README runs as written.

- Python blocks (```python): each runs in a fresh namespace, in a temporary folder, after a
  prelude that gives what the README leaves to the user (a tiny model of the block's task and
  its batches, random gradients). The distributed block runs as a one-process gloo group: its
  "nccl" (a GPU backend) becomes "gloo" and its shared folder "/shared/" a temporary one.
- Shell blocks (```sh): every ``datainf`` command line (also behind ``torchrun ... -m``) is
  accepted by the command's own parser (the options exist and their values parse); the
  README's two set-up commands are those of the Makefile.
"""

from __future__ import annotations

import logging
import re
import shlex
import socket
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), re.S | re.M)


def prelude(code: str) -> dict:
    """The user's inputs of a block: ``model`` and ``batches`` (a tiny causal LM for a
    "causal_lm" block, else a tiny BERT classifier), ``train_grads``, ``test_grads`` and
    ``query_grads``."""
    from conftest import random_gradients
    from test_collect_store import text_batches
    from tiny_models import padded_text_batch, tiny_bert_classifier, tiny_llama

    if '"causal_lm"' in code:
        model = tiny_llama()
        whole = padded_text_batch([5, 7, 6, 4, 8, 6], vocab=50, side="right", seed=0, prompt=2)
        batches = [{k: v[i : i + 3] for k, v in whole.items()} for i in (0, 3)]
    else:
        model, batches = tiny_bert_classifier(), text_batches()
    widths = {"layer.0.lora_A": 6, "layer.0.lora_B": 64, "head": 17}
    if "DataInfCallback" in code:  # a user's SFTTrainer set-up, tiny, on one epoch
        return sft_prelude()
    return {"model": model, "batches": batches,
            "train_grads": random_gradients(40, widths, seed=1),
            "test_grads": random_gradients(7, widths, seed=2),
            "query_grads": None}


def sft_prelude() -> dict:
    """``peft_model`` (a tiny chat model with LoRA), ``ds`` (prompt/completion rows), ``cfg``
    (an SFTConfig of one epoch on the CPU) and SFTTrainer, in the working folder."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from datainf.models.hf import add_lora
    from datainf.models.tiny import tiny_chat_model

    folder = tiny_chat_model(Path("chat-model"))
    torch.manual_seed(0)
    return {"peft_model": add_lora(AutoModelForCausalLM.from_pretrained(folder), r=2, alpha=4),
            "ds": Dataset.from_list([{"prompt": f"Say {i}.", "completion": f" {i}"}
                                     for i in range(6)]),
            "cfg": SFTConfig(output_dir="trainer", report_to=[], use_cpu=True, max_length=32,
                             num_train_epochs=1, save_strategy="no", logging_strategy="no",
                             per_device_train_batch_size=3),
            "SFTTrainer": SFTTrainer}


def test_the_readme_has_its_code_blocks():
    assert len(blocks("python")) >= 4 and len(blocks("sh")) >= 8


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_block_runs(index, tmp_path, monkeypatch):
    import torch.distributed as dist

    from datainf import collect_gradients

    code = blocks("python")[index]
    monkeypatch.chdir(tmp_path)
    names = prelude(code)
    if "init_process_group" in code:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
                           "WORLD_SIZE": "1"}.items():
            monkeypatch.setenv(key, value)
        code = code.replace('"nccl"', '"gloo"').replace('"/shared/', f'"{tmp_path}/shared/')
        names["collect_gradients"] = collect_gradients  # imported by the block before it
        from datainf import DataInf

        names["DataInf"] = DataInf
        names["query_grads"] = collect_gradients(names["model"], names["batches"][:1],
                                                 "causal_lm")
    level = logging.getLogger("datainf").level  # a block may set it: not for the tests after
    try:
        exec(compile(code, f"README.md python block {index + 1}", "exec"), names)
    finally:
        logging.getLogger("datainf").setLevel(level)
        if dist.is_initialized():
            dist.destroy_process_group()
    results = [v for v in names.values() if isinstance(v, torch.Tensor)]
    assert all(torch.isfinite(v).all() for v in results if v.is_floating_point())


def command_lines() -> list[list[str]]:
    """The shell blocks' lines, continuation lines joined and comments dropped, as words."""
    lines = []
    for block in blocks("sh"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                lines.append(words)
    return lines


def test_every_datainf_command_line_parses():
    from datainf.cli import build_parser

    parser = build_parser()
    checked = 0
    for words in command_lines():
        if words[0] == "torchrun":
            words = words[words.index("datainf") + 1 :]  # ... -m datainf ARGUMENTS
        elif words[0] == "datainf":
            words = words[1:]
        else:
            continue
        parser.parse_args(words)  # an unknown option or a bad value exits with status 2
        checked += 1
    assert checked >= 12


def test_the_two_setup_commands_are_the_makefile_targets():
    first = [words for words in command_lines() if words[0] == "make"]
    assert [w[:2] for w in first[:2]] == [["make", "run"], ["make", "test"]]
    makefile = (README.parent / "Makefile").read_text()
    assert "\nrun: setup\n" in makefile and "\ntest: setup\n" in makefile
