"""explain-image: the ImageFolder reader, the pipeline end to end on a tiny digit UNet with
MiniLM's text states, top.jsonl against scores.npz, reuse on a repeat, and bad input refused in
one line with nothing that looks complete left behind."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from datainf.cli import main
from datainf.data.digits import digit_prompt, mnist_digits
from datainf.data.images import ImageExample, load_images, read_image_folder
from datainf.errors import DataInfError
from datainf.gradients.store import GradientStore


@pytest.fixture(scope="module")
def digits():
    return mnist_digits()


def write_folder(folder, rows, digits, extra_rows=()):
    """An ImageFolder of MNIST digits (28 x 28 PNGs): rows = MNIST indices."""
    images, labels = digits
    folder.mkdir(parents=True)
    meta = []
    for i in rows:
        Image.fromarray(images[i]).save(folder / f"{i:04d}.png")
        meta.append({"file_name": f"{i:04d}.png", "text": digit_prompt(int(labels[i])),
                     "digit": int(labels[i])})
    meta += list(extra_rows)
    (folder / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    return str(folder)


@pytest.fixture
def folders(tmp_path, digits):
    # one image of each digit (MNIST's 5,000 are sorted by digit, 500 each), rows not in
    # file-name order
    train = write_folder(tmp_path / "train", [3500, 1500, 0, 500, 1000, 2000, 2500, 3000,
                                              4000, 4500], digits)
    queries = write_folder(tmp_path / "queries", [1, 501], digits,
                           [{"text": digit_prompt(3), "seed": 11}])
    return train, queries


def run(pipeline, train, queries, out, *extra):
    return main(["explain-image", "--pipeline", pipeline, "--train-dir", train, "--queries",
                 queries, "--out", str(out), "--epochs", "1", "--batch-size", "4",
                 "--timesteps", "25,525", "--sampling-steps", "3", "--quiet",
                 *map(str, extra)])


def test_folder_rows_in_file_order_with_their_keys(folders, digits):
    train = read_image_folder(folders[0], what="--train-dir")
    assert [r.file.name for r in train] == sorted(r.file.name for r in train)
    assert train[0].file.name == "0000.png" and train[0].extra == {"digit": 0}
    assert [r.extra["digit"] for r in train] == list(range(10))
    assert train[0].line == 3  # the order of metadata.jsonl is not the order of the rows
    queries = read_image_folder(folders[1], what="--queries", need_image=False)
    assert [q.file is None for q in queries] == [False, False, True]
    assert queries[2].seed == 11 and queries[2].text == digit_prompt(3)
    with pytest.raises(DataInfError, match="line 3 has no 'file_name'"):
        read_image_folder(folders[1], what="--queries")


def test_images_fitted_to_the_model(tmp_path, folders):
    rows = read_image_folder(folders[0], what="--train-dir")
    images, changed = load_images(rows, size=16, channels=1, what="--train-dir")
    assert images.shape == (10, 16, 16, 1) and images.dtype == np.uint8 and changed == 10
    Image.new("RGB", (30, 20), (255, 0, 0)).save(tmp_path / "wide.png")
    Image.new("L", (16, 16), 200).save(tmp_path / "fits.png")
    wide, fits = (ImageExample("x", tmp_path / n, 1) for n in ("wide.png", "fits.png"))
    images, changed = load_images([wide, fits], size=16, channels=1, what="--queries")
    assert changed == 1 and images.shape == (2, 16, 16, 1) and (images[1] == 200).all()
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(DataInfError, match="bad.png is not a readable image"):
        load_images([ImageExample("x", tmp_path / "bad.png", 1)], size=16, channels=1,
                    what="--queries")


@pytest.mark.parametrize("problem, message", [
    ("no metadata", "has no metadata.jsonl"),
    ("no text", "line 2 has no 'text'"),
    ("not json", "line 2 is not JSON"),
    ("missing file", "names 'gone.png', which is not a file"),
    ("unlisted image", "1 image files have no row in metadata.jsonl"),
])
def test_bad_folders_refused(tmp_path, folders, problem, message):
    folder = tmp_path / "train"
    meta = folder / "metadata.jsonl"
    lines = meta.read_text().splitlines()
    if problem == "no metadata":
        meta.unlink()
    elif problem == "no text":
        meta.write_text(lines[0] + "\n" + json.dumps({"file_name": "1500.png"}) + "\n")
    elif problem == "not json":
        meta.write_text(lines[0] + "\n{oops\n")
    elif problem == "missing file":
        meta.write_text("\n".join(lines) + "\n" + json.dumps({"file_name": "gone.png",
                                                              "text": "x"}) + "\n")
    else:
        Image.new("L", (28, 28)).save(folder / "extra.png")
    with pytest.raises(DataInfError, match=message):
        read_image_folder(folder, what="--train-dir")


def test_end_to_end(tiny_digit_pipeline, folders, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(tiny_digit_pipeline, *folders, out, "--methods",
               "datainf,hessian_free,cosine", "--top", "3") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_train"] == 10 and summary["n_queries"] == 3
    assert summary["generated_images"] == 1 and summary["image_size"] == 8
    # run() passes --quiet: the 28 x 28 digits fitted to 8 x 8 are said all the same
    assert "datainf: warning: --train-dir: 10 images converted, cropped or resized to 8 x 8" \
        in capsys.readouterr().err
    scores = np.load(out / "scores.npz")
    assert set(scores.files) == {"datainf", "hessian_free", "cosine"}
    assert all(scores[m].shape == (3, 10) and np.isfinite(scores[m]).all() for m in scores)
    assert np.abs(scores["cosine"]).max() <= 1 + 1e-6
    rows = [json.loads(line) for line in (out / "top.jsonl").read_text().splitlines()]
    assert [r["generated"] for r in rows] == [False, False, True] and rows[2]["seed"] == 11
    assert (out / "query" / "generated" / "line-3-seed-11.png").is_file()
    for j, row in enumerate(rows):
        for method in scores.files:
            s = scores[method][j]
            order = np.argsort(s, kind="stable")  # only negative scores help, positive harm
            helpful = [i for i in order[:3] if s[i] < 0]
            assert [x["train"] for x in row[method]["helpful"]] == helpful
            assert [x["train"] for x in row[method]["harmful"]] == \
                [i for i in order[::-1][:3] if s[i] > 0]
            assert [x["file_name"] for x in row[method]["helpful"]] == \
                [f"{500 * i:04d}.png" for i in helpful]
    page = (out / "report.html").read_text()
    listed = sum(len(row[m]["helpful"]) + len(row[m]["harmful"]) for row in rows
                 for m in scores.files)
    assert page.count("data:image/png;base64,") == 3 + listed + 2 * 8
    # a repeat reuses the adapter and both stores; new scores only
    first = scores["datainf"].copy()
    assert run(tiny_digit_pipeline, *folders, out, "--methods", "datainf") == 0
    again = json.loads((out / "summary.json").read_text())
    assert {"fine-tuning", "gradients", "query gradients"} <= set(again["reused_stages"])
    assert np.allclose(np.load(out / "scores.npz")["datainf"], first, rtol=1e-6, atol=0)
    # the queries' own noise: the adapter and the training gradients stay, the queries'
    # gradients are taken again from another noise stream, and their scores change
    assert run(tiny_digit_pipeline, *folders, out, "--methods", "datainf",
               "--query-noise", "own") == 0
    own = json.loads((out / "summary.json").read_text())
    assert {"fine-tuning", "gradients"} <= set(own["reused_stages"])
    assert "query gradients" not in own["reused_stages"]
    store = GradientStore.open(out / "query" / "gradients")
    assert store.identity["task"]["noise_stream"] == 1
    assert not np.allclose(np.load(out / "scores.npz")["datainf"], first, rtol=1e-3, atol=0)


def run_error(capsys, *args):
    """Exit 2 with the error in one line (the last), after warnings at most (the note that
    images were converted shows with --quiet too)."""
    code = main(list(map(str, args)))
    lines = capsys.readouterr().err.splitlines()
    assert code == 2 and lines and lines[-1].startswith("datainf: error:")
    assert all(line.startswith("datainf: warning:") for line in lines[:-1]), lines
    return lines[-1]


def test_bad_input_through_the_cli(tiny_digit_pipeline, folders, tmp_path, capsys):
    base = ["explain-image", "--pipeline", tiny_digit_pipeline, "--quiet"]
    out = tmp_path / "bad"
    (tmp_path / "train" / "metadata.jsonl").rename(tmp_path / "meta")
    err = run_error(capsys, *base, "--train-dir", folders[0], "--queries", folders[1],
                    "--out", out)
    assert "has no metadata.jsonl" in err and not out.exists()
    (tmp_path / "meta").rename(tmp_path / "train" / "metadata.jsonl")
    (tmp_path / "queries" / "0001.png").write_bytes(b"broken")
    err = run_error(capsys, *base, "--train-dir", folders[0], "--queries", folders[1],
                    "--out", out, "--epochs", "1", "--timesteps", "25")
    assert "0001.png is not a readable image" in err
    assert not out.exists()  # refused before the model loads: nothing trained or written
    (tmp_path / "queries" / "0001.png").write_bytes((tmp_path / "queries" / "0501.png")
                                                    .read_bytes())
    err = run_error(capsys, *base, "--train-dir", folders[0], "--queries", folders[1],
                    "--out", tmp_path / "t", "--timesteps", "25,2000")
    assert "--timesteps must be integers in [0, 1000)" in err
    err = run_error(capsys, *base, "--train-dir", folders[0], "--queries", folders[1],
                    "--out", tmp_path / "t", "--timesteps", "a,b")
    assert "--timesteps must be comma-separated integers" in err
    err = run_error(capsys, "explain-image", "--pipeline", str(tmp_path / "nope"),
                    "--train-dir", folders[0], "--queries", folders[1], "--out", tmp_path / "t")
    assert "does not exist" in err


def test_adapter_for_another_unet_refused(tiny_digit_pipeline, folders, tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    from datainf.models.hf import add_lora

    other = UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=384,
        attention_head_dim=2, norm_num_groups=4)
    add_lora(other, r=2, alpha=2, target_modules=("to_q", "to_v")).save_pretrained(
        tmp_path / "adapter")
    out = tmp_path / "run"
    err = run_error(capsys, "explain-image", "--pipeline", tiny_digit_pipeline, "--adapter",
                    tmp_path / "adapter", "--train-dir", folders[0], "--queries", folders[1],
                    "--out", out, "--quiet")
    assert "does not fit the model" in err and not out.exists()


def test_stable_diffusion_folder(tmp_path, folders):
    """A Stable-Diffusion-shaped folder (VAE, text_encoder/, tokenizer/) runs through the same
    code: RGB images of 16 x 16 encoded to 4 x 8 x 8 latents, prompts by its own encoder."""
    from tiny_models import tiny_stable_diffusion

    from datainf.models.diffusion import load_pipeline

    folder = tiny_stable_diffusion(tmp_path / "sd")
    pipeline = load_pipeline(folder)
    assert pipeline.image_size == 16 and pipeline.channels == 3
    assert pipeline.conditioning(["a digit"]).shape == (1, 77, 16)  # padded as CLIP's 77
    out = tmp_path / "run"
    assert run(str(folder), *folders, out, "--methods", "datainf,cosine") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["image_size"] == 16 and summary["generated_images"] == 1
    scores = np.load(out / "scores.npz")
    assert scores["datainf"].shape == (3, 10) and np.isfinite(scores["datainf"]).all()
    drawn = Image.open(out / "query" / "generated" / "line-3-seed-11.png")
    assert drawn.size == (16, 16) and drawn.mode == "RGB"


def test_pretraining_writes_a_loadable_pipeline(tmp_path):
    """The shipped model's pre-training, cut to a few steps on 128 digits: diffusers' folder
    layout, loadable by load_pipeline, drawing 16 x 16 grey images in [-1, 1]."""
    from datainf.models.diffusion import load_pipeline, pretrain_digit_model

    history = pretrain_digit_model(tmp_path / "digits", steps=4, batch_size=32,
                                   learning_rate=5e-4, seed=0, empty_prompt_share=0.1,
                                   progress=False, limit=128)
    assert len(history) == 1 and np.isfinite(history[0])
    assert {"unet", "scheduler", "model_index.json", "training.json"} <= {
        p.name for p in (tmp_path / "digits").iterdir()}
    pipeline = load_pipeline(tmp_path / "digits")
    images = pipeline.generate(pipeline.unet, [digit_prompt(4)] * 2, [0, 1], steps=2)
    assert images.shape == (2, 1, 16, 16) and images.abs().max() <= 1
    assert not torch.equal(images[0], images[1])  # the seeds differ


def test_a_fingerprint_refuses_a_damaged_or_other_model(tmp_path):
    """write_fingerprint records every file's sha256 and the settings; check_fingerprint
    refuses a changed byte, a missing file and other settings, naming how to mend it."""
    import json

    from datainf import DataInfError
    from datainf.models.diffusion import (
        FINGERPRINT,
        check_fingerprint,
        pretrain_digit_model,
        write_fingerprint,
    )

    folder = tmp_path / "digits"
    pretrain_digit_model(folder, steps=1, batch_size=16, learning_rate=5e-4, seed=0,
                         empty_prompt_share=0.1, progress=False, limit=16)
    write_fingerprint(folder)
    check_fingerprint(folder)
    weights = next((folder / "unet").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(DataInfError, match=r"does not match its fingerprint \(unet/.*"
                                           r"safetensors\).*scripts/pretrain_digits.py"):
        check_fingerprint(folder)
    write_fingerprint(folder)
    (folder / "training.json").unlink()
    with pytest.raises(DataInfError, match=r"\(training.json\)"):
        check_fingerprint(folder)
    write_fingerprint(folder)
    recorded = json.loads((folder / FINGERPRINT).read_text())
    recorded["settings"]["steps"] += 1
    (folder / FINGERPRINT).write_text(json.dumps(recorded))
    with pytest.raises(DataInfError, match="made with other settings"):
        check_fingerprint(folder)


def test_the_shipped_digit_model_loads_as_is():
    """The pre-trained digit model ships with the package and matches its fingerprint: the
    first explain-image does not pre-train."""
    from datainf.models.diffusion import SHIPPED_DIGITS, digit_model_path, load_pipeline

    assert digit_model_path() == SHIPPED_DIGITS
    pipeline = load_pipeline("digits", progress=False)
    assert pipeline.image_size == 16 and pipeline.channels == 1
    images = pipeline.generate(pipeline.unet, [digit_prompt(7)], [0], steps=2)
    assert images.shape == (1, 1, 16, 16) and torch.isfinite(images).all()
