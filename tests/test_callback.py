"""DataInfCallback on a transformers Trainer and TRL's SFTTrainer (tiny models from configs):
the run folder's store equals per-example gradients of the final adapter on each unpadded
example with the labels the trainer used, and every refused setting is refused before the
first training step."""

import json
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
import torch
import trl
from tolerances import relative
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from datainf import DataInfError
from datainf.cli import main
from datainf.gradients.store import GradientStore
from datainf.integrations import DataInfCallback
from datainf.models.hf import add_lora, minilm_path
from datainf.models.tiny import tiny_chat_model
from datainf.training.moments import read_second_moments

# float32 store against a float64 reference on one unpadded example: rounding of a 2-layer
# model of width 64 in float32 (a few 1e-7 per layer), far below the 1e-5
BOUND = 1e-5


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    folder = tiny_chat_model(tmp_path_factory.mktemp("chat") / "model")
    return folder, AutoTokenizer.from_pretrained(folder)


def sft_model(folder):
    torch.manual_seed(0)
    return add_lora(AutoModelForCausalLM.from_pretrained(folder), r=2, alpha=4)


def sft(folder, tokenizer, out, tmp_path, rows=10, **settings):
    data = datasets.Dataset.from_list([{"prompt": f"Say {i} twice:", "completion": f" {i} {i}"}
                                       for i in range(rows)])
    args = trl.SFTConfig(output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=4,
                         num_train_epochs=2, learning_rate=1e-2, report_to=[],
                         save_strategy="no", logging_strategy="no", use_cpu=True,
                         max_length=64, **settings)
    return trl.SFTTrainer(model=sft_model(folder), train_dataset=data, args=args,
                          processing_class=tokenizer, callbacks=[DataInfCallback(out)])


def reference_rows(trained, fresh, examples, loss):
    """Per example, the gradient of ``loss(model64, example)`` on the unpadded example in
    float64, model64 = ``fresh`` (the same base and LoRA, untouched by any trainer) with the
    trained adapter's values: {parameter name: (n, numel)}."""
    values = {n: p.detach() for n, p in trained.named_parameters() if p.requires_grad}
    model64 = fresh.double().eval()
    params = {n: p for n, p in model64.named_parameters() if p.requires_grad}
    assert set(params) == set(values)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(values[n])
    rows = {n: [] for n in params}
    for example in examples:
        grads = torch.autograd.grad(loss(model64, example), list(params.values()))
        for n, g in zip(params, grads, strict=True):
            rows[n].append(g.reshape(-1))
    return {n: torch.stack(v) for n, v in rows.items()}


def completion_loss(model, example):
    ids = torch.tensor([example["input_ids"]])
    labels = torch.tensor(example["labels"])[1:]
    logits = model(input_ids=ids).logits[0, :-1]
    scored = labels != -100
    return torch.nn.functional.cross_entropy(logits[scored], labels[scored])


def test_sft_trainer_leaves_a_run_folder(chat, tmp_path):
    folder, tokenizer = chat
    out = tmp_path / "run"
    trainer = sft(*chat, out, tmp_path)
    trainer.train()
    record = json.loads((out / "callback.json").read_text())
    assert record["task"] == "causal_lm" and record["n_train"] == 10
    assert record["trainer"]["steps"] == trainer.state.global_step == 6
    store = GradientStore.open(out / "gradients" / "train")
    assert store.num_rows == 10
    examples = [trainer.train_dataset[i] for i in range(10)]
    # the labels the model trained on: the completion only (TRL's completion-only loss)
    assert all(-100 in e["labels"] and e["labels"][-1] != -100 for e in examples)
    expected = reference_rows(trainer.model, sft_model(folder), examples, completion_loss)
    assert set(store.block_names) == set(expected)
    for name, rows in expected.items():
        assert relative(store.read_block(name), rows) < BOUND, name
    # the adapter, its optimizer moments and the examples' text
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert set(read_second_moments(out / "adapter")) == set(store.block_names)
    lines = [json.loads(x) for x in (out / "examples.jsonl").read_text().splitlines()]
    # the trainer's dataloader no longer holds the text columns: the tokens, decoded, split
    # where the scored tokens begin
    assert lines[3]["prompt"] == "Say 3 twice:" and lines[3]["completion"] == " 3 3<|im_end|>"


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    """A Trainer's LoRA fine-tune of a tiny 3-class BERT (saved in a folder, as a base model
    is) with the callback: (base folder, run folder, dataset, trained model, fresh model)."""
    tmp = tmp_path_factory.mktemp("classifier")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, num_labels=3)
    folder = tmp / "base"
    BertModel(config).save_pretrained(folder)  # no head: each load initialises one
    tokenizer.save_pretrained(folder)

    def classifier():
        torch.manual_seed(1)  # another head than the command's (seeded 0): unused once trained
        return add_lora(BertForSequenceClassification.from_pretrained(folder), r=2, alpha=4,
                        target_modules=["query", "value"])

    model = classifier()
    data = datasets.Dataset.from_dict({"text": CLASSIFIER_TEXTS,
                                       "label": [i % 3 for i in range(9)]})
    data = data.map(lambda b: tokenizer(b["text"], truncation=True, max_length=16),
                    batched=True)
    args = TrainingArguments(output_dir=str(tmp / "trainer"), per_device_train_batch_size=4,
                             num_train_epochs=1, report_to=[], save_strategy="no",
                             logging_strategy="no", use_cpu=True)
    out = tmp / "run"
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer,
                      callbacks=[DataInfCallback(out)])
    trainer.train()
    return folder, out, data, trainer.model, classifier()


CLASSIFIER_TEXTS = [f"text number {i} about {'abc'[i % 3]}" for i in range(9)]


def test_trainer_on_a_classifier(classifier_run):
    _, out, data, trained, fresh = classifier_run
    store = GradientStore.open(out / "gradients" / "train")
    record = json.loads((out / "callback.json").read_text())
    assert record["task"] == "classification"
    assert record["classes"] == ["LABEL_0", "LABEL_1", "LABEL_2"]

    def loss(model64, example):
        ids = torch.tensor([example["input_ids"]])
        logits = model64(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        return torch.nn.functional.cross_entropy(logits, torch.tensor([example["label"]]))

    expected = reference_rows(trained, fresh, [data[i] for i in range(9)], loss)
    for name, rows in expected.items():
        assert relative(store.read_block(name), rows) < BOUND, name
    lines = [json.loads(x) for x in (out / "examples.jsonl").read_text().splitlines()]
    # decoded, [CLS] ... [SEP]; the tokens the collator made of the example alone
    assert CLASSIFIER_TEXTS[4] in lines[4]["text"] and lines[4]["label"] == 1
    assert lines[4]["inputs"]["input_ids"] == data[4]["input_ids"]
    assert set(lines[4]["inputs"]) == {"input_ids", "attention_mask", "token_type_ids"}


def test_detect_mislabeled_from_the_run_folder(classifier_run, tmp_path, capsys):
    """--run scores the trainer's examples (on their own tokens) against --val-data as the
    standalone command does with the same adapter and data; labels by name or id."""
    folder, run, data, _, _ = classifier_run
    train, val = tmp_path / "train.csv", tmp_path / "val.csv"
    train.write_text("text,label\n" + "".join(f"{t},{i % 3}\n"
                                             for i, t in enumerate(CLASSIFIER_TEXTS)))
    val.write_text("text,label\n" + "".join(f"other text {i} about {'abc'[i % 3]},LABEL_{i % 3}\n"
                                           for i in range(6)))
    common = ["--methods", "datainf,less,repsim", "--max-length", "16", "--quiet"]
    assert main(["detect-mislabeled", "--run", str(run), "--val-data", str(val), "--out",
                 str(tmp_path / "a"), *common]) == 0
    val.write_text(val.read_text().replace("LABEL_", ""))  # the ids: the same classes
    assert main(["detect-mislabeled", "--model", str(folder), "--adapter", str(run / "adapter"),
                 "--data", str(train), "--val-data", str(val), "--noise", "0", "--out",
                 str(tmp_path / "b"), *common]) == 0
    a = pd.read_csv(tmp_path / "a" / "scores.csv").sort_values("row")
    b = pd.read_csv(tmp_path / "b" / "scores.csv").sort_values("row")
    assert list(a["row"]) == list(range(9))
    for column in ("datainf", "less", "repsim", "loss"):
        # the same float32 gradients batched otherwise (4 a batch in the trainer's collator,
        # 16 in ours): one float32 pass apart, see tolerances
        assert relative(torch.tensor(a[f"{column}_score"].to_numpy()),
                        torch.tensor(b[f"{column}_score"].to_numpy())) < 1e-5, column
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert "gradients" in summary["reused_stages"] and summary["n_train"] == 9
    # a validation label that is none of the run's classes: refused before the model loads
    val.write_text("text,label\nsome text,7\n")
    capsys.readouterr()
    assert main(["detect-mislabeled", "--run", str(run), "--val-data", str(val), "--out",
                 str(tmp_path / "c"), *common]) == 2
    assert "labels ['7'] are none of the run's classes" in capsys.readouterr().err


@pytest.mark.parametrize("problem, message", [
    ("no lora", "has no trainable LoRA adapter"),
    ("out not empty", "already holds files"),
    ("out is a file", "is a file"),
    ("packing", "packing and padding-free"),
    ("fsdp", "FSDP is not supported"),
])
def test_refused_at_construction(chat, tmp_path, problem, message):
    folder, tokenizer = chat
    out = tmp_path / "run"
    settings = {}
    if problem == "out not empty":
        out.mkdir()
        (out / "old.txt").write_text("x")
    elif problem == "out is a file":
        out.write_text("x")
    elif problem == "packing":
        settings["packing"] = True
    with pytest.raises(DataInfError, match=message):
        if problem == "no lora":
            data = datasets.Dataset.from_list([{"prompt": "a", "completion": " b"}])
            trl.SFTTrainer(model=AutoModelForCausalLM.from_pretrained(folder),
                           train_dataset=data, processing_class=tokenizer,
                           args=trl.SFTConfig(output_dir=str(tmp_path / "t"), report_to=[],
                                              use_cpu=True),
                           callbacks=[DataInfCallback(out)])
        elif problem == "fsdp":
            callback = DataInfCallback(out)
            args = type("Args", (), {"fsdp": "full_shard", "process_index": 0})()
            callback.on_init_end(args, None, None, model=sft_model(folder))
        else:
            sft(folder, tokenizer, out, tmp_path, **settings)


def test_unbatchable_dataset_refused_before_the_first_step(chat, tmp_path):
    """A dataset whose first example the collator cannot batch alone: refused when training
    begins, before any step changes the adapter."""
    folder, tokenizer = chat
    trainer = sft(folder, tokenizer, tmp_path / "run", tmp_path)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()
              if p.requires_grad}
    original = trainer.data_collator

    def collator(examples):
        if len(examples) == 1:
            raise ValueError("needs pairs")
        return original(examples)

    trainer.data_collator = collator
    with pytest.raises(DataInfError, match="cannot batch the first training example alone"):
        trainer.train()
    assert trainer.state.global_step == 0
    for n, p in trainer.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, before[n])


def test_explain_generation_from_the_run_folder(chat, tmp_path, capsys):
    """SFTTrainer on conversational prompt/completion rows tokenizes them as explain-generation
    does (the chat template, the completion scored): --run on its folder scores the queries as
    the standalone command does with the same adapter and data."""
    folder, tokenizer = chat
    rows = [{"prompt": [{"role": "user", "content": f"Say {i} twice."}],
             "completion": [{"role": "assistant", "content": f"{i} {i}"}]} for i in range(8)]
    args = trl.SFTConfig(output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=3,
                         num_train_epochs=2, learning_rate=1e-2, report_to=[],
                         save_strategy="no", logging_strategy="no", use_cpu=True, max_length=64)
    run = tmp_path / "run"
    trl.SFTTrainer(model=sft_model(folder), train_dataset=datasets.Dataset.from_list(rows),
                   args=args, processing_class=tokenizer,
                   callbacks=[DataInfCallback(run)]).train()
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"messages": r["prompt"] + r["completion"]}) + "\n"
                             for r in rows))
    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(json.dumps({"prompt": f"Say {i} twice.", "response": f"{i} {i}"})
                               + "\n" for i in (3, 9)))
    common = ["--queries", str(queries), "--methods", "datainf,cosine", "--quiet"]
    assert main(["explain-generation", "--run", str(run), "--out", str(tmp_path / "a"),
                 "--per-token", *common]) == 0
    assert main(["explain-generation", "--model", str(folder), "--adapter", str(run / "adapter"),
                 "--train", str(train), "--out", str(tmp_path / "b"), *common]) == 0
    a, b = np.load(tmp_path / "a" / "scores.npz"), np.load(tmp_path / "b" / "scores.npz")
    for method in ("datainf", "cosine"):
        # the same float32 gradients batched otherwise (3 a batch in the trainer's collator,
        # 8 in ours): one float32 pass apart, see tolerances
        assert relative(a[method], b[method]) < 1e-5, (method, relative(a[method], b[method]))
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert "gradients" in summary["reused_stages"] and summary["n_train"] == 8
    top = json.loads((tmp_path / "a" / "top.jsonl").read_text().splitlines()[0])
    assert "Say" in top["datainf"]["helpful"][0]["prompt"]
    # per token: the queries' side only (the folder keeps no training tokens)
    tokens = json.loads((tmp_path / "a" / "tokens.jsonl").read_text().splitlines()[0])
    assert tokens["tokens"] and "training_tokens" not in tokens
    # a run folder whose gradients are of other base weights than the model named: refused
    record = json.loads((run / "callback.json").read_text())
    (run / "callback.json").write_text(json.dumps({**record, "weights_fingerprint": "0" * 16}))
    capsys.readouterr()
    assert main(["explain-generation", "--run", str(run), "--out", str(tmp_path / "c"),
                 *common]) == 2
    assert "its gradients were made with another model or adapter" in capsys.readouterr().err


@pytest.mark.parametrize("command, extra, message", [
    ("explain-generation", ["--train", "{q}"], "give it without --train and --adapter"),
    ("explain-generation", [], "has no callback.json"),
    ("explain-generation", ["--methods", "datainf,repsim"],
     "repsim needs the training examples' representations"),
    ("detect-mislabeled", ["--data", "{v}", "--val-data", "{v}"],
     "give it without --data and --adapter"),
    ("detect-mislabeled", [], "--run needs --val-data"),
    ("detect-mislabeled", ["--val-data", "{v}", "--noise", "0.1"], "leave --noise out"),
    ("detect-mislabeled", ["--val-data", "{v}", "--drop-top", "2"],
     "drop the rows that suspects.csv names"),
    ("detect-mislabeled", ["--val-data", "{v}"], "has no callback.json"),
])
def test_run_folder_refused(tmp_path, capsys, command, extra, message):
    run = tmp_path / "run"
    run.mkdir()
    q, v = tmp_path / "q.jsonl", tmp_path / "val.csv"
    q.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    v.write_text("text,label\na,0\n")
    args = [command, "--run", str(run), "--out", str(tmp_path / "out"), "--quiet"]
    args += ["--queries", str(q)] if command == "explain-generation" else []
    assert main([*args, *(x.format(q=q, v=v) for x in extra)]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_under_torchrun_each_rank_writes_its_shard(chat, tmp_path):
    """Two processes (torchrun, DDP on gloo): the store has a shard a rank, and its rows are
    the per-example gradients of the final adapter, as one process computes them."""
    import os
    import subprocess
    import sys

    from sft_ranks import ROWS

    from datainf.data.chat import ChatExample, encode_all, lm_batches
    from datainf.models.hf import load_adapter

    folder, tokenizer = chat
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    script = Path(__file__).with_name("sft_ranks.py")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", str(script), str(folder), str(out),
                           str(tmp_path / "work")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    store = GradientStore.open(out / "gradients" / "train")
    assert store.shards == 2 and store.complete and store.num_rows == len(ROWS)
    model = load_adapter(AutoModelForCausalLM.from_pretrained(folder), out / "adapter")
    examples = [ChatExample(r["prompt"], r["completion"][0]["content"]) for r in ROWS]
    encoded = encode_all(tokenizer, examples, [e.response for e in examples], max_length=64,
                         what="rows")
    from datainf import collect_gradients

    expected = collect_gradients(model, lm_batches(encoded, 3, tokenizer.pad_token_id),
                                 "causal_lm")
    for name, rows in expected.items():
        # float32 both, batched otherwise (2 a rank against 3 here): one float32 pass apart
        assert relative(store.read_block(name), rows) < BOUND, name
