"""The tables of a detect-mislabeled run: scores.csv (every training example with every
score and rank), suspects.csv (the most suspicious, with a suggested label) and cleaned.csv
(the user's data without the dropped rows). Ranks: 1 = most suspicious."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..data.text import TextData


def score_table(train: TextData, preds, scores: dict):
    """One row per training example, in training order: where it is in the user's file, its
    text and labels, what the model predicts, and every score with its rank (1 = most
    suspicious). ``given_label`` is always the file's label; with --noise, ``trained_label``
    is the label the model was trained on (``flipped`` where this run changed it)."""
    table = pd.DataFrame({"row": _rows(train)})
    if train.ids:
        table["id"] = train.ids
    table["text"] = train.texts
    if train.pairs is not None:
        table["text_pair"] = train.pairs
    given = train.original if train.original is not None else train.labels  # the file's
    table["given_label"] = [train.classes[i] for i in given]
    predicted = preds.train_probs.argmax(1)
    table["model_label"] = [train.classes[i] for i in predicted]
    table["model_probability"] = preds.train_probs.max(1).round(4)
    table["given_label_probability"] = preds.train_probs[np.arange(len(train)), given].round(4)
    if train.original is not None:  # --noise: what the model was trained on, flipped or not
        table["trained_label"] = [train.classes[i] for i in train.labels]
        table["flipped"] = train.flipped
    for key, values in scores.items():
        table[f"{key}_score"] = values
        table[f"{key}_rank"] = pd.Series(-values).rank(method="first").astype(int).values
    return table


def suspect_table(table, rank_by: str, top: int):
    """The ``top`` most suspicious examples by ``rank_by``, most suspicious first, with a
    suggested label: the model's own choice where it differs from the given label."""
    suspects = table.sort_values(f"{rank_by}_rank").head(top)
    suspects.insert(0, "rank", suspects[f"{rank_by}_rank"].values)
    disagree = suspects["model_label"] != suspects["given_label"]
    at = suspects.columns.get_loc("given_label") + 1
    suspects.insert(at, "suggested_label", suspects["model_label"].where(disagree, ""))
    return suspects.drop(columns=[c for c in suspects.columns if c.endswith("_rank")])


def cleaned_table(config, train: TextData, val: TextData, drop_rows):
    """Every example this run read (training and validation), in file order, without the
    examples at ``drop_rows``; columns named as in the user's file, after ``original_row`` (the
    record's position in the file this run read). Labels are the file's own."""
    parts = []
    for data in (train, val):
        labels = data.original if data.original is not None else data.labels
        part = pd.DataFrame({"original_row": _rows(data)})
        if data.ids:
            part[config.id_column or "id"] = data.ids
        part[config.text_columns[0]] = data.texts
        if data.pairs is not None:
            part[config.text_columns[1]] = data.pairs
        part[config.label_column] = [data.classes[i] for i in labels]
        parts.append(part)
    both = pd.concat(parts).sort_values("original_row", kind="stable")
    return both[~both["original_row"].isin(set(drop_rows))]


def _rows(data: TextData) -> np.ndarray:
    """Positions of the examples in the user's file (0 = first record)."""
    return np.arange(len(data)) if data.rows is None else data.rows
