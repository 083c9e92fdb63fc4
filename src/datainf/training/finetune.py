"""LoRA fine-tuning (one loop for classifiers and causal LMs), and a classifier's predictions.

Plain AdamW on the trainable (LoRA and head) parameters, the mean loss per batch, a fixed seed
for the shuffling; no learning-rate schedule beyond a linear decay.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.text import TextData, text_batches
from ..distributed import (
    all_reduce_sum,
    broadcast_flag,
    shard,
    world,
)
from ..gradients.tasks import text_model_inputs
from .moments import adam_second_moments


def finetune(
    model: torch.nn.Module,
    tokenizer,
    data: TextData,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    max_length: int,
    seed: int,
    progress: bool | None = None,
    on_epoch: Callable[[int, float], bool | None] | None = None,
    process_group: object | None = None,
    second_moments: dict | None = None,
) -> list[float]:
    """Train a classifier's trainable parameters in place on the mean cross entropy of each
    batch; returns the mean loss of each epoch. See :func:`train_loop` for ``on_epoch`` and
    ``process_group``
    and ``second_moments``."""

    def batches(order: np.ndarray) -> list[dict]:
        return text_batches(tokenizer, data, batch_size, max_length, order=order)

    def loss(module: torch.nn.Module, batch: dict) -> torch.Tensor:
        logits = module(**text_model_inputs(model, batch)).logits
        return F.cross_entropy(logits, batch["labels"])

    return train_loop(model, len(data), batches, loss, epochs=epochs, batch_size=batch_size,
                      learning_rate=learning_rate, seed=seed, progress=progress,
                      on_epoch=on_epoch, process_group=process_group,
                      second_moments=second_moments)


def train_loop(
    model: torch.nn.Module,
    num_examples: int,
    batches: Callable[[np.ndarray], Iterable[dict]],
    loss: Callable[[torch.nn.Module, dict], torch.Tensor],
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    progress: bool | None = None,
    on_epoch: Callable[[int, float], bool | None] | None = None,
    desc: str = "fine-tuning",
    process_group: object | None = None,
    second_moments: dict | None = None,
) -> list[float]:
    """AdamW on the trainable parameters, the learning rate decayed linearly to 0, the data
    shuffled with ``seed`` every epoch; returns the mean loss of each epoch.

    ``batches(order)``: the batches of the examples in ``order`` (a permutation of
    range(num_examples)), ``batch_size`` a batch, every value a tensor with one row per
    example; ``loss(module, batch)``: the batch's mean loss (a scalar) from ``module``'s
    forward. ``on_epoch(epoch, mean_loss)`` is called after each epoch (1-based) with the model
    in eval mode; when it returns True, training stops there. ``desc``: the progress bar's
    label. ``second_moments``, when given, is filled after each epoch (before ``on_epoch``)
    with Adam's bias-corrected second moments (see :mod:`datainf.training.moments`).

    With a torch.distributed ``process_group`` of W ranks, every rank builds the same batches
    (same seed) and takes its contiguous share of each one; the model is wrapped in
    DistributedDataParallel, which averages the gradients, and each rank's mean loss is
    weighted by its share (W b_r / b), so that every step follows the gradient of the whole
    batch's mean loss: the same adapter as one process, to float rounding. Rank 0's answer of
    ``on_epoch`` is followed by all.
    """
    rank, size = world(process_group)
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    module = model if size == 1 else _data_parallel(model, process_group, device)
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    steps = epochs * -(-num_examples // batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / max(1, steps))
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model.train()
    history = []
    bar = tqdm(total=steps, desc=desc, unit="step",
               disable=True if rank > 0 else (None if progress is None else not progress))
    for _ in range(epochs):
        sums = torch.zeros(2, dtype=torch.float64)  # sum of losses x examples, examples
        for batch in batches(rng.permutation(num_examples)):
            size_all = len(next(iter(batch.values())))  # examples in the batch
            lo, hi = shard(size_all, rank, size)
            weight = size * (hi - lo) / size_all  # this rank's share, times W (see above)
            if hi == lo:  # fewer examples than ranks: a share of weight 0 keeps DDP in step
                lo, hi = 0, 1
            batch = {k: v[lo:hi].to(device) for k, v in batch.items()}
            value = loss(module, batch)
            optimizer.zero_grad()
            (value * weight if size > 1 else value).backward()
            optimizer.step()
            schedule.step()
            sums += torch.tensor([float(value.detach()) * weight * size_all / size,
                                  size_all / size], dtype=torch.float64)
            bar.update(1)
            bar.set_postfix(loss=f"{sums[0] / sums[1]:.3f}")
        sums = all_reduce_sum(sums, process_group)
        history.append(float(sums[0] / sums[1]))
        if second_moments is not None:
            second_moments.clear()
            second_moments.update(adam_second_moments(model, optimizer))
        if on_epoch is not None:
            model.eval()
            stop = broadcast_flag(bool(on_epoch(len(history), history[-1])), process_group)
            model.train()
            if stop:
                break
    bar.close()
    model.eval()
    return history


def _data_parallel(model: torch.nn.Module, group: object, device: torch.device):
    """``model`` in DistributedDataParallel over its trainable parameters only: the frozen
    base model is neither broadcast at the start nor reduced (every rank loaded it alike)."""
    from torch.nn.parallel import DistributedDataParallel

    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
    ids = [device] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, process_group=group,
                                   broadcast_buffers=False)


@torch.no_grad()
def predict(model: torch.nn.Module, tokenizer, data: TextData, *, batch_size: int,
            max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(losses, probabilities): per-example cross entropy of the data's labels, shape (n,), and
    the model's class probabilities (softmax), shape (n, classes); float64."""
    device = next(model.parameters()).device
    model.eval()
    losses, probabilities = [], []
    for batch in text_batches(tokenizer, data, batch_size, max_length):
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(**text_model_inputs(model, batch)).logits.double()
        losses.append(F.cross_entropy(logits, batch["labels"], reduction="none").cpu())
        probabilities.append(logits.softmax(-1).cpu())
    return torch.cat(losses).numpy(), torch.cat(probabilities).numpy()
