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
from ..gradients.tasks import text_model_inputs


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
) -> list[float]:
    """Train a classifier's trainable parameters in place on the mean cross entropy of each
    batch; returns the mean loss of each epoch. See :func:`train_loop` for ``on_epoch``."""

    def batches(order: np.ndarray) -> list[dict]:
        return text_batches(tokenizer, data, batch_size, max_length, order=order)

    def loss(batch: dict) -> torch.Tensor:
        logits = model(**text_model_inputs(model, batch)).logits
        return F.cross_entropy(logits, batch["labels"])

    return train_loop(model, len(data), batches, loss, epochs=epochs, batch_size=batch_size,
                      learning_rate=learning_rate, seed=seed, progress=progress,
                      on_epoch=on_epoch)


def train_loop(
    model: torch.nn.Module,
    num_examples: int,
    batches: Callable[[np.ndarray], Iterable[dict]],
    loss: Callable[[dict], torch.Tensor],
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    progress: bool | None = None,
    on_epoch: Callable[[int, float], bool | None] | None = None,
    desc: str = "fine-tuning",
) -> list[float]:
    """AdamW on the trainable parameters, the learning rate decayed linearly to 0, the data
    shuffled with ``seed`` every epoch; returns the mean loss of each epoch.

    ``batches(order)``: the batches of the examples in ``order`` (a permutation of
    range(num_examples)), ``batch_size`` a batch; ``loss(batch)``: the batch's mean loss (a
    scalar). ``on_epoch(epoch, mean_loss)`` is called after each epoch (1-based) with the model
    in eval mode; when it returns True, training stops there. ``desc``: the progress bar's
    label.
    """
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    steps = epochs * -(-num_examples // batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / max(1, steps))
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model.train()
    history = []
    bar = tqdm(total=steps, desc=desc, unit="step",
               disable=None if progress is None else not progress)
    for _ in range(epochs):
        total, count = 0.0, 0
        for batch in batches(rng.permutation(num_examples)):
            batch = {k: v.to(device) for k, v in batch.items()}
            value = loss(batch)
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
            schedule.step()
            size = len(next(iter(batch.values())))  # examples in the batch
            total += float(value.detach()) * size
            count += size
            bar.update(1)
            bar.set_postfix(loss=f"{total / count:.3f}")
        history.append(total / count)
        if on_epoch is not None:
            model.eval()
            stop = on_epoch(len(history), history[-1])
            model.train()
            if stop:
                break
    bar.close()
    model.eval()
    return history


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
