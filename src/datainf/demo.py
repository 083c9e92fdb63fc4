"""A small built-in demonstration of the four estimators on generated data (seconds, offline).

A softmax regression is trained on Gaussian clusters whose training labels are 20% flipped.
Its per-example gradients are written in closed form: for example (x, y) with predicted
probabilities p, the gradient of the cross entropy w.r.t. the weight row of class c is
(p_c - [y = c]) x. Each class's weight row is one block. Every method scores every training
example on the mean validation loss (aggregate mode); the flipped examples should rank first.
"""

from __future__ import annotations

import time

import torch

from .errors import DataInfError
from .methods import DataInf, Exact, HessianFree, LiSSA
from .metrics import detection_auc
from .options import said


def make_problem(n_train: int, n_val: int, classes: int, dim: int, noise: float, seed: int):
    """Gaussian clusters; returns (x_train, y_given, flipped, x_val, y_val)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g, dtype=torch.float64) * 0.35

    def sample(n):
        y = torch.randint(classes, (n,), generator=g)
        return centres[y] + torch.randn(n, dim, generator=g, dtype=torch.float64), y

    x_train, y_true = sample(n_train)
    x_val, y_val = sample(n_val)
    flipped = torch.rand(n_train, generator=g) < noise
    shift = torch.randint(1, classes, (n_train,), generator=g)
    y_given = torch.where(flipped, (y_true + shift) % classes, y_true)
    return x_train, y_given, flipped, x_val, y_val


def train_softmax(x: torch.Tensor, y: torch.Tensor, classes: int, steps: int = 300):
    """Weights W (classes x (dim + 1)) of an L2-regularised softmax regression (bias last)."""
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    W = torch.zeros(classes, xb.shape[1], dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([W], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xb @ W.T, y) + 1e-3 * (W**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach()


def per_example_gradients(W: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
    """Block ``class_c`` -> (n, dim + 1): d loss_i / d W_c = (p_ic - [y_i = c]) [x_i, 1]."""
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    residual = torch.softmax(xb @ W.T, dim=1)
    residual[torch.arange(len(y)), y] -= 1
    return {f"class_{c}": (residual[:, c : c + 1] * xb).float() for c in range(W.shape[0])}


def run_demo(
    n_train: int = 2000,
    n_val: int = 200,
    classes: int = 5,
    dim: int = 64,
    noise: float = 0.2,
    seed: int = 0,
    process_group: object | None = None,
) -> dict:
    """Train, collect gradients, score with every method; returns AUCs and seconds per method.
    With a process group, the ranks share the scoring (every rank gets the results)."""
    x, y, flipped, x_val, y_val = make_problem(n_train, n_val, classes, dim, noise, seed)
    if not 0 < int(flipped.sum()) < n_train:
        raise DataInfError(f"{said('n_train', n_train)} with seed {seed}: {int(flipped.sum())} "
                           f"of the {n_train} labels flipped, so there is nothing to detect; "
                           f"give {said('n_train', 50)} or more")
    W = train_softmax(x, y, classes)
    train, val = per_example_gradients(W, x, y), per_example_gradients(W, x_val, y_val)
    results = {}
    shared = {"process_group": process_group}
    methods = {
        "DataInf": DataInf(**shared),
        "Exact": Exact(**shared),
        "LiSSA": LiSSA(**shared),
        "Hessian-free": HessianFree(**shared),
    }
    for label, est in methods.items():
        start = time.perf_counter()
        scores = est.fit(train).score(val, aggregate=True)
        results[label] = {"auc": detection_auc(scores, flipped),
                          "seconds": time.perf_counter() - start}
        if label == "LiSSA":
            results[label]["converged"] = est.converged_
    start = time.perf_counter()
    self_scores = DataInf(**shared).fit(train).self_influence()
    results["DataInf self-influence"] = {"auc": detection_auc(self_scores, flipped),
                                         "seconds": time.perf_counter() - start}
    return {"n_train": n_train, "n_val": n_val, "flipped": int(flipped.sum()), "seed": seed,
            "methods": results}
