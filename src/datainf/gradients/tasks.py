"""Per-example losses: what a gradient is the gradient OF.

Every task returns one loss per example, each equal to the loss the model gives that example
alone, unpadded: the batch loss whose gradient we take is their SUM, so examples never mix.

- ``classification``: cross entropy of the example's label.
- ``causal_lm``: mean negative log-likelihood of the tokens whose label is not -100 (the
  response), next-token shifted, exactly as the model's own loss computes it for one example.
- ``diffusion``: noise-prediction MSE at fixed timesteps, the noise drawn from a generator seeded
  by (seed, example index, timestep), so it is deterministic and independent of batching. One
  backward pass per timestep; the per-timestep gradients are concatenated (the authors' choice),
  so a block row has len(timesteps) x numel entries.
- a callable ``fn(model, batch) -> (B,) losses`` for anything else.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from ..errors import DataInfError

TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds")


@runtime_checkable
class Task(Protocol):
    """What a gradient is the gradient of: the interface every task below implements (and a
    user's own task object may). A row of the gradients holds ``num_passes`` passes (the
    diffusion task's timesteps) concatenated."""

    num_passes: int

    def settings(self) -> dict:
        """What identifies the task in a store's manifest (JSON values)."""
        ...

    def losses(self, model: torch.nn.Module, batch: Mapping, rows: torch.Tensor,
               pass_index: int) -> torch.Tensor:
        """Per-example losses, shape (B,), of the batch's examples (``rows``: their positions
        in the whole data, (B,)) in pass ``pass_index``; each equal to the example's loss
        alone."""
        ...


def batch_size(batch: Mapping) -> int:
    """Number of examples in a batch (the first dimension of its first tensor)."""
    for key in ("input_ids", "inputs_embeds", "pixel_values", "labels"):
        if key in batch and isinstance(batch[key], torch.Tensor):
            return int(batch[key].shape[0])
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return int(value.shape[0])
    raise DataInfError(f"batch with keys {sorted(batch)} holds no tensor to count examples in")


def text_model_inputs(model: torch.nn.Module, batch: Mapping) -> dict:
    """The batch's model inputs, with position ids from the attention mask when the model takes
    them, so that a left-padded example sees the positions it would see unpadded."""
    if "input_ids" not in batch and "inputs_embeds" not in batch:
        raise DataInfError(
            f"batch has no 'input_ids' (keys: {sorted(batch)}); tokenize the texts first"
        )
    inputs = {k: batch[k] for k in TEXT_INPUTS if k in batch}
    mask = inputs.get("attention_mask")
    if mask is not None and "position_ids" not in inputs and _accepts(model, "position_ids"):
        inputs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)
    return inputs


def _accepts(model: torch.nn.Module, argument: str) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return argument in inspect.signature(base.forward).parameters


def _labels(batch: Mapping, task: str) -> torch.Tensor:
    if "labels" not in batch:
        raise DataInfError(f"task {task!r}: the batch has no 'labels' (keys: {sorted(batch)})")
    return batch["labels"]


@dataclass(frozen=True)
class Classification:
    """Cross entropy of each example's label: loss_b = -log softmax(logits_b)[y_b]."""

    name: str = "classification"
    num_passes: int = 1

    def settings(self) -> dict:
        return {"name": self.name}

    def losses(self, model, batch: Mapping, rows: torch.Tensor, pass_index: int) -> torch.Tensor:
        labels = _labels(batch, self.name)
        B = batch_size(batch)
        if labels.ndim != 1 or labels.shape[0] != B:
            raise DataInfError(
                f"task 'classification': the batch has {B} examples but labels of shape "
                f"{tuple(labels.shape)}; give one class index per example"
            )
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise DataInfError(
                f"task 'classification': labels are {labels.dtype}, not class indices; give "
                "integer labels (e.g. torch.long), 0 .. classes - 1"
            )
        logits = model(**text_model_inputs(model, batch)).logits
        classes = logits.shape[-1]
        outside = (labels < 0) | (labels >= classes)
        if outside.any():
            first = int(outside.nonzero()[0, 0])
            raise DataInfError(
                f"task 'classification': label {int(labels[first])} of example "
                f"{int(rows[first])} is not a class of the model, which has {classes} "
                f"(0 .. {classes - 1}); give labels in that range or a head with more classes"
            )
        return F.cross_entropy(logits, labels.to(logits.device), reduction="none")


@dataclass(frozen=True)
class CausalLM:
    """Mean NLL of the scored tokens: loss_b = mean_{t: y_bt != -100} -log p(y_bt | x_b,<t)."""

    name: str = "causal_lm"
    num_passes: int = 1

    def settings(self) -> dict:
        return {"name": self.name}

    def losses(self, model, batch: Mapping, rows: torch.Tensor, pass_index: int) -> torch.Tensor:
        labels = _labels(batch, self.name)
        inputs = text_model_inputs(model, batch)
        reference = inputs.get("input_ids", inputs.get("inputs_embeds"))
        if labels.shape != reference.shape[:2]:
            raise DataInfError(
                f"task 'causal_lm': labels of shape {tuple(labels.shape)} do not match the "
                f"inputs of shape {tuple(reference.shape[:2])}; give one label per token, "
                "-100 where a token is not scored"
            )
        # next-token prediction: position t predicts token t + 1
        targets = labels[:, 1:]
        scored = targets != -100
        counts = scored.sum(1)
        if (counts == 0).any():
            b = int((counts == 0).nonzero()[0])
            raise DataInfError(
                f"task 'causal_lm': example {int(rows[b])} has no scored tokens (every label "
                "is -100); give its response tokens their ids as labels"
            )
        # logits only from the first position that predicts a scored token on (the vocabulary
        # projection of prompt positions is wasted work): positions first..T-1
        first = int(scored.any(0).nonzero()[0])
        if first > 0 and _accepts(model, "logits_to_keep"):
            inputs["logits_to_keep"] = labels.shape[1] - first
            targets, scored = targets[:, first:], scored[:, first:]
        logits = model(**inputs).logits
        targets, scored = targets.to(logits.device), scored.to(logits.device)
        nll = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            targets.masked_fill(~scored, 0).reshape(-1),
            reduction="none",
        ).view(targets.shape)
        return (nll * scored).sum(1) / counts


@dataclass(frozen=True)
class Diffusion:
    """Noise-prediction MSE at fixed timesteps, noise seeded per (seed, example, timestep).

    ``noise_stream`` 0: the noise of row i is the same in every store made with ``seed``, so a
    query and the training example at the same position share it (the authors' notebook);
    another value draws every row's noise from its own stream.

    loss_{b,t} = mean over pixels of (eps_theta(x_t, t, cond) - eps)^2 with
    x_t = scheduler.add_noise(x_0, eps, t); one pass (and gradient) per timestep.
    The batch needs ``pixel_values`` (images or latents) and may hold ``encoder_hidden_states``
    or ``class_labels`` for conditioning. ``scheduler`` defaults to diffusers' DDPMScheduler
    with 1000 training steps.
    """

    timesteps: tuple[int, ...] = (25, 225, 425, 525, 725, 925)
    seed: int = 0
    scheduler: object = field(default=None, compare=False)
    name: str = "diffusion"
    noise_stream: int = 0

    @property
    def num_passes(self) -> int:
        return len(self.timesteps)

    def settings(self) -> dict:
        scheduler = self._scheduler()
        return {
            "name": self.name,
            "timesteps": list(self.timesteps),
            "seed": self.seed,
            # stream 0's settings are those of stores written before there were streams
            **({"noise_stream": self.noise_stream} if self.noise_stream else {}),
            "scheduler": type(scheduler).__name__,
            "scheduler_config": {
                k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")
            },
        }

    def _scheduler(self):
        if self.scheduler is not None:
            return self.scheduler
        from diffusers import DDPMScheduler

        object.__setattr__(self, "scheduler", DDPMScheduler(num_train_timesteps=1000))
        return self.scheduler

    def noise(self, shape: torch.Size, row: int, timestep: int) -> torch.Tensor:
        """The noise of one example at one timestep (float64, deterministic)."""
        stream = f"{self.noise_stream}:" if self.noise_stream else ""
        key = hashlib.blake2b(f"{self.seed}:{stream}{row}:{timestep}".encode(),
                              digest_size=8).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(key, "little") >> 1)
        return torch.randn(shape, generator=generator, dtype=torch.float64)

    def losses(self, model, batch: Mapping, rows: torch.Tensor, pass_index: int) -> torch.Tensor:
        if "pixel_values" not in batch:
            raise DataInfError(
                f"task 'diffusion': the batch has no 'pixel_values' (keys: {sorted(batch)})"
            )
        x0 = batch["pixel_values"]
        t = self.timesteps[pass_index]
        scheduler = self._scheduler()
        noise = torch.stack([self.noise(x0.shape[1:], int(r), t) for r in rows]).to(x0)
        steps = torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device)
        noisy = scheduler.add_noise(x0, noise, steps)
        cond = {k: batch[k] for k in ("encoder_hidden_states", "class_labels") if k in batch}
        prediction = model(noisy, steps, **cond).sample
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(x0, noise, steps)
        else:
            target = noise
        return ((prediction - target) ** 2).flatten(1).mean(1)


@dataclass(frozen=True)
class CustomLoss:
    """A user function ``fn(model, batch) -> (B,) tensor`` of per-example losses."""

    fn: Callable
    name: str = "custom"
    num_passes: int = 1

    def settings(self) -> dict:
        return {"name": self.name, "function": getattr(self.fn, "__qualname__", repr(self.fn))}

    def losses(self, model, batch: Mapping, rows: torch.Tensor, pass_index: int) -> torch.Tensor:
        return self.fn(model, batch)


TASKS = {"classification": Classification, "causal_lm": CausalLM, "diffusion": Diffusion}


def as_task(task: object, **settings) -> Task:
    """A task object from a name ("classification", "causal_lm", "diffusion"), a task object,
    or a callable returning per-example losses."""
    if isinstance(task, str):
        if task not in TASKS:
            raise DataInfError(
                f"unknown task {task!r}; choose one of {sorted(TASKS)} or pass a "
                "function (model, batch) -> per-example losses"
            )
        return TASKS[task](**settings)
    if settings:
        raise DataInfError("task settings are given with a task name, e.g. task='diffusion'")
    if isinstance(task, Task):
        return task
    if callable(task):
        return CustomLoss(task)
    raise DataInfError(f"task must be a name, a task object or a function, not {task!r}")
