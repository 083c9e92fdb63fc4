"""The pictures of the reports, as base64 PNG: matplotlib figures and uint8 images."""

from __future__ import annotations

import base64
import io

import numpy as np

from ..metrics import detection_curve

# one look per curve, told apart by colour and line style (print and colour-blind readers)
LINE_STYLES = ["-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 1))]
MARKERS = ["o", "s", "^", "D", "v", "P", "X"]


def png_base64(fig) -> str:
    """A matplotlib figure as base64 PNG (for an <img> data URI)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def figure_png(draw, size: tuple[float, float] = (7.2, 4.2)) -> str:
    """Base64 PNG of the matplotlib figure that ``draw(ax)`` fills."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    draw(ax)
    data = png_base64(fig)
    plt.close(fig)
    return data


def detection_plot(scores: dict, labels: dict, flipped: np.ndarray) -> str:
    """Base64 PNG: share of flipped examples found vs share of data inspected, per method."""

    def draw(ax) -> None:
        for i, (key, values) in enumerate(scores.items()):
            inspected, found = detection_curve(values, flipped)
            ax.plot(inspected, found, label=labels[key],
                    linestyle=LINE_STYLES[i % len(LINE_STYLES)],
                    marker=MARKERS[i % len(MARKERS)], markevery=max(1, len(inspected) // 8),
                    markersize=4, linewidth=1.4)
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="random order")
        share = flipped.mean()
        ax.plot([0, share, 1], [0, 1, 1], color="black", linestyle="--", linewidth=0.8,
                label="perfect order")
        ax.set_xlabel("share of training data inspected (highest score first)")
        ax.set_ylabel("share of flipped labels found")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")

    return figure_png(draw, (6.4, 4.4))


def image_uri(image: np.ndarray) -> str:
    """A uint8 image (H, W, C) as a PNG data URI."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
