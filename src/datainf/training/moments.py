"""Adam's second moments at the end of a fine-tune, kept beside the adapter: the
preconditioner of the ``less`` method (LESS, Xia et al. 2024; TrackStar, Chang et al. 2024).

Per trainable parameter p, after t optimizer steps with decay beta2:

    v_hat_p = v_p / (1 - beta2^t),    v_p the running mean of the squared gradient entries

stored flattened (numel,) in float32 under the parameter's name, the names of the gradient
store's blocks.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FILE = "second_moments.safetensors"


def adam_second_moments(model: torch.nn.Module, optimizer: torch.optim.Optimizer
                        ) -> dict[str, torch.Tensor]:
    """v_hat of every parameter of ``model`` that ``optimizer`` (Adam or AdamW) has stepped."""
    beta2 = {id(p): group["betas"][1] for group in optimizer.param_groups
             for p in group["params"]}
    moments = {}
    for name, param in model.named_parameters():
        state = optimizer.state.get(param, {})
        if "exp_avg_sq" not in state:
            continue
        step = float(state["step"])
        v = state["exp_avg_sq"].detach().float() / (1 - beta2[id(param)] ** step)
        moments[name] = v.flatten().cpu().clone()
    return moments


def save_second_moments(moments: dict[str, torch.Tensor], folder: Path) -> None:
    """``moments`` into folder/second_moments.safetensors (nothing when empty)."""
    if moments:
        save_file({k: v.contiguous() for k, v in moments.items()}, str(Path(folder) / FILE))


def read_second_moments(folder: Path) -> dict[str, torch.Tensor] | None:
    """The moments saved in the adapter folder ``folder``; None when it has none."""
    path = Path(folder) / FILE
    return load_file(str(path)) if path.exists() else None
