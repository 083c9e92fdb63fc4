"""The paper's text-generation study (Table 2, LLM rows): which training examples does each
method find behind a test answer, on the three synthetic tasks of :mod:`datainf.data.synthetic`?

It runs the explain-generation pipeline itself (one pipeline, two front doors): the task's 900
training examples are the fine-tuning data, its 100 test examples, with their true responses,
the queries. Per method, on the pairwise scores: the class-detection AUC and the recall (see
:func:`datainf.metrics.class_detection`), mean and standard deviation over test examples as
the paper reports them; and the exact-match test accuracy of greedy answers before and after
fine-tuning (the paper's Table 4).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..data.synthetic import TASKS, make_task
from ..files import write_atomic
from ..jobs import explain_generation as generation
from ..jobs.runs import is_main, main_first
from ..methods import LABELS
from ..models.tiny import tiny_chat_model
from ..report import stage_line, study_page
from .classes import score_classes
from .common import QUICK_HELP, write_files

SYSTEM = "You are a helpful assistant."
METHODS = ("datainf", "hessian_free", "exact", "lissa", "datainf_normalized", "cosine", "less",
           "repsim")
# the paper's Table 2 (Llama-2-13B-chat): (AUC, recall)
PAPER = {
    "sentence-transformations": {"hessian_free": (0.999, 0.985), "datainf": (1.000, 0.997)},
    "math": {"hessian_free": (0.770, 0.258), "datainf": (1.000, 0.999)},
    "math-reasoning": {"hessian_free": (0.772, 0.258), "datainf": (1.000, 0.996)},
}


@dataclass
class Study:
    """The task, its size, and the explain-generation settings used for it."""

    task: str
    job: generation.Config
    per_class: int = 100
    test_per_class: int = 10
    seed: int = 0
    shown: int = 3           # test examples shown with their top training examples
    quick: bool = False      # --quick: the report says its numbers mean nothing


HELP = ("which training examples each method finds behind a test answer, on the paper's "
        "synthetic text-generation tasks (Table 2, LLM rows)")
DESCRIPTION = (HELP[0].upper() + HELP[1:] + ": 10 classes, 90 training and 10 test examples "
               "each, generated with --data-seed; class-detection AUC and recall of every "
               "method, exact-match accuracy before and after fine-tuning. The "
               "explain-generation pipeline, on its defaults.")
QUICK = {"per_class": 4, "test_per_class": 1, "epochs": 1, "max_new_tokens": 4}
OPTIONS = (("--task", {"choices": TASKS, "default": TASKS[0], "help": "the synthetic task"}),
           ("--data-seed", {"type": int, "default": 0, "help": "seed of the generated examples"}),
           ("--quick", {"action": "store_true",
                        "help": f"{QUICK_HELP}: a 2-layer Llama built from a config (random "
                                "weights, SmolLM2's tokenizer), 4 examples a class, 1 epoch"}),
           ("--out", {"help": "the experiment's folder (default: "
                              "runs/experiment-generation-TASK)"}),
           ("--quiet", {"action": "store_true", "help": "no progress bars or stage lines"}))


def start(settings: dict, *, task: str, data_seed: int, quick: bool, out: str | None,
          quiet: bool, process_group: object | None = None) -> str:
    """Runs the study from its command's options (``settings``: the explain-generation ones,
    :data:`~datainf.jobs.explain_generation.MODEL_OPTIONS`); returns its folder."""
    folder = Path(out or f"runs/experiment-generation-{task}")
    job = generation.Config(**settings, out=str(folder / "run"), top=3,
                            progress=False if quiet else None, process_group=process_group)
    study = Study(task=task, seed=data_seed, job=job)
    if quick:
        with main_first(process_group):  # built once, by rank 0 under torchrun
            model = tiny_chat_model(folder / "tiny-model")
        study = replace(study, per_class=QUICK["per_class"], quick=True,
                        test_per_class=QUICK["test_per_class"],
                        job=replace(job, model=str(model), epochs=QUICK["epochs"],
                                    max_new_tokens=QUICK["max_new_tokens"]))
    run(study)
    return str(folder)


def run(study: Study) -> dict:
    """Writes summary.json, generation.csv and report.html into the job's parent folder
    (``--out``) and returns the summary."""
    out = Path(study.job.out).parent
    data = out / "data"
    group = study.job.process_group
    train, test = make_task(study.task, per_class=study.per_class,
                            test_per_class=study.test_per_class, seed=study.seed)
    with main_first(group):  # rank 0 writes the data the others read
        if is_main(group):
            data.mkdir(parents=True, exist_ok=True)
            for name, rows in (("train.jsonl", train), ("test.jsonl", test)):
                write_atomic(data / name, "".join(json.dumps(chat_row(r)) + "\n" for r in rows))
    job = replace(study.job, train=str(data / "train.jsonl"), queries=str(data / "test.jsonl"))
    train_classes = np.array([r["class"] for r in train])
    test_classes = np.array([r["class"] for r in test])
    with generation.prepared(job) as p:
        with p.run.main_first(), p.run.stage("accuracy"):  # rank 0 answers; the others
            accuracy = _accuracy(job, p)                     # read its accuracy.json
        table, methods, tops = score_classes(p, job, train_classes, test_classes)
        history = p.history
        stage_seconds = {k: round(v, 1) for k, v in job.stage_seconds.items()}
        reused = list(p.run.reused)
        examples = _shown(study, p, tops, train, test)
    summary = {
        "experiment": "generation", "quick": study.quick, "task": study.task,
        "n_train": len(train), "n_test": len(test), "model": job.model, "lora_r": job.lora_r,
        "epochs": job.epochs, "learning_rate": job.learning_rate, "accuracy": accuracy,
        "training": history, "stage_seconds": stage_seconds, "reused_stages": reused,
        "methods": methods,
        "paper": {m: {"auc": a, "recall": r} for m, (a, r) in PAPER.get(study.task, {}).items()},
    }
    if is_main(group):
        write_files(out, "generation", summary, table, _report(summary, examples))
    return summary


def chat_row(row: dict) -> dict:
    """An example in TRL's chat format with a short system turn (SmolLM2's template would
    otherwise add its own 20-token system prompt to every example)."""
    return {"messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": row["prompt"]},
                         {"role": "assistant", "content": row["response"]}],
            "class": row["class"]}


def _accuracy(job: generation.Config, p: generation.Prepared) -> dict:
    """Exact-match accuracy of greedy answers to the test prompts, before fine-tuning (the
    adapter disabled) and after; kept in the run folder while the adapter stays."""
    path = p.run.out / "query" / "accuracy.json"
    if path.exists():
        return json.loads(path.read_text())
    answers = {}
    with p.model.disable_adapter():
        answers["before"] = generation.greedy_answers(
            p.model, p.tokenizer, p.queries, max_new_tokens=job.max_new_tokens,
            batch_size=job.batch_size, progress=job.progress)
    answers["after"] = generation.greedy_answers(
        p.model, p.tokenizer, p.queries, max_new_tokens=job.max_new_tokens,
        batch_size=job.batch_size, progress=job.progress)
    truth = [q.response.strip() for q in p.queries]
    result = {k: round(float(np.mean([a == t for a, t in zip(v, truth, strict=True)])), 4)
              for k, v in answers.items()}
    result["examples"] = [{"prompt": q.prompt_text, "truth": t, "before": b, "after": a}
                          for q, t, b, a in list(zip(p.queries, truth, answers["before"],
                                                     answers["after"], strict=True))[:5]]
    write_atomic(path, json.dumps(result, indent=2))
    return result


def _shown(study: Study, p, tops: dict, train: list[dict], test: list[dict]) -> list[dict]:
    """A few test examples (spread over the classes) with DataInf's three most and least
    influential training examples: the paper's Figure 3 in text form."""
    per = max(1, len(test) // study.shown)
    shown = []
    for j in range(0, len(test), per)[: study.shown]:
        top = tops["datainf"][j] if "datainf" in tops else next(iter(tops.values()))[j]
        shown.append({"test": test[j], "helpful": [train[i] | {"score": s}
                                                   for i, s in top["helpful"][:3]],
                      "harmful": [train[i] | {"score": s} for i, s in top["harmful"][:3]]})
    return shown


def _report(summary: dict, examples: list[dict]) -> str:
    return study_page("generation_study.html", "Text generation: influential training examples",
                      summary=summary, examples=examples,
                      labels=LABELS,
                      timing=stage_line(summary["stage_seconds"], summary["reused_stages"]))
