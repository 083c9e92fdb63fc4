"""dattri's influence on the gradients of a comparison set, run in dattri's own environment.

    benchmarks/peers/.venvs/dattri/bin/python benchmarks/peers/run_dattri.py SET.pt OUT.pt

OUT.pt: method -> {"scores": (m, n) (dattri returns (n, m): transposed here, nothing else),
"seconds": cache + attribute}.

dattri's conventions, as used here: ``regularization`` is ONE absolute lambda added to every
layer's Hessian (no per-block value), so the comparison set uses one lambda for all blocks;
``IFAttributorDataInf`` is DataInf with each parameter tensor a layer;
``IFAttributorExplicit`` inverts the Hessian of every parameter it is given together (cross
terms included), so it runs once per block, on a model of that block alone, and the blocks'
scores are summed: the block-diagonal exact influence. ``IFAttributorLiSSA`` likewise runs
block by block; its recursion x_t = v + (1 - d) x_{t-1} - H_batch x_{t-1} / s, H^-1 v ~= x_T / s,
is ours with d = lambda / s (its ``damping`` is relative to its ``scaling``), on batches drawn
without replacement: with a batch of all n rows every step sees the whole Hessian, as ours.
It casts the data to float32 before every Hessian-vector product
(``IFAttributorLiSSA.lissa_collate_fn``, called by class name): replaced here by one that keeps
the data's dtype.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from gradient_model import GradientModel, inputs, read_set, squared_error  # noqa: E402


def main() -> None:
    data, widths = read_set(sys.argv[1])
    from dattri.algorithm.influence_function import (
        IFAttributorDataInf,
        IFAttributorExplicit,
        IFAttributorLiSSA,
    )
    from dattri.task import AttributionTask

    def keep_dtype(sampled):  # dattri's casts the data to float32
        return sampled[0], tuple(sampled[1:])

    IFAttributorLiSSA.lissa_collate_fn = staticmethod(keep_dtype)

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
            # the training rows in one batch, unless they take over 1 GB: at n = 4500 x
            # 196,608 one batch ran out of 24 GB. In batches its attribute() recomputes the
            # test transformation for every batch (O(n m d) each)
            n, d = len(next(iter(data["train"].values()))), sum(widths.values())
            size = n * d * torch.get_default_dtype().itemsize
            train, test = loaders(widths, batch=256 if size > 2**30 else None)
            attributor = IFAttributorDataInf(task_of(model), regularization=lam)
            attributor.cache(train)
            scores = attributor.attribute(train, test)
        elif method in ("exact", "lissa"):
            # block by block, each block its own model (dattri's layer_name path fails under
            # torch 2.13's functorch: it writes transformed tensors into a plain buffer)
            scores = 0
            for name, d in widths.items():
                train, test = loaders([name])
                task = task_of(GradientModel({name: d}))
                if method == "exact":
                    attributor = IFAttributorExplicit(task, regularization=lam)
                else:
                    s = data["lissa_scale"]
                    attributor = IFAttributorLiSSA(
                        task, batch_size=len(train.dataset), damping=lam / s, scaling=s,
                        recursion_depth=data["lissa_iterations"])
                attributor.cache(train)
                scores = scores + attributor.attribute(train, test)
        else:
            continue
        found[method] = {"scores": scores.detach().T.contiguous(),
                         "seconds": time.perf_counter() - start}
    torch.save(found, sys.argv[2])


if __name__ == "__main__":
    main()
