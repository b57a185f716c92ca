"""Open a local HTML file in Debian's headless Chromium (never a downloaded browser) and collect what went wrong:
console errors, page errors, dialogs, and any attempt to reach the network (blocked)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM = Path(os.environ.get("FEATREC_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-default-apps", "--mute-audio"]
_LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:")


@dataclass
class BrowserPage:
    """A loaded page (playwright `page`) and what it reported while loading and afterwards."""

    page: Any
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    external_requests: list[str] = field(default_factory=list)

    def text(self) -> str:
        """The rendered, visible text of the body (what a reader sees, tags not interpreted)."""
        return self.page.inner_text("body")

    def count(self, selector: str) -> int:
        return self.page.locator(selector).count()


@dataclass(frozen=True)
class PageReport:
    text: str
    console_errors: list[str]
    page_errors: list[str]
    dialogs: list[str]
    external_requests: list[str]
    counts: dict[str, int]


def require_chromium() -> Path:
    """Path of the system Chromium; a clear failure (not a skip) when it is missing."""
    if not CHROMIUM.exists():
        raise RuntimeError(f"{CHROMIUM} not found: install Debian's chromium with "
                           "`apt-get update && apt-get install -y chromium` (tests never download a browser)")
    return CHROMIUM


@contextlib.contextmanager
def open_page(path: str | os.PathLike[str], *, wait_for: str | None = None, timeout_ms: int = 15000,
              viewport: tuple[int, int] = (1280, 900)) -> Iterator[BrowserPage]:
    """Load file `path`, wait for the JS expression `wait_for` to be truthy, yield the page and its collectors.
    Dialogs are recorded and dismissed; every non-local request is recorded and aborted."""
    from playwright.sync_api import sync_playwright

    executable = require_chromium()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(executable), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]},
                                          service_workers="block")
            page = context.new_page()
            seen = BrowserPage(page)
            page.on("console", lambda m: seen.console_errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: seen.page_errors.append(str(e)))
            page.on("dialog", lambda d: (seen.dialogs.append(f"{d.type}: {d.message}"), d.dismiss()))

            page.on("request", lambda r: None if r.url.startswith(_LOCAL_SCHEMES) else seen.external_requests.append(r.url))
            context.route(lambda url: not url.startswith(_LOCAL_SCHEMES), lambda route: route.abort())
            page.goto(Path(path).resolve().as_uri(), wait_until="load", timeout=timeout_ms)
            if wait_for:
                page.wait_for_function(wait_for, timeout=timeout_ms)
            yield seen
        finally:
            browser.close()


def inspect_html(path: str | os.PathLike[str], selectors: Sequence[str] = (), *, wait_for: str | None = None,
                 screenshot: str | os.PathLike[str] | None = None, timeout_ms: int = 15000) -> PageReport:
    """Open `path`, wait, and return its visible text, errors, dialogs, blocked requests and selector counts."""
    with open_page(path, wait_for=wait_for, timeout_ms=timeout_ms) as seen:
        if screenshot is not None:
            seen.page.screenshot(path=str(screenshot), full_page=True)
        counts = {s: seen.count(s) for s in selectors}
        return PageReport(seen.text(), list(seen.console_errors), list(seen.page_errors), list(seen.dialogs),
                          list(seen.external_requests), counts)
