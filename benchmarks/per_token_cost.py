"""What `explain-generation --per-token` costs: the gradients of queries whole (one row per
query) against token by token (one row per response token), on the shipped SmolLM2 with LoRA
r 8 on q_proj, v_proj, timed in one process one after the other (this machine is shared:
compare the ratio, not the seconds).

    .venv/bin/python benchmarks/per_token_cost.py [--task math-reasoning] [--queries 8]

The queries are test examples of a synthetic task in the generation study's chat format; both
passes use batches of 8 rows. Prints the tokens, the seconds of each pass, the seconds per
token and the ratio of the two passes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from datainf import collect_gradients
from datainf.data.chat import encode_all, lm_batches, read_chat_jsonl
from datainf.data.synthetic import TASKS, make_task
from datainf.experiments.generation import chat_row
from datainf.gradients.tokens import token_batches
from datainf.models.hf import add_lora, load_causal_lm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=TASKS, default="math-reasoning")
    parser.add_argument("--queries", type=int, default=8)
    args = parser.parse_args()
    model, tokenizer = load_causal_lm("smollm2")
    torch.manual_seed(0)
    model = add_lora(model, r=8, alpha=16)
    _, test = make_task(args.task, per_class=2, test_per_class=1)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "queries.jsonl"
        path.write_text("".join(json.dumps(chat_row(r)) + "\n" for r in test[: args.queries]))
        queries = read_chat_jsonl(path, need_response=True, what="queries")
    encoded = encode_all(tokenizer, queries, [q.response for q in queries], max_length=256,
                         what="queries")
    batches = lm_batches(encoded, 8, tokenizer.pad_token_id)
    tokens = token_batches(batches, rows_per_batch=8)
    collect_gradients(model, batches[:1], "causal_lm", progress=False)  # warm-up
    start = time.perf_counter()
    collect_gradients(model, batches, "causal_lm", progress=False)
    whole = time.perf_counter() - start
    start = time.perf_counter()
    collect_gradients(model, tokens.batches, "causal_lm", progress=False)
    by_token = time.perf_counter() - start
    count = len(tokens.owners)
    print(f"{args.task}: {len(queries)} queries, {count} response tokens "
          f"({count / len(queries):.1f} a query), {torch.get_num_threads()} threads")
    print(f"whole queries: {whole:.2f} s; token by token: {by_token:.2f} s "
          f"({by_token / count:.3f} s a token); ratio {by_token / whole:.1f}")


if __name__ == "__main__":
    main()
