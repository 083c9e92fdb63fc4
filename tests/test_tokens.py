"""Per-token gradients (datainf.gradients.tokens) of a tiny Llama in float64, stored in
float32 (one rounding: float32_passes(1)): a token row's gradient is the gradient of that
token's loss alone, an example's token rows average to its gradient, and every gradient
method's token scores average to its score of that mean (in float64: the estimators' own
identity, to the issue's 1e-6)."""

import pytest
import torch
from conftest import any_estimator
from tiny_models import padded_text_batch, tiny_llama
from tolerances import float32_passes, relative

from datainf import DataInfError, collect_gradients
from datainf.gradients.source import RowRange
from datainf.gradients.tokens import TokenGradients, mean_by_owner, token_batches
from datainf.methods import METHODS, PAIRWISE


@pytest.fixture(scope="module")
def llama():
    """The model and two batches of right-padded examples (prompts of 2 tokens unscored),
    each padded to its own longest example (7 and 8 tokens), as a collator pads them."""
    model = tiny_llama().eval()  # no dropout in the reference passes
    whole = padded_text_batch([5, 7, 6, 4, 8], vocab=50, side="right", seed=0, prompt=2)
    return model, [{k: v[:3, :7] for k, v in whole.items()}, {k: v[3:] for k, v in whole.items()}]


@pytest.fixture(scope="module")
def gradients(llama):
    """(sequence gradients, token gradients, token batches) of the five examples."""
    model, batches = llama
    tokens = token_batches(batches, rows_per_batch=5)
    return (collect_gradients(model, batches, "causal_lm"),
            collect_gradients(model, tokens.batches, "causal_lm"), tokens)


def token_loss(model, batch, b, t):
    """-log p(token t | tokens before it) of example b, computed alone."""
    logits = model(input_ids=batch["input_ids"][b : b + 1],
                   attention_mask=batch["attention_mask"][b : b + 1]).logits[0]
    return torch.nn.functional.cross_entropy(logits[t - 1], batch["labels"][b, t])


def test_rows_are_the_scored_tokens_in_order(llama, gradients):
    _, batches = llama
    _, tok, tokens = gradients
    # 5 examples of 5, 7, 6, 4, 8 tokens, the first 2 unscored: 3 + 5 + 4 + 2 + 6 rows
    assert tokens.owners.tolist() == [0] * 3 + [1] * 5 + [2] * 4 + [3] * 2 + [4] * 6
    assert tokens.positions[:3].tolist() == [2, 3, 4]
    # 12 rows of the first batch, then 8 of the second: no token batch spans the two
    assert [tuple(b["input_ids"].shape) for b in tokens.batches] == [
        (5, 7), (5, 7), (2, 7), (5, 8), (3, 8)]
    for batch in tokens.batches:
        assert ((batch["labels"] != -100).sum(1) == 1).all()  # one scored token a row
    assert next(iter(tok.values())).shape[0] == 20


def test_a_token_row_is_the_gradient_of_that_tokens_loss(llama, gradients):
    model, batches = llama
    _, tok, tokens = gradients
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for r in (0, 4, 19):  # tokens of examples 0, 1 (second batch row 1) and 4
        owner, t = int(tokens.owners[r]), int(tokens.positions[r])
        batch, b = (batches[0], owner) if owner < 3 else (batches[1], owner - 3)
        grads = torch.autograd.grad(token_loss(model, batch, b, t), list(params.values()))
        for name, g in zip(params, grads, strict=True):
            assert relative(tok[name][r], g.reshape(-1)) < float32_passes(1), (r, name)


def test_token_rows_average_to_the_sequence_gradient(gradients):
    seq, tok, tokens = gradients
    for name in seq:
        assert relative(mean_by_owner(tok[name].double(), tokens.owners),
                        seq[name]) < float32_passes(1), name


@pytest.mark.parametrize("method", [m for m in PAIRWISE if METHODS[m].reads == "gradients"])
@pytest.mark.filterwarnings("ignore:LiSSA did not converge")
def test_token_scores_average_to_the_sequence_score(gradients, method):
    """Every gradient method is linear in the test gradient once its scale is fixed: the
    unit-norm ones scale each token row by its example's norm (TokenGradients' owners)."""
    seq, tok, tokens = gradients
    tok = {name: rows.double() for name, rows in tok.items()}
    train = {name: torch.randn(9, g.shape[1], generator=torch.Generator().manual_seed(i),
                               dtype=torch.float64) for i, (name, g) in enumerate(seq.items())}
    widths = {name: g.shape[1] for name, g in seq.items()}
    estimator = any_estimator(method, widths, progress=False).fit(train)
    by_token = estimator.score(TokenGradients(tok, tokens.owners))
    assert by_token.shape == (20, 9)
    expected = estimator.score({name: mean_by_owner(rows, tokens.owners)
                                for name, rows in tok.items()})
    assert relative(mean_by_owner(by_token, tokens.owners), expected) < 1e-6, method
    if METHODS[method].settings.get("normalize") or method == "less":
        # without the owners each token row is scaled by its own norm: no split
        alone = estimator.score(tok)
        assert relative(mean_by_owner(alone, tokens.owners), expected) > 1e-3


@pytest.mark.filterwarnings("ignore:LiSSA did not converge")
@pytest.mark.parametrize("method", [m for m in PAIRWISE if METHODS[m].reads == "gradients"])
def test_training_token_splits_average_to_the_score(gradients, method):
    """score_rows on a training example's token rows, with the inverse of the whole training
    set: their mean is that example's score (float64: the estimators' own identity)."""
    seq, tok, tokens = gradients
    tok = {name: rows.double() for name, rows in tok.items()}
    train = {name: mean_by_owner(rows, tokens.owners) for name, rows in tok.items()}
    test = {name: torch.randn(2, g.shape[1], generator=torch.Generator().manual_seed(i),
                              dtype=torch.float64) for i, (name, g) in enumerate(seq.items())}
    widths = {name: g.shape[1] for name, g in seq.items()}
    estimator = any_estimator(method, widths, progress=False).fit(train)
    split = estimator.score_rows(test, TokenGradients(tok, tokens.owners))
    assert split.shape == (2, 20)
    means = mean_by_owner(split.T, tokens.owners).T
    assert relative(means, estimator.score(test)) < 1e-6, method
    # both sides by token (explain-generation's training split against each query token):
    # query 1's token rows, whose mean is its row, against the examples' token rows
    noise = {name: torch.randn(3, t.shape[1], generator=torch.Generator().manual_seed(7),
                               dtype=torch.float64) for name, t in test.items()}
    rows = {name: torch.cat([t[:1], t[1:] + noise[name] - noise[name].mean(0)])
            for name, t in test.items()}  # rows 1-3: query 1's tokens
    queries = TokenGradients(rows, torch.tensor([0, 1, 1, 1]))
    both = estimator.score_rows(RowRange(queries, 1, 4), TokenGradients(tok, tokens.owners))
    assert both.shape == (3, 20)
    assert relative(mean_by_owner(both.mean(0)[:, None], tokens.owners)[:, 0],
                    estimator.score(test)[1]) < 1e-6, method


def test_query_batches_hold_whole_queries():
    """The pairwise scoring's batches of token rows end at query boundaries (a query's rows
    are scaled by its own norm), however long a query is."""
    from datainf.jobs.pairwise import query_ranges

    owners = torch.tensor([0] * 3 + [1] * 5 + [2] * 4)
    assert query_ranges(12, 4, owners) == [(0, 3), (3, 8), (8, 12)]
    assert query_ranges(12, 8, owners) == [(0, 8), (8, 12)]
    assert query_ranges(12, 64, owners) == [(0, 12)]
    assert query_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]


def test_refusals(llama):
    _, batches = llama
    with pytest.raises(DataInfError, match="need 'labels'"):
        token_batches([{"input_ids": batches[0]["input_ids"]}])
    with pytest.raises(DataInfError, match="no example has a scored token"):
        token_batches([{**batches[0], "labels": torch.full_like(batches[0]["labels"], -100)}])
    with pytest.raises(DataInfError, match="one owner per row"):
        TokenGradients({"a": torch.zeros(3, 2)}, torch.zeros(2, dtype=torch.long))
