"""What the per-token view shows on the math-with-reasoning task: which training examples drive
the tokens of the final answer's number, and which drive the equation before it.

    datainf experiment generation --task math-reasoning --out runs/gen-mr   # the adapter
    .venv/bin/python benchmarks/per_token_finding.py --study runs/gen-mr --out runs/tok-mr \
        --per-class 2

Runs ``explain-generation --per-token --token-matrix`` with the study's adapter on its training
data, for ``--per-class`` test examples of each class with their true responses ("3 + 8 = 11.
The answer is 11."), unless ``--out`` already holds that run; then reads token_scores.npz and
scores.npz. Each response token falls in one part (see ``parts``): the steps' operands,
operators and results ("17 + 2 = 19. 19 - 8 = 11."; the last step's result, "11", apart from
the earlier ones), the words ("The answer is"), the final number ("11", written again),
punctuation, spacing, the end of turn. Per part and method,
over its tokens: the AUC of -score (negative = helpful) for finding the training examples of
the query's class (its template), and for finding those whose final answer is the query's
(averaged per query, then over queries, with a 95% interval). The same two AUCs of the whole
response's scores (scores.npz) are the sequence view.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

from datainf.cli import main as datainf
from datainf.metrics import detection_auc, mean_interval

PARTS = ("operands", "operators", "earlier results", "last result", "words", "final number",
         "punctuation", "spacing", "end of turn")
ANSWER = "The answer is "


def final_answer(response: str) -> str:
    return re.findall(r"-?\d+", response.split(ANSWER)[-1])[0]


def parts(tokens: list[str], response: str) -> list[str]:
    """The part of the response that each token is (the tokens' texts concatenated give the
    response, then the end of turn): in the steps ("17 + 2 = 19. 19 - 8 = 11."), the operands,
    the operators (+, -, x, /, =), the results of the steps before the last and the last
    step's result (the final answer, computed); then the words "The answer is", the final
    number (the same answer, written again); punctuation, spacing tokens, the end of turn."""
    words = response.index(ANSWER)
    out, at, after_equals = [], 0, False
    for text in tokens:
        start, at = at, at + len(text)
        core = text.strip()
        if start >= len(response):
            out.append("end of turn")
        elif not core:
            out.append("spacing")
        elif core == ".":
            out.append("punctuation")
            after_equals = False
        elif start + len(text) - len(text.lstrip()) < words:
            if core.isdigit():
                out.append("step results" if after_equals else "operands")
            else:
                out.append("operators")
                after_equals = core == "="
        else:
            out.append("final number" if core.isdigit() else "words")
    last = max((i for i, p in enumerate(out) if p == "step results"), default=-1)
    while last >= 0 and out[last] == "step results":  # the last step's result (its tokens)
        out[last], last = "last result", last - 1
    return ["earlier results" if p == "step results" else p for p in out]


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """AUC of -score (negative = helpful) for finding the ``positive`` training examples."""
    return detection_auc(-scores, positive)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", type=Path, required=True,
                        help="an `experiment generation --task math-reasoning` folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--per-class", type=int, default=1)
    parser.add_argument("--methods", default="datainf,cosine")
    args = parser.parse_args()
    train = [json.loads(line) for line in (args.study / "data" / "train.jsonl").open()]
    test = [json.loads(line) for line in (args.study / "data" / "test.jsonl").open()]
    queries, seen = [], {}
    for row in test:
        if seen.get(row["class"], 0) < args.per_class:
            seen[row["class"]] = seen.get(row["class"], 0) + 1
            queries.append(row)
    if not (args.out / "token_scores.npz").exists():
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "queries.jsonl"
        path.write_text("".join(json.dumps(q) + "\n" for q in queries))
        code = datainf(["explain-generation", "--train", str(args.study / "data" / "train.jsonl"),
                        "--queries", str(path), "--adapter", str(args.study / "run" / "adapter"),
                        "--methods", args.methods, "--top", "2", "--per-token",
                        "--token-matrix", "--out", str(args.out / "run")])
        if code:
            raise SystemExit(code)
        for name in ("token_scores.npz", "scores.npz", "tokens.jsonl", "summary.json"):
            (args.out / name).write_bytes((args.out / "run" / name).read_bytes())
    tokens = np.load(args.out / "token_scores.npz")
    whole = np.load(args.out / "scores.npz")
    rows = [json.loads(line) for line in (args.out / "tokens.jsonl").open()]
    classes = np.array([r["class"] for r in train])
    answers = np.array([final_answer(r["messages"][-1]["content"]) for r in train])
    methods = [m for m in args.methods.split(",") if m in tokens.files]
    owner = tokens["query"]  # each token's query row
    part_of = np.array([p for j, row in enumerate(rows) for p in parts(
        [t["token"] for t in row["tokens"]], queries[j]["messages"][-1]["content"])])
    same = {"class": [classes == q["class"] for q in queries],
            "answer": [answers == final_answer(q["messages"][-1]["content"]) for q in queries]}
    # a query whose final answer no training example shares has no same-answer AUC
    usable = {"class": range(len(rows)), "answer": [j for j in range(len(rows))
                                                    if same["answer"][j].any()]}
    print(f"{len(rows)} queries ({len(usable['answer'])} whose final answer some training "
          f"example shares), {len(part_of)} tokens; tokens per part: "
          + ", ".join(f"{p} {int((part_of == p).sum())}" for p in PARTS))
    print("AUC of -score for finding the training examples of the same class / the same final "
          "answer: per query the mean over its tokens of the part, then the mean over queries "
          "+- the half-width of its 95% Student-t interval (datainf.metrics.mean_interval)")
    for m in methods:
        per_query = {}  # (part, what) -> {query: mean AUC over its tokens of the part}
        for p in PARTS:
            for what in ("class", "answer"):
                cells = {j: np.flatnonzero((owner == j) & (part_of == p)) for j in usable[what]}
                per_query[p, what] = {j: np.mean([auc(tokens[m][r], same[what][j]) for r in rs])
                                      for j, rs in cells.items() if len(rs)}
            print(f"  {m:8s} {p:16s} " + " / ".join(interval(per_query[p, w].values())
                                                  for w in ("class", "answer")))
        print(f"  {m:8s} {'whole response':16s} " + " / ".join(interval(
            [auc(whole[m][j], same[w][j]) for j in usable[w]]) for w in ("class", "answer")))
        paired = [per_query["last result", "answer"][j] - per_query["final number", "answer"][j]
                  for j in per_query["last result", "answer"]]
        print(f"  {m:8s} same answer, last result minus final number, paired by query: "
              f"{interval(paired)}")


def interval(values) -> str:
    """Mean +- the half-width of its 95% interval over the values (one per query)."""
    mean, low, high = mean_interval(list(values))
    return f"{mean:.3f} +- {(high - low) / 2:.3f}"


if __name__ == "__main__":
    main()
