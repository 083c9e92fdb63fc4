"""Look at a report as a user would: render it in headless Chromium.

    .venv/bin/python scripts/check_report.py runs/detect-mislabeled/report.html [shot.png]
    .venv/bin/python scripts/check_report.py runs/tok/report.html [shot.png]   # --per-token

Needs Debian's chromium package (apt-get install chromium; .ci/run installs it). Takes a
screenshot of the whole page (up to MAX_HEIGHT pixels), checks that it is not blank, and checks
the DOM that Chromium built (scripts run) against the files beside the report:

- detect-mislabeled (summary.json, suspects.csv, scores.csv): the methods table, the detection
  curve (a PNG that decodes) when noise was injected, the suspects table, the per-label table,
  the advice, the warnings;
- explain-generation --per-token (tokens.jsonl): each response drawn token by token, the
  training examples' tokens drawn, and, opened at ``#token-0-T``, the selected token's most
  helpful and harmful examples as tokens.jsonl lists them.

``check`` returns the problems (tests/test_report_browser.py uses it); the script exits non-zero
naming them.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
WIDTH, MAX_HEIGHT = 1200, 16000
SUSPECT_HEADER = ["rank", "row", "given label", "model says (probability)", "score (", "text"]
WEAK_MODEL = "the fine-tuned model is weak"


class Page(HTMLParser):
    """What the rendered DOM holds: headings, tables (rows of cells) and images, each under the
    heading it follows, and the warning paragraphs."""

    def __init__(self) -> None:
        super().__init__()
        self.headings: list[str] = []
        self.tables: list[dict] = []     # {"heading": h2 above it, "rows": [[cell text]]}
        self.images: list[dict] = []     # {"heading": ..., "src": ...}
        self.warnings: list[str] = []
        self._text: list[str] | None = None  # the heading, cell or warning being read
        self._where = ""

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("h1", "h2"):
            self._text, self._where = [], tag
        elif tag == "table":
            self.tables.append({"heading": self.headings[-1] if self.headings else "",
                                "rows": []})
        elif tag == "tr" and self.tables:
            self.tables[-1]["rows"].append([])
        elif tag in ("td", "th") and self.tables and self.tables[-1]["rows"]:
            self._text, self._where = [], "cell"
        elif tag == "img":
            self.images.append({"heading": self.headings[-1] if self.headings else "",
                                "src": attrs.get("src") or ""})
        elif tag == "p" and "warning" in (attrs.get("class") or "").split():
            self._text, self._where = [], "warning"

    def handle_endtag(self, tag):
        if self._text is None:
            return
        text = " ".join("".join(self._text).split())
        if tag in ("h1", "h2") and self._where == tag:
            self.headings.append(text)
        elif tag in ("td", "th") and self._where == "cell":
            self.tables[-1]["rows"][-1].append(text)
        elif tag == "p" and self._where == "warning":
            self.warnings.append(text)
        else:
            return
        self._text = None

    def handle_data(self, data):
        if self._text is not None:
            self._text.append(data)

    def table(self, heading: str) -> list[list[str]] | None:
        """Rows of the first table under the h2 that starts with ``heading``."""
        for t in self.tables:
            if t["heading"].startswith(heading):
                return t["rows"]
        return None


def chromium() -> str | None:
    """Path of a Chromium binary, or None."""
    for name in BROWSERS:
        if shutil.which(name):
            return shutil.which(name)
    return None


def _run(command: list[str]) -> tuple[str, str | None]:
    """(stdout, None) or ("", what went wrong)."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return "", "chromium did not finish in 120 s"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        return "", f"chromium failed (exit {done.returncode}): {last}"
    return done.stdout, None


def render(report: Path, shot: Path, fragment: str = "") -> tuple[str, list[str]]:
    """The DOM Chromium builds from ``report`` (opened at ``#fragment`` when given) and a
    screenshot of the page in ``shot``, cut below the content; returns (DOM, problems)."""
    browser = chromium()
    if browser is None:
        return "", ["chromium is not installed: apt-get install chromium (.ci/run installs it)"]
    address = report.as_uri() + (f"#{fragment}" if fragment else "")
    with tempfile.TemporaryDirectory() as profile:
        base = [browser, *FLAGS, f"--user-data-dir={profile}"]
        dom, failed = _run([*base, "--dump-dom", address])
        if failed:
            return "", [failed]
        # the window must hold the whole page: a generous guess from the rows and images
        page = Page()
        page.feed(dom)
        rows = sum(len(t["rows"]) for t in page.tables)
        height = min(MAX_HEIGHT, max(2400, 1500 + 120 * rows + 700 * len(page.images)))
        shot.unlink(missing_ok=True)
        _, failed = _run([*base, f"--screenshot={shot}", f"--window-size={WIDTH},{height}",
                          address])
    if failed:
        return dom, [failed]
    if shot.exists():
        _crop(shot)
    return dom, []


def _crop(shot: Path) -> None:
    """Cuts the empty background below the content (keeps a margin)."""
    from PIL import Image, ImageChops

    with Image.open(shot) as img:
        rgb = img.convert("RGB")
    background = Image.new("RGB", rgb.size, rgb.getpixel((rgb.width - 1, rgb.height - 1)))
    box = ImageChops.difference(rgb, background).getbbox()
    if box and box[3] + 40 < rgb.height:
        rgb.crop((0, 0, rgb.width, box[3] + 40)).save(shot)


def _blank(png: bytes) -> str | None:
    """Why an image is no picture (does not decode, tiny, one colour), or None."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(png)) as img:
            kind, rgb = img.format, img.convert("RGB")
    except Exception as exc:  # any decoding failure is the finding
        return f"does not decode ({exc})"
    if kind != "PNG":
        return f"is {kind}, not PNG"
    if rgb.width < 200 or rgb.height < 150:
        return f"is only {rgb.width}x{rgb.height} pixels"
    # a few pixel rows across the picture: more than one colour on them
    rows = [rgb.crop((0, y, rgb.width, y + 1)) for y in range(0, rgb.height, rgb.height // 16)]
    colours = set()
    for row in rows:
        colours.update(c for _, c in row.getcolors(rgb.width) or [])
    if len(colours) < 2:
        return "is one single colour"
    return None


def _overflows(shot: Path) -> bool:
    """Whether anything is drawn on the screenshot's right margin (the page body is centred
    and narrower than the window, so only overflowing content reaches it)."""
    from PIL import Image

    with Image.open(shot) as img:
        rgb = img.convert("RGB")
    margin = rgb.crop((rgb.width - 16, 0, rgb.width, rgb.height))
    return margin.getcolors(1) is None  # None: more than one colour


def _read_next_to(report: Path) -> tuple[dict | None, list[str] | None, set[str] | None]:
    """summary.json, the columns of suspects.csv and the given labels in scores.csv beside the
    report (None where missing)."""
    folder = report.parent
    summary = columns = labels = None
    if (folder / "summary.json").is_file():
        summary = json.loads((folder / "summary.json").read_text())
    if (folder / "suspects.csv").is_file():
        with open(folder / "suspects.csv", newline="") as f:
            columns = next(csv.reader(f), [])
    if (folder / "scores.csv").is_file():
        with open(folder / "scores.csv", newline="") as f:
            labels = {r["given_label"] for r in csv.DictReader(f) if "given_label" in r}
    return summary, columns, labels


def check_dom(dom: str, report: Path) -> list[str]:
    """Problems with what the rendered page shows (see the module's docstring)."""
    page = Page()
    page.feed(dom)
    summary, columns, labels = _read_next_to(report)
    problems = []

    methods = page.table("Methods")
    if methods is None:
        problems.append("no methods table (under 'Methods')")
    elif len(methods) < 2:
        problems.append("the methods table has no rows")
    elif summary and len(methods) - 1 != len(summary["methods"]):
        problems.append(f"the methods table has {len(methods) - 1} rows for "
                        f"{len(summary['methods'])} methods")

    plots = [i["src"] for i in page.images if i["heading"] == "Detection curve"]
    noise = summary.get("n_flipped") is not None if summary else bool(plots)
    if noise and "Detection curve" not in page.headings:
        problems.append("no detection curve although labels were flipped on purpose")
    elif noise and not plots:
        problems.append("no image under 'Detection curve'")
    elif noise:
        prefix = "data:image/png;base64,"
        if not plots[0].startswith(prefix):
            problems.append("the detection curve is not a PNG data URI")
        else:
            why = _blank(base64.b64decode(plots[0][len(prefix):]))
            if why:
                problems.append(f"the detection-curve image {why}")
    elif "Detection curve" in page.headings:
        problems.append("a detection curve although no labels were flipped on purpose")

    heading = next((h for h in page.headings if re.match(r"Top \d+ suspects by ", h)), None)
    suspects = page.table(heading) if heading else None
    if suspects is None:
        problems.append("no suspects table (under 'Top N suspects by ...')")
    else:
        header, body = suspects[0], suspects[1:]
        wanted = SUSPECT_HEADER + (["id"] if columns and "id" in columns else [])
        missing = [w for w in wanted if not any(c == w or (w.endswith("(") and c.startswith(w))
                                                for c in header)]
        if missing:
            problems.append(f"the suspects table lacks the columns {missing}")
        method = heading.split(" suspects by ", 1)[1]
        if f"score ({method})" not in header:
            problems.append(f"the suspects table has no 'score ({method})' column")
        if not body:
            problems.append("the suspects table has no rows")
        elif len(body) != int(heading.split()[1]):
            problems.append(f"'{heading}' over {len(body)} rows")
        if any(len(r) != len(header) for r in body):
            problems.append("rows of the suspects table do not match its header")

    per_label = page.table("Suspects per given label")
    expected = labels if labels else set(summary["classes"]) if summary else None
    if per_label is None:
        problems.append("no table under 'Suspects per given label'")
    elif len(per_label) < 2:
        problems.append("the per-label table has no rows")
    elif expected and sorted(r[0] for r in per_label[1:]) != sorted(expected):
        problems.append(f"the per-label table has rows {sorted(r[0] for r in per_label[1:])} "
                        f"for the labels {sorted(expected)}")

    if "What to do next" not in page.headings:
        problems.append("no 'What to do next'")

    if summary and summary.get("model_quality", {}).get("weak"):
        if not any(w.startswith(WEAK_MODEL) for w in page.warnings):
            problems.append("no weak-model warning although summary.json says the model is weak")
    for note in (summary or {}).get("data", {}).get("notes", []):
        if " ".join(note.split()) not in page.warnings:
            problems.append(f"no warning for the data note {note!r}")
    return problems


class TokenPage(HTMLParser):
    """What the token views of an explain-generation page hold, per query (``data-query``):
    the response's token spans (and how many are chosen), the selected token's helpful and
    harmful example ids, and the training examples drawn (id, token spans)."""

    def __init__(self) -> None:
        super().__init__()
        self.views: dict[int, dict] = {}
        self._view: dict | None = None
        self._in: str | None = None      # "response", "example", "helpful", "harmful"

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        if "token-view" in classes:
            self._view = self.views.setdefault(int(attrs["data-query"]), {
                "tokens": 0, "chosen": 0, "helpful": [], "harmful": [], "examples": [],
                "headings": []})
        elif self._view is None:
            return
        elif "token-heading" in classes:
            self._in = "heading"
            self._view["headings"].append("")
        elif "response-tokens" in classes:
            self._in = "response"
        elif "train-ex" in classes:
            self._in = "example"
            self._view["examples"].append([int(attrs["data-train"]), 0])
        elif tag == "ol" and {"token-helpful", "token-harmful"} & set(classes):
            self._in = classes[0].removeprefix("token-")
        elif tag == "li" and self._in in ("helpful", "harmful"):
            self._view[self._in].append(int(attrs["data-train"]))
        elif tag == "span" and "tok" in classes:
            if self._in == "response":
                self._view["tokens"] += 1
                self._view["chosen"] += "chosen" in classes
            elif self._in == "example":
                self._view["examples"][-1][1] += 1

    def handle_data(self, data):
        if self._in == "heading":
            self._view["headings"][-1] += data

    def handle_endtag(self, tag):
        if (self._in, tag) in (("response", "p"), ("example", "div"), ("helpful", "ol"),
                               ("harmful", "ol"), ("heading", "p")):
            self._in = None


def check_token_views(dom: str, rows: list[dict], chosen: int | None) -> list[str]:
    """Problems of the token views against tokens.jsonl's ``rows``; ``chosen``: the token of
    query 0 that the address selected (None: none)."""
    page = TokenPage()
    page.feed(dom)
    problems = []
    if sorted(page.views) != list(range(len(rows))):
        return [f"token views for the queries {sorted(page.views)}, not 0-{len(rows) - 1}"]
    # the first of the token methods: the one the page draws first
    method = [m for m in rows[0]["tokens"][0] if m not in ("position", "token")][0]
    for j, row in enumerate(rows):
        view = page.views[j]
        if view["tokens"] != len(row["tokens"]):
            problems.append(f"query {j}: {view['tokens']} token spans for "
                            f"{len(row['tokens'])} tokens")
        if view["chosen"] != (1 if j == 0 and chosen is not None else 0):
            problems.append(f"query {j}: {view['chosen']} tokens marked chosen")
        listed = row.get("training_tokens", {}).get(method, [])
        drawn = [[x["train"], len(x["tokens"])] for x in listed]
        if view["examples"] != drawn:
            problems.append(f"query {j}: training examples drawn as (id, tokens) "
                            f"{view['examples']}, tokens.jsonl has {drawn}")
    if chosen is not None:
        text = rows[0]["tokens"][chosen]["token"].replace("\n", "\\n")
        named = "\u2423" * len(text) if text.strip(" ") == "" else text  # as the page names it
        if not any(f"«{named}»" in h for h in page.views[0]["headings"]):
            problems.append(f"query 0, token {chosen}: no heading names it as «{named}»: "
                            f"{page.views[0]['headings']}")
        token = rows[0]["tokens"][chosen][method]
        for side in ("helpful", "harmful"):
            wanted = [x["train"] for x in token[side]]
            if page.views[0][side] != wanted:
                problems.append(f"query 0, token {chosen}: {side} examples "
                                f"{page.views[0][side]}, tokens.jsonl has {wanted}")
    return problems


def check(report: Path, shot: Path) -> list[str]:
    """Renders ``report`` in Chromium, writes the screenshot to ``shot`` and returns the
    problems found (empty: the page shows everything it should)."""
    report, shot = Path(report).resolve(), Path(shot).resolve()
    if not report.is_file():
        return [f"no report at {report}"]
    tokens = report.parent / "tokens.jsonl"
    if tokens.is_file():  # explain-generation --per-token, opened at query 0's last token
        rows = [json.loads(line) for line in tokens.read_text().splitlines()]
        chosen = len(rows[0]["tokens"]) - 1
        dom, problems = render(report, shot, f"token-0-{chosen}")
        if not dom:
            return problems
        problems += check_token_views(dom, rows, chosen)
        plain, failed = render(report, shot.with_name(shot.stem + "-plain.png"))
        problems += failed or check_token_views(plain, rows, None)
    else:
        dom, problems = render(report, shot)
        if not dom:
            return problems
        problems += check_dom(dom, report)
    if not shot.is_file():
        problems.append("no screenshot")
    elif shot.stat().st_size < 10_000:
        problems.append(f"the screenshot has only {shot.stat().st_size} bytes")
    else:
        why = _blank(shot.read_bytes())
        if why:
            problems.append(f"the screenshot {why}")
        elif _overflows(shot):
            problems.append(f"the page is wider than a {WIDTH} px window: something overflows "
                            "to the right (a table with a long unbroken word?)")
    return problems


def main() -> None:
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__.split("\n\n")[1])
    report = Path(sys.argv[1])
    shot = Path(sys.argv[2]) if len(sys.argv) > 2 else report.with_suffix(".png")
    problems = check(report, shot)
    if problems:
        sys.exit("the rendered report has problems:\n  " + "\n  ".join(problems))
    print(f"the report shows everything it should; screenshot: {shot}")


if __name__ == "__main__":
    main()
