"""The ``explain-generation`` job: which fine-tuning examples made the LLM answer like that?

Stages (the expensive ones are written to ``out`` once and reused when the job is repeated with
the same settings; new queries reuse the adapter and the training gradients):

1. data      --train and --queries JSON lines (see :mod:`datainf.data.chat`)        -> recomputed
2. adapter   LoRA fine-tuning of the causal LM on --train (or --adapter)       -> out/adapter/
3. answers   greedy answers to the queries that have no response              -> out/query/
4. gradients per-example gradients of the loss on --loss-on's tokens (the response by
             default)                                         -> out/gradients/, out/query/
5. scores    every method's pairwise influence of every training example on every query
             -> scores.npz, top.jsonl, summary.json, report.html (always recomputed)

Scores have the paper's sign: NEGATIVE = the training example helps (up-weighting it lowers
the query's loss), positive = harmful. Scores are computed a batch of queries at a time, so
that memory holds (queries per batch) x n scores, never the whole matrix.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data.chat import (
    LOSS_SPANS,
    ChatExample,
    Encoded,
    encode_all,
    lm_batches,
    prompt_and_response_text,
    read_chat_jsonl,
)
from ..devices import check_device
from ..errors import DataInfError
from ..files import write_atomic
from ..gradients.collect import collect_gradients
from ..gradients.representations import representations
from ..gradients.source import names_matching
from ..gradients.store import GradientStore
from ..gradients.tasks import CausalLM
from ..identity import fingerprint
from ..integrations import CallbackRun, given_store, read_callback_run
from ..log import warn
from ..methods import Inputs
from ..models.hf import check_adapter_folder, check_model_name, load_causal_lm
from ..options import Command, option, said
from ..report import explain_generation_page
from ..training.finetune import train_loop
from .pairwise import (
    OUTPUT_OPTIONS,
    OUTPUTS,
    SCORING_OPTIONS,
    PairwiseOptions,
    Scored,
    kept,
    scored,
)
from .pairwise import write_outputs as write_pairwise
from .pipeline import (
    QUIET_HELP,
    Run,
    check_second_moments,
    collected,
    fine_tuned,
    query_folder,
    second_moments,
    with_adapter,
    with_features,
)
from .runs import check_numbers, settings_json
from .tokens import OUTPUTS as TOKEN_OUTPUTS
from .tokens import TokenScores, score_tokens, token_methods, write_token_outputs


@dataclass
class Config(PairwiseOptions):
    """Settings of one explain-generation run. Those in ``EXPENSIVE`` decide the adapter and
    the training gradients."""

    blocks: str | None = option(
        None, "regular expression: only the matching gradient blocks count (e.g. "
        "'layers\\.2[0-9]\\.')")
    train: str = option("", "fine-tuning examples (.jsonl)", shown=None)
    run: str | None = option(
        None, "instead of --train, --model and --adapter: a run folder that "
        "datainf.integrations.DataInfCallback wrote at the end of your Trainer / SFTTrainer "
        "training (its model, adapter, training examples and their gradients)", shown=None)
    queries: str = option("", "queries to explain (.jsonl)", required=True, shown=None)
    model: str = option(
        "smollm2", "'smollm2' (shipped SmolLM2-135M-Instruct), a HF causal LM folder or hub name")
    adapter: str | None = option(
        None, "an existing PEFT adapter folder for --model (skips fine-tuning)")
    lora_r: int = option(8, "LoRA rank")
    lora_alpha: int = option(16, "LoRA alpha")
    lora_targets: tuple[str, ...] = option(
        ("q_proj", "v_proj"), "modules that get LoRA (comma-separated)", kind="list")
    epochs: int = option(3, "fine-tuning epochs")
    batch_size: int = option(8, "examples per batch")
    learning_rate: float = option(1e-3, "AdamW")
    max_length: int = option(256, "tokens of prompt and response (chat template included)")
    seed: int = option(0, "seed of LoRA and the data order")
    # cheap: may change between runs on the same --out
    max_new_tokens: int = option(64, "tokens the model may generate to answer a query")
    # the tokens whose loss the influence gradients are of (fine-tuning always scores the
    # response); each span has its own stores (see _suffix)
    loss_on: str = option(
        "response", "the tokens whose loss is attributed: the response (what made the "
        "answer), the prompt alone (the DataInf authors' gradients; they also fine-tuned on the "
        "whole text and scored right padding, we do neither) or the full text (bergson's)",
        choices=LOSS_SPANS)
    per_token: bool = option(
        False, "also attribute every attributed token of each query alone (its loss's gradient): "
        "tokens.jsonl lists each token's most helpful and harmful training examples; one "
        "backward per token", kind="on")
    token_matrix: bool = option(
        False, "with --per-token: also token_scores.npz, every token's score of every training "
        "example (8 x tokens x training examples bytes per method)", kind="on")
    out: str = option("runs/explain-generation", "run folder (reused when repeated)")
    progress: bool | None = option(None, QUIET_HELP, flag="--quiet", kind="quiet")
    stage_seconds: dict = field(default_factory=dict)

    EXPENSIVE = ("model", "adapter", "run", "lora_r", "lora_alpha", "lora_targets", "epochs",
                 "batch_size", "learning_rate", "max_length", "seed")


MODEL_OPTIONS = {  # the generation study runs the same pipeline with these
    "model": ("model", "lora_r", "lora_alpha", "lora_targets", "epochs", "batch_size",
              "learning_rate", "max_length", "max_new_tokens", "seed", "device"),
    "scoring": ("loss_on", *SCORING_OPTIONS)}
COMMAND = Command(
    "explain-generation",
    help="which fine-tuning examples made the LLM answer like that",
    description="Influence of every fine-tuning example on the model's answers to your "
    "queries: LoRA fine-tunes the causal LM on --train (or takes --adapter), answers the "
    "queries that have no response, and scores every training example against every query.",
    config=Config,
    layout={"data": ("train", "run", "queries", "adapter"), **MODEL_OPTIONS,
            "outputs": ("per_token", "token_matrix", *OUTPUT_OPTIONS)},
    epilog="""\
data: JSON lines, one example a line: {"prompt": ..., "response": ...} or {"messages": [{"role":
..., "content": ...}, ...]} (TRL's chat format: the last assistant turn is the response, the
turns before it the prompt); other keys are kept and shown. A query without a response is
answered by the model (greedy) and that answer is explained. Examples longer than --max-length
tokens are refused, never cut.

outputs (in --out): scores.npz (one queries x training-examples float64 array per method, the
paper's sign: negative = helpful), top.jsonl (per query, the --top most helpful and most harmful
training examples), report.html, summary.json, the adapter and the gradient stores; with
--per-token, tokens.jsonl (per query token, its most helpful and harmful training examples;
per query, its most helpful examples token by token) and, with --token-matrix,
token_scores.npz.

examples:
  datainf explain-generation --train train.jsonl --queries queries.jsonl --out runs/explain
  datainf explain-generation --model DIR --adapter ADAPTER_DIR --train train.jsonl \\
      --queries queries.jsonl --methods datainf,cosine --out runs/explain
""")


def check_settings(config: Config) -> None:
    """Every setting, before anything is loaded."""
    config.check_scoring()
    if config.token_matrix and not config.per_token:
        raise DataInfError("--token-matrix writes the scores of --per-token; add --per-token")
    if config.per_token and not token_methods(config.methods):
        raise DataInfError("--per-token scores gradients, and --methods holds none (repsim "
                           "compares representations); add a gradient method such as datainf")
    check_numbers(config, {"epochs": 1, "batch_size": 1, "lora_r": 1, "max_length": 2,
                           "top": 1, "max_new_tokens": 1, "query_batch": 1},
                  ("learning_rate", "damping", "lora_alpha"))
    check_device(config.device)
    if config.run is not None:
        if config.train or config.adapter:
            raise DataInfError("--run brings the training examples, the model and the adapter; "
                               "give it without --train and --adapter")
        if config.loss_on != "response":
            raise DataInfError("--run: the training gradients are of the loss the trainer "
                               "trained on (its labels); the queries' loss must be the "
                               "response's: leave --loss-on at 'response'")
        if "repsim" in config.methods:
            raise DataInfError("--run: repsim needs the training examples' representations, "
                               "which the run folder does not keep; leave repsim out of "
                               "--methods")
        read_callback_run(config.run, "causal_lm")  # refused now, not after loading
        return
    if not config.train:
        raise DataInfError("give --train (a .jsonl file of examples to fine-tune on) or --run "
                           "(a DataInfCallback run folder)")
    check_model_name(config.model, ("smollm2",))
    if config.adapter is not None:
        check_adapter_folder(config.adapter)
        check_second_moments(config)


# ---------------------------------------------------------------- stage 2: adapter
def load_model(config: Config, out: Path):
    """(model with its LoRA adapter, tokenizer, source): see
    :func:`datainf.jobs.pipeline.with_adapter`."""
    base, tokenizer = load_causal_lm(config.model)
    model, source = with_adapter(base, config, out)
    if config.blocks is not None:
        names_matching([n for n, p in model.named_parameters() if p.requires_grad],
                       config.blocks)
    return model.to(config.device), tokenizer, source


def response_loss(model, batch: dict) -> torch.Tensor:
    """Per-example mean NLL of the response tokens, shape (B,) (see
    datainf.gradients.tasks.CausalLM)."""
    return CausalLM().losses(model, batch, torch.arange(len(batch["input_ids"])), 0)


def train_adapter(config: Config, model, tokenizer, train: Encoded,
                  second_moments: dict | None = None) -> dict:
    """LoRA fine-tuning on the mean response loss; returns the history (loss per epoch) and
    fills ``second_moments`` (see :func:`datainf.training.finetune.train_loop`)."""

    def batches(order):
        return lm_batches(train, config.batch_size, tokenizer.pad_token_id, order)

    losses = train_loop(model, len(train), batches,
                        lambda module, b: response_loss(module, b).mean(),
                        epochs=config.epochs, batch_size=config.batch_size,
                        learning_rate=config.learning_rate, seed=config.seed,
                        progress=config.progress, process_group=config.process_group,
                        second_moments=second_moments)
    return {"epoch_losses": [round(x, 5) for x in losses], "epochs_run": len(losses)}


# ---------------------------------------------------------------- stage 3: answers
@torch.no_grad()
def greedy_answers(model, tokenizer, examples: list[ChatExample], *, max_new_tokens: int,
                   batch_size: int, progress: bool | None = None) -> list[str]:
    """The model's greedy answer to each prompt (special tokens removed, stripped)."""
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
            warn(f"the model answered {said('queries')} lines {empty[:5]} with an empty text: "
                 "what is explained there is its ending the turn at once")
        generated.update({str(i): a for i, a in zip(todo, answers, strict=True)})
        write_atomic(path, json.dumps(generated, indent=2))
    responses = [q.response if q.response is not None else generated[str(i)]
                 for i, q in enumerate(queries)]
    return responses, [q.response is None for q in queries]


# ---------------------------------------------------------------- stage 4: gradients
def gradients(config: Config, model, batches: list[dict], path: Path) -> GradientStore:
    """Per-example gradients of ``batches`` (:func:`scored_batches`: labelled on
    ``config.loss_on``'s tokens), in the store at ``path``."""
    return collect_gradients(model, batches, "causal_lm", out=str(path),
                             progress=config.progress, process_group=config.process_group)


def features(config: Config, model, tokenizer, encoded: Encoded) -> torch.Tensor:
    """The representations repsim compares, (n, d): the mean last hidden state over the
    positions that predict ``config.loss_on``'s tokens."""
    return representations(model, scored_batches(config, tokenizer, encoded), "causal_lm")


def scored_batches(config: Config, tokenizer, encoded: Encoded) -> list[dict]:
    """Batches of ``encoded`` labelled on ``config.loss_on``'s tokens (the attributed loss)."""
    return lm_batches(encoded, config.batch_size, tokenizer.pad_token_id,
                      loss_on=config.loss_on)


# ---------------------------------------------------------------- outputs
def write_outputs(config: Config, out: Path, train: list[ChatExample],
                  queries: list[ChatExample], responses: list[str], generated: list[bool],
                  scores: Scored, extra: dict, tokens: TokenScores | None = None) -> dict:
    """scores.npz, top.jsonl, report.html, with --per-token tokens.jsonl (and
    token_scores.npz), then summary.json (see :func:`datainf.jobs.pairwise.write_outputs`).
    Returns the summary."""
    rows = [{"query": j, "line": q.line, "prompt": q.messages, "response": responses[j],
             "generated": generated[j], **kept(q)} for j, q in enumerate(queries)]

    def entry(i: int, score: float, rank: int) -> dict:
        return {"train": i, "line": train[i].line, "score": score, "rank": rank,
                "prompt": train[i].prompt_text, "response": train[i].response,
                **kept(train[i])}

    by_token = None
    if tokens is not None:
        written, by_token = write_token_outputs(out, tokens, [dict(r) for r in rows], entry)
        extra = {**extra, "per_token": {
            "tokens": len(tokens.texts), "outputs": written,
            "methods": {m: {"seconds": round(s, 4)} for m, s in tokens.seconds.items()}}}
    head = {"command": "explain-generation",
            "config": settings_json(config, leave_out=("stage_seconds",)),
            "n_train": len(train), "n_queries": len(queries),
            "generated_answers": int(sum(generated))}
    sign = ("negative = helpful (up-weighting the training example lowers the query's loss), "
            "positive = harmful")
    return write_pairwise(config, out, scores, rows, entry, head, sign, extra,
                          lambda summary, rows: explain_generation_page(
                              summary, rows, list(scores.tops), by_token,
                              None if tokens is None else list(tokens.tops)))


# ---------------------------------------------------------------- the job
@dataclass
class Prepared:
    """The expensive stages' results, in the locked run folder ``run.out``."""

    run: Run
    train: list[ChatExample]
    queries: list[ChatExample]
    responses: list[str]
    generated: list[bool]
    model: object
    tokenizer: object
    source: str
    history: dict | None
    train_store: GradientStore
    query_store: GradientStore
    inputs: Inputs              # what the methods score: the stores, moments, features
    query_batches: list[dict]   # the queries labelled on the attributed tokens
    query_folder: Path          # their answers and stores
    encoded_train: Encoded | None  # the training examples' tokens (None: a --run folder's)


@contextmanager
def prepared(config: Config) -> Iterator[Prepared]:
    """Runs (or reuses) every expensive stage and yields their results while ``out`` stays
    locked. Settings and data are checked before anything expensive; ``out`` is claimed (its
    run.json written) only once the model and adapter have loaded."""
    check_settings(config)
    run = Run.of(config)
    given = read_callback_run(config.run, "causal_lm") if config.run else None
    if given is not None:  # the trainer's model and adapter
        config = replace(config, model=given.record["base_model"], adapter=str(given.adapter))
    with run.stage("data"):
        train = (read_chat_jsonl(config.train, need_response=True, what=said("train"))
                 if given is None else callback_examples(given))
    queries = read_chat_jsonl(config.queries, need_response=False, what=said("queries"))
    record = {**config.expensive(), "train_fingerprint": fingerprint(
        config.train if given is None else given.folder / "callback.json")}
    with run.locked(record):
        with run.stage("model"):
            model, tokenizer, source = load_model(config, run.out)
        encoded_train = None if given is not None else encode_all(
            tokenizer, train, [e.response for e in train], max_length=config.max_length,
            what=said("train"))
        # the prompts alone must fit too, with room for an answer
        encode_all(tokenizer, queries, [q.response for q in queries],
                   max_length=config.max_length, what=said("queries"))
        run.claim(record, (*OUTPUTS, *TOKEN_OUTPUTS))
        history = fine_tuned(run, source, model, lambda moments: train_adapter(
            config, model, tokenizer, encoded_train, moments))
        moments = second_moments(run, config, source)
        with run.main_first():  # rank 0 answers; the others read its answers.json
            folder = query_folder(run.out, config, source, config.queries,
                                  max_new_tokens=config.max_new_tokens)
            with run.stage("answers"):
                responses, generated = query_answers(config, model, tokenizer, queries, folder)
        encoded_queries = encode_all(tokenizer, queries, responses,
                                     max_length=config.max_length + config.max_new_tokens,
                                     what=said("queries"))
        train_path = run.out / "gradients" / ("train" + _suffix(config))
        query_path = folder / ("gradients" + _suffix(config))
        if given is None:
            train_store = collected(run, "gradients", [train_path], lambda: gradients(
                config, model, scored_batches(config, tokenizer, encoded_train), train_path))
        else:  # the trainer's: made by the callback, for this model and adapter
            train_store = given_store(given, model)
            run.reuse("gradients")
        query_batches = scored_batches(config, tokenizer, encoded_queries)
        query_store = collected(run, "query gradients", [query_path], lambda: gradients(
            config, model, query_batches, query_path))
        inputs = with_features(run, Inputs(train_store, query_store, second_moments=moments),
                               config.methods, lambda: tuple(
                                   features(config, model, tokenizer, encoded)
                                   for encoded in (encoded_train, encoded_queries)))
        yield Prepared(run, train, queries, responses, generated, model, tokenizer, source,
                       history, train_store, query_store, inputs, query_batches, folder,
                       encoded_train)


def callback_examples(given: CallbackRun) -> list[ChatExample]:
    """The training examples of a DataInfCallback run folder, for the reports: the prompt and
    completion when the dataset kept them, else the decoded tokens as the prompt."""
    return [ChatExample([{"role": "user", "content": e.get("prompt") or e.get("text") or ""}],
                        e.get("completion") or "", line=e["row"] + 1)
            for e in given.examples]


def _suffix(config: Config) -> str:
    """The stores of each loss span have their own folders (gradients/train-prompt, ...), so a
    store of another span is never taken for this run's; the response's keep the names of
    runs made before the choice existed."""
    return "" if config.loss_on == "response" else f"-{config.loss_on}"


def run(config: Config) -> dict | None:
    """Every stage; returns the summary (also written to out/summary.json). With a process
    group, rank 0 writes the outputs and returns the summary; other ranks None."""
    with prepared(config) as p, scored(p.run, config, p.inputs) as scores:
        tokens = None if not config.per_token else score_tokens(
            p.run, config, p.model, p.tokenizer, p.query_batches,
            p.query_folder / ("token-gradients" + _suffix(config)), p.inputs,
            matrix=config.token_matrix, query_tops=scores.tops,
            train_batches=None if p.encoded_train is None else lambda examples: scored_batches(
                config, p.tokenizer, p.encoded_train.subset(examples)))
        if not p.run.main:
            return None
        extra = {"adapter": p.source, "training": p.history, "reused_stages": p.run.reused}
        with p.run.stage("report"):
            return write_outputs(config, p.run.out, p.train, p.queries, p.responses,
                                 p.generated, scores, extra, tokens)


__all__ = ["Config", "prepared", "run"]
