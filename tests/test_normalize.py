"""normalize=True: every gradient scaled to unit norm over all blocks before scoring, for
training and test rows alike, the damping computed on the unit rows; checked against plain
formulas (tests/reference.py) on hand-normalized gradients."""

import pytest
import torch
from reference import scores as reference_scores

from datainf import DataInf, Exact, HessianFree, LiSSA
from datainf.gradients.source import UnitNormRows, as_gradient_source
from datainf.gradients.store import GradientStore
from datainf.methods import estimator


def unit_rows(blocks: dict) -> dict:
    """Each row divided by its norm over all blocks (float64)."""
    norm = torch.cat([b.double() for b in blocks.values()], dim=1).norm(dim=1, keepdim=True)
    return {k: v.double() / norm for k, v in blocks.items()}


def test_cosine_is_minus_the_cosine_similarity(grads):
    train, test = grads
    got = HessianFree(normalize=True).fit(train).score(test)
    flat = lambda b: torch.cat([v.double() for v in b.values()], dim=1)  # noqa: E731
    G, V = flat(train), flat(test)
    cosine = (V @ G.T) / (V.norm(dim=1)[:, None] * G.norm(dim=1)[None, :])
    assert torch.allclose(got, -cosine, rtol=0, atol=1e-6)
    assert got.abs().max() <= 1 + 1e-6


@pytest.mark.parametrize("aggregate", [False, True])
@pytest.mark.parametrize("method", ["datainf", "exact", "hessian_free"])
def test_normalized_equals_the_method_on_unit_rows(grads, method, aggregate):
    train, test = grads
    make = {"datainf": DataInf, "exact": Exact, "hessian_free": HessianFree}[method]
    got = make(normalize=True).fit(train).score(test, aggregate=aggregate)
    expected = reference_scores(unit_rows(train), unit_rows(test), method, aggregate=aggregate)
    assert (got - expected).abs().max() <= 2e-4 * expected.abs().max()


def test_normalized_scores_do_not_depend_on_gradient_scale(grads):
    """Scaling one training row by 1000 changes plain DataInf's scores, not normalized ones."""
    train, test = grads
    louder = {k: v.clone() for k, v in train.items()}
    for v in louder.values():
        v[3] *= 1000.0
    plain = DataInf().fit(train).score(test), DataInf().fit(louder).score(test)
    unit = (DataInf(normalize=True).fit(train).score(test),
            DataInf(normalize=True).fit(louder).score(test))
    assert not torch.allclose(*plain, rtol=1e-2)
    assert torch.allclose(*unit, rtol=1e-4, atol=1e-6 * unit[0].abs().max())


def test_store_and_memory_agree_and_zero_rows_stay_zero(grads, tmp_path):
    train, test = grads
    train = {k: v.clone() for k, v in train.items()}
    for v in train.values():
        v[0] = 0.0
    store = GradientStore.create_or_resume(
        tmp_path / "train", {k: v.shape[1] for k, v in train.items()},
        len(next(iter(train.values()))), identity={"test": "normalize"})
    store.write_rows(0, train, data_hash="x")
    view = UnitNormRows(GradientStore.open(tmp_path / "train"))
    memory = UnitNormRows(as_gradient_source(train))
    for name in train:
        a = torch.cat([c for _, c in view.iter_block(name, 7)])
        b = torch.cat([c for _, c in memory.iter_block(name, 7)])
        assert torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-7) and (a[0] == 0).all()
        assert torch.allclose(view.row_sq_norms(name), memory.row_sq_norms(name), rtol=1e-6)
    total = sum(view.row_sq_norms(name) for name in train)
    assert total[0] == 0 and torch.allclose(total[1:], torch.ones_like(total[1:]))
    scores = DataInf(normalize=True).fit(view).score(test)
    assert torch.isfinite(scores).all() and (scores[:, 0] == 0).all()


def test_named_variants():
    assert isinstance(estimator("cosine"), HessianFree) and estimator("cosine").normalize
    e = estimator("datainf_normalized", damping=0.2)
    assert isinstance(e, DataInf) and e.normalize and e.damping == 0.2
    assert isinstance(estimator("lissa"), LiSSA) and not estimator("lissa").normalize
    with pytest.raises(Exception, match="unknown method 'nope'"):
        estimator("nope")
