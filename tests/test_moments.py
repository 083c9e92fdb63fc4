"""Adam's second moments kept beside an adapter (the preconditioner of ``less``)."""

import numpy as np
import torch
from tiny_models import tiny_bert_classifier

from datainf.training.finetune import train_loop
from datainf.training.moments import read_second_moments, save_second_moments


def test_moments_after_one_step_are_the_squared_gradient(tmp_path):
    """After one Adam step, v = (1 - beta2) g^2, so the bias-corrected v_hat is g^2 exactly
    (g: the gradient of the batch's mean loss at the initial weights; the loop is given the
    batch in the same order, so g is the same computation and only v's two roundings differ)."""
    model = tiny_bert_classifier(dtype=torch.float32)
    model.eval()  # no dropout: the gradient below is the one the step used
    batch = {"input_ids": torch.randint(1, 60, (4, 7)), "labels": torch.tensor([0, 1, 2, 1])}

    def loss(module, b):
        return torch.nn.functional.cross_entropy(module(input_ids=b["input_ids"]).logits,
                                                 b["labels"])

    loss(model, batch).backward()
    expected = {n: p.grad.flatten().clone() ** 2 for n, p in model.named_parameters()
                if p.requires_grad}
    model.zero_grad()
    moments: dict = {}
    model.train = lambda mode=True: model  # keep eval mode (dropout off) inside the loop
    train_loop(model, 4, lambda order: [batch], loss,
               epochs=1, batch_size=4, learning_rate=1e-3, seed=0, progress=False,
               second_moments=moments)
    assert set(moments) == set(expected)
    for name, v in expected.items():
        torch.testing.assert_close(moments[name], v, rtol=1e-5, atol=1e-12)

    save_second_moments(moments, tmp_path)
    again = read_second_moments(tmp_path)
    assert all(np.array_equal(again[n].numpy(), moments[n].numpy()) for n in moments)
    assert read_second_moments(tmp_path / "elsewhere") is None
