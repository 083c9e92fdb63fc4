"""The paper's two text-to-image tasks, made from the shipped MNIST digits with a seed (ours:
the paper used Stable Diffusion on cartoon / pixel-art / line-sketch images and DreamBooth's
photos, which cannot be had here).

- ``style``: three visual styles defined as image transformations of the digits: ``inverted``
  (dark strokes on white), ``thick`` (strokes dilated to about three times their width) and
  ``pixelated`` (4 x 4 blocks); prompts name the digit and the style ("a handwritten digit
  seven, inverted"). Class = style. The paper: 3 styles, 600 training and 150 test images.
- ``subject``: DreamBooth-like "subjects": one handwriting instance (an MNIST image), drawn
  in one of the styles, shifted and rotated a little for each of its images; the prompt names
  the digit and the writer ("a handwritten digit seven written by Nora"), not the style.
  Class = subject. The paper: 31 subjects, 3 training images each.

A row is {"image": uint8 (28, 28), "text", "class", "digit"} (and "style").
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .digits import DIGIT_WORDS, digit_prompt, mnist_digits

TASKS = ("style", "subject")
STYLE_PROMPTS = {"inverted": "inverted", "thick": "in thick strokes", "pixelated": "pixelated"}
WRITERS = ("Anna Ben Carla David Emma Felix Grace Hugo Iris Jack Lena Mark Nora Omar Paula "
           "Sam Tina Victor Wendy Xavier Yara Zoe Alice Bruno Chloe Dmitri Elena Farid Greta "
           "Hassan Ingrid").split()


def stylize(image: np.ndarray, style: str) -> np.ndarray:
    """A uint8 (28, 28) digit (white on black) in one of the styles."""
    if style == "inverted":
        return 255 - image
    if style == "thick":
        return ndimage.grey_dilation(image, size=(3, 3))
    if style == "pixelated":
        blocks = image.reshape(7, 4, 7, 4).mean(axis=(1, 3))
        return np.repeat(np.repeat(blocks, 4, axis=0), 4, axis=1).round().astype(np.uint8)
    raise ValueError(f"unknown style {style!r}; choose from {', '.join(STYLE_PROMPTS)}")


def jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The image rotated by up to 12 degrees and shifted by up to 2 pixels (bilinear)."""
    turned = ndimage.rotate(image.astype(np.float64), rng.uniform(-12, 12), reshape=False,
                            order=1, mode="constant", cval=0.0)
    moved = ndimage.shift(turned, rng.integers(-2, 3, size=2), order=1, mode="constant",
                          cval=0.0)
    return np.clip(moved, 0, 255).round().astype(np.uint8)


def make_image_task(task: str, *, per_class_train: int, per_class_test: int,
                    classes: int | None = None, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(training rows, test rows) of ``task``. ``style``: ``per_class_train`` and
    ``per_class_test`` images per style (distinct MNIST images, digits drawn at random).
    ``subject``: ``classes`` subjects (default 31), each with ``per_class_train`` training and
    ``per_class_test`` test images of its one instance."""
    images, labels = mnist_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    train, test = [], []
    if task == "style":
        styles = list(STYLE_PROMPTS)[: classes or len(STYLE_PROMPTS)]
        per = per_class_train + per_class_test
        for s, style in enumerate(styles):
            for k, i in enumerate(order[s * per : (s + 1) * per]):
                d = int(labels[i])
                row = {"image": stylize(images[i], style), "class": style, "digit": d,
                       "style": style, "text": f"{digit_prompt(d)}, {STYLE_PROMPTS[style]}"}
                (train if k < per_class_train else test).append(row)
        return train, test
    if task == "subject":
        count = classes or len(WRITERS)
        if count > len(WRITERS):
            raise ValueError(f"at most {len(WRITERS)} subjects")
        styles = list(STYLE_PROMPTS)
        for s in range(count):
            i = order[s]
            d, style = int(labels[i]), styles[s % len(styles)]
            base = stylize(images[i], style)
            for k in range(per_class_train + per_class_test):
                row = {"image": stylize(jitter(images[i], rng), style) if k else base,
                       "class": WRITERS[s], "digit": d, "style": style,
                       "text": f"a handwritten digit {DIGIT_WORDS[d]} written by {WRITERS[s]}"}
                (train if k < per_class_train else test).append(row)
        return train, test
    raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
