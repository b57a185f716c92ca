"""Screenshots of every section of a report at 1400 px, in Debian's headless Chromium (no network).

    python scripts/screenshots.py reports/demo/index.html shots/

Clicks the first heatmap's cell (row 1, column 2) first so that the drill-down panel is filled, and writes
<section id>.png per section (plus page.png, the whole page) into the output folder.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

CHROMIUM = os.environ.get("FEATREC_CHROMIUM", "/usr/bin/chromium")
LOCAL = ("file:", "data:", "blob:", "about:")


def screenshots(page_path: Path, out: Path, width: int = 1400, cell: tuple[int, int] = (0, 1)) -> list[Path]:
    """Write one PNG per <section> (and the whole page); returns their paths."""
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    written = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            context = browser.new_context(viewport={"width": width, "height": 900})
            context.route(lambda url: not url.startswith(LOCAL), lambda route: route.abort())
            page = context.new_page()
            page.goto(page_path.resolve().as_uri(), wait_until="load")
            page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length > 0", timeout=30000)
            if page.locator(".pair-heatmap").count():
                page.evaluate(f"featrecReport.showPair(featrecReport.data.order[{cell[0]}], "
                              f"featrecReport.data.order[{cell[1]}])")  # fmt: skip
                page.wait_for_timeout(500)
            page.evaluate("document.querySelectorAll('details').forEach(d => d.open = false)")
            page.add_style_tag(content="nav{position:static}")  # a sticky bar would cover each section's top
            for ident in page.eval_on_selector_all("section[id]", "els => els.map(e => e.id)"):
                path = out / f"{ident}.png"
                page.locator(f"section#{ident}").screenshot(path=str(path))
                written.append(path)
            path = out / "page.png"
            page.screenshot(path=str(path), full_page=True)
            written.append(path)
        finally:
            browser.close()
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--width", type=int, default=1400)
    args = parser.parse_args()
    for path in screenshots(args.page, args.out, args.width):
        print(path)


if __name__ == "__main__":
    main()
