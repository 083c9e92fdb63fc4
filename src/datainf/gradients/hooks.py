"""Per-example gradients of LoRA tensors from one batched forward and backward per batch.

For a Linear layer y = W a + b applied at positions t of example i (tokens, pixels), the
gradient of example i's loss L_i is

    dL_i/dW = sum_t delta_it a_it^T,     dL_i/db = sum_t delta_it,     delta_it = dL_i/dy_it

Forward hooks on the trainable Linear layers (LoRA's lora_A / lora_B and heads kept by
``modules_to_save``) record a and y; one ``autograd.grad`` of sum_i L_i gives every delta at
once (examples do not interact in eval mode, so delta_it involves only L_i). Parameter
gradients of the full model are never formed: all parameters are frozen during collection and
the gradient flows only from the hooked outputs to the loss. Padding positions have delta = 0.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..errors import DataInfError


@dataclass
class HookedLinear:
    """One trainable nn.Linear: the block names of its weight and bias, and what it saw."""

    module: torch.nn.Linear
    weight: str | None
    bias: str | None
    calls: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def record(self, module, args, output) -> None:
        if not output.requires_grad:
            output.requires_grad_()
        self.calls.append((args[0].detach(), output))


def select_blocks(model: torch.nn.Module, blocks: str | Sequence[str] | None = None):
    """The trainable parameters to collect, grouped by their Linear layer.

    ``blocks``: None (every trainable parameter), a regular expression searched in parameter
    names, or a list of names. Returns (layers, widths) with widths[name] = numel.
    """
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not any("lora_" in n for n in trainable):
        raise DataInfError(
            "the model has no trainable LoRA parameters; wrap it with peft "
            "(datainf.models.add_lora) or load its adapter with is_trainable=True"
        )
    if blocks is None:
        chosen = set(trainable)
    elif isinstance(blocks, str):
        pattern = re.compile(blocks)
        chosen = {n for n in trainable if pattern.search(n)}
    else:
        unknown = [b for b in blocks if b not in trainable]
        if unknown:
            raise DataInfError(f"blocks {unknown[:3]} are not trainable parameters of the model")
        chosen = set(blocks)
    if not chosen:
        raise DataInfError(
            f"no trainable parameter matches blocks={blocks!r}; parameter names "
            f"look like {sorted(trainable)[:2]}"
        )
    layers, widths = [], {}
    for prefix, module in model.named_modules():
        own = {
            f"{prefix}.{k}" if prefix else k: k for k, _ in module.named_parameters(recurse=False)
        }
        mine = {full: short for full, short in own.items() if full in chosen}
        if not mine:
            continue
        if not isinstance(module, torch.nn.Linear):
            raise DataInfError(
                f"parameter {sorted(mine)[0]!r} belongs to a {type(module).__name__}; per-example "
                "gradients are computed for Linear layers (LoRA A/B, classifier heads): freeze "
                "it or leave it out with blocks=..."
            )
        by_kind = {short: full for full, short in mine.items()}
        layers.append(HookedLinear(module, by_kind.get("weight"), by_kind.get("bias")))
        for full in mine:
            widths[full] = trainable[full].numel()
    return layers, dict(sorted(widths.items(), key=lambda kv: list(trainable).index(kv[0])))


@contextmanager
def collecting(model: torch.nn.Module, layers: list[HookedLinear]):
    """Eval mode, all parameters frozen, hooks on; everything restored afterwards."""
    was_training = model.training
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    handles = [layer.module.register_forward_hook(layer.record) for layer in layers]
    try:
        model.eval()
        for p, _ in frozen:
            p.requires_grad_(False)
        with torch.enable_grad():
            yield
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.train(was_training)


def batch_gradients(model, task, layers, batch, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example gradients of one batch: block name -> (B, numel), passes concatenated."""
    B = len(rows)
    parts: dict[str, list[torch.Tensor]] = {}
    for pass_index in range(task.num_passes):
        for layer in layers:
            layer.calls.clear()
        losses = task.losses(model, batch, rows, pass_index)
        if losses.shape != (B,):
            raise DataInfError(
                f"the task gave losses of shape {tuple(losses.shape)} for a batch "
                f"of {B} examples; it must give one loss per example"
            )
        bad = (~torch.isfinite(losses.detach())).nonzero()
        if len(bad):
            b = int(bad[0])
            raise DataInfError(
                f"the loss of example {int(rows[b])} is {float(losses[b].detach())}; "
                "check that example's input"
            )
        outputs = [out for layer in layers for _, out in layer.calls]
        deltas = iter(torch.autograd.grad(losses.sum(), outputs, allow_unused=True))
        for layer in layers:
            grad_w = grad_b = 0
            for a, _ in layer.calls:
                delta = next(deltas)
                if delta is None:
                    continue
                if a.shape[0] != B or delta.shape[0] != B:
                    raise DataInfError(
                        f"layer of {layer.weight or layer.bias!r} saw an input whose first "
                        f"dimension is {a.shape[0]}, not the batch size {B}"
                    )
                a = a.reshape(B, -1, a.shape[-1])
                delta = delta.reshape(B, -1, delta.shape[-1])
                grad_w = grad_w + torch.einsum("bto,bti->boi", delta, a).reshape(B, -1)
                grad_b = grad_b + delta.sum(1)
            for name, grad, param in (
                (layer.weight, grad_w, layer.module.weight),
                (layer.bias, grad_b, layer.module.bias),
            ):
                if name is None:
                    continue
                if isinstance(grad, int):  # the layer did not influence the loss
                    grad = torch.zeros(B, param.numel(), dtype=losses.dtype, device=losses.device)
                parts.setdefault(name, []).append(grad.detach())
        for layer in layers:
            layer.calls.clear()
    return {name: torch.cat(p, dim=1) if len(p) > 1 else p[0] for name, p in parts.items()}
