"""Tiny models built from configs, with LoRA, for fast gradient tests (no downloads)."""

import peft
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
)


def tiny_bert_classifier(num_labels: int = 3, seed: int = 0, dtype=torch.float64):
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=60,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        num_labels=num_labels,
        max_position_embeddings=32,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    return _with_lora(BertForSequenceClassification(config), ["query", "value"], ["classifier"],
                      seed, dtype)


def _llama_config(**kw):
    return LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        pad_token_id=0,
        **kw,
    )


def tiny_llama_classifier(num_labels: int = 3, seed: int = 0, dtype=torch.float64):
    """Pools the last non-pad token, so (unlike BERT's first-token pooling) left padding is fine."""
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(_llama_config(num_labels=num_labels))
    return _with_lora(model, ["q_proj", "v_proj"], ["score"], seed, dtype)


def tiny_llama(seed: int = 0, dtype=torch.float64):
    torch.manual_seed(seed)
    return _with_lora(LlamaForCausalLM(_llama_config()), ["q_proj", "v_proj"], None, seed, dtype)


def tiny_unet(seed: int = 0, dtype=torch.float64):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    # explain-image's targets: self- and cross-attention (to_k, to_v read the text states)
    return _with_lora(unet, ["to_q", "to_k", "to_v", "to_out.0"], None, seed, dtype)


def _with_lora(model, targets, heads, seed, dtype):
    """LoRA r = 2 (dropout 0.1, which collection must switch off) with random A and B."""
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=targets, modules_to_save=heads, lora_dropout=0.1))
    _randomize_lora(model, seed)
    return model.to(dtype)


def _randomize_lora(model, seed):
    """LoRA B starts at zero; give it values so that every gradient is non-trivial."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def padded_text_batch(lengths, vocab: int, side: str, seed: int, prompt: int | None = None):
    """input_ids / attention_mask with the given lengths, padded on ``side`` with id 0.

    With ``prompt``, also causal-LM labels: -100 on the first ``prompt`` tokens and on padding.
    """
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    labels = torch.full((len(lengths), T), -100, dtype=torch.long)
    for b, n in enumerate(lengths):
        tokens = torch.randint(1, vocab, (n,), generator=g)
        span = slice(T - n, T) if side == "left" else slice(0, n)
        ids[b, span] = tokens
        mask[b, span] = 1
        if prompt is not None:
            lab = tokens.clone()
            lab[:prompt] = -100
            labels[b, span] = lab
    batch = {"input_ids": ids, "attention_mask": mask}
    if prompt is not None:
        batch["labels"] = labels
    return batch


def tiny_stable_diffusion(folder):
    """A Stable-Diffusion-shaped pipeline folder built from configs (random weights): an
    AutoencoderKL (16 x 16 RGB -> 4 x 8 x 8 latents), a UNet on the latents, a 1-layer BERT
    text encoder with MiniLM's tokenizer, a DDPM scheduler; saved as a pipeline's
    save_pretrained lays it out. For the --pipeline code path, never for results."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, BertConfig, BertModel

    from datainf.models.hf import minilm_path

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=32)).save_pretrained(
        folder / "text_encoder")
    tokenizer.save_pretrained(folder / "tokenizer")
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                  down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
                  sample_size=16).save_pretrained(folder / "vae")
    UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
        attention_head_dim=2, norm_num_groups=4).save_pretrained(folder / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(folder / "scheduler")
    return folder
