"""Does scoring the chat template's end of turn hide the class? Recomputes the gradients of a
finished `datainf experiment generation` run with the end-of-turn tokens left out of the loss
(only the answer's own tokens scored), on the run's adapter, and prints the class-detection
AUC, recall and AUC of |score| next to those with the end of turn scored (the run's stores).

    .venv/bin/python benchmarks/generation_end_of_turn.py runs/experiment-generation-TASK
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from datainf.data.chat import IGNORE, lm_batches, read_chat_jsonl
from datainf.data.chat import encode as encode_whole
from datainf.gradients.collect import collect_gradients
from datainf.gradients.store import GradientStore
from datainf.methods import estimator
from datainf.metrics import class_detection
from datainf.models.hf import load_adapter, load_causal_lm


def answer_only(tokenizer, examples):
    """Token ids with labels on the answer's own tokens only: the response text tokenized
    alone must be a prefix of what the template writes after the prompt."""
    batches_ids, starts, ends = [], [], []
    for e in examples:
        ids, n_prompt = encode_whole(tokenizer, e, e.response)
        answer = tokenizer(e.response, add_special_tokens=False)["input_ids"]
        assert ids[n_prompt : n_prompt + len(answer)] == answer, "answer is not a prefix"
        batches_ids.append(ids)
        starts.append(n_prompt)
        ends.append(n_prompt + len(answer))
    return batches_ids, starts, ends


def gradients(model, tokenizer, examples, path):
    from datainf.data.chat import Encoded

    ids, starts, ends = answer_only(tokenizer, examples)
    batches = lm_batches(Encoded(ids, starts), 8, tokenizer.pad_token_id)
    offset = 0
    for batch in batches:  # labels after the answer (end of turn) are not scored
        for row in range(len(batch["labels"])):
            batch["labels"][row, ends[offset + row]:] = IGNORE
        offset += len(batch["labels"])
    return collect_gradients(model, batches, "causal_lm", out=str(path), progress=False)


def main(folder: str) -> None:
    out = Path(folder)
    data = {n: read_chat_jsonl(out / "data" / f"{n}.jsonl", need_response=True, what=n)
            for n in ("train", "test")}
    classes = {n: np.array([e.extra["class"] for e in data[n]]) for n in data}
    config = json.loads((out / "run" / "run.json").read_text())
    base, tokenizer = load_causal_lm(config["model"])
    model = load_adapter(base, out / "run" / "adapter").eval()
    stores = {"with end of turn": (GradientStore.open(out / "run" / "gradients" / "train"),
                                   GradientStore.open(out / "run" / "query" / "gradients"))}
    stores["answer only"] = tuple(gradients(model, tokenizer, data[n], out / "answer-only" / n)
                                  for n in ("train", "test"))
    print(f"{'loss':<18}{'method':<20}{'AUC':>7}{'recall':>8}{'AUC |s|':>9}")
    for label, (train, test) in stores.items():
        for method in ("datainf", "hessian_free", "datainf_normalized", "cosine"):
            scores = estimator(method, progress=False).fit(train).score(test).numpy()
            m = class_detection(scores, classes["train"], classes["test"])
            print(f"{label:<18}{method:<20}{m['auc'].mean():>7.3f}{m['recall'].mean():>8.3f}"
                  f"{m['auc_magnitude'].mean():>9.3f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
