"""Models: Hugging Face text models with PEFT LoRA, and text-to-image pipelines."""

from .hf import add_lora, load_adapter, load_causal_lm, load_classifier

__all__ = ["add_lora", "load_adapter", "load_causal_lm", "load_classifier"]
