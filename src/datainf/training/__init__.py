"""LoRA fine-tuning."""
