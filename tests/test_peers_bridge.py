"""The bridge the peer comparison (benchmarks/peers) stands on: a model whose per-example
gradients are given ones and whose Hessian is their Gauss-Newton matrix, so that a peer library
computing gradients itself sees exactly ours; and the quick equality check itself, where the
peers' environments are installed (bash benchmarks/peers/install.sh)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

PEERS = Path(__file__).parent.parent / "benchmarks" / "peers"
sys.path.insert(0, str(PEERS))

from gradient_model import GradientModel, inputs, squared_error  # noqa: E402


def test_per_example_gradients_and_hessian_are_the_given_ones():
    g = torch.Generator().manual_seed(0)
    blocks = {"layer.0.lora_A": torch.randn(7, 5, generator=g, dtype=torch.float64),
              "head": torch.randn(7, 3, generator=g, dtype=torch.float64)}
    torch.set_default_dtype(torch.float64)
    try:
        model = GradientModel({k: v.shape[1] for k, v in blocks.items()})
        x, y = inputs(blocks)
    finally:
        torch.set_default_dtype(torch.float32)
    names = model.parameter_names()
    params = dict(model.named_parameters())
    for i in range(7):
        loss = squared_error(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, [params[names[k]] for k in blocks])
        for (name, block), grad in zip(blocks.items(), grads, strict=True):
            assert torch.allclose(grad, block[i], rtol=1e-12, atol=0), name
    theta = {k: v.detach() for k, v in params.items()}

    def mean_loss(flat):
        return squared_error(torch.func.functional_call(model, {**theta, names["head"]: flat},
                                                        (x,)), y)

    hessian = torch.func.hessian(mean_loss)(theta[names["head"]])
    G = blocks["head"]
    assert torch.allclose(hessian, G.T @ G / 7, rtol=1e-12, atol=1e-14)


@pytest.mark.skipif(not all((PEERS / ".venvs" / p / ".stamp").exists()
                            for p in ("pydvl", "dattri")),
                    reason="peers not installed: bash benchmarks/peers/install.sh pydvl dattri")
def test_quick_equality_with_the_peers():
    done = subprocess.run([sys.executable, str(PEERS / "compare.py"), "--quick",
                           "--no-install"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.count("| quick |") == 6  # pyDVL and dattri: DataInf, Exact, LiSSA
