"""The paper's formulas written plainly (explicit d x d inverses, float64) to test against."""

import torch


def damping(G: torch.Tensor, relative: float = 0.1) -> float:
    """lambda_l = relative * (1/(n d)) sum_i ||g_i||^2."""
    n, d = G.shape
    return relative * float((G.double() ** 2).sum()) / (n * d)


def inverse(G: torch.Tensor, lam: float, method: str) -> torch.Tensor:
    """The d x d matrix each method uses in place of (G^T G / n + lambda I)^-1."""
    G = G.double()
    n, d = G.shape
    eye = torch.eye(d, dtype=torch.float64)
    if method == "exact":
        return torch.linalg.inv(G.T @ G / n + lam * eye)
    if method == "datainf":
        total = torch.zeros(d, d, dtype=torch.float64)
        for g in G:
            total += eye - torch.outer(g, g) / (lam + g @ g)
        return total / (n * lam)
    if method == "hessian_free":
        return eye
    raise ValueError(method)


def scores(train, test, method: str, relative: float = 0.1, aggregate: bool = False):
    """I[j, k] = - sum_l v_jl^T Hinv_l g_kl  (or the mean over j when aggregate)."""
    total = 0
    for name, G in train.items():
        V = test[name].double()
        if aggregate:
            V = V.mean(0, keepdim=True)
        Hinv = inverse(G, damping(G, relative), method)
        total = total - V @ Hinv @ G.double().T
    return total[0] if aggregate else total


def self_influence(train, method: str, relative: float = 0.1):
    """s_k = sum_l g_kl^T Hinv_l g_kl."""
    total = 0
    for G in train.values():
        Hinv = inverse(G, damping(G, relative), method)
        G = G.double()
        total = total + ((G @ Hinv) * G).sum(1)
    return total
