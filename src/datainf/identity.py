"""What identifies what: digests of files, models, adapters and examples, which run
folders, stores and caches record and compare to refuse what another input produced."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch


def fingerprint(path: str | os.PathLike) -> str:
    """sha256 (first 16 hex digits) of a file's bytes, or of a folder's files (names and
    bytes, sorted by relative path)."""
    digest = hashlib.sha256()
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    for file in files:
        if root.is_dir():
            digest.update(str(file.relative_to(root)).encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def adapter_digest(folder: Path) -> str:
    """Fingerprint of a saved adapter's weights ("" when there are none)."""
    weights = folder / "adapter_model.safetensors"
    return fingerprint(weights) if weights.exists() else ""


# auto_mapping: PEFT records the base class of a non-transformers model (a diffusers UNet)
# when it saves an adapter, so a reloaded adapter's config has it and a fresh one's has not
_UNSTABLE_KEYS = {"_name_or_path", "name_or_path", "transformers_version",
                  "base_model_name_or_path", "peft_version", "auto_mapping"}


def _config_json(config: Any) -> str:
    """A config as canonical JSON, without keys that name paths or library versions.

    Module-name lists become sorted sets: PEFT appends its default ``modules_to_save`` again
    when it reloads a saved adapter (``["classifier", "score", "classifier", "score"]``).
    """
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    data = {k: v for k, v in data.items() if k not in _UNSTABLE_KEYS}
    for key in ("target_modules", "modules_to_save"):  # PEFT repeats defaults on reload
        if isinstance(data.get(key), list | tuple | set):
            data[key] = sorted(set(data[key]))

    def default(obj: Any) -> Any:
        return sorted(map(str, obj)) if isinstance(obj, set | frozenset) else str(obj)

    return json.dumps(data, sort_keys=True, default=default)


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def model_fingerprint(
    model: Any, *, frozen_samples: int = 1024, trainable_values: bool = True,
    configs: bool = True, head_originals: bool = True,
) -> str:
    """A 16-hex-digit digest of a model's architecture and current weights.

    Hashed: the model's config and any PEFT configs (without paths and library versions, so
    a copied checkpoint or a reload from another place gives the same digest); the name,
    shape, dtype and trainability of every parameter; all bytes of every trainable parameter
    (LoRA matrices, ``modules_to_save`` heads), so any change to them changes the digest; and,
    for frozen parameters, an evenly strided sample of ``frozen_samples`` values per tensor.
    The sample identifies the base checkpoint (two different checkpoints differ everywhere)
    without reading all of it: this costs milliseconds even for billions of frozen weights,
    and, unlike file sizes and mtimes, works for models loaded from the hub or built in memory.
    An edit to frozen weights that misses every sampled value goes unnoticed.
    ``trainable_values=False`` leaves the trainable values out: a digest of the base model and
    the adapter's shape, unchanged by training (the adapter's values are fingerprinted apart).
    ``configs=False`` leaves the configs out: the weights alone, which a trainer's switches in
    the config (``use_cache`` under gradient checkpointing, ...) do not change.
    ``head_originals=False`` leaves out the frozen originals that PEFT keeps of each
    ``modules_to_save`` head (``...original_module...``): its trained copy replaces them in the
    forward pass, so their values (a classifier head's random initialisation) change no output.
    """
    h = hashlib.blake2b(digest_size=8)
    if configs:
        h.update(_config_json(model.config).encode())
        for name, cfg in sorted(getattr(model, "peft_config", {}).items()):
            h.update(f"peft:{name}:{_config_json(cfg)}".encode())
    for name, p in model.named_parameters():
        if not head_originals and ".original_module." in name:
            continue
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}:{p.requires_grad};".encode())
        if p.requires_grad:
            if trainable_values:
                h.update(_tensor_bytes(p))
        elif p.numel():
            flat = p.detach().reshape(-1)
            h.update(_tensor_bytes(flat[:: max(1, flat.numel() // frozen_samples)]))
    return h.hexdigest()


def adapter_fingerprint(model: torch.nn.Module, names: Iterable[str]) -> str:
    """Hash of the named parameters' names, shapes and values (the adapter's weights)."""
    params = dict(model.named_parameters())
    h = hashlib.sha256()
    for name in names:
        p = params[name].detach()
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(p.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def example_digest(hasher, batch: Mapping, b: int) -> None:
    """Feed example b of a batch into ``hasher``, padding removed (batch-size independent)."""
    mask = batch.get("attention_mask")
    for key in sorted(batch):
        value = batch[key]
        if key == "attention_mask":
            continue
        hasher.update(key.encode())
        if isinstance(value, torch.Tensor):
            row = value[b]
            if mask is not None and row.ndim >= 1 and row.shape[0] == mask.shape[1]:
                row = row[mask[b].bool()]
            hasher.update(str((row.dtype, tuple(row.shape))).encode())
            hasher.update(row.detach().cpu().contiguous().numpy().tobytes())
        else:
            hasher.update(repr(value[b] if isinstance(value, Sequence) else value).encode())
