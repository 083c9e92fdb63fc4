"""The self-contained HTML report of a detect-mislabeled run (plots embedded as PNG)."""

from __future__ import annotations

import base64
import html
import io

import numpy as np

from .metrics import detection_curve

TOP_SUSPECTS = 50


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def detection_plot(scores: dict, labels: dict, flipped: np.ndarray) -> str:
    """Base64 PNG: share of flipped examples found vs share of data inspected, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for key, values in scores.items():
        inspected, found = detection_curve(values, flipped)
        ax.plot(inspected, found, label=labels[key])
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
    data = _png(fig)
    plt.close(fig)
    return data


def write_report(summary: dict, table, scores: dict, flipped: np.ndarray | None) -> str:
    """The report page as one HTML string."""
    e = html.escape
    methods = summary["methods"]
    labels = {k: v["label"] for k, v in methods.items()}
    has_auc = flipped is not None
    rows = []
    for m in methods.values():
        auc = f"{m['auc']:.3f}" if has_auc else "–"
        note = "" if m.get("converged", True) else " (did not converge)"
        rows.append(f"<tr><td>{e(m['label'])}{note}</td><td>{auc}</td>"
                    f"<td>{m['seconds']:.2f}</td></tr>")
    first = next(iter(scores))
    top = table.sort_values(f"{first}_rank").head(TOP_SUSPECTS)
    suspect_rows = []
    for _, r in top.iterrows():
        flag = ""
        if "flipped" in table:
            flag = "<td>yes</td>" if r["flipped"] else "<td></td>"
        original = f"<td>{e(str(r['original_label']))}</td>" if "original_label" in table else ""
        text = str(r["text"])
        if "text_pair" in table:
            text += " ‖ " + str(r["text_pair"])
        suspect_rows.append(
            f"<tr><td>{int(r[f'{first}_rank'])}</td><td>{int(r['index'])}</td>"
            f"<td>{e(str(r['given_label']))}</td>{original}{flag}"
            f"<td class='text'>{e(text[:400])}{'…' if len(text) > 400 else ''}</td></tr>"
        )
    head_extra = ("<th>original label</th><th>flipped</th>" if "flipped" in table else "")
    plot = ""
    if has_auc:
        plot = (f"<h2>Detection curve</h2><img alt='detection curve' src='data:image/png;base64,"
                f"{detection_plot(scores, labels, flipped)}'>")
    stages = "".join(f"<tr><td>{e(k)}</td><td>{v:.1f}</td></tr>"
                     for k, v in summary["stage_seconds"].items())
    config = summary["config"]
    noise = (f"{summary['n_flipped']} of {summary['n_train']} training labels were flipped "
             f"(noise {config['noise']}, seed {config['seed']})." if has_auc else
             "No label noise was injected: the ranking below lists the suspects; no AUC.")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>datainf: mislabeled examples</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
td, th {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }}
th {{ background: #f3f3f3; }}
td.text {{ font-size: 0.85em; max-width: 650px; }}
.note {{ color: #555; font-size: 0.9em; }}
</style></head><body>
<h1>Mislabeled training examples</h1>
<p>Model <code>{e(str(config['model']))}</code>, LoRA rank {config['lora_r']}, data
<code>{e(str(config['data'] or 'BBC News (shipped)'))}</code>: {summary['n_train']} training and
{summary['n_val']} validation examples, classes {e(', '.join(summary['classes']))}.
Validation accuracy after fine-tuning: {summary['val_accuracy']:.3f}. {noise}</p>
<p class="note">Every score is oriented so that higher means more suspicious. Influence scores
follow the paper's sign convention: a positive influence on the mean validation loss means the
example is harmful. The training loss and the gradient norm are plain reference scores.</p>
<h2>Methods</h2>
<table><tr><th>method</th><th>AUC (flipped labels)</th><th>seconds</th></tr>
{''.join(rows)}</table>
{plot}
<h2>Top {len(top)} suspects by {e(labels[first])}</h2>
<table><tr><th>rank</th><th>example</th><th>given label</th>{head_extra}<th>text</th></tr>
{''.join(suspect_rows)}</table>
<h2>Time per stage (seconds)</h2>
<table>{stages}</table>
</body></html>
"""
