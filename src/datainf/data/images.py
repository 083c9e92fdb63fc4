"""Image folders in Hugging Face's ImageFolder convention: image files plus a
``metadata.jsonl`` whose rows have ``file_name`` (relative to the folder) and ``text`` (the
prompt); other keys are kept.

Rows are taken in sorted ``file_name`` order (the order of the rows and columns of every score
matrix). For queries, a row without ``file_name`` is a prompt only: the model draws that image
(with the row's ``seed``, else the run's seed plus the row's position) and it is explained.

Images are fitted to the model: converted to its colour mode (grey "L" or "RGB"), centre-cropped
to a square when they are not square, and resized (bicubic) to the model's size, with one line
on stderr saying how many were changed. Unreadable files are refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataInfError

METADATA = "metadata.jsonl"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class ImageExample:
    """One row of an image folder: ``file`` is None for a prompt-only query."""

    text: str
    file: Path | None
    line: int                      # 1-based line of metadata.jsonl
    seed: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.file.name if self.file is not None else f"(generated, line {self.line})"


def read_image_folder(folder: str | Path, *, what: str, need_image: bool = True
                      ) -> list[ImageExample]:
    """The rows of ``folder/metadata.jsonl``, sorted by file name (prompt-only rows, allowed
    when ``need_image`` is False, come after, in line order)."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataInfError(f"{what} {root} is not a folder: pass an image folder with a "
                           f"{METADATA}")
    path = root / METADATA
    if not path.is_file():
        raise DataInfError(f"{what} {root} has no {METADATA}: write one line per image, "
                           '{"file_name": "0001.png", "text": "the prompt"}')
    rows, seen = [], set()
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{what} {path} line {number}"
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as err:
            raise DataInfError(f"{where} is not JSON ({err.msg})") from err
        if not isinstance(row, dict):
            raise DataInfError(f"{where} is not a JSON object")
        text = row.pop("text", None)
        if not isinstance(text, str) or not text.strip():
            raise DataInfError(f"{where} has no 'text' (the prompt of the image)")
        name = row.pop("file_name", None)
        seed = row.pop("seed", None)
        if seed is not None and not isinstance(seed, int):
            raise DataInfError(f"{where}: 'seed' must be an integer")
        if name is None:
            if need_image:
                raise DataInfError(f"{where} has no 'file_name'")
            rows.append(ImageExample(text, None, number, seed, row))
            continue
        file = root / str(name)
        if not file.is_file():
            raise DataInfError(f"{where} names {name!r}, which is not a file in {root}")
        if file in seen:
            raise DataInfError(f"{where} names {name!r} a second time")
        seen.add(file)
        rows.append(ImageExample(text, file, number, seed, row))
    unlisted = sorted(p.name for p in root.iterdir()
                      if p.suffix.lower() in IMAGE_SUFFIXES and p not in seen)
    if unlisted:
        raise DataInfError(f"{what} {root}: {len(unlisted)} image files have no row in "
                           f"{METADATA} (first: {', '.join(unlisted[:3])}); add rows for them "
                           "or move them out")
    if not rows:
        raise DataInfError(f"{what} {path} has no rows")
    with_file = sorted((r for r in rows if r.file is not None), key=lambda r: str(r.file))
    return with_file + [r for r in rows if r.file is None]


def read_image(example: ImageExample, what: str):
    """The example's image file, decoded (a PIL image); refuses a file that is not a readable
    image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(example.file) as image:
            image.load()
    except (UnidentifiedImageError, OSError) as err:
        raise DataInfError(f"{what}: {example.file} is not a readable image ({err})") from err
    return image


def load_images(examples: list[ImageExample], *, size: int, channels: int, what: str
                ) -> tuple[np.ndarray, int]:
    """(uint8 images (n, H, W, C) of the model's size and colour mode, how many had to be
    converted, cropped or resized). Refuses a file that is not a readable image."""
    from PIL import Image

    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise DataInfError(f"images with {channels} channels are not supported (1 or 3)")
    out, changed = np.empty((len(examples), size, size, channels), np.uint8), 0
    for i, example in enumerate(examples):
        image = read_image(example, what)
        fitted = image.convert(mode) if image.mode != mode else image
        w, h = fitted.size
        if w != h:
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            fitted = fitted.crop((left, top, left + side, top + side))
        if fitted.size != (size, size):
            fitted = fitted.resize((size, size), Image.Resampling.BICUBIC)
        changed += fitted is not image
        out[i] = np.asarray(fitted).reshape(size, size, channels)
    return out, changed


def save_png(image: np.ndarray, path: str | Path) -> None:
    """A uint8 image (H, W, C) as PNG."""
    from PIL import Image

    array = image[..., 0] if image.shape[-1] == 1 else image
    Image.fromarray(array).save(path)
