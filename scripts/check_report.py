"""Look at a detect-mislabeled report as a user would: render it in headless Chromium.

    .venv/bin/python scripts/check_report.py runs/detect-mislabeled/report.html [shot.png]

Needs Debian's chromium package (apt-get install chromium). Takes a full-page screenshot and
checks the DOM that Chromium built: the methods table, the detection-curve image (decoded, not
empty) and the suspects table. Exits non-zero, naming what is missing, otherwise.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars"]


class Page(HTMLParser):
    """Counts what the rendered DOM holds: tables with their rows, headings, images."""

    def __init__(self) -> None:
        super().__init__()
        self.headings, self.images, self.table_rows = [], [], []
        self._in_heading = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("h1", "h2"):
            self._in_heading = True
            self.headings.append("")
        elif tag == "img":
            self.images.append(attrs.get("src", ""))
        elif tag == "table":
            self.table_rows.append(0)
        elif tag == "tr" and self.table_rows:
            self.table_rows[-1] += 1

    def handle_endtag(self, tag):
        if tag in ("h1", "h2"):
            self._in_heading = False

    def handle_data(self, data):
        if self._in_heading:
            self.headings[-1] += data


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    sys.exit("chromium not found: apt-get install chromium")


def main() -> None:
    report = Path(sys.argv[1]).resolve()
    shot = Path(sys.argv[2] if len(sys.argv) > 2 else report.with_suffix(".png")).resolve()
    with tempfile.TemporaryDirectory() as profile:
        base = [chromium(), *FLAGS, f"--user-data-dir={profile}"]
        dom = subprocess.run([*base, "--dump-dom", report.as_uri()], capture_output=True,
                             text=True, timeout=120, check=True).stdout
        subprocess.run([*base, f"--screenshot={shot}", "--window-size=1200,2400",
                        report.as_uri()], capture_output=True, timeout=120, check=True)
    page = Page()
    page.feed(dom)
    problems = []
    if not any("Methods" in h for h in page.headings) or not page.table_rows:
        problems.append("the methods table")
    if not any(src.startswith("data:image/png;base64,") and len(src) > 1000
               for src in page.images):
        problems.append("the detection-curve plot")
    if not any(h.startswith("Top") and "suspects" in h for h in page.headings) or \
            len(page.table_rows) < 2 or page.table_rows[1] < 2:
        problems.append("the suspects table")
    if not shot.exists() or shot.stat().st_size < 10_000:
        problems.append("a screenshot")
    print(f"headings: {page.headings}")
    print(f"table rows: {page.table_rows}; images: {len(page.images)}; screenshot: {shot}")
    if problems:
        sys.exit("the rendered report lacks " + ", ".join(problems))
    print("the report shows the methods table, the detection curve and the suspects")


if __name__ == "__main__":
    main()
