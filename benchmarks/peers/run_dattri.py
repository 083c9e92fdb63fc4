"""dattri's influence on the gradients of a comparison set, run in dattri's own environment.

    benchmarks/peers/.venvs/dattri/bin/python benchmarks/peers/run_dattri.py SET.pt OUT.pt

OUT.pt: method -> {"scores": (m, n) (dattri returns (n, m): transposed here, nothing else),
"seconds": cache + attribute}.

dattri's conventions, as used here: ``regularization`` is ONE absolute lambda added to every
layer's Hessian (no per-block value), so the comparison set uses one lambda for all blocks;
``IFAttributorDataInf`` is DataInf with each parameter tensor a layer;
``IFAttributorExplicit`` inverts the Hessian of every parameter it is given together (cross
terms included), so it runs once per block, on a model of that block alone, and the blocks'
scores are summed: the block-diagonal exact influence.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from gradient_model import GradientModel, inputs, squared_error  # noqa: E402


def main() -> None:
    source, out = sys.argv[1], sys.argv[2]
    data = torch.load(source)
    from dattri.algorithm.influence_function import IFAttributorDataInf, IFAttributorExplicit
    from dattri.task import AttributionTask

    torch.set_default_dtype(getattr(torch, data.get("dtype", "float64")))
    widths = {name: block.shape[1] for name, block in data["train"].items()}
    model = GradientModel(widths)
    lam = {float(v) for v in data["damping"].values()}
    if len(lam) != 1:
        raise SystemExit("dattri takes one regularization for every layer; give one damping")
    lam = lam.pop()

    def task_of(model):
        def loss(params, batch):
            x, y = batch
            return squared_error(torch.func.functional_call(model, params, (x,)), y)

        return AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())

    def loaders(blocks, batch=None):
        x, y = inputs({k: data["train"][k] for k in blocks})
        x_test, y_test = inputs({k: data["test"][k] for k in blocks})
        return (DataLoader(TensorDataset(x, y), batch_size=batch or len(x)),
                DataLoader(TensorDataset(x_test, y_test), batch_size=len(x_test)))

    found = {}
    for method in data["methods"]:
        start = time.perf_counter()
        if method == "datainf":
            # (DataInf keeps every training row; batches of 256 only bound the memory of
            # computing them: at n = 4500 x 196,608 one batch ran out of 24 GB)
            train, test = loaders(widths, batch=256)
            attributor = IFAttributorDataInf(task_of(model), regularization=lam)
            attributor.cache(train)
            scores = attributor.attribute(train, test)
        elif method == "exact":
            # block by block, each block its own model (dattri's layer_name path fails under
            # torch 2.13's functorch: it writes transformed tensors into a plain buffer)
            scores = 0
            for name, d in widths.items():
                train, test = loaders([name])
                attributor = IFAttributorExplicit(task_of(GradientModel({name: d})),
                                                  regularization=lam)
                attributor.cache(train)
                scores = scores + attributor.attribute(train, test)
        else:
            continue
        found[method] = {"scores": scores.detach().T.contiguous(),
                         "seconds": time.perf_counter() - start}
    torch.save(found, out)


if __name__ == "__main__":
    main()
