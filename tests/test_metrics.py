"""The experiment statistics in datainf.metrics against values worked out by hand."""

import math

import numpy as np
import pytest
import torch

from datainf import DataInfError
from datainf.metrics import (
    detection_auc,
    detection_curve,
    lds,
    mean_interval,
    pearson,
    spearman,
    top_k_overlap,
)


def test_pearson_by_hand():
    # a = [1, 2, 3], b = [1, 2, 4]: means 2 and 7/3, deviations (-1, 0, 1) and (-4/3, -1/3, 5/3)
    # sum of products = 4/3 + 0 + 5/3 = 3, sum a^2 = 2, sum b^2 = (16 + 1 + 25) / 9 = 14/3
    # r = 3 / sqrt(2 * 14/3) = sqrt(9 * 3 / 28) = sqrt(27/28) = 0.98198...
    assert pearson([1, 2, 3], [1, 2, 4]) == pytest.approx(math.sqrt(27 / 28), rel=1e-12)
    assert pearson(np.array([1.0, 2, 3]), torch.tensor([3.0, 2, 1])) == pytest.approx(-1, rel=1e-12)
    # any increasing linear map of a correlates perfectly: b = 2 a + 1.5
    assert pearson([0.5, -1, 4, 2], [2.5, -0.5, 9.5, 5.5]) == pytest.approx(1, rel=1e-12)
    # a = [1, 3, 1, 3], b = [1, 1, 3, 3]: deviations (-1, 1, -1, 1) and (-1, -1, 1, 1)
    # sum of products = 1 - 1 - 1 + 1 = 0: uncorrelated
    assert pearson([1, 3, 1, 3], [1, 1, 3, 3]) == 0.0


def test_spearman_with_ties_by_hand():
    # a = [1, 2, 2, 3] ranks (1, 2.5, 2.5, 4) (the tied 2s share ranks 2 and 3); b = [1, 3, 2, 4]
    # ranks (1, 3, 2, 4). Both mean 2.5; deviations (-1.5, 0, 0, 1.5) and (-1.5, 0.5, -0.5, 1.5)
    # sum of products = 2.25 + 2.25 = 4.5, sum a^2 = 4.5, sum b^2 = 2.25 + 0.25 + 0.25 + 2.25 = 5
    # rho = 4.5 / sqrt(4.5 * 5) = sqrt(0.9) = 0.94868...
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(math.sqrt(0.9), rel=1e-12)
    # any increasing relation is a perfect rank correlation, a reversal is -1
    assert spearman([1, 2, 3, 4], [1, 4, 9, 100]) == pytest.approx(1, rel=1e-12)
    assert spearman([0.1, 0.5, 0.3], [30, 10, 20]) == pytest.approx(-1, rel=1e-12)


@pytest.mark.parametrize("statistic", [pearson, spearman])
def test_correlation_of_constant_scores_is_nan(statistic):
    # no spread, no correlation: NaN, and the experiment table goes on
    assert math.isnan(statistic([2.0, 2.0, 2.0], [1, 2, 3]))
    assert math.isnan(statistic([1, 2, 3], np.zeros(3)))


@pytest.mark.parametrize("statistic", [pearson, spearman])
def test_correlation_bad_input(statistic):
    with pytest.raises(DataInfError, match="same length, got 3 and 2"):
        statistic([1, 2, 3], [1, 2])
    with pytest.raises(DataInfError, match="at least 2 values"):
        statistic([1.0], [2.0])
    with pytest.raises(DataInfError, match="NaN or infinite"):
        statistic([1, 2, float("nan")], [1, 2, 3])
    with pytest.raises(DataInfError, match="1-D"):
        statistic(np.ones((2, 2)), np.ones((2, 2)))


def test_top_k_overlap_by_counting():
    # n = 10, share = 0.3: k = 3
    a = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]  # top 3: examples 0, 1, 2
    b = [0, 9, 1, 8, 2, 3, 4, 5, 6, 7]  # top 3: examples 1 (9), 3 (8), 9 (7)
    assert top_k_overlap(a, b, share=0.3) == 1 / 3  # only example 1 in both
    # share = 0.5: k = 5; top a = {0..4}, top b = {1 (9), 3 (8), 9 (7), 8 (6), 7 (5)}: {1, 3}
    assert top_k_overlap(a, b, share=0.5) == 2 / 5
    # the default 10% of 10 examples is k = 1: example 0 against example 1
    assert top_k_overlap(a, b) == 0.0
    assert top_k_overlap(a, a) == 1.0
    assert top_k_overlap(a, b, share=1.0) == 1.0
    # the same examples in another order are a full overlap
    assert top_k_overlap([5, 4, 3, 0, 0], [3, 4, 5, 0, 0], share=0.6) == 1.0


def test_top_k_overlap_ties_keep_lower_indices():
    # n = 10, share = 0.2: k = 2. a ties examples 0, 1, 2 at the top: stable order keeps 0, 1
    a = [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    assert top_k_overlap(a, [0, 0, 1, 1, 0, 0, 0, 0, 0, 0], share=0.2) == 0.0  # b keeps {2, 3}
    assert top_k_overlap(a, [0, 1, 1, 0, 0, 0, 0, 0, 0, 0], share=0.2) == 0.5  # b keeps {1, 2}
    # all scores equal: both keep examples 0 and 1
    assert top_k_overlap(np.zeros(10), np.ones(10), share=0.2) == 1.0


def test_top_k_overlap_k_is_not_rounded_up_by_float_error():
    # 0.14 * 50 = 7.000000000000001 in floating point; k must be 7, not 8.
    # a ranks examples 0..49 in order; b is the same but swaps example 7 (8th) and example 6:
    # the top 7 by b are {0..5, 7}, so k = 7 gives 6/7 (k = 8 would give 8/8)
    a = np.arange(50, 0, -1.0)
    b = a.copy()
    b[[6, 7]] = b[[7, 6]]
    assert top_k_overlap(a, b, share=0.14) == 6 / 7


def test_top_k_overlap_bad_input():
    with pytest.raises(DataInfError, match="same length, got 3 and 4"):
        top_k_overlap([1, 2, 3], [1, 2, 3, 4])
    with pytest.raises(DataInfError, match="at least 1 values"):
        top_k_overlap([], [])
    for share in (0, -0.1, 1.5):
        with pytest.raises(DataInfError, match="share must be in"):
            top_k_overlap([1, 2], [1, 2], share=share)
    with pytest.raises(DataInfError, match="NaN or infinite"):
        top_k_overlap([1, 2], [1, float("inf")])


# t_{0.975, 3}, the 97.5% quantile of Student's t with 3 degrees of freedom (the 95% two-sided
# value): tables give 3.182; this is scipy.stats.t.ppf(0.975, 3), checked below against the
# closed-form t(3) CDF F(t) = 1/2 + (t / (sqrt(3) (1 + t^2/3)) + atan(t / sqrt(3))) / pi.
T_975_3 = 3.1824463052837078


def test_the_t_quantile_constant():
    t = T_975_3
    cdf = 0.5 + (t / (math.sqrt(3) * (1 + t * t / 3)) + math.atan(t / math.sqrt(3))) / math.pi
    assert cdf == pytest.approx(0.975, rel=1e-12)


def test_mean_interval_by_hand():
    # [1, 2, 3, 4]: mean 2.5, squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5, s = sqrt(5/3),
    # half width = t_{0.975,3} * s / sqrt(4) = 3.1824463 * 1.2909944 / 2 = 2.0542845...
    mean, low, high = mean_interval([1, 2, 3, 4])
    half = T_975_3 * math.sqrt(5 / 3) / 2
    assert mean == 2.5
    assert low == pytest.approx(2.5 - half, rel=1e-12)
    assert high == pytest.approx(2.5 + half, rel=1e-12)
    # 3 runs: t with 2 degrees of freedom has the closed-form quantile
    # t_{p,2} = (2p - 1) / sqrt(2 p (1 - p)); p = 0.95 (level 0.9): 0.9 / sqrt(0.095) = 2.91998...
    # [0.7, 0.8, 0.9]: mean 0.8, s = sqrt((0.01 + 0 + 0.01) / 2) = 0.1, half = t * 0.1 / sqrt(3)
    mean, low, high = mean_interval(torch.tensor([0.7, 0.8, 0.9], dtype=torch.float64), level=0.9)
    half = 0.9 / math.sqrt(0.095) * 0.1 / math.sqrt(3)
    assert mean == pytest.approx(0.8, rel=1e-12)
    assert low == pytest.approx(0.8 - half, rel=1e-12)
    assert high == pytest.approx(0.8 + half, rel=1e-12)
    # no spread, no width
    assert mean_interval([0.5, 0.5]) == (0.5, 0.5, 0.5)


def test_mean_interval_one_run_and_bad_input():
    mean, low, high = mean_interval([0.83])
    assert mean == 0.83 and math.isnan(low) and math.isnan(high)
    assert all(math.isnan(x) for x in mean_interval([0.8, float("nan"), 0.9]))
    with pytest.raises(DataInfError, match="at least one value"):
        mean_interval([])
    for level in (0, 1, 95):
        with pytest.raises(DataInfError, match="level must be in"):
            mean_interval([1, 2], level=level)
    with pytest.raises(DataInfError, match="1-D"):
        mean_interval(np.ones((2, 3)))


def test_detection_auc_and_curve_by_hand():
    # flagged examples 0 (0.9) and 2 (0.3) against unflagged 1 (0.8) and 3 (0.1): of the 4 pairs,
    # 0.9 > 0.8, 0.9 > 0.1, 0.3 < 0.8, 0.3 > 0.1 -> AUC 3/4
    scores, flagged = [0.9, 0.8, 0.3, 0.1], [True, False, True, False]
    assert detection_auc(scores, flagged) == 0.75
    inspected, found = detection_curve(np.array(scores), np.array(flagged))
    assert inspected.tolist() == [0, 0.25, 0.5, 0.75, 1]
    assert found.tolist() == [0, 0.5, 0.5, 1, 1]


def test_class_detection_by_hand():
    from datainf.metrics import class_detection

    train = np.array([0, 0, 1, 1, 1])
    # test 0 (class 0): scores -3, -1 for its class; -2, 0, 1 for the others: of the 2 x 3 pairs
    # (same, other) the same-class example is more helpful (more negative) in 5 of 6 -> 5/6;
    # the 2 most helpful are examples 0 (-3) and 2 (-2): recall 1/2
    # test 1 (class 1): every class-1 example below every class-0 one -> AUC 1, recall 1
    scores = np.array([[-3.0, -1.0, -2.0, 0.0, 1.0],
                       [5.0, 4.0, -1.0, -2.0, 0.5]])
    got = class_detection(scores, train, np.array([0, 1]))
    assert got["auc"] == pytest.approx([5 / 6, 1.0])
    assert got["recall"] == pytest.approx([0.5, 1.0])
    # |scores| of test 0: its class has 3 and 1, the others 2, 0 and 1: the class is larger in
    # 4 of the 6 pairs and tied in 1 (counts half) -> 4.5 / 6 = 0.75; test 1: its class has 1,
    # 2 and 0.5, the others 5 and 4: smaller in every pair -> 0
    assert got["auc_magnitude"] == pytest.approx([0.75, 0.0])
    with pytest.raises(DataInfError, match="must be among the training classes"):
        class_detection(scores[:1], train, np.array([2]))


def test_lds_by_hand():
    # 4 subsets, 2 test examples. Test 0: predicted (1, 2, 2, 3) with ties, actual (1, 3, 2, 4):
    # the tie case above, rho = sqrt(0.9). Test 1: predicted (0.4, 0.1, 0.3, 0.2) ranks
    # (4, 1, 3, 2), actual (10, 40, 20, 30) ranks (1, 4, 2, 3); deviations (1.5, -1.5, 0.5, -0.5)
    # and (-1.5, 1.5, -0.5, 0.5): the exact negative, rho = -1
    predicted = np.array([[1, 0.4], [2, 0.1], [2, 0.3], [3, 0.2]])
    actual = np.array([[1, 10], [3, 40], [2, 20], [4, 30]])
    got = lds(predicted, actual)
    assert got.shape == (2,)
    assert got[0] == pytest.approx(math.sqrt(0.9), rel=1e-12)
    assert got[1] == pytest.approx(-1, rel=1e-12)
    # a monotone map of either side changes nothing (ranks only)
    np.testing.assert_allclose(lds(np.exp(predicted), actual ** 3), got, rtol=1e-12)


@pytest.mark.parametrize("predicted, actual, message", [
    (np.ones((4, 2)), np.arange(8.0).reshape(4, 2), "predicted values of test example 0 "
                                                    "are the same in every subset"),
    (np.arange(8.0).reshape(4, 2), np.array([[1, 2], [1, 3], [1, 4], [1, 5.0]]),
     "actual values of test example 0"),
    (np.arange(4.0).reshape(2, 2), np.arange(4.0).reshape(2, 2), "at least 3 subsets"),
    (np.arange(6.0).reshape(3, 2), np.arange(6.0).reshape(2, 3), "of one shape"),
    (np.array([[0, 1], [1, np.nan], [2, 3.0]]), np.arange(6.0).reshape(3, 2), "NaN or inf"),
])
def test_lds_refuses(predicted, actual, message):
    with pytest.raises(DataInfError, match=message):
        lds(predicted, actual)
