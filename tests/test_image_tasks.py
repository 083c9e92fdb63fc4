"""The paper's image tasks made from MNIST, and the Fréchet distance against its formula."""

import numpy as np
import pytest

from datainf.data.image_tasks import STYLE_PROMPTS, make_image_task, stylize
from datainf.metrics import frechet_distance


def test_styles_change_the_digit_as_named():
    image = np.zeros((28, 28), np.uint8)
    image[10:18, 13:15] = 255  # a vertical stroke, 2 pixels wide
    assert (stylize(image, "inverted") == 255 - image).all()
    thick = stylize(image, "thick")
    assert (thick >= image).all() and (thick > 0).sum() == 10 * 4
    pixelated = stylize(image, "pixelated")
    blocks = pixelated.reshape(7, 4, 7, 4)
    assert (blocks == blocks[:, :1, :, :1]).all()  # constant 4 x 4 blocks
    with pytest.raises(ValueError, match="unknown style"):
        stylize(image, "sepia")


def test_style_task_sizes_classes_and_prompts():
    train, test = make_image_task("style", per_class_train=5, per_class_test=2, seed=1)
    assert len(train) == 15 and len(test) == 6
    assert [r["class"] for r in train] == [s for s in STYLE_PROMPTS for _ in range(5)]
    for row in train + test:
        assert row["image"].shape == (28, 28) and row["image"].dtype == np.uint8
        assert row["text"].endswith(STYLE_PROMPTS[row["style"]])
    again, _ = make_image_task("style", per_class_train=5, per_class_test=2, seed=1)
    assert all((a["image"] == b["image"]).all() for a, b in zip(train, again, strict=True))


def test_subject_task_one_instance_per_subject():
    train, test = make_image_task("subject", per_class_train=3, per_class_test=2, classes=4)
    assert len(train) == 12 and len(test) == 8
    for subject in {r["class"] for r in train}:
        rows = [r for r in train + test if r["class"] == subject]
        assert len(rows) == 5 and len({r["text"] for r in rows}) == 1
        assert subject in rows[0]["text"] and len({r["style"] for r in rows}) == 1
        # jittered copies of one instance: not equal to it, but correlated with it
        base = rows[0]["image"].astype(float).ravel()
        for r in rows[1:]:
            assert not (r["image"] == rows[0]["image"]).all()
            assert np.corrcoef(base, r["image"].astype(float).ravel())[0, 1] > 0.1
    assert len({r["text"] for r in train}) == 4


def test_frechet_distance_matches_the_gaussian_formula():
    rng = np.random.default_rng(0)
    a = rng.normal(1.0, 2.0, size=(4000, 1))
    b = rng.normal(-0.5, 0.5, size=(4000, 1))
    # 1-D: (mu_a - mu_b)^2 + (sigma_a - sigma_b)^2
    expected = (a.mean() - b.mean()) ** 2 + (a.std(ddof=1) - b.std(ddof=1)) ** 2
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    x = rng.normal(size=(500, 3))
    assert frechet_distance(x, x) == pytest.approx(0, abs=1e-6)
    assert frechet_distance(x, x + [1, 0, 0]) == pytest.approx(1, rel=1e-6)
