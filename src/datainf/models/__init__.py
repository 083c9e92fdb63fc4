"""Models: Hugging Face text models with PEFT LoRA, and text-to-image pipelines."""
