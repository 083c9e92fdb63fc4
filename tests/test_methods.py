"""Each estimator against the plain float64 formulas of tests/reference.py."""

import warnings

import pytest
import torch
from conftest import random_gradients
from reference import scores as reference_scores
from reference import self_influence as reference_self_influence

from datainf import DataInf, Exact, HessianFree, LiSSA

EXACT_LIKE = {
    "datainf": DataInf,
    "exact": Exact,
    "hessian_free": HessianFree,
}


def converging_lissa():
    return LiSSA(max_iterations=20000, tol=1e-11)


def assert_close(actual, expected, dtype):
    rtol = 1e-9 if dtype == torch.float64 else 2e-4
    scale = expected.abs().max()
    assert actual.dtype == torch.float64
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max() <= rtol * scale, (actual - expected).abs().max() / scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("aggregate", [False, True])
@pytest.mark.parametrize("method", list(EXACT_LIKE))
def test_matches_plain_formula(grads, method, aggregate, dtype):
    train, test = grads
    train = {k: v.to(dtype) for k, v in train.items()}
    test = {k: v.to(dtype) for k, v in test.items()}
    got = EXACT_LIKE[method]().fit(train).score(test, aggregate=aggregate)
    assert_close(got, reference_scores(train, test, method, aggregate=aggregate), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("aggregate", [False, True])
def test_lissa_converges_to_exact(grads, aggregate, dtype):
    train, test = grads
    train = {k: v.to(dtype) for k, v in train.items()}
    test = {k: v.to(dtype) for k, v in test.items()}
    est = LiSSA(max_iterations=20000, tol=1e-11 if dtype == torch.float64 else 1e-6).fit(train)
    got = est.score(test, aggregate=aggregate)
    assert est.converged_
    assert all(c.converged and c.relative_residual <= est.tol for c in est.convergence_.values())
    expected = reference_scores(train, test, "exact", aggregate=aggregate)
    rtol = 1e-8 if dtype == torch.float64 else 1e-3
    assert (got - expected).abs().max() <= rtol * expected.abs().max()


def test_lissa_reports_non_convergence(grads):
    train, test = grads
    est = LiSSA(max_iterations=3).fit(train)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        got = est.score(test)
    assert got.shape == (7, 40) and torch.isfinite(got).all()
    assert est.converged_ is False
    assert all(c.iterations == 3 and not c.converged for c in est.convergence_.values())
    assert all(c.relative_residual > est.tol for c in est.convergence_.values())


def test_lissa_trace_scale_also_converges(grads):
    train, test = grads
    est = LiSSA(scale="trace", max_iterations=100000, tol=1e-10).fit(train)
    got = est.score(test, aggregate=True)
    assert est.converged_
    expected = reference_scores(train, test, "exact", aggregate=True)
    assert (got - expected).abs().max() <= 1e-7 * expected.abs().max()


def test_lissa_too_small_scale_is_reported_not_hidden(grads):
    train, test = grads
    est = LiSSA(scale=1e-6, max_iterations=50).fit(train)
    with pytest.warns(RuntimeWarning):
        est.score(test)
    assert not est.converged_


@pytest.mark.parametrize("method", list(EXACT_LIKE))
def test_self_influence_matches_plain_formula(grads, method):
    train, _ = grads
    got = EXACT_LIKE[method]().fit(train).self_influence()
    expected = reference_self_influence(train, method)
    assert (got - expected).abs().max() <= 1e-9 * expected.abs().max()
    assert (got > 0).all()


def test_self_influence_is_the_diagonal_of_pairwise_scores(grads):
    train, _ = grads
    for cls in (DataInf, Exact, HessianFree):
        est = cls().fit(train)
        pairwise = est.score(train)
        assert torch.allclose(est.self_influence(), -pairwise.diagonal(), rtol=1e-9)


def test_lissa_has_no_self_influence(grads):
    from datainf import DataInfError

    with pytest.raises(DataInfError, match="self-influence"):
        converging_lissa().fit(grads[0]).self_influence()


def test_aggregate_is_mean_of_pairwise(grads):
    train, test = grads
    for cls in (DataInf, Exact, HessianFree):
        est = cls().fit(train)
        assert torch.allclose(
            est.score(test, aggregate=True), est.score(test).mean(0), rtol=1e-9, atol=0
        )


def test_sign_convention_helpful_example_is_negative():
    """A training example whose gradient points along the test gradient lowers the test loss."""
    g = torch.Generator().manual_seed(0)
    train = {"w": torch.randn(30, 5, generator=g, dtype=torch.float64)}
    test = {"w": train["w"][:1] * 3}
    for cls in (DataInf, Exact, HessianFree):
        s = cls().fit(train).score(test)[0]
        assert s[0] < 0 and s[0] == s.min()


def test_exact_uses_the_cheaper_side(grads):
    est = Exact().fit(grads[0])
    assert est.sides_ == {"layer.0.lora_A": "primal", "layer.0.lora_B": "dual", "head": "primal"}
    assert est.factors_["layer.0.lora_B"].shape == (40, 40)
    assert est.factors_["head"].shape == (17, 17)


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


def datainf_error(d: int, relative: float, seed: int) -> float:
    train = random_gradients(60, {"w": d}, seed=seed)
    test = random_gradients(5, {"w": d}, seed=seed + 100)
    return relative_error(
        DataInf(relative).fit(train).score(test), Exact(relative).fit(train).score(test)
    )


def test_theorem1_error_grows_with_block_width():
    errors = [sum(datainf_error(d, 0.1, s) for s in range(3)) / 3 for d in (1, 4, 16, 64)]
    assert errors == sorted(errors), errors
    assert errors[0] < 0.5 * errors[-1]


def test_theorem1_error_shrinks_as_damping_grows():
    errors = [sum(datainf_error(16, lam, s) for s in range(3)) / 3 for lam in (0.1, 1, 10, 100)]
    assert errors == sorted(errors, reverse=True), errors
    assert errors[-1] < 0.05


def test_datainf_is_exact_for_a_single_example():
    """With n = 1 the average has one term and Sherman-Morrison is exact."""
    train = random_gradients(1, {"a": 5, "b": 9}, seed=3)
    test = random_gradients(4, {"a": 5, "b": 9}, seed=4)
    assert torch.allclose(
        DataInf().fit(train).score(test), Exact().fit(train).score(test), rtol=1e-10
    )


def test_refitting_replaces_state(grads):
    train, test = grads
    est = DataInf().fit(random_gradients(11, {k: v.shape[1] for k, v in train.items()}, seed=9))
    est.fit(train)
    assert torch.allclose(est.score(test), DataInf().fit(train).score(test))


def test_no_warning_when_converged(grads):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converging_lissa().fit(grads[0]).score(grads[1], aggregate=True)


@pytest.mark.parametrize("iterations, tol", [(30, 1e-4), (20000, 1e-9)])
def test_lissa_on_the_n_by_n_side_equals_its_recursion_on_the_d_side(grads, monkeypatch,
                                                                      iterations, tol):
    """Blocks wider than n (here 64 > 40) run LiSSA's recursion as x_t = c_t v + y_t G: the
    same iterates, so the same scores (float64: the same sums in another order, FLOAT64 of
    tests/tolerances.py), unconverged after 30 iterations or converged to 1e-9, and the same
    convergence; DUAL_BYTES = 0 forces the d-side recursion."""
    import warnings

    from tolerances import FLOAT64, relative

    import datainf.methods.lissa as lissa

    train, test = grads
    found = {}
    for side, limit in (("dual", lissa.DUAL_BYTES), ("primal", 0)):
        monkeypatch.setattr(lissa, "DUAL_BYTES", limit)
        est = LiSSA(max_iterations=iterations, tol=tol).fit(train)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            found[side] = (est.score(test), est.converged_, est.convergence_)
    assert relative(found["dual"][0], found["primal"][0]) < FLOAT64
    assert found["dual"][1] == found["primal"][1] == (tol == 1e-9)
    wide = "layer.0.lora_B"  # 64 columns > 40 rows: the block that took the n x n side
    a, b = found["dual"][2][wide], found["primal"][2][wide]
    assert abs(a.iterations - b.iterations) <= 1
