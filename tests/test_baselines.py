"""The baselines beside DataInf: ``less`` (cosine of Adam-preconditioned gradients) and
``repsim`` (cosine of the model's representations), against their plain formulas, in the
library and in the jobs, with the paper's sign (negative = helpful)."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from cli_helpers import cli, common
from test_explain_generation import files, run  # noqa: F401 (a fixture)
from tiny_models import tiny_bert_classifier, tiny_llama

from datainf import DataInfError, Less, RepSim
from datainf.gradients.representations import representations
from datainf.gradients.source import as_gradient_source, group_by_module
from datainf.gradients.store import GradientStore
from datainf.training.moments import FILE, read_second_moments


def cosine_scores(test: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    """-cos(test_j, train_k), (m, n), in float64."""
    return -(F.normalize(test.double(), dim=1) @ F.normalize(train.double(), dim=1).T)


def test_less_is_the_cosine_of_preconditioned_gradients():
    torch.manual_seed(0)
    widths = {"m.lora_A.default.weight": 6, "m.lora_B.default.weight": 4, "h.weight": 3}
    train = {k: torch.randn(9, d, dtype=torch.float64) for k, d in widths.items()}
    test = {k: torch.randn(4, d, dtype=torch.float64) for k, d in widths.items()}
    moments = {k: torch.rand(d) * 1e-3 for k, d in widths.items()}
    step = torch.cat([1 / (moments[k].double().sqrt() + 1e-8) for k in widths])
    expected = cosine_scores(torch.cat(list(test.values()), 1) * step,
                             torch.cat(list(train.values()), 1) * step)
    got = Less(moments).fit(train).score(test)
    assert torch.allclose(got, expected, rtol=0, atol=1e-14)
    # blocks grouped by module take their members' moments in order
    grouped = Less(moments).fit(group_by_module(as_gradient_source(train)))
    assert torch.allclose(grouped.score(group_by_module(as_gradient_source(test))), expected,
                          rtol=0, atol=1e-14)
    # with equal moments it is the cosine method
    flat = {k: torch.full((d,), 0.25) for k, d in widths.items()}
    cos = cosine_scores(torch.cat(list(test.values()), 1), torch.cat(list(train.values()), 1))
    assert torch.allclose(Less(flat).fit(train).score(test), cos, rtol=0, atol=1e-14)


def test_less_refuses_missing_or_mismatched_moments():
    train = {"a": torch.randn(3, 2, dtype=torch.float64)}
    with pytest.raises(DataInfError, match="second moments"):
        Less()
    with pytest.raises(DataInfError, match="none for gradient block 'a'"):
        Less({"b": torch.ones(2)}).fit(train)
    with pytest.raises(DataInfError, match="2 columns but 3 scales"):
        Less({"a": torch.ones(3)}).fit(train)


def test_less_repeats_the_moments_of_each_pass():
    """A block of k passes concatenated (the diffusion task's timesteps) takes the parameter's
    moments once a pass."""
    torch.manual_seed(2)
    train, test = torch.randn(5, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    v = torch.rand(3)
    step = (1 / (v.double().sqrt() + 1e-8)).repeat(2)
    got = Less({"a": v}).fit({"a": train}).score({"a": test})
    assert torch.allclose(got, cosine_scores(test * step, train * step), rtol=0, atol=1e-14)


def test_repsim_is_the_cosine_of_features():
    torch.manual_seed(1)
    train, test = torch.randn(8, 5), torch.randn(3, 5)
    got = RepSim().fit(train).score(test)
    # float32 features: one float32 dot product of unit rows, |error| < d * eps32
    # float32 unit rows and one float32 dot product of 5 terms: |error| < 16 * eps32
    assert torch.allclose(got, cosine_scores(test, train), rtol=0, atol=16 * 2**-23)
    assert got.shape == (3, 8)


def test_lm_representation_is_the_mean_state_before_the_scored_tokens():
    """Padded batch rows give each example's own mean of the last hidden state over the
    positions t whose token t + 1 is labelled (computed here one unpadded example at a
    time)."""
    model = tiny_llama()  # float64: both sides are the same sums but for padding
    model.eval()
    ids = [[3, 5, 7, 9, 11], [4, 6, 8]]
    labelled = [[3, 4], [1, 2]]  # the positions of the scored tokens
    batch = {"input_ids": torch.zeros(2, 5, dtype=torch.long),
             "attention_mask": torch.zeros(2, 5, dtype=torch.long),
             "labels": torch.full((2, 5), -100)}
    for row, (tokens, scored) in enumerate(zip(ids, labelled, strict=True)):
        batch["input_ids"][row, : len(tokens)] = torch.tensor(tokens)
        batch["attention_mask"][row, : len(tokens)] = 1
        batch["labels"][row, scored] = torch.tensor([tokens[t] for t in scored])
    got = representations(model, [batch], "causal_lm")
    for row, (tokens, scored) in enumerate(zip(ids, labelled, strict=True)):
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([tokens]),
                           output_hidden_states=True).hidden_states[-1][0]
        expected = hidden[[t - 1 for t in scored]].mean(0).float()
        # float64 states rounded to float32 once: padding changes only the last float64 bits
        assert torch.allclose(got[row], expected, rtol=2**-22, atol=0)


def test_classifier_representation_is_what_the_head_reads():
    model = tiny_bert_classifier(dtype=torch.float32)
    model.eval()
    batch = {"input_ids": torch.randint(1, 60, (3, 6)),
             "attention_mask": torch.ones(3, 6, dtype=torch.long)}
    got = representations(model, [batch], "classification")
    with torch.no_grad():
        pooled = model.get_base_model().bert(**batch).pooler_output
    assert torch.equal(got, pooled.float())


def test_explain_generation_scores_the_baselines(tiny_chat_model, files, tmp_path,  # noqa: F811
                                                 capsys):
    out = tmp_path / "run"
    assert run(tiny_chat_model, *files, out, "--methods", "datainf,less,repsim") == 0
    scores = np.load(out / "scores.npz")
    assert set(scores.files) == {"datainf", "less", "repsim"}
    train = GradientStore.open(out / "gradients" / "train")
    queries = GradientStore.open(out / "query" / "gradients")
    expected = Less(read_second_moments(out / "adapter")).fit(train).score(queries).numpy()
    # the same computation on the same store, in the same chunks
    assert np.array_equal(scores["less"], expected)
    assert np.all(np.abs(scores["repsim"]) <= 1 + 1e-6) and np.ptp(scores["repsim"]) > 0
    summary = json.loads((out / "summary.json").read_text())
    assert "representations" in summary["stage_seconds"]
    # an adapter without the optimizer's moments: less is refused before anything loads
    given = tmp_path / "adapter"
    shutil.copytree(out / "adapter", given)
    (given / FILE).unlink()
    capsys.readouterr()
    assert run(tiny_chat_model, *files, tmp_path / "other", "--adapter", given,
               "--methods", "less") != 0
    err = capsys.readouterr().err
    assert "less needs the second moments" in err and "leave it out of --methods" in err
    assert not (tmp_path / "other").exists()


def test_detect_mislabeled_scores_the_baselines(tiny_model, csv_file, tmp_path):
    """Aggregate scores (higher = more suspicious): less = -cos(mean of the unit
    preconditioned validation rows, each unit preconditioned training row), blocks grouped
    by module; repsim the same on the features the head reads."""
    out = tmp_path / "run"
    assert cli("--data", csv_file, *common(tiny_model, out), "--methods", "less,repsim",
               "--rank-by", "less", "--grouping", "module") == 0
    table = pd.read_csv(out / "scores.csv")
    train = group_by_module(GradientStore.open(out / "gradients" / "train"))
    val = group_by_module(GradientStore.open(out / "gradients" / "val"))
    expected = Less(read_second_moments(out / "adapter")).fit(train).score(val, aggregate=True)
    assert np.array_equal(table["less_score"].to_numpy(), expected.numpy())
    assert table["repsim_score"].abs().max() <= 1 + 1e-6 and table["repsim_score"].std() > 0
