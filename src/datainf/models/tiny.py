"""Tiny models built from a config (random weights), saved once: for ``--quick`` runs, tests
and benchmarks' smoke runs, never for results."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..assets import built_once
from .diffusion import MAX_TOKENS
from .hf import _is_complete, smollm2_gguf


def _is_pipeline(folder: Path) -> bool:
    return (folder / "model_index.json").is_file()


def tiny_chat_model(folder: str | os.PathLike) -> Path:
    """A 2-layer Llama causal LM with SmolLM2's tokenizer and chat template, built from a config
    (random weights) and saved in ``folder`` once: for --quick runs and tests, never for
    results."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if _is_complete(Path(folder)):
        return Path(folder)
    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)

    def build(out: Path) -> None:
        LlamaForCausalLM(config).save_pretrained(out)
        tokenizer.save_pretrained(out)

    return built_once(Path(folder), build, _is_complete, "checkpoint")


def tiny_digit_pipeline(folder: str | os.PathLike) -> Path:
    """A digit pipeline with a 2-level UNet of random weights on 8 x 8 images (MiniLM as its
    text encoder), built from a config and saved in ``folder`` once: for --quick runs and
    tests, never for results."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    if _is_pipeline(Path(folder)):
        return Path(folder)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=384,
        attention_head_dim=2, norm_num_groups=4)

    def build(out: Path) -> None:
        unet.save_pretrained(out / "unet")
        DDPMScheduler(num_train_timesteps=1000).save_pretrained(out / "scheduler")
        (out / "model_index.json").write_text(json.dumps(
            {"_class_name": "DataInfDigitPipeline", "datainf_text_encoder": "minilm",
             "image_size": 8, "max_tokens": MAX_TOKENS}, indent=2))

    return built_once(Path(folder), build, _is_pipeline, "pipeline")
