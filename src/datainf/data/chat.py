"""Chat fine-tuning data: JSON lines of prompts and responses, tokenized so that only the
response is scored.

Two formats, one example a line (other keys are kept, e.g. a category):

- ``{"prompt": "...", "response": "..."}``
- ``{"messages": [{"role": "user", "content": "..."}, ..., {"role": "assistant", ...}]}``, the
  chat format of TRL's SFTTrainer: the last assistant turn is the response, every turn before it
  the prompt.

A query may leave the response out (no ``response`` key, or messages that do not end with the
assistant): the model then answers it and that answer is explained.

Tokenization uses the model's own chat template: ``prompt`` is the template applied to the
prompt turns with the generation prompt (``<|im_start|>assistant\\n`` for SmolLM2), the
response is what the template adds after it for the assistant turn (the answer and its end of
turn). Fine-tuning scores the response: labels are -100 on every prompt token, so the loss is
the mean negative log-likelihood of the response tokens given the prompt; the gradients for
influence may score the prompt or both instead (``loss_on``, :data:`LOSS_SPANS`). A model
without a chat template takes the prompt format only, as ``prompt + "\\n"`` followed by
``response + eos``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import DataInfError
from ..options import said
from .text import json_records

IGNORE = -100  # the label of a token that is not scored
# which tokens a loss scores: the response (what the model answered, the default), the prompt
# alone (the authors' influence gradients), or both (bergson's, Li et al.'s)
LOSS_SPANS = ("response", "prompt", "full")


@dataclass
class ChatExample:
    """One example: the prompt turns, the response (None: to be generated), kept keys, and the
    line of the file it came from (1-based)."""

    messages: list[dict]
    response: str | None
    extra: dict = field(default_factory=dict)
    line: int = 0
    chat_format: bool = False    # given as "messages" (needs a chat template)

    @property
    def prompt_text(self) -> str:
        """The prompt as one text, for reports: the contents of its turns other than system
        turns, one per line."""
        return "\n".join(m["content"] for m in self.messages if m["role"] != "system")


def read_chat_jsonl(path: str | Path, *, need_response: bool, what: str) -> list[ChatExample]:
    """Every example of the JSON-lines file ``path``; ``what`` names the option in errors
    ("--train", "--queries"). ``need_response``: a missing response is an error."""
    path = Path(path)
    if not path.is_file():
        raise DataInfError(f"{what} {path} does not exist; give a .jsonl file of "
                           '{"prompt": ..., "response": ...} or {"messages": [...]} lines')
    try:
        records = json_records(path, f"{what} {path}",
                               '{"prompt": ..., "response": ...} or {"messages": [...]}')
    except UnicodeDecodeError as error:
        raise DataInfError(f"{what} {path} is not UTF-8 text ({error.reason}); save it as "
                           "UTF-8 JSON lines") from None
    examples = [_example(record, number, f"{what} {path}, line {number}", need_response)
                for number, record in records]
    if not examples:
        raise DataInfError(f"{what} {path} holds no examples; give one JSON object a line")
    return examples


def _example(record: dict, line: int, where: str, need_response: bool) -> ChatExample:
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in messages):
            raise DataInfError(f'{where}: "messages" must be a non-empty list of '
                               '{"role": ..., "content": ...} objects with text contents')
        turns = [{"role": m["role"], "content": m["content"]} for m in messages]
        response = None
        if turns[-1]["role"] == "assistant":
            response = turns.pop()["content"]
        extra = {k: v for k, v in record.items() if k != "messages"}
        chat_format = True
    elif "prompt" in record:
        prompt, response = record["prompt"], record.get("response")
        if not isinstance(prompt, str) or (response is not None and not isinstance(response,
                                                                                    str)):
            raise DataInfError(f'{where}: "prompt" and "response" must be texts')
        turns = [{"role": "user", "content": prompt}]
        extra = {k: v for k, v in record.items() if k not in ("prompt", "response")}
        chat_format = False
    else:
        raise DataInfError(f'{where}: no "prompt" or "messages" key (keys: '
                           f'{sorted(record)}); give {{"prompt": ..., "response": ...}} or '
                           '{"messages": [...]}')
    if not turns or not any(t["content"].strip() for t in turns):
        raise DataInfError(f"{where}: the prompt is empty; give it a text")
    if response is None and need_response:
        last = turns[-1]["role"]
        hint = (f"; the last message's role is {last!r}: the response must come from the role "
                "'assistant' (ShareGPT's 'human'/'gpt' become 'user'/'assistant')"
                if chat_format and last != "assistant" else "")
        raise DataInfError(f"{where}: no response (a \"response\" key, or a last message "
                           f"from the assistant){hint}; a training example needs one")
    if response is not None and not response.strip():
        leave_out = "" if need_response else " or leave it out to have the model answer"
        raise DataInfError(f"{where}: the response is empty; give it a text{leave_out}")
    return ChatExample(turns, response, extra, line, chat_format)


def prompt_and_response_text(tokenizer, example: ChatExample,
                             response: str | None) -> tuple[str, str]:
    """(prompt text, response text) as the model sees them; ``response`` None gives ''."""
    if tokenizer.chat_template:
        prompt = tokenizer.apply_chat_template(example.messages, tokenize=False,
                                               add_generation_prompt=True)
        if response is None:
            return prompt, ""
        whole = tokenizer.apply_chat_template(
            [*example.messages, {"role": "assistant", "content": response}], tokenize=False)
        if not whole.startswith(prompt):
            raise DataInfError(
                f"line {example.line}: the model's chat template does not write the prompt as "
                "the start of the whole conversation, so the response cannot be told apart; "
                "use a model whose template does (most do), or the prompt/response format "
                "with a model without a template")
        return prompt, whole[len(prompt):]
    if example.chat_format:
        raise DataInfError(
            f'line {example.line}: "messages" need a model with a chat template, and this '
            "tokenizer has none; give the examples as {\"prompt\": ..., \"response\": ...}, "
            "or use a chat model")
    prompt = example.messages[0]["content"] + "\n"
    return prompt, "" if response is None else response + (tokenizer.eos_token or "")


def encode(tokenizer, example: ChatExample, response: str | None) -> tuple[list[int], int]:
    """(token ids of prompt + response, number of prompt tokens). The prompt and the response
    are tokenized apart, so the boundary is exact."""
    prompt, answer = prompt_and_response_text(tokenizer, example, response)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] if answer else []
    return prompt_ids + answer_ids, len(prompt_ids)


@dataclass
class Encoded:
    """Token ids of every example and how many of them are prompt."""

    ids: list[list[int]]
    prompt_lengths: list[int]

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index) -> Encoded:
        """The examples at ``index``, in its order."""
        return Encoded([self.ids[i] for i in index], [self.prompt_lengths[i] for i in index])


def encode_all(tokenizer, examples: list[ChatExample], responses: list[str | None], *,
               max_length: int, what: str) -> Encoded:
    """Every example with its response, refused (with the lines named) when any is longer than
    ``max_length`` tokens or has no response token: a cut would change what is explained."""
    ids, prompts, long, empty = [], [], [], []
    for example, response in zip(examples, responses, strict=True):
        tokens, n_prompt = encode(tokenizer, example, response)
        if len(tokens) > max_length:
            long.append((example.line, len(tokens)))
        if response is not None and len(tokens) == n_prompt:
            empty.append(example.line)
        ids.append(tokens)
        prompts.append(n_prompt)
    if long:
        lines = ", ".join(str(line) for line, _ in long[:5]) + (" ..." if len(long) > 5 else "")
        raise DataInfError(
            f"{what}: {len(long)} example(s) are longer than {said('max_length', max_length)} "
            f"tokens (lines {lines}; the longest has {max(n for _, n in long)}); raise "
            f"{said('max_length')} or shorten them (examples are never cut: that would change "
            "what is explained)")
    if empty:
        raise DataInfError(f"{what}: the responses of lines {empty[:5]} have no tokens; give "
                           "them a text")
    return Encoded(ids, prompts)


def lm_batches(encoded: Encoded, batch_size: int, pad_id: int, order=None,
               loss_on: str = "response") -> list[dict]:
    """Right-padded batches {input_ids, attention_mask, labels} in ``order``; labels are the
    ids on the tokens ``loss_on`` scores (:data:`LOSS_SPANS`: the response, the prompt or
    both) and -100 on the others and on padding. The first token is never scored (nothing
    predicts it)."""
    if loss_on not in LOSS_SPANS:
        raise DataInfError(f"{said('loss_on')} must be one of {', '.join(LOSS_SPANS)}, not "
                           f"{loss_on!r}")
    order = range(len(encoded)) if order is None else order
    order = list(order)
    batches = []
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        width = max(len(encoded.ids[i]) for i in index)
        input_ids = torch.full((len(index), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(index), width), dtype=torch.long)
        labels = torch.full((len(index), width), IGNORE, dtype=torch.long)
        for row, i in enumerate(index):
            tokens, n_prompt = encoded.ids[i], encoded.prompt_lengths[i]
            input_ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
            first, stop = {"response": (n_prompt, len(tokens)), "prompt": (0, n_prompt),
                           "full": (0, len(tokens))}[loss_on]
            labels[row, first:stop] = torch.tensor(tokens[first:stop])
        batches.append({"input_ids": input_ids, "attention_mask": mask, "labels": labels})
    return batches
