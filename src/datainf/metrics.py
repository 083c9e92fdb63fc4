"""Scores against ground truth: detection AUC and the detection curve."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from .errors import DataInfError


def detection_auc(scores: torch.Tensor | np.ndarray, flagged: torch.Tensor | np.ndarray) -> float:
    """AUC of ``scores`` (higher = more suspicious) for finding the ``flagged`` examples.

    0.5 is chance, 1.0 ranks every flagged example above every other.
    """
    scores, flagged = np.asarray(scores, dtype=np.float64), np.asarray(flagged, dtype=bool)
    if scores.shape != flagged.shape:
        raise DataInfError(f"{scores.shape[0]} scores but {flagged.shape[0]} flags")
    if flagged.all() or not flagged.any():
        raise DataInfError("detection AUC needs both flagged and unflagged examples")
    return float(roc_auc_score(flagged, scores))


def detection_curve(
    scores: torch.Tensor | np.ndarray, flagged: torch.Tensor | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Share of flagged examples found vs share of data inspected, highest score first.

    Returns (inspected, found), both of length n + 1 starting at (0, 0).
    """
    scores, flagged = np.asarray(scores, dtype=np.float64), np.asarray(flagged, dtype=bool)
    order = np.argsort(-scores, kind="stable")
    found = np.concatenate([[0], np.cumsum(flagged[order])]) / max(1, flagged.sum())
    inspected = np.arange(len(scores) + 1) / len(scores)
    return inspected, found
