"""A model whose per-example gradients are given ones, so that a peer library that computes
gradients itself (from a model, a loss and data) sees exactly our gradients.

One parameter vector theta_l (zeros, shape (d_l,)) per block; example i's input is its
gradient g_i (all blocks side by side), its target -1, and its loss the squared error

    l_i(theta) = 1/2 (sum_l theta_l . g_il - y_i)^2,     y_i = -1,

so that at theta = 0 the gradient of l_i with respect to theta_l is (0 - y_i) g_il = g_il, and
the Hessian of the mean loss, block l, is (1/n) sum_i g_il g_il^T = G_l^T G_l / n: the
Gauss-Newton matrix every method here approximates. Imported by the peer runners, which run in
the peers' own environments (torch only; no datainf).
"""

from __future__ import annotations

import torch


class Block(torch.nn.Module):
    """One block's parameter vector theta_l (its own module: libraries that split parameters
    by layer see one layer per block)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.theta = torch.nn.Parameter(torch.zeros(width))  # the default dtype


class GradientModel(torch.nn.Module):
    """theta . x over all blocks; ``widths``: block name -> d_l, in column order of x."""

    def __init__(self, widths: dict[str, int]) -> None:
        super().__init__()
        self.names = list(widths)
        self.widths = [widths[name] for name in self.names]
        self.blocks = torch.nn.ModuleDict({_safe(name): Block(d) for name, d in widths.items()})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, self.widths, dim=-1)
        return sum(part @ self.blocks[_safe(name)].theta
                   for name, part in zip(self.names, parts, strict=True))[..., None]

    def parameter_names(self) -> dict[str, str]:
        """Block name -> the name of its parameter in ``named_parameters()``."""
        return {name: f"blocks.{_safe(name)}.theta" for name in self.names}


def read_set(path: str) -> tuple[dict, dict[str, int]]:
    """A comparison set written by compare.py, and its block widths (name -> d_l). Sets torch's
    default dtype to the set's, so that models and inputs made next are in it."""
    data = torch.load(path)
    torch.set_default_dtype(getattr(torch, data.get("dtype", "float64")))
    return data, {name: block.shape[1] for name, block in data["train"].items()}


def squared_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1/2 (prediction - target)^2, averaged over the examples given."""
    return 0.5 * ((prediction.reshape(-1) - target.reshape(-1)) ** 2).mean()


def inputs(blocks: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y): the gradients side by side, and targets -1, in torch's default dtype."""
    dtype = torch.get_default_dtype()
    x = torch.cat([blocks[name].to(dtype) for name in blocks], dim=1)
    return x, -torch.ones(len(x), dtype=dtype)


def _safe(name: str) -> str:
    """A block name usable as a module key (no dots)."""
    return name.replace(".", "__")
