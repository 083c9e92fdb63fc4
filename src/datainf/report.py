"""The self-contained HTML report of a detect-mislabeled run (plots embedded as PNG)."""

from __future__ import annotations

import base64
import html
import io

import numpy as np

from .metrics import detection_curve

SHOWN_CLASSES = 12      # class names listed in the header; the rest are counted
TEXT_CHARACTERS = 300   # of each suspect's text
# one look per curve, told apart by colour and line style (print and colour-blind readers)
LINE_STYLES = ["-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 1))]
MARKERS = ["o", "s", "^", "D", "v", "P", "X"]


def png_base64(fig) -> str:
    """A matplotlib figure as base64 PNG (for an <img> data URI)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def detection_plot(scores: dict, labels: dict, flipped: np.ndarray) -> str:
    """Base64 PNG: share of flipped examples found vs share of data inspected, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, (key, values) in enumerate(scores.items()):
        inspected, found = detection_curve(values, flipped)
        ax.plot(inspected, found, label=labels[key], linestyle=LINE_STYLES[i % len(LINE_STYLES)],
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
    data = png_base64(fig)
    plt.close(fig)
    return data


def class_breakdown(table, suspects) -> list[tuple[str, int, int]]:
    """(given label, training examples with it, suspects with it), most suspects first."""
    sizes = table["given_label"].value_counts()
    among = suspects["given_label"].value_counts()
    rows = [(str(label), int(size), int(among.get(label, 0))) for label, size in sizes.items()]
    return sorted(rows, key=lambda r: (-r[2], -r[1], r[0]))


def write_report(summary: dict, table, suspects, scores: dict, flipped: np.ndarray | None) -> str:
    """The report page as one HTML string. ``table``: every training example (scores.csv);
    ``suspects``: the most suspicious ones in order (suspects.csv)."""
    e = html.escape
    methods = summary["methods"]
    labels = {k: v["label"] for k, v in methods.items()}
    config = summary["config"]
    rank_by = config["rank_by"]
    has_auc = flipped is not None
    method_rows = []
    for m in methods.values():
        auc = f"{m['auc']:.3f}" if has_auc else "–"
        note = "" if m.get("converged", True) else " (did not converge)"
        seconds = "(by-product)" if m.get("by_product") else f"{m['seconds']:.3g}"
        method_rows.append(f"<tr><td>{e(m['label'])}{note}</td><td>{auc}</td>"
                           f"<td>{seconds}</td></tr>")

    has_id = "id" in suspects
    suspect_rows = []
    for _, r in suspects.iterrows():
        text = str(r["text"])
        if "text_pair" in suspects:
            text += " ‖ " + str(r["text_pair"])
        short = e(text[:TEXT_CHARACTERS]) + ("…" if len(text) > TEXT_CHARACTERS else "")
        says = f"{e(str(r['model_label']))} ({r['model_probability']:.2f})"
        cells = [f"<td>{int(r['rank'])}</td>", f"<td>{int(r['row'])}</td>"]
        if has_id:
            cells.append(f"<td class='id'>{e(str(r['id']))}</td>")
        cells += [f"<td>{e(str(r['given_label']))}</td>",
                  f"<td class='{'disagree' if r['suggested_label'] else ''}'>{says}</td>",
                  f"<td>{r[f'{rank_by}_score']:.4g}</td>"]
        if has_auc:
            cells += [f"<td>{e(str(r['trained_label']))}</td>",
                      f"<td>{'yes' if r['flipped'] else ''}</td>"]
        cells.append(f"<td class='text'>{short}</td>")
        suspect_rows.append("<tr>" + "".join(cells) + "</tr>")
    suspect_head = ("<tr><th>rank</th><th>row</th>" + ("<th>id</th>" if has_id else "")
                    + "<th>given label</th><th>model says (probability)</th>"
                    + f"<th>score ({e(labels[rank_by])})</th>"
                    + ("<th>trained on (--noise)</th><th>flipped</th>" if has_auc else "")
                    + "<th>text</th></tr>")

    breakdown = "".join(
        f"<tr><td>{e(label)}</td><td>{size}</td><td>{count}</td><td>{count / size:.1%}</td></tr>"
        for label, size, count in class_breakdown(table, suspects))

    plot = ""
    if has_auc:
        plot = (f"<h2>Detection curve</h2><img alt='detection curve' src='data:image/png;base64,"
                f"{detection_plot(scores, labels, flipped)}'>")
    reused = set(summary.get("reused_stages", []))
    stages = "".join(f"<tr><td>{e(k)}</td><td>{v:.1f}</td></tr>"
                     for k, v in summary["stage_seconds"].items() if k not in reused)
    stages += "".join(f"<tr><td>{e(k)}</td><td>reused from an earlier run</td></tr>"
                      for k in summary.get("reused_stages", []))

    warnings = [summary["model_quality"]["warning"]] if summary["model_quality"]["weak"] else []
    warnings += summary.get("data", {}).get("notes", [])
    warning_html = "".join(f"<p class='warning'>{e(w)}</p>" for w in warnings)

    classes = summary["classes"]
    class_list = ", ".join(classes[:SHOWN_CLASSES])
    if len(classes) > SHOWN_CLASSES:
        class_list += f" and {len(classes) - SHOWN_CLASSES} more"
    quality = summary["model_quality"]
    noise = (f"{summary['n_flipped']} of {summary['n_train']} training labels were flipped on "
             f"purpose (noise {config['noise']}, seed {config['seed']}) to measure how well each "
             "score finds them." if has_auc else
             "No label noise was injected: the suspects below are ranked on your labels as they "
             "are; there is no AUC.")
    drop = (f"<code>cleaned.csv</code> holds your data without the top {config['drop_top']} "
            f"suspects by {e(labels[rank_by])}." if config.get("drop_top") else
            "<code>--drop-top K</code> writes <code>cleaned.csv</code>: your data without the "
            "top K suspects.")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>datainf: mislabeled examples</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
td, th {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }}
th {{ background: #f3f3f3; }}
table.suspects {{ width: 100%; font-size: 0.85em; }}
td.text {{ min-width: 22em; overflow-wrap: anywhere; }}
td.id {{ white-space: nowrap; }}
td.disagree {{ background: #fff1d6; }}
.note {{ color: #555; font-size: 0.9em; }}
.warning {{ background: #fde8e8; border-left: 4px solid #c0392b; padding: 0.5em 0.8em; }}
</style></head><body>
<h1>Mislabeled training examples</h1>
<p>Model <code>{e(str(config['model']))}</code>, LoRA rank {config['lora_r']}, data
<code>{e(str(config['data'] or 'BBC News (shipped)'))}</code>: {summary['n_train']} training and
{summary['n_val']} validation examples, {len(classes)} classes ({e(class_list)}).
Validation accuracy after fine-tuning: {quality['val_accuracy']:.3f} (always answering the most
frequent class: {quality['majority_rate']:.3f}). {noise}</p>
{warning_html}
<p class="note">Every score is oriented so that higher means more suspicious. Influence scores
follow the paper's sign convention: a positive influence on the mean validation loss means the
example is harmful. The training loss and the gradient norm are plain reference scores.</p>
<h2>Methods</h2>
<table><tr><th>method</th><th>AUC (flipped labels)</th><th>seconds</th></tr>
{''.join(method_rows)}</table>
{plot}
<h2>Top {len(suspects)} suspects by {e(labels[rank_by])}</h2>
<p class="note">"row" is the example's position in your file (0 = the first record). Where the
model disagrees with the given label (shaded), its choice is the suggested label in
<code>suspects.csv</code>.</p>
<table class="suspects">{suspect_head}
{''.join(suspect_rows)}</table>
<h2>Suspects per given label</h2>
<table><tr><th>given label</th><th>training examples</th><th>among the top {len(suspects)}
suspects</th><th>share of the label</th></tr>
{breakdown}</table>
<h2>What to do next</h2>
<ul>
<li>Check the suspects in <code>suspects.csv</code> (row, text, given and suggested label,
scores): edit the labels you agree with in your own file, by row.</li>
<li>{drop}</li>
<li><code>--rank-by</code> orders the suspects by another score (computed ones:
{e(', '.join(methods))}); nothing is recomputed but the scores.</li>
</ul>
<h2>Time per stage (seconds)</h2>
<table>{stages}</table>
</body></html>
"""


NONE_LISTED = {
    "helpful": "none: no training example has a negative score (none lowers this query's loss)",
    "harmful": "none: no training example has a positive score (every one lowers this query's "
               "loss)",
}


def _method_title(entry: dict) -> str:
    """A method's label, with a warning when its iterations did not converge (LiSSA)."""
    title = html.escape(entry["label"])
    if entry.get("converged") is False:
        title += (f" <span class='warning'>(did not converge: relative residual "
                  f"{entry['relative_residual']:.2g}; its scores are approximate)</span>")
    return title


def _none_note(lists: dict, side: str) -> str:
    """Why a query's list of helpful or harmful examples is empty (only examples with a score of
    that side's sign are listed)."""
    return "" if lists[side] else f"<p class='note'>{NONE_LISTED[side]}</p>"


def explain_generation_page(summary: dict, rows: list[dict], methods: list[str]) -> str:
    """The explain-generation report: per query, its prompt and response, and for each method
    the most helpful and most harmful training examples side by side."""
    e = html.escape
    config = summary["config"]

    def turns(messages: list[dict]) -> str:
        return "<br>".join(f"<b>{e(m['role'])}:</b> {e(m['content'])}" for m in messages)

    def examples(items: list[dict]) -> str:
        return "".join(
            f"<li><span class='score'>{x['score']:+.4g}</span> <span class='note'>line "
            f"{x['line']}</span>{_keys(x)}<br>{e(x['prompt'])}<br><i>→ {e(x['response'])}"
            "</i></li>" for x in items)

    sections = []
    for row in rows:
        said = "the model's own greedy answer" if row["generated"] else "the given response"
        blocks = "".join(
            f"<tr><th colspan='2'>{_method_title(summary['methods'][m])}</th></tr>"
            f"<tr><td><b>most helpful</b> (most negative)<ol>{examples(row[m]['helpful'])}"
            f"</ol>{_none_note(row[m], 'helpful')}</td><td><b>most harmful</b> (most positive)"
            f"<ol>{examples(row[m]['harmful'])}</ol>{_none_note(row[m], 'harmful')}</td></tr>"
            for m in methods)
        sections.append(
            f"<h3>Query {row['query'] + 1} <span class='note'>(line {row['line']})"
            f"{_keys(row)}</span></h3><p>{turns(row['prompt'])}<br><b>response</b> ({said}): "
            f"<i>{e(row['response'])}</i></p><table class='pairs'>{blocks}</table>")
    timing = stage_line(summary["stage_seconds"], summary.get("reused_stages", []))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>datainf: explain generation</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; width: 100%; }}
td, th {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top;
         overflow-wrap: anywhere; width: 50%; }}
th {{ background: #f3f3f3; }}
li {{ margin-bottom: 0.4em; }}
.score {{ font-family: monospace; }}
.note {{ color: #555; font-size: 0.9em; }}
</style></head><body>
<h1>Which training examples made the model answer like that</h1>
<p>Model <code>{e(str(config['model']))}</code> with adapter {e(summary['adapter'])}
(LoRA rank {config['lora_r']} on {e(', '.join(config['lora_targets']))}):
{summary['n_train']} training examples, {summary['n_queries']} queries
({summary['generated_answers']} answered by the model). Stages: {e(timing)}.</p>
<p class="note">Influence of up-weighting each training example on the query's loss (mean
negative log-likelihood of the response tokens given the prompt): negative = the example helps
the model give this response, positive = it works against it (the paper's sign).</p>
{''.join(sections)}
</body></html>
"""


def image_uri(image) -> str:
    """A uint8 image (H, W, C) as a PNG data URI."""
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def explain_image_page(summary: dict, rows: list[dict], methods: list[str], train_images,
                       query_images, drawn: dict | None) -> str:
    """The explain-image report: samples before and after fine-tuning; per query, its image
    next to each method's most helpful and most harmful training images (the paper's
    Figure 3 as an image grid)."""
    e = html.escape
    config = summary["config"]

    def figure(image, caption: str, title: str = "") -> str:
        return (f"<figure title='{e(title)}'><img src='{image_uri(image)}' alt='{e(caption)}'>"
                f"<figcaption>{e(caption)}</figcaption></figure>")

    def grid(items: list[dict]) -> str:
        return "".join(figure(train_images[x["train"]], f"{x['score']:+.3g}",
                              f"#{x['rank']} {x['file_name']}: {x['text']}") for x in items)

    sections = []
    for row in rows:
        said = (f"drawn by the fine-tuned model, seed {row['seed']}" if row["generated"]
                else "given")
        blocks = "".join(
            f"<tr><th>{_method_title(summary['methods'][m])}</th><td><b>most helpful</b> (most "
            f"negative)<div class='grid'>{grid(row[m]['helpful'])}</div>"
            f"{_none_note(row[m], 'helpful')}</td><td><b>most harmful</b> (most positive)"
            f"<div class='grid'>{grid(row[m]['harmful'])}</div>{_none_note(row[m], 'harmful')}"
            "</td></tr>" for m in methods)
        sections.append(
            f"<h3>Query {row['query'] + 1} <span class='note'>(line {row['line']}, {said})"
            f"{_keys(row)}</span></h3><div class='query'>"
            f"{figure(query_images[row['query']], row['text'])}</div>"
            f"<table class='pairs'>{blocks}</table>")
    before_after = ""
    if drawn is not None:
        cells = "".join(
            f"<td>{figure(b, 'before')}{figure(a, 'after')}<div class='note'>{e(t)}</div></td>"
            for t, b, a in zip(drawn["prompts"], drawn["before"], drawn["after"], strict=True))
        before_after = ("<h2>Samples before and after fine-tuning</h2><p class='note'>Training "
                        "prompts drawn by the base model and by the fine-tuned one, same seeds "
                        f"({', '.join(map(str, drawn['seeds']))}).</p>"
                        f"<table class='samples'><tr>{cells}</tr></table>")
    timing = stage_line(summary["stage_seconds"], summary.get("reused_stages", []))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>datainf: explain image</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; width: 100%; table-layout: fixed; }}
td, th {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top;
         overflow-wrap: anywhere; }}
th {{ background: #f3f3f3; width: 9em; }}
.grid, .query {{ display: flex; flex-wrap: wrap; gap: 0.4em; }}
figure {{ margin: 0; text-align: center; font-size: 0.8em; font-family: monospace; }}
img {{ width: 64px; height: 64px; image-rendering: pixelated; border: 1px solid #999; }}
.query img {{ width: 96px; height: 96px; }}
.samples td {{ text-align: center; }}
.samples figure {{ display: inline-block; }}
.note {{ color: #555; font-size: 0.9em; font-family: system-ui, sans-serif; }}
</style></head><body>
<h1>Which training images made the model draw that</h1>
<p>Pipeline <code>{e(str(summary['pipeline']))}</code> ({summary['image_size']} x
{summary['image_size']} images) with adapter {e(summary['adapter'])} (LoRA rank
{config['lora_r']} on {e(', '.join(config['lora_targets']))}): {summary['n_train']} training
images, {summary['n_queries']} queries ({summary['generated_images']} drawn by the model).
Stages: {e(timing)}.</p>
<p class="note">Influence of up-weighting each training image on the query's loss (the
noise-prediction error at timesteps {e(', '.join(map(str, config['timesteps'])))}, noise seeded
per image): negative = the training image helps the model draw this query, positive = it works
against it (the paper's sign). Hover over an image for its file and prompt.</p>
{before_after}
<h2>Queries</h2>
{''.join(sections)}
</body></html>
"""


def _keys(item: dict) -> str:
    keys = item.get("keys")
    if not keys:
        return ""
    return " <span class='note'>" + html.escape(", ".join(f"{k}: {v}" for k, v in
                                                           keys.items())) + "</span>"


def stage_line(seconds: dict, reused: list) -> str:
    """"data 0.1 s, fine-tuning reused, ...": each stage's seconds, or that it was reused from
    an earlier run (a reused stage's seconds would only time the check)."""
    parts = [f"{k} {v:.1f} s" for k, v in seconds.items() if k not in reused]
    return ", ".join(parts + [f"{k} reused" for k in reused])
