"""The ``explain-generation`` job: which fine-tuning examples made the LLM answer like that?

Stages (the expensive ones are written to ``out`` once and reused when the job is repeated with
the same settings; new queries reuse the adapter and the training gradients):

1. data      --train and --queries JSON lines (see :mod:`datainf.data.chat`)        -> recomputed
2. adapter   LoRA fine-tuning of the causal LM on --train (or --adapter)       -> out/adapter/
3. answers   greedy answers to the queries that have no response              -> out/query/
4. gradients per-example gradients of the response-only loss                  -> out/gradients/,
                                                                                  out/query/
5. scores    every method's pairwise influence of every training example on every query
             -> scores.npz, top.jsonl, summary.json, report.html (always recomputed)

Scores have the paper's sign: NEGATIVE = the training example helps (up-weighting it lowers
the query's loss), positive = harmful. Scores are computed a batch of queries at a time, so
that memory holds (queries per batch) x n scores, never the whole matrix.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.chat import ChatExample, Encoded, encode_all, lm_batches, read_chat_jsonl
from ..methods import LABELS
from ..methods.blocks import names_matching
from .pairwise import PairwiseOptions, kept, matrix_folder, save_matrices, score_queries
from .runs import (
    Stages,
    adapter_digest,
    check_numbers,
    fingerprint,
    is_main,
    keyed_folder,
    main_first,
    record_run,
    run_folder,
    save_adapter,
    say,
    settings_json,
    warn,
    warn_unconverged,
    write_atomic,
)

OUTPUTS = ("scores.npz", "top.jsonl", "summary.json", "report.html")


@dataclass
class Config(PairwiseOptions):
    """Settings of one explain-generation run. Those in ``EXPENSIVE`` decide the adapter and
    the training gradients."""

    train: str = ""
    queries: str = ""
    model: str = "smollm2"
    adapter: str | None = None
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    epochs: int = 3
    batch_size: int = 8
    learning_rate: float = 1e-3
    max_length: int = 256
    seed: int = 0
    # cheap: may change between runs on the same --out
    max_new_tokens: int = 64
    out: str = "runs/explain-generation"
    progress: bool | None = None
    stage_seconds: dict = field(default_factory=dict)

    EXPENSIVE = ("model", "adapter", "lora_r", "lora_alpha", "lora_targets", "epochs",
                 "batch_size", "learning_rate", "max_length", "seed")

    def expensive(self) -> dict:
        return settings_json(self, self.EXPENSIVE)


def check_settings(config: Config) -> None:
    """Every setting, before anything is loaded."""
    config.check_scoring()
    check_numbers(config, {"epochs": 1, "batch_size": 1, "lora_r": 1, "max_length": 2,
                           "top": 1, "max_new_tokens": 1, "query_batch": 1},
                  ("learning_rate", "damping", "lora_alpha"))
    from ..devices import check_device
    from ..models.hf import check_adapter_folder, check_model_name

    check_device(config.device)
    check_model_name(config.model, ("smollm2",))
    if config.adapter is not None:
        check_adapter_folder(config.adapter)


# ---------------------------------------------------------------- stage 2: adapter
def load_model(config: Config, out: Path):
    """(model with its LoRA adapter, tokenizer, source): ``source`` is "given", "reused" or
    "new" (fresh LoRA, to be fine-tuned)."""
    from ..models.hf import add_lora, load_adapter, load_causal_lm

    base, tokenizer = load_causal_lm(config.model)
    saved = out / "adapter"
    if config.adapter is not None:
        model, source = load_adapter(base, config.adapter), "given"
    elif (saved / "adapter_config.json").exists():
        model, source = load_adapter(base, saved), "reused"
    else:
        torch.manual_seed(config.seed)
        model = add_lora(base, r=config.lora_r, alpha=config.lora_alpha,
                         target_modules=config.lora_targets)
        source = "new"
    if config.blocks is not None:
        names_matching([n for n, p in model.named_parameters() if p.requires_grad],
                       config.blocks)
    return model.to(config.device), tokenizer, source


def response_loss(model, batch: dict) -> torch.Tensor:
    """Per-example mean NLL of the response tokens, shape (B,) (see
    datainf.gradients.tasks.CausalLM)."""
    from ..gradients.tasks import CausalLM

    return CausalLM().losses(model, batch, torch.arange(len(batch["input_ids"])), 0)


def train_adapter(config: Config, model, tokenizer, train: Encoded, out: Path) -> dict:
    """LoRA fine-tuning on the mean response loss; the adapter is saved to out/adapter whole
    or not at all, with training.json (loss per epoch)."""
    from ..training.finetune import train_loop

    def batches(order):
        return lm_batches(train, config.batch_size, tokenizer.pad_token_id, order)

    losses = train_loop(model, len(train), batches,
                        lambda module, b: response_loss(module, b).mean(),
                        epochs=config.epochs, batch_size=config.batch_size,
                        learning_rate=config.learning_rate, seed=config.seed,
                        progress=config.progress, process_group=config.process_group)
    history = {"epoch_losses": [round(x, 5) for x in losses], "epochs_run": len(losses)}
    if is_main(config.process_group):
        save_adapter(model, out, history)
    return history


# ---------------------------------------------------------------- stage 3: answers
@torch.no_grad()
def greedy_answers(model, tokenizer, examples: list[ChatExample], *, max_new_tokens: int,
                   batch_size: int, progress: bool | None = None) -> list[str]:
    """The model's greedy answer to each prompt (special tokens removed, stripped)."""
    from tqdm.auto import tqdm

    from ..data.chat import prompt_and_response_text

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # batched generation continues every row at the end
    answers = []
    try:
        for start in tqdm(range(0, len(examples), batch_size), desc="answering", unit="batch",
                          disable=None if progress is None else not progress):
            prompts = [prompt_and_response_text(tokenizer, e, None)[0]
                       for e in examples[start : start + batch_size]]
            batch = tokenizer(prompts, return_tensors="pt", padding=True,
                              add_special_tokens=False).to(next(model.parameters()).device)
            ids = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            new = ids[:, batch["input_ids"].shape[1]:]
            answers += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
    return answers


def query_answers(config: Config, model, tokenizer, queries: list[ChatExample],
                  folder: Path) -> tuple[list[str], list[bool]]:
    """(the response explained for each query, whether the model generated it). Generated
    answers are kept in folder/answers.json and reused while queries and adapter stay."""
    path = folder / "answers.json"
    missing = [i for i, q in enumerate(queries) if q.response is None]
    generated: dict[str, str] = {}
    if path.exists():
        generated = json.loads(path.read_text())
    todo = [i for i in missing if str(i) not in generated]
    if todo:
        answers = greedy_answers(model, tokenizer, [queries[i] for i in todo],
                                 max_new_tokens=config.max_new_tokens,
                                 batch_size=config.batch_size, progress=config.progress)
        empty = [queries[i].line for i, a in zip(todo, answers, strict=True) if not a]
        if empty:
            warn(f"the model answered --queries lines {empty[:5]} with an empty text: what is "
                 "explained there is its ending the turn at once")
        generated.update({str(i): a for i, a in zip(todo, answers, strict=True)})
        write_atomic(path, json.dumps(generated, indent=2))
    responses = [q.response if q.response is not None else generated[str(i)]
                 for i, q in enumerate(queries)]
    return responses, [q.response is None for q in queries]


# ---------------------------------------------------------------- stage 4: gradients
def gradients(config: Config, model, tokenizer, encoded: Encoded, path: Path):
    """(store, reused): per-example gradients of the response-only loss at ``path``."""
    from ..gradients.collect import collect_gradients
    from ..gradients.store import GradientStore

    reused = GradientStore.is_complete(path)
    batches = lm_batches(encoded, config.batch_size, tokenizer.pad_token_id)
    store = collect_gradients(model, batches, "causal_lm", out=str(path),
                              progress=config.progress, process_group=config.process_group)
    return store, reused


# ---------------------------------------------------------------- outputs
def write_outputs(config: Config, out: Path, train: list[ChatExample],
                  queries: list[ChatExample], responses: list[str], generated: list[bool],
                  tops: dict, seconds: dict, notes: dict, matrix_folder: Path | None,
                  extra: dict) -> dict:
    """scores.npz, top.jsonl, report.html, then summary.json (last: its presence says the run
    is complete). Returns the summary."""
    from ..report import explain_generation_page

    if matrix_folder is not None:
        save_matrices(matrix_folder, tops, out)
    rows = []
    for j, query in enumerate(queries):
        row = {"query": j, "line": query.line, "prompt": query.messages,
               "response": responses[j], "generated": generated[j], **kept(query)}
        for method, per_query in tops.items():
            row[method] = {side: [{"train": i, "line": train[i].line, "score": s,
                                   "rank": r + 1, "prompt": train[i].prompt_text,
                                   "response": train[i].response, **kept(train[i])}
                                  for r, (i, s) in enumerate(per_query[j][side])]
                           for side in ("helpful", "harmful")}
        rows.append(row)
    write_atomic(out / "top.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    summary = {
        "command": "explain-generation",
        "config": settings_json(config, leave_out=("stage_seconds",)),
        "n_train": len(train), "n_queries": len(queries),
        "generated_answers": int(sum(generated)),
        "methods": {m: {"label": LABELS[m], "seconds": round(s, 4), **notes.get(m, {})}
                    for m, s in seconds.items()},
        "sign": "negative = helpful (up-weighting the training example lowers the query's "
                "loss), positive = harmful",
        "outputs": [name for name in OUTPUTS if name != "scores.npz" or matrix_folder],
        **extra,
    }
    summary["stage_seconds"] = {k: round(v, 2) for k, v in config.stage_seconds.items()}
    write_atomic(out / "report.html", explain_generation_page(summary, rows, list(tops)))
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    return summary



# ---------------------------------------------------------------- the job
@dataclass
class Prepared:
    """The expensive stages' results, in the locked run folder ``out``."""

    out: Path
    train: list[ChatExample]
    queries: list[ChatExample]
    responses: list[str]
    generated: list[bool]
    model: object
    tokenizer: object
    source: str
    history: dict | None
    train_store: object
    query_store: object
    stages: Stages


@contextmanager
def prepared(config: Config):
    """Runs (or reuses) every expensive stage and yields their results while ``out`` stays
    locked. Settings and data are checked before anything expensive; ``out`` is claimed (its
    run.json written) only once the model and adapter have loaded."""
    check_settings(config)
    stages = Stages(config.stage_seconds, lambda m: say(m, config.progress), config.out)
    train = stages.timed("data", read_chat_jsonl, config.train, need_response=True,
                         what="--train")
    queries = read_chat_jsonl(config.queries, need_response=False, what="--queries")
    record = {**config.expensive(), "train_fingerprint": fingerprint(config.train)}
    group = config.process_group
    with run_folder(Path(config.out), record, group) as out:
        model, tokenizer, source = stages.timed("model", load_model, config, out)
        encoded_train = encode_all(tokenizer, train, [e.response for e in train],
                                   max_length=config.max_length, what="--train")
        # the prompts alone must fit too, with room for an answer
        encode_all(tokenizer, queries, [q.response for q in queries],
                   max_length=config.max_length, what="--queries")
        if is_main(group):
            record_run(out, record)
            for name in OUTPUTS:  # never leave results of other settings next to this run's
                (out / name).unlink(missing_ok=True)
        history = None
        if source == "new":
            history = stages.timed("fine-tuning", train_adapter, config, model, tokenizer,
                                   encoded_train, out)
        elif source == "reused":
            stages.reuse("fine-tuning")
            history = json.loads((out / "adapter" / "training.json").read_text())
        with main_first(group):  # rank 0 answers; the others read its answers.json
            folder = _query_folder(out, config, source)
            responses, generated = stages.timed("answers", query_answers, config, model,
                                                tokenizer, queries, folder)
        encoded_queries = encode_all(tokenizer, queries, responses,
                                     max_length=config.max_length + config.max_new_tokens,
                                     what="--queries")
        train_store, again = stages.timed("gradients", gradients, config, model, tokenizer,
                                          encoded_train, out / "gradients" / "train")
        query_store, again_q = stages.timed("query gradients", gradients, config, model,
                                            tokenizer, encoded_queries, folder / "gradients")
        if again:
            stages.reuse("gradients")
        if again_q:
            stages.reuse("query gradients")
        yield Prepared(out, train, queries, responses, generated, model, tokenizer, source,
                       history, train_store, query_store, stages)


def _query_folder(out: Path, config: Config, source: str) -> Path:
    """out/query: the queries' answers and gradients, kept while the queries file, the
    adapter and the generation length stay the same (otherwise emptied)."""
    adapter = Path(config.adapter) if config.adapter else out / "adapter"
    return keyed_folder(out / "query", {
        "queries": fingerprint(config.queries), "max_new_tokens": config.max_new_tokens,
        "adapter": source if source == "given" else "trained here",
        "adapter_fingerprint": adapter_digest(adapter)})


def run(config: Config) -> dict | None:
    """Every stage; returns the summary (also written to out/summary.json). With a process
    group, rank 0 writes the outputs and returns the summary; other ranks None."""
    main = is_main(config.process_group)
    with prepared(config) as p, matrix_folder(p.out, config.matrix and main) as folder:
        tops, seconds, notes = p.stages.timed("scoring", score_queries, p.train_store,
                                              p.query_store, folder=folder, **config.scoring())
        if not main:
            return None
        warn_unconverged(notes)
        extra = {"adapter": p.source, "training": p.history, "reused_stages": p.stages.reused}
        return p.stages.timed("report", write_outputs, config, p.out, p.train, p.queries,
                              p.responses, p.generated, tops, seconds, notes, folder, extra)


__all__ = ["Config", "prepared", "run"]
