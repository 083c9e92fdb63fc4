import os

import pytest
import torch

# Tests never reach a model hub: every model is built from a config or shipped in a package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def random_gradients(n: int, widths: dict[str, int], seed: int, dtype=torch.float64, scale=None):
    """Random per-block gradients with uneven row norms (like real per-example gradients)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (name, d) in enumerate(widths.items()):
        row_scale = torch.rand(n, 1, generator=g, dtype=torch.float64) * 2 + 0.1
        block_scale = (scale or 1.0) * 10.0 ** (i % 3 - 1)
        out[name] = (
            torch.randn(n, d, generator=g, dtype=torch.float64) * row_scale * block_scale
        ).to(dtype)
    return out


@pytest.fixture
def grads():
    """Training and test gradients with blocks narrower and wider than n = 40."""
    widths = {"layer.0.lora_A": 6, "layer.0.lora_B": 64, "head": 17}
    return random_gradients(40, widths, seed=1), random_gradients(7, widths, seed=2)
