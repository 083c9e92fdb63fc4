"""The model's own features of each example, for the ``repsim`` method (no gradients):

- a causal LM (``"causal_lm"``): the last layer's hidden states (the final norm applied, as
  the LM head reads them), averaged over the positions t whose next token t + 1 the loss
  scores (labels != -100): the states the attributed loss is computed from;
- a classifier (``"classification"``): the features its head reads (BERT: the pooled [CLS]
  vector; a decoder classifier: the state at the last real token, the one it pools).

Returns an (n, d) float32 tensor in the order of the batches' rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from ..errors import DataInfError
from .tasks import text_model_inputs

KINDS = ("causal_lm", "classification")


@torch.no_grad()
def representations(model: torch.nn.Module, batches: Iterable[Mapping], kind: str
                    ) -> torch.Tensor:
    """Features (n, d) of every example of ``batches`` (see the module docstring)."""
    if kind not in KINDS:
        raise DataInfError(f"representations of a {kind!r} model: choose from {KINDS}")
    device = next(model.parameters()).device
    rows = []
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        inputs = text_model_inputs(model, batch)
        if kind == "causal_lm":
            hidden = model(**inputs, output_hidden_states=True).hidden_states[-1]
            scored = (batch["labels"][:, 1:] != -100).to(hidden.dtype)  # t predicts t + 1
            total = (hidden[:, :-1] * scored[..., None]).sum(1)
            rows.append(total / scored.sum(1).clamp_min(1)[:, None])
        else:
            rows.append(_head_input(model, inputs))
    return torch.cat(rows).float().cpu()


def _head_input(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """What the classification head (``classifier`` or ``score``) is given, one row per
    example."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = getattr(base, "classifier", None) or getattr(base, "score", None)
    if head is None:
        raise DataInfError(f"{type(base).__name__} has no 'classifier' or 'score' head whose "
                           "input repsim could read; leave repsim out of --methods")
    seen = []
    handle = head.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    try:
        model(**inputs)
    finally:
        handle.remove()
    features = seen[-1]
    if features.dim() == 3:  # a decoder classifier scores every position and pools the last
        last = inputs["attention_mask"].long().sum(1) - 1
        features = features[torch.arange(len(last)), last]
    return features
