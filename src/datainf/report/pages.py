"""The self-contained HTML pages of the jobs and the studies, rendered from the Jinja2
templates beside this module (``templates/``: ``base.html`` holds the page and its CSS, one
template per report extends it; text is escaped by the templates)."""

from __future__ import annotations

import jinja2
import numpy as np
from markupsafe import Markup

from .figures import detection_plot, image_uri

SHOWN_CLASSES = 12      # class names listed in the header; the rest are counted
TEXT_CHARACTERS = 300   # of each suspect's text
NONE_LISTED = {
    "helpful": "none: no training example has a negative score (none lowers this query's loss)",
    "harmful": "none: no training example has a positive score (every one lowers this query's "
               "loss)",
}


def _none_note(lists: dict, side: str) -> str:
    """Why a query's list of helpful or harmful examples is empty (only examples with a score of
    that side's sign are listed)."""
    return Markup("" if lists[side] else f"<p class='note'>{NONE_LISTED[side]}</p>")


def shown(value: dict | None, digits: str = ".3f") -> str:
    """An interval dict as "mean [low, high]" ("–" when there is no value)."""
    if value is None or value["mean"] is None:
        return "–"
    if value["low"] is None:
        return f"{value['mean']:{digits}}"
    return f"{value['mean']:{digits}} [{value['low']:{digits}}, {value['high']:{digits}}]"


TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("datainf.report", "templates"), autoescape=True,
    trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
TEMPLATES.filters["f"] = format            # {{ x | f(".3f") }}
TEMPLATES.filters["image_uri"] = image_uri
TEMPLATES.filters["shown"] = shown        # {{ interval | shown(".3g") }}
TEMPLATES.globals["none_note"] = _none_note


def render(template: str, **values) -> str:
    return TEMPLATES.get_template(template).render(**values)


def stage_line(seconds: dict, reused: list) -> str:
    """"data 0.1 s, fine-tuning reused, ...": each stage's seconds, or that it was reused from
    an earlier run (a reused stage's seconds would only time the check)."""
    parts = [f"{k} {v:.1f} s" for k, v in seconds.items() if k not in reused]
    return ", ".join(parts + [f"{k} reused" for k in reused])


def class_breakdown(table, suspects) -> list[tuple[str, int, int]]:
    """(given label, training examples with it, suspects with it), most suspects first."""
    sizes = table["given_label"].value_counts()
    among = suspects["given_label"].value_counts()
    rows = [(str(label), int(size), int(among.get(label, 0))) for label, size in sizes.items()]
    return sorted(rows, key=lambda r: (-r[2], -r[1], r[0]))


def write_report(summary: dict, table, suspects, scores: dict, flipped: np.ndarray | None) -> str:
    """The detect-mislabeled report page as one HTML string. ``table``: every training example
    (scores.csv); ``suspects``: the most suspicious ones in order (suspects.csv)."""
    methods = summary["methods"]
    labels = {k: v["label"] for k, v in methods.items()}
    config = summary["config"]
    rank_by = config["rank_by"]
    has_auc = flipped is not None
    rows = []
    for _, r in suspects.iterrows():
        text = str(r["text"])
        if "text_pair" in suspects:
            text += " ‖ " + str(r["text_pair"])
        rows.append({
            "rank": int(r["rank"]), "row": int(r["row"]), "id": r.get("id"),
            "given": str(r["given_label"]), "disagree": bool(r["suggested_label"]),
            "says": f"{r['model_label']} ({r['model_probability']:.2f})",
            "score": r[f"{rank_by}_score"],
            "trained": r.get("trained_label"), "flipped": bool(r.get("flipped", False)),
            "text": text[:TEXT_CHARACTERS] + ("…" if len(text) > TEXT_CHARACTERS else "")})
    classes = summary["classes"]
    class_list = ", ".join(classes[:SHOWN_CLASSES])
    if len(classes) > SHOWN_CLASSES:
        class_list += f" and {len(classes) - SHOWN_CLASSES} more"
    quality = summary["model_quality"]
    warnings = [quality["warning"]] if quality["weak"] else []
    noise = (f"{summary['n_flipped']} of {summary['n_train']} training labels were flipped on "
             f"purpose (noise {config['noise']}, seed {config['seed']}) to measure how well each "
             "score finds them." if has_auc else
             "No label noise was injected: the suspects below are ranked on your labels as they "
             "are; there is no AUC.")
    return render(
        "detect_mislabeled.html", summary=summary, config=config, quality=quality,
        class_list=class_list, noise=noise,
        warnings=warnings + summary.get("data", {}).get("notes", []),
        methods=list(methods.values()), has_auc=has_auc, has_id="id" in suspects,
        plot=detection_plot(scores, labels, flipped) if has_auc else None,
        rank_label=labels[rank_by], suspects=rows,
        breakdown=class_breakdown(table, suspects), reused=summary.get("reused_stages", []))


def explain_generation_page(summary: dict, rows: list[dict], methods: list[str],
                            by_token: list[dict] | None = None,
                            token_methods: list[str] | None = None) -> str:
    """The explain-generation report: per query, its prompt and response, and for each method
    the most helpful and most harmful training examples side by side; with ``by_token`` (the
    rows of tokens.jsonl, scored by ``token_methods``) the response token by token, drawn in
    the browser (templates/token_view.html)."""
    return render("explain_generation.html", summary=summary, config=summary["config"],
                  rows=rows, methods=methods, by_token=by_token, token_methods=token_methods,
                  labels={m: v["label"] for m, v in summary["methods"].items()},
                  timing=stage_line(summary["stage_seconds"], summary.get("reused_stages", [])))


def explain_image_page(summary: dict, rows: list[dict], methods: list[str], train_images,
                       query_images, drawn: dict | None) -> str:
    """The explain-image report: samples before and after fine-tuning; per query, its image
    next to each method's most helpful and most harmful training images (the paper's
    Figure 3 as an image grid)."""
    samples = [] if drawn is None else list(zip(drawn["prompts"], drawn["before"],
                                                drawn["after"], strict=True))
    return render("explain_image.html", summary=summary, config=summary["config"], rows=rows,
                  methods=methods, train_images=train_images, query_images=query_images,
                  drawn=drawn, samples=samples,
                  timing=stage_line(summary["stage_seconds"], summary.get("reused_stages", [])))


def study_page(template: str, title: str, **values) -> str:
    """A study's page: ``template`` extends ``study.html`` (``title``, an introduction and
    what the study shows)."""
    return render(template, title=title, **values)
