"""pyDVL's influence on the gradients of a comparison set, run in pyDVL's own environment.

    benchmarks/peers/.venvs/pydvl/bin/python benchmarks/peers/run_pydvl.py SET.pt OUT.pt

SET.pt (written by compare.py): train and test gradients (block -> (n, d_l) / (m, d_l)),
the damping per block, the methods to run. OUT.pt: method -> {"scores": (m, n) as pyDVL
returns them (``influences(..., mode="up")``), "seconds": fit + influences}.

pyDVL's conventions, as used here: ``regularization`` is the absolute lambda added to the
(Gauss-Newton) Hessian, one value per block through a dict keyed like ``block_structure``;
``InverseHarmonicMeanInfluence`` is DataInf, ``DirectInfluence`` solves the damped Hessian
exactly, ``LissaInfluence`` iterates.
"""

from __future__ import annotations

import sys
import time
from collections import OrderedDict
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from gradient_model import GradientModel, inputs, read_set, squared_error  # noqa: E402


def main() -> None:
    data, widths = read_set(sys.argv[1])
    from pydvl.influence.torch import (
        DirectInfluence,
        InverseHarmonicMeanInfluence,
        LissaInfluence,
    )

    model = GradientModel(widths)
    names = model.parameter_names()
    blocks = OrderedDict((name, [names[name]]) for name in widths)
    damping = {name: float(data["damping"][name]) for name in widths}
    # pyDVL 0.10.0 refuses every dict whose keys are block names (its subset check in
    # _build_regularization_dict is inverted); an extra key it ignores gets past it
    damping["(not a block)"] = 1.0
    x, y = inputs(data["train"])
    x_test, y_test = inputs(data["test"])
    loader = DataLoader(TensorDataset(x, y), batch_size=len(x))  # one batch: exact means
    found = {}
    for method in data["methods"]:
        start = time.perf_counter()
        if method == "datainf":
            est = InverseHarmonicMeanInfluence(model, squared_error, damping, blocks)
        elif method == "exact":
            est = DirectInfluence(model, squared_error, damping, block_structure=blocks)
        elif method == "lissa":
            est = LissaInfluence(model, squared_error, damping,
                                 maxiter=data["lissa_max_iterations"], rtol=1e-10,
                                 scale=data["lissa_scale"], block_structure=blocks)
        else:
            continue
        est = est.fit(loader)
        scores = est.influences(x_test, y_test, x, y, mode="up")
        found[method] = {"scores": scores.detach(), "seconds": time.perf_counter() - start}
    torch.save(found, sys.argv[2])


if __name__ == "__main__":
    main()
