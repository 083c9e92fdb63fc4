"""Scores against ground truth, and the statistics the experiments report.

Against ground truth: detection AUC and the detection curve. Between two score vectors (e.g.
DataInf against Exact): Pearson and Spearman correlation and the overlap of the top share.
Over repeated runs: the mean with a Student-t confidence interval. Against retraining: the
linear datamodeling score.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import stats
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


def _vector(x: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    """``x`` as a 1-D float64 array; DataInfError if it is not 1-D."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
    v = np.asarray(x, dtype=np.float64)
    if v.ndim != 1:
        raise DataInfError(f"{name} must be 1-D (one value per example), got shape {v.shape}")
    return v


def _pair(
    a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, what: str, minimum: int
) -> tuple[np.ndarray, np.ndarray]:
    """``a`` and ``b`` as finite 1-D float64 arrays of one length >= ``minimum``."""
    a, b = _vector(a, "a"), _vector(b, "b")
    if a.shape != b.shape:
        raise DataInfError(
            f"{what} needs two score vectors of the same length, got {a.size} and {b.size}"
        )
    if a.size < minimum:
        raise DataInfError(f"{what} needs at least {minimum} values per vector, got {a.size}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise DataInfError(f"{what}: the scores contain NaN or infinite values")
    return a, b


def pearson(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Pearson correlation of two score vectors over the same examples.

    ``a``, ``b``: 1-D, equal length n >= 2, finite. Returns r in [-1, 1]: 1 when ``b`` is an
    increasing linear function of ``a``, -1 for a decreasing one, 0 for no linear relation.
    A constant vector has no spread, so r is undefined: the result is then NaN (no exception),
    so that one degenerate method leaves a hole in an experiment table instead of ending the
    run. Mismatched lengths, fewer than 2 values or NaN/inf raise DataInfError.
    """
    a, b = _pair(a, b, "pearson", 2)
    if (a == a[0]).all() or (b == b[0]).all():
        return math.nan
    # r = sum_i (a_i - mean a)(b_i - mean b) / sqrt(sum_i (a_i - mean a)^2 * sum_i (b_i - mean b)^2)
    da, db = a - a.mean(), b - b.mean()
    r = float(da @ db / math.sqrt(float(da @ da) * float(db @ db)))
    return min(1.0, max(-1.0, r))


def spearman(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Spearman rank correlation of two score vectors over the same examples.

    ``a``, ``b``: 1-D, equal length n >= 2, finite. Returns rho in [-1, 1]: 1 when the two
    orders agree exactly (any increasing relation), -1 when one reverses the other. Ties get
    the average of the ranks they span (``scipy.stats.rankdata``, method "average"), which is
    the convention of ``scipy.stats.spearmanr``. A constant vector: NaN, as in ``pearson``;
    mismatched lengths, fewer than 2 values or NaN/inf raise DataInfError.
    """
    a, b = _pair(a, b, "spearman", 2)
    # rho = pearson(rank(a), rank(b)), tied values sharing their mean rank
    return pearson(stats.rankdata(a), stats.rankdata(b))


def top_k_overlap(
    a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, share: float = 0.1
) -> float:
    """Share of the top examples by ``a`` that are also among the top by ``b``.

    ``a``, ``b``: 1-D score vectors of equal length n >= 1, finite, higher = ranked first.
    ``share`` in (0, 1]: the top k = ceil(share * n) examples are taken from each (share * n
    is first rounded to 9 decimals, so that 0.14 * 50 = 7.000000000000001 gives k = 7, not 8).
    Returns |top_k(a) & top_k(b)| / k in [0, 1]: 1 when both pick the same examples (in any
    order), 0 when they pick disjoint sets; "the overlap of the top 10%" with share=0.1.
    Ties: examples are ordered by ``argsort(-score, kind="stable")``, so among equal scores
    the lower index ranks first; a tie across the cut keeps the lower indices, the same rule
    for ``a`` and ``b``.
    """
    a, b = _pair(a, b, "top_k_overlap", 1)
    if not 0 < share <= 1:
        raise DataInfError(f"top_k_overlap: share must be in (0, 1], got {share}")
    k = math.ceil(round(share * a.size, 9))
    top_a = np.argsort(-a, kind="stable")[:k]
    top_b = np.argsort(-b, kind="stable")[:k]
    # overlap = |top_k(a) & top_k(b)| / k
    return np.intersect1d(top_a, top_b).size / k


def mean_interval(
    values: torch.Tensor | np.ndarray | list[float], level: float = 0.95
) -> tuple[float, float, float]:
    """Mean over runs and its Student-t confidence interval: (mean, low, high).

    ``values``: 1-D, one number per run (n >= 1), e.g. a method's AUC over seeds. ``level``
    in (0, 1): the interval's confidence level. For n >= 2 the interval is
    mean -/+ t_{(1+level)/2, n-1} * s / sqrt(n), s the sample standard deviation (ddof=1):
    under normally distributed runs it holds the true mean with probability ``level``. One run
    gives (value, nan, nan): no spread can be estimated. A NaN among the values (an undefined
    statistic in some run) makes all three NaN. No values raise DataInfError.
    """
    v = _vector(values, "values")
    if v.size == 0:
        raise DataInfError("mean_interval needs at least one value")
    if not 0 < level < 1:
        raise DataInfError(f"mean_interval: level must be in (0, 1), got {level}")
    mean = float(v.mean())
    if v.size == 1:
        return mean, math.nan, math.nan
    # half width = t_{(1+level)/2, n-1} * s / sqrt(n), s = sqrt(sum_i (v_i - mean)^2 / (n - 1))
    t = float(stats.t.ppf((1 + level) / 2, v.size - 1))
    half = t * float(v.std(ddof=1)) / math.sqrt(v.size)
    return mean, mean - half, mean + half


def class_detection(scores: np.ndarray, train_classes: np.ndarray,
                    test_classes: np.ndarray) -> dict[str, np.ndarray]:
    """The paper's influential-data identification metrics, per test example (pairwise scores
    (m, n), the paper's sign: negative = helpful):

    - ``auc``: AUC of -score_j against the indicator "training example of test j's class";
    - ``recall``: share of test j's class among the s most helpful (most negative) training
      examples, s = the number of training examples of that class;
    - ``auc_magnitude`` (ours, a diagnostic): AUC of |score_j|, whether the class stands out
      by the size of its influence whatever its sign.

    Returns {"auc": (m,), "recall": (m,), "auc_magnitude": (m,)}; average them over test
    examples to report.
    """
    scores = np.asarray(scores, dtype=np.float64)
    train_classes, test_classes = np.asarray(train_classes), np.asarray(test_classes)
    if scores.shape != (len(test_classes), len(train_classes)):
        raise DataInfError(f"scores of shape {scores.shape} do not match {len(test_classes)} "
                           f"test and {len(train_classes)} training classes")
    auc, recall, magnitude = (np.empty(len(test_classes)) for _ in range(3))
    for j, cls in enumerate(test_classes):
        same = train_classes == cls
        s = int(same.sum())
        if s == 0 or s == len(same):
            raise DataInfError(f"test example {j}: its class {cls!r} must be among the training "
                               "classes, and not the only one")
        auc[j] = detection_auc(-scores[j], same)
        magnitude[j] = detection_auc(np.abs(scores[j]), same)
        helpful = np.argsort(scores[j], kind="stable")[:s]
        recall[j] = same[helpful].mean()
    return {"auc": auc, "recall": recall, "auc_magnitude": magnitude}


def lds(predicted: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """The linear datamodeling score (Park et al., TRAK, 2023) per test example.

    ``predicted``, ``actual``: (M, m), one row per training subset, one column per test
    example: the method's prediction of test j's loss after training on subset k (the sum of
    its scores over the subset's examples, oriented so that larger = larger loss) and the loss
    the model trained on that subset has. Returns (m,): LDS_j = Spearman correlation over the
    M subsets of column j (ties: average ranks). A constant column (a prediction or a loss that
    no subset changes) has no rank order: refused, as are M < 3, NaN or inf and mismatched
    shapes.
    """
    predicted = np.asarray(predicted, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    if predicted.ndim != 2 or predicted.shape != actual.shape:
        raise DataInfError(f"lds needs two (subsets, test examples) arrays of one shape, not "
                           f"{predicted.shape} and {actual.shape}")
    if predicted.shape[0] < 3:
        raise DataInfError(f"lds needs at least 3 subsets, not {predicted.shape[0]}")
    for name, x in (("predicted", predicted), ("actual", actual)):
        if not np.isfinite(x).all():
            raise DataInfError(f"lds: the {name} values hold NaN or inf")
        constant = np.flatnonzero((x == x[:1]).all(axis=0))
        if constant.size:
            raise DataInfError(
                f"lds: the {name} values of test example {int(constant[0])} are the same in "
                f"every subset ({constant.size} such columns): no rank order to correlate; "
                "leave such examples out or use subsets that differ")
    return np.array([spearman(predicted[:, j], actual[:, j])
                     for j in range(predicted.shape[1])])


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (rows = samples):
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), as FID computes it. With fewer
    samples than features the covariances are singular; the square root is still defined
    (scipy's warning about it is silenced)."""
    import warnings

    from scipy import linalg

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu = a.mean(0) - b.mean(0)
    sa, sb = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = linalg.sqrtm(sa @ sb)
    root = np.real(root)  # rounding leaves tiny imaginary parts
    return float(mu @ mu + np.trace(sa + sb - 2 * root))
