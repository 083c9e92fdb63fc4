"""Attach to training where users train: a transformers ``TrainerCallback`` (also for TRL's
``SFTTrainer``) that leaves a run folder at the end of training.

    from datainf.integrations import DataInfCallback
    trainer = SFTTrainer(model=peft_model, train_dataset=ds, args=cfg,
                         callbacks=[DataInfCallback(out="runs/my-sft")])
    trainer.train()

The folder (``out``) holds, once training has ended:

- ``adapter/``: the trained LoRA adapter (PEFT's ``save_pretrained``) and the optimizer's
  second moments (``second_moments.safetensors``, for ``less``) when the optimizer is Adam(W);
- ``gradients/train``: the per-example gradient store of the final adapter over the trainer's
  own training set, in its order, batched by the trainer's own data collator, so that each
  example's loss is the one the model was trained on (SFTTrainer's completion-only labels, a
  classifier's label); one row per example (gradient accumulation changes nothing: per-example
  gradients do not depend on how steps group examples);
- ``examples.jsonl``: one record per training example: its text columns as the dataset
  holds them (prompt and completion, messages, text), else its input ids decoded (special
  tokens kept; for a causal LM split at the first scored token into prompt and completion);
  for a classifier also its label and the model inputs the trainer's collator makes of it
  (``detect-mislabeled --run`` predicts on exactly those tokens);
- ``callback.json``: the settings (task, base model, a classifier's class names, trainer's
  batch size, epochs, steps) and fingerprints, written last: its presence marks a complete
  folder.

Checked before the first training step (one clear error, nothing trained): the model has LoRA
adapters; ``out`` is writable and empty (or absent); no DeepSpeed and no FSDP (they shard the
parameters; per-example gradients need each LoRA tensor whole on each process: plain or DDP
data-parallel training is supported, under torchrun or accelerate, where each rank writes its
shard of the store); no packing or padding-free batches (several examples in one row); the
training set yields examples that the trainer's collator turns into a batch with labels.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from transformers import TrainerCallback

from .errors import DataInfError
from .files import write_atomic
from .gradients.collect import collect_gradients
from .gradients.store import GradientStore
from .identity import adapter_fingerprint, model_fingerprint
from .training.moments import adam_second_moments, save_second_moments

FORMAT = "datainf-callback"
RECORD = "callback.json"
TEXT_COLUMNS = ("prompt", "completion", "messages", "text")  # kept in examples.jsonl
CLASSIFIER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # kept for a classifier
PROBE = ".datainf-write-probe"  # written and removed by rank 0 to check that out is writable


class DataInfCallback(TrainerCallback):
    """Writes a run folder that datainf's commands read (see the module's docstring).

    ``out``: the folder (created; refused when it holds anything already). ``batch_size``:
    examples per batch of the gradient pass (default: the trainer's per-device batch size).
    """

    def __init__(self, out: str | os.PathLike, *, batch_size: int | None = None) -> None:
        self.out = Path(out)
        self.batch_size = batch_size
        self.task: str | None = None

    # ------------------------------------------------------------ before training
    def on_init_end(self, args, state, control, model=None, **kwargs):
        """At the trainer's construction: the model, the settings and ``out``."""
        self._check_model(model)
        self._check_args(args)
        self._check_out(args)

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None,
                       **kwargs):
        """Before the first step: the training set turns back into examples."""
        if train_dataloader is None:
            raise DataInfError("DataInfCallback: the trainer has no training set to attribute "
                               "to; give it a train_dataset")
        dataset = train_dataloader.dataset
        try:
            count = len(dataset)
        except TypeError:
            raise DataInfError("DataInfCallback: the training set has no length (an iterable "
                               "or streamed dataset); give a map-style dataset (datasets."
                               "Dataset, a list) so that every example can be scored") from None
        if count == 0:
            raise DataInfError("DataInfCallback: the training set is empty")
        try:
            batch = train_dataloader.collate_fn([dataset[0]])
        except Exception as error:  # noqa: BLE001 - said in one line
            raise DataInfError(f"DataInfCallback: the trainer's collator cannot batch the first "
                               f"training example alone ({type(error).__name__}: {error}); "
                               "the callback needs each example as its own row") from None
        if "input_ids" not in batch or "labels" not in batch:
            raise DataInfError(f"DataInfCallback: a training batch has keys {sorted(batch)}; "
                               "the callback needs 'input_ids' and 'labels' (tokenized examples "
                               "with their labels)")
        self.task = _task_of(model)

    # ------------------------------------------------------------ after training
    def on_train_end(self, args, state, control, model=None, train_dataloader=None,
                     processing_class=None, optimizer=None, **kwargs):
        """The adapter, the gradient store, the examples and the record, in ``out``."""
        group = _process_group()
        main = args.process_index == 0
        dataset = train_dataloader.dataset
        batch_size = self.batch_size or args.per_device_train_batch_size
        batches = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                              collate_fn=train_dataloader.collate_fn)
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
        with _plain_forward(model):
            store = collect_gradients(model, batches, self.task,
                                      out=str(self.out / "gradients" / "train"),
                                      num_examples=len(dataset), progress=False,
                                      process_group=group)
        if not main:
            return
        adapter = self.out / "adapter"
        model.save_pretrained(adapter)
        if optimizer is not None:
            inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
            save_second_moments(adam_second_moments(model, inner), adapter)
        _write_examples(self.out / "examples.jsonl", dataset, processing_class, self.task,
                        train_dataloader.collate_fn)
        record = {
            "format": FORMAT, "version": 1, "task": self.task,
            "base_model": _base_name(model),
            "weights_fingerprint": weights_fingerprint(model),
            "adapter_fingerprint": adapter_fingerprint(model, store.block_widths),
            **({"classes": _classes(model)} if self.task == "classification" else {}),
            "n_train": len(dataset), "batch_size": batch_size,
            "trainer": {"epochs": args.num_train_epochs, "steps": state.global_step,
                        "per_device_train_batch_size": args.per_device_train_batch_size,
                        "gradient_accumulation_steps": args.gradient_accumulation_steps,
                        "world_size": args.world_size, "learning_rate": args.learning_rate},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_atomic(self.out / RECORD, json.dumps(record, indent=1))

    # ------------------------------------------------------------ checks
    def _check_model(self, model) -> None:
        names = [n for n, p in model.named_parameters() if p.requires_grad] if model else []
        if not any("lora_" in n for n in names):
            raise DataInfError("DataInfCallback: the model has no trainable LoRA adapter; wrap "
                               "it with peft.get_peft_model(model, LoraConfig(...)) (or pass "
                               "peft_config to SFTTrainer) before training")
        _task_of(model)  # refuses a model that is neither a causal LM nor a classifier

    def _check_args(self, args) -> None:
        if getattr(args, "deepspeed", None):
            raise DataInfError("DataInfCallback: DeepSpeed is not supported (ZeRO-3 shards the "
                               "parameters; per-example gradients need each LoRA tensor whole "
                               "on each process); train without it: plain or DDP data-parallel "
                               "training (torchrun, accelerate) is supported")
        if getattr(args, "fsdp", None):
            raise DataInfError("DataInfCallback: FSDP is not supported (it shards the "
                               "parameters; per-example gradients need each LoRA tensor whole "
                               "on each process); train without it: plain or DDP data-parallel "
                               "training (torchrun, accelerate) is supported")
        if getattr(args, "packing", False) or getattr(args, "padding_free", False):
            raise DataInfError("DataInfCallback: packing and padding-free batches put several "
                               "examples in one row, so no row is one example's loss; set "
                               "packing=False and padding_free=False")

    def _check_out(self, args) -> None:
        out = self.out
        if out.exists() and not out.is_dir():
            raise DataInfError(f"DataInfCallback: out={str(out)!r} is a file; give a folder")
        if out.is_dir() and any(p.name != PROBE for p in out.iterdir()):  # rank 0's probe
            raise DataInfError(f"DataInfCallback: out={str(out)!r} already holds files (another "
                               "run's?); give a new or empty folder, or delete it")
        if args.process_index != 0:
            return
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / PROBE
            probe.write_text("")
            probe.unlink()
        except OSError as error:
            raise DataInfError(f"DataInfCallback: cannot write into out={str(out)!r} "
                               f"({error.strerror}); give a folder you can write to") from None


@contextmanager
def _plain_forward(model):
    """The model's own forward while the block runs: accelerate replaces it, for mixed
    precision, with one under autocast (bfloat16 activations), which stays after training;
    the gradients are taken in the parameters' dtype, float32."""
    patched = model.__dict__.pop("forward", None)
    try:
        yield
    finally:
        if patched is not None:
            model.forward = patched


@dataclass
class CallbackRun:
    """A complete run folder of :class:`DataInfCallback`, as the commands read it."""

    folder: Path
    record: dict                # callback.json
    examples: list[dict]        # examples.jsonl, one per training example, in store order

    @property
    def adapter(self) -> Path:
        return self.folder / "adapter"

    @property
    def store(self) -> Path:
        return self.folder / "gradients" / "train"


def read_callback_run(folder: str | os.PathLike, task: str, what: str = "--run"
                      ) -> CallbackRun:
    """The run folder ``folder``, refused in one line when it is not a complete one of a
    ``task`` ("causal_lm" or "classification") training."""
    folder = Path(folder)
    path = folder / RECORD
    if not path.is_file():
        raise DataInfError(f"{what} {folder} has no {RECORD}: not a folder that "
                           "datainf.integrations.DataInfCallback finished writing (training "
                           "still running, stopped before its end, or another folder)")
    record = json.loads(path.read_text())
    if record.get("format") != FORMAT:
        raise DataInfError(f"{what} {folder}: {RECORD} is not of a DataInfCallback run")
    if record["task"] != task:
        kind = {"causal_lm": "a causal LM", "classification": "a sequence classifier"}
        raise DataInfError(f"{what} {folder} holds the training of {kind[record['task']]}; "
                           f"this command needs {kind[task]}")
    lines = (folder / "examples.jsonl").read_text().splitlines()
    return CallbackRun(folder, record, [json.loads(line) for line in lines])


def given_store(given: CallbackRun, model) -> GradientStore:
    """The run's training store, refused when ``model`` (the base with the run's adapter
    loaded) is not the model it was made from."""
    if not GradientStore.is_complete(given.store):
        raise DataInfError(f"--run {given.folder}: its gradient store is not complete")
    store = GradientStore.open(given.store)
    widths = store.block_widths
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(widths) != names:
        raise DataInfError(f"--run {given.folder}: its gradients are of other parameters than "
                           "the adapter's (another model or adapter)")
    if given.record["weights_fingerprint"] != weights_fingerprint(model) or \
            store.identity["adapter"] != adapter_fingerprint(model, widths):
        raise DataInfError(f"--run {given.folder}: its gradients were made with another model "
                           f"or adapter than {given.record['base_model']} with the run's "
                           "adapter (the base model's weights changed?)")
    return store


def weights_fingerprint(model) -> str:
    """The digest of the base model's weights and the adapter's shape: not of the configs (a
    trainer switches some of their flags), nor of a classifier head's unused original (PEFT
    keeps the initial head beside the trained copy; the command's initialisation differs from
    the trainer's)."""
    return model_fingerprint(model, trainable_values=False, configs=False, head_originals=False)


def _task_of(model) -> str:
    """'causal_lm' or 'classification', from the PEFT task type or the model's class."""
    peft_config = getattr(model, "peft_config", {}) or {}
    kinds = {str(getattr(c, "task_type", "")) for c in peft_config.values()}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = type(base).__name__
    if any("CAUSAL_LM" in k for k in kinds) or name.endswith("ForCausalLM"):
        return "causal_lm"
    if any("SEQ_CLS" in k for k in kinds) or name.endswith("ForSequenceClassification"):
        return "classification"
    raise DataInfError(f"DataInfCallback: {name} is neither a causal LM nor a sequence "
                       "classifier; the callback attributes those two kinds of training")


def _classes(model) -> list[str]:
    """A classifier's class names in id order (its config's id2label)."""
    labels = model.config.id2label
    return [str(labels[i]) for i in range(model.config.num_labels)]


def _base_name(model) -> str:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return str(getattr(base.config, "_name_or_path", "") or type(base).__name__)


def _process_group():
    """The default group when training runs on several processes, else None."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        return torch.distributed.group.WORLD
    return None


def _ints(values) -> list[int]:
    return values.tolist() if hasattr(values, "tolist") else [int(v) for v in values]


def _attended(inputs: dict) -> list[int]:
    """The input ids that the attention mask keeps (all without a mask)."""
    mask = inputs.get("attention_mask") or [1] * len(inputs["input_ids"])
    return [t for t, m in zip(inputs["input_ids"], mask, strict=True) if m]


def _write_examples(path: Path, dataset, tokenizer, task: str, collate) -> None:
    """One JSON line per training example: its text as the dataset still holds it ("prompt"
    and "completion", "messages" or "text" columns), else decoded from its input ids (special
    tokens kept; a causal LM's split into the unscored prompt and the scored completion). For a
    classifier also its label and, under "inputs", the model inputs that ``collate`` (the
    trainer's collator) makes of it alone (input ids, attention mask, token type ids): what
    ``detect-mislabeled --run`` predicts on."""
    lines = []
    for i in range(len(dataset)):
        row = dataset[i]
        record = {"row": i, **{k: row[k] for k in TEXT_COLUMNS if k in row}}
        inputs = None
        if task == "classification":
            batch = collate([row])
            inputs = {k: _ints(batch[k][0]) for k in CLASSIFIER_INPUTS if k in batch}
            record["label"] = int(batch["labels"][0])
        if not any(k in row for k in TEXT_COLUMNS) and tokenizer is not None:
            ids = _ints(row["input_ids"]) if inputs is None else _attended(inputs)
            scored = [j for j, y in enumerate(_ints(row.get("labels", []))) if y != -100]
            if task == "causal_lm" and scored:  # the unscored head is the prompt
                record["prompt"] = tokenizer.decode(ids[: scored[0]])
                record["completion"] = tokenizer.decode(ids[scored[0]:])
            else:
                record["text"] = tokenizer.decode(ids)
        if inputs is not None:
            record["inputs"] = inputs
        lines.append(json.dumps(record) + "\n")
    write_atomic(path, "".join(lines))


__all__ = ["CallbackRun", "DataInfCallback", "read_callback_run"]
