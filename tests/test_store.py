"""The on-disk gradient store: round trips, resume after a crash, refusals, disk errors."""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
from conftest import random_gradients

from datainf import DataInf, DataInfError, Exact, HessianFree
from datainf.gradients import store as store_module
from datainf.gradients.store import GradientStore

# a parameter name with characters that must never reach a file name
WIDTHS = {"layer.0.lora_A": 3, "layer.0/lora B": 17, "head": 5}
IDENTITY = {"model": "a1b2c3d4" * 8, "adapter": "e5f6" * 4, "task": {"kind": "cls", "labels": 4}}
N = 23


def data(n=N, widths=WIDTHS, seed=0):
    return random_gradients(n, widths, seed, dtype=torch.float32)


def write(store, grads, sizes, hash_prefix="h"):
    start = store.rows_complete
    for size in sizes:
        chunk = {k: v[start : start + size] for k, v in grads.items()}
        store.write_rows(start, chunk, f"{hash_prefix}{start + size}")
        start += size


def read(store, name, rows=1 << 30):
    return torch.cat([chunk for _, chunk in store.iter_block(name, rows)])


def manifest(path):
    return json.loads((path / "manifest.json").read_text())


def files(path):
    """Every data file's bytes (not the manifest, whose times differ)."""
    return {f: (path / f).read_bytes() for f in os.listdir(path) if f != "manifest.json"}


def assert_same_files(path, other):
    """Two stores written in different chunks hold the same data.

    Block files byte for byte: rows are stored as given, whatever the chunks. Row norms to
    float64 rounding: a chunk of another shape may be summed by other kernels, in another
    order; for sums of squares of at most 300 terms that moves them by < 300 * 2**-53.
    """
    ours, theirs = files(path), files(other)
    assert sorted(ours) == sorted(theirs)
    for name, data in ours.items():
        if name == store_module.NORMS_FILE:
            norms, expected = (torch.frombuffer(bytearray(b), dtype=torch.float64)
                               for b in (data, theirs[name]))
            torch.testing.assert_close(norms, expected, rtol=1e-13, atol=0)
        else:
            assert data == theirs[name], name


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip(tmp_path, dtype):
    grads = data()
    path = tmp_path / "deep" / "store"
    store = GradientStore.create_or_resume(path, WIDTHS, N, IDENTITY, dtype=dtype)
    assert (store.rows_complete, store.complete, store.data_hash) == (0, False, "")
    write(store, grads, [1, 7, 2, 13])
    assert store.complete and store.data_hash == "h23"
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    for source in (store, GradientStore.open(path)):
        assert source.block_names == tuple(WIDTHS) and source.block_widths == WIDTHS
        assert source.num_rows == N and source.identity == IDENTITY
        for name, expected in grads.items():
            whole = source.read_block(name)
            assert whole.dtype == torch_dtype and whole.shape == (N, WIDTHS[name])
            # stored as given and read back (no arithmetic): bit for bit
            assert torch.equal(whole, expected.to(torch_dtype))
            for rows in (1, 4, 23, 100):
                chunks = list(source.iter_block(name, rows))
                assert [s for s, _ in chunks] == list(range(0, N, rows))
                assert torch.equal(torch.cat([c for _, c in chunks]), whole)
            norms = source.row_sq_norms(name)
            assert norms.dtype == torch.float64 and norms.shape == (N,)
            assert torch.allclose(norms, whole.double().square().sum(1), rtol=1e-14, atol=0)
    # file names come from indices; sizes are the full size from the start
    m = manifest(path)
    suffix = {"float32": "f32", "bfloat16": "bf16"}[dtype]
    assert [b["file"] for b in m["blocks"]] == [f"block-{i:05d}.{suffix}" for i in range(3)]
    assert sorted(os.listdir(path)) == sorted(
        [b["file"] for b in m["blocks"]] + ["manifest.json", "row_sq_norms.f64"]
    )
    assert m["format"] == "datainf-gradient-store" and m["complete"] and m["rows_complete"] == N


def test_preallocated_at_creation(tmp_path):
    store = GradientStore.create_or_resume(tmp_path / "s", WIDTHS, N, IDENTITY)
    m = manifest(store.path)
    for block in m["blocks"]:
        stat = os.stat(store.path / block["file"])
        assert stat.st_size == N * block["width"] * 4
        assert stat.st_blocks * 512 >= stat.st_size  # really allocated, not sparse
    assert os.stat(store.path / "row_sq_norms.f64").st_size == N * len(WIDTHS) * 8


def test_reading_does_not_write(tmp_path):
    grads = data()
    store = GradientStore.create_or_resume(tmp_path / "s", WIDTHS, N, IDENTITY)
    write(store, grads, [N])
    before = files(store.path)
    _, chunk = next(store.iter_block("head", 5))
    chunk.zero_()
    store.row_sq_norms("head").zero_()
    assert files(store.path) == before
    assert torch.equal(GradientStore.open(store.path).read_block("head"), grads["head"])


def close(a, b, rtol=1e-5):
    """Equal up to float32 rounding, relative to the largest entry."""
    return a.shape == b.shape and (a - b).abs().max() <= rtol * b.abs().max()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", [DataInf, Exact, HessianFree])
def test_estimators_read_the_store(tmp_path, method, dtype):
    """Same scores as from the (rounded) tensors in memory.

    Not bit for bit: estimators take the store's float64 row norms, where they compute
    float32 norms from tensors in memory.
    """
    train, test = data(), data(n=4, seed=1)
    torch_dtype = getattr(torch, dtype)
    train_store = GradientStore.create_or_resume(tmp_path / "tr", WIDTHS, N, {}, dtype=dtype)
    write(train_store, train, [10, 13])
    test_store = GradientStore.create_or_resume(tmp_path / "te", WIDTHS, 4, {}, dtype=dtype)
    write(test_store, test, [4])
    stored = {k: v.to(torch_dtype) for k, v in train.items()}
    stored_test = {k: v.to(torch_dtype) for k, v in test.items()}
    for chunk_rows in (None, 5):
        expected = method(chunk_rows=chunk_rows).fit(stored)
        actual = method(chunk_rows=chunk_rows).fit(GradientStore.open(train_store.path))
        assert close(actual.score(test_store), expected.score(stored_test))
        assert close(
            actual.score(test_store, aggregate=True), expected.score(stored_test, aggregate=True)
        )
        assert close(actual.self_influence(), expected.self_influence())
        for name in WIDTHS:
            assert close(actual.row_sq_norms_[name], expected.row_sq_norms_[name])


def test_resume(tmp_path):
    grads = data()
    whole = GradientStore.create_or_resume(tmp_path / "whole", WIDTHS, N, IDENTITY)
    write(whole, grads, [5, 5, 5, 8])
    part = GradientStore.create_or_resume(tmp_path / "part", WIDTHS, N, IDENTITY)
    write(part, grads, [5, 4])
    del part
    again = GradientStore.create_or_resume(tmp_path / "part", WIDTHS, N, dict(IDENTITY))
    assert (again.rows_complete, again.data_hash, again.complete) == (9, "h9", False)
    write(again, grads, [14])
    assert again.complete and again.data_hash == whole.data_hash == "h23"
    assert_same_files(tmp_path / "part", tmp_path / "whole")
    # a complete store resumes as complete; there is nothing left to write
    done = GradientStore.create_or_resume(tmp_path / "part", WIDTHS, N, IDENTITY)
    assert done.complete
    with pytest.raises(DataInfError, match="complete"):
        write(done, grads, [1])


CHILD = textwrap.dedent(
    """
    import sys, time, torch
    from datainf.gradients.store import GradientStore
    n, widths = {n}, {widths!r}
    g = torch.Generator().manual_seed(5)
    grads = {{k: torch.randn(n, d, generator=g) for k, d in widths.items()}}
    store = GradientStore.create_or_resume(sys.argv[1], widths, n, {{"model": "m"}})
    for start in range(store.rows_complete, n, 4):
        rows = {{k: v[start : start + 4] for k, v in grads.items()}}
        store.write_rows(start, rows, str(start + 4))
        print(store.rows_complete, flush=True)
        time.sleep(0.002)  # so that the parent surely kills it before it finishes
    """
)


def test_kill_9_then_resume(tmp_path):
    n, widths = 400, {"a": 300, "b": 7}
    code = CHILD.format(n=n, widths=widths)
    path = tmp_path / "killed"
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True
    )
    seen, reads, stop = [], [], threading.Event()

    def watch():  # read the manifest all along: it must always parse (never half-written)
        while not stop.is_set():
            if (path / "manifest.json").exists():
                reads.append(manifest(path)["rows_complete"])
            time.sleep(0.0005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(3):
            seen.append(int(child.stdout.readline()))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        stop.set()
        watcher.join()
    assert seen == [4, 8, 12]
    assert reads and reads == sorted(reads)
    m = manifest(path)
    assert 12 <= m["rows_complete"] < n, "the child finished before it was killed"
    assert m["data_hash"] == str(m["rows_complete"])
    # resume here with the same data (in other chunks), then compare with an uninterrupted run
    g = torch.Generator().manual_seed(5)
    grads = {k: torch.randn(n, d, generator=g) for k, d in widths.items()}
    for path_, chunk in ((path, 7), (tmp_path / "whole", 4)):
        store = GradientStore.create_or_resume(path_, widths, n, {"model": "m"})
        for start in range(store.rows_complete, n, chunk):
            rows = {k: v[start : start + chunk] for k, v in grads.items()}
            store.write_rows(start, rows, f"{min(start + chunk, n)}")
    assert_same_files(path, tmp_path / "whole")
    resumed = GradientStore.open(path)
    assert resumed.complete and resumed.data_hash == str(n)
    # the child drew the same numbers (same seed, same machine) and the store keeps them as given
    assert all(torch.equal(resumed.read_block(k), v) for k, v in grads.items())


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("model", "c3d4" * 16, ["another model", "model: a1b2c3d4a1b2c3d4…", "c3d4c3d4"]),
        ("adapter", "ffff", ["another adapter", "adapter: e5f6e5f6e5f6e5f6 in the store"]),
        ("task", {"kind": "cls", "labels": 5}, ["another task", "task.labels: 4", "5 now"]),
        ("data", "d" * 8, ["other data", "data: (none) in the store vs dddddddd now"]),
    ],
)
def test_refuses_other_identity(tmp_path, key, value, words):
    GradientStore.create_or_resume(tmp_path / "s", WIDTHS, N, IDENTITY)
    with pytest.raises(DataInfError) as err:
        GradientStore.create_or_resume(tmp_path / "s", WIDTHS, N, {**IDENTITY, key: value})
    message = str(err.value)
    for word in words + [str(tmp_path / "s"), "use another path", "delete"]:
        assert word in message, (word, message)


@pytest.mark.parametrize(
    "change, words",
    [
        ({"widths": {**WIDTHS, "head": 6}}, ["other blocks", "'head': 5 vs 6"]),
        ({"widths": {"head": 5}}, ["other blocks", "in the store but not here"]),
        ({"num_rows": 24}, ["another number of examples (23 in the store vs 24 now)"]),
        ({"dtype": "bfloat16"}, ["another dtype (float32 in the store vs bfloat16 now)"]),
        (
            {"num_rows": 5, "identity": {**IDENTITY, "model": "x"}},
            ["another model", "and another number of examples"],
        ),
    ],
)
def test_refuses_other_settings(tmp_path, change, words):
    GradientStore.create_or_resume(tmp_path / "s", WIDTHS, N, IDENTITY)
    before = files(tmp_path / "s")
    args = {"widths": WIDTHS, "num_rows": N, "identity": IDENTITY, "dtype": "float32", **change}
    with pytest.raises(DataInfError) as err:
        GradientStore.create_or_resume(tmp_path / "s", **args)
    for word in words:
        assert word in str(err.value), (word, str(err.value))
    assert files(tmp_path / "s") == before


def test_refuses_foreign_and_damaged_folders(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DataInfError, match="no manifest.json: it is not a datainf"):
        GradientStore.create_or_resume(foreign, WIDTHS, N, IDENTITY)
    assert os.listdir(foreign) == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataInfError, match="is not a folder"):
        GradientStore.create_or_resume(tmp_path / "file", WIDTHS, N, IDENTITY)

    store = GradientStore.create_or_resume(tmp_path / "s", WIDTHS, N, IDENTITY)
    (store.path / "manifest.json").write_text('{"format": "datainf-gradient-st')
    with pytest.raises(DataInfError, match="does not parse.*delete"):
        GradientStore.create_or_resume(store.path, WIDTHS, N, IDENTITY)
    with pytest.raises(DataInfError, match="does not parse"):
        GradientStore.open(store.path)
    assert (store.path / "manifest.json").read_text() == '{"format": "datainf-gradient-st'
    (store.path / "manifest.json").write_text('{"something": "else"}')
    with pytest.raises(DataInfError, match="not the manifest of a datainf gradient store"):
        GradientStore.open(store.path)

    store = GradientStore.create_or_resume(tmp_path / "t", WIDTHS, N, IDENTITY)
    m = manifest(store.path)
    m["blocks"][0]["file"] = "../../etc/passwd"
    (store.path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataInfError, match="is damaged"):
        GradientStore.create_or_resume(store.path, WIDTHS, N, IDENTITY)
    m["blocks"][0]["file"] = "block-00000.f32"
    (store.path / "manifest.json").write_text(json.dumps(m))
    os.truncate(store.path / "block-00001.f32", 10)
    with pytest.raises(DataInfError, match="damaged: block-00001.f32 has 10 bytes, expected"):
        GradientStore.create_or_resume(store.path, WIDTHS, N, IDENTITY)
    with pytest.raises(DataInfError, match="no gradient store at"):
        GradientStore.open(tmp_path / "nothing")


def test_interrupted_creation_is_restarted(tmp_path):
    path = tmp_path / "s"
    path.mkdir()
    (path / "block-00000.f32").write_bytes(b"half")  # killed before the manifest was written
    store = GradientStore.create_or_resume(path, WIDTHS, N, IDENTITY)
    assert store.rows_complete == 0 and (path / "manifest.json").exists()
    assert os.stat(path / "block-00000.f32").st_size == N * 3 * 4


def test_bad_arguments(tmp_path):
    for kwargs, match in [
        ({"dtype": "float16"}, "dtype must be one of"),
        ({"num_rows": 0}, "num_rows must be a positive integer"),
        ({"widths": {}}, "non-empty"),
        ({"widths": {"a": 0}}, "width 0"),
        ({"identity": {"model": object()}}, "JSON-serialisable"),
    ]:
        args = {"widths": WIDTHS, "num_rows": N, "identity": IDENTITY, **kwargs}
        with pytest.raises(DataInfError, match=match):
            GradientStore.create_or_resume(tmp_path / "s", **args)
    assert not (tmp_path / "s").exists()


def test_write_rows_refusals(tmp_path):
    grads = data()
    store = GradientStore.create_or_resume(tmp_path / "s", WIDTHS, N, IDENTITY)
    write(store, grads, [5])
    rows = {k: v[5:9] for k, v in grads.items()}
    cases = [
        (4, rows, "next write starts at row 5, not 4"),
        (6, rows, "next write starts at row 5, not 6"),
        (5, {k: v for k, v in rows.items() if k != "head"}, r"missing \['head'\], extra \[\]"),
        (5, {**rows, "x": rows["head"]}, r"missing \[\], extra \['x'\]"),
        (5, {**rows, "head": torch.zeros(4, 6)}, "'head' has 6 columns but the store holds 5"),
        (5, {**rows, "head": torch.zeros(3, 5)}, "'head' has 3 rows but block"),
        (5, {k: v[:0] for k, v in rows.items()}, "the chunk has 0 rows"),
        (5, {k: torch.zeros(19, d) for k, d in WIDTHS.items()}, "has room for 18 more"),
        (5, {**rows, "head": torch.zeros(4, 5, dtype=torch.int64)}, "floating point"),
        (5, {**rows, "head": torch.zeros(4)}, "must be 2-D"),
    ]
    for start, chunk, match in cases:
        with pytest.raises(DataInfError, match=match):
            store.write_rows(start, chunk, "bad")
    assert store.rows_complete == 5 and manifest(store.path)["rows_complete"] == 5
    with pytest.raises(DataInfError, match="has 5 of 23 rows; run the collection again"):
        GradientStore.open(store.path)
    with pytest.raises(DataInfError, match="has 5 of 23 rows"):
        store.read_block("head")
    with pytest.raises(DataInfError, match="no block 'nope'"):
        store.iter_block("nope", 4)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e300])
def test_non_finite_rows_are_not_committed(tmp_path, bad):
    grads = data()
    store = GradientStore.create_or_resume(tmp_path / "s", WIDTHS, N, IDENTITY)
    write(store, grads, [5])
    before = manifest(store.path)
    chunk = {k: v[5:9].double() for k, v in grads.items()}
    chunk["layer.0/lora B"][2, 11] = bad
    with pytest.raises(DataInfError, match=r"block 'layer.0/lora B'.* example 7"):
        store.write_rows(5, chunk, "bad")
    assert manifest(store.path) == before and store.data_hash == "h5"
    write(store, grads, [18])
    assert torch.equal(
        GradientStore.open(store.path).read_block("layer.0/lora B"), grads["layer.0/lora B"]
    )


def test_read_only(tmp_path):
    grads = data()
    store = GradientStore.create_or_resume(tmp_path / "s", WIDTHS, N, IDENTITY)
    write(store, grads, [N])
    with pytest.raises(DataInfError, match="read-only"):
        GradientStore.open(store.path).write_rows(N, grads, "x")


@pytest.mark.skipif(not hasattr(os, "posix_fallocate"), reason="no posix_fallocate here")
def test_full_disk_at_creation(tmp_path, monkeypatch):
    def no_space(fd, offset, size):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    path = tmp_path / "new" / "s"
    with pytest.raises(DataInfError) as err:
        GradientStore.create_or_resume(path, WIDTHS, N, IDENTITY)
    message = str(err.value)
    needed = N * sum(WIDTHS.values()) * 4 + N * len(WIDTHS) * 8
    for word in ["not enough disk space", str(path), f"needs {needed} bytes", "Free space"]:
        assert word in message, (word, message)
    assert not path.exists()  # nothing half-made is left behind


def test_write_error_keeps_committed_rows(tmp_path, monkeypatch):
    grads = data()
    store = GradientStore.create_or_resume(tmp_path / "s", WIDTHS, N, IDENTITY)
    write(store, grads, [5])

    def broken(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(store_module, "_sync", broken)
    with pytest.raises(DataInfError) as err:
        write(store, grads, [4])
    assert "keeps its first 5 of 23 rows" in str(err.value)
    assert "resumes from row 5" in str(err.value)
    assert store.rows_complete == 5 and manifest(store.path)["rows_complete"] == 5
    monkeypatch.undo()
    write(GradientStore.create_or_resume(tmp_path / "s", WIDTHS, N, IDENTITY), grads, [18])
    whole = GradientStore.create_or_resume(tmp_path / "whole", WIDTHS, N, IDENTITY)
    write(whole, grads, [N])
    assert_same_files(tmp_path / "s", tmp_path / "whole")
