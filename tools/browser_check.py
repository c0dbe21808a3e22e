"""Open every page of the built book in headless Chromium and check what a reader sees.

    python tools/browser_check.py [_build/html] [--chromium /usr/bin/chromium]

For each page of the book (the HTML that `jupyter-book build` wrote, less Sphinx's index and
search pages) it asserts:

* the maths rendered: MathJax (served from the book's own `_static`, no network) typeset every
  formula, and no raw `\\(`, `\\[` or `$$` is left in the text;
* every image loaded (complete, with a non-zero natural width);
* no cell output holds a traceback, a warning, a progress bar or a stderr box;
* no leaked MyST role (`{eq}`, `{ref}`, ...) or exporter directive (`#| export`) is on the page;
* every local link resolves: the file exists and, for `page.html#anchor`, the anchor does.

The browser runs with every request outside the book's folder blocked, as on a machine without a
network. A screenshot of each page (the whole page, 1200 px wide) goes to
`_build/screenshots/<page>.jpg` for a person to look at (JPEG: a tall page encodes in half the
time of a PNG, and the whole check stays under a minute or so). Exits 1 on any failure, listing them all,
and prints 'N passed, N failed' (one per page).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

SKIP_PAGES = {"genindex.html", "search.html"}
ROLE = re.compile(r"\{(eq|ref|numref|doc|math|cite|term|download)\}`")
DIRECTIVE = re.compile(r"^\s*#\|", re.MULTILINE)
RAW_MATH = re.compile(r"\\\(|\\\[|\$\$")
PROGRESS = re.compile(r"\d+%\|[^\n]*\||it/s\]|s/it\]")
# sphinx-thebe, which jupyter-book always loads (this book has no launch button that uses it),
# writes its `const THEBE_JS_URL` script into each page twice; the second declaration throws and
# changes nothing on the page.
KNOWN_JS_ERROR = re.compile(r"Identifier 'THEBE_JS_URL' has already been declared")
REDIRECT = re.compile(r'http-equiv="refresh"[^>]*url=([^"#]+)', re.IGNORECASE)
OUTPUT_JUNK = re.compile(r"Traceback|Warning|warnings\.warn")

# What the page reports, in one evaluation after MathJax has finished.
PAGE_REPORT = """() => {
  const text = el => el.innerText || '';
  const prose = document.querySelector('main') || document.body;
  const clone = prose.cloneNode(true);
  clone.querySelectorAll('pre, code, script, style, mjx-container, .cell_output').forEach(e => e.remove());
  return {
    math: document.querySelectorAll('.math').length,
    typeset: document.querySelectorAll('.math mjx-container').length,
    untypeset: Array.from(document.querySelectorAll('.math'))
      .filter(e => !e.querySelector('mjx-container')).map(e => text(e).slice(0, 80)),
    mathjax_errors: Array.from(document.querySelectorAll('mjx-merror'))
      .map(e => e.getAttribute('data-mjx-error') || text(e)).slice(0, 5),
    broken_images: Array.from(document.images)
      .filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src')),
    outputs: Array.from(document.querySelectorAll('.cell_output')).map(text),
    stderr: document.querySelectorAll('.cell_output .stderr, .cell_output .output.stderr').length,
    prose: text(clone),
    page: text(document.body),
  };
}"""


class Anchors(HTMLParser):
    """The ids and hrefs of one HTML file."""

    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if attrs.get("id"):
            self.ids.add(attrs["id"])
        if tag == "a" and attrs.get("name"):
            self.ids.add(attrs["name"])
        if tag == "a" and attrs.get("href"):
            self.hrefs.append(attrs["href"])


def parse(path: Path, cache: dict[Path, Anchors]) -> Anchors:
    if path not in cache:
        parser = Anchors()
        parser.feed(path.read_text(encoding="utf8", errors="replace"))
        cache[path] = parser
    return cache[path]


def broken_links(page: Path, html_root: Path, cache: dict[Path, Anchors]) -> list[str]:
    """Local links of `page` whose file or anchor does not exist."""
    broken = []
    for href in parse(page, cache).hrefs:
        parts = urlsplit(href)
        if parts.scheme or parts.netloc or href.startswith(("mailto:", "javascript:")):
            continue
        target = (page.parent / unquote(parts.path)).resolve() if parts.path else page
        if target.is_dir():
            target = target / "index.html"
        if not target.exists() or html_root.resolve() not in target.parents:
            broken.append(href)
        elif parts.fragment and target.suffix == ".html":
            if unquote(parts.fragment) not in parse(target, cache).ids:
                broken.append(href)
    return broken


def check_page(report: dict) -> list[str]:
    problems = []
    if report["untypeset"]:
        problems.append(f"{len(report['untypeset'])} of {report['math']} formulas not typeset by "
                        f"MathJax, e.g. {report['untypeset'][0]!r}")
    if report["mathjax_errors"]:
        problems.append(f"MathJax errors: {report['mathjax_errors']}")
    raw = RAW_MATH.search(report["prose"])
    if raw:
        at = raw.start()
        problems.append(f"raw TeX in the text: {report['prose'][max(0, at - 40):at + 40]!r}")
    if report["broken_images"]:
        problems.append(f"images not loaded: {report['broken_images']}")
    if report["stderr"]:
        problems.append(f"{report['stderr']} stderr output box(es)")
    for output in report["outputs"]:
        for pattern, what in ((OUTPUT_JUNK, "traceback or warning"), (PROGRESS, "progress bar")):
            found = pattern.search(output)
            if found:
                at = found.start()
                problems.append(f"{what} in an output: {output[max(0, at - 60):at + 60]!r}")
    for pattern, what in ((ROLE, "leaked MyST role"), (DIRECTIVE, "exporter directive")):
        found = pattern.search(report["page"])
        if found:
            at = found.start()
            problems.append(f"{what} on the page: {report['page'][max(0, at - 40):at + 60]!r}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("html", nargs="?", type=Path, default=Path("_build/html"))
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--screenshots", type=Path, default=Path("_build/screenshots"))
    args = parser.parse_args(argv)

    from playwright.sync_api import sync_playwright  # here: --help needs no browser

    html_root = args.html.resolve()
    pages = sorted(p for p in html_root.rglob("*.html")
                   if not {"_static", "_sources", "_images"} & set(p.relative_to(html_root).parts)
                   and p.name not in SKIP_PAGES)
    if not pages:
        print(f"no HTML pages under {html_root}: build the book first (make book)")
        return 1
    args.screenshots.mkdir(parents=True, exist_ok=True)
    root_url = html_root.as_uri()
    links: dict[Path, Anchors] = {}
    failures: dict[str, list[str]] = {}
    start = time.time()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=args.chromium,
                                             args=["--no-sandbox", "--disable-gpu"])
        context = browser.new_context(viewport={"width": 1200, "height": 900})
        blocked: list[str] = []

        def offline(route):  # the book must not need the network
            if route.request.url.startswith(root_url) or route.request.url.startswith("data:"):
                route.continue_()
            else:
                blocked.append(route.request.url)
                route.abort()

        context.route("**/*", offline)
        for path in pages:
            name = str(path.relative_to(html_root))
            redirect = REDIRECT.search(path.read_text(encoding="utf8", errors="replace"))
            if redirect:  # index.html: only its target must exist
                target = (path.parent / redirect.group(1)).resolve()
                problems = [] if target.exists() else [f"redirects to a missing page: {target}"]
                print(f"{'ok  ' if not problems else 'FAIL'} {name}: redirects to "
                      f"{redirect.group(1)}", flush=True)
                if problems:
                    failures[name] = problems
                continue
            page = context.new_page()
            console_errors: list[str] = []
            page.on("pageerror", lambda error: console_errors.append(str(error)))
            blocked.clear()
            page.goto(path.as_uri(), wait_until="load")
            if page.evaluate("() => document.querySelectorAll('.math').length") > 0:
                try:
                    page.wait_for_function("() => window.MathJax && MathJax.startup && "
                                           "MathJax.startup.promise", timeout=20_000)
                    page.evaluate("() => MathJax.startup.promise")
                except Exception as error:  # noqa: BLE001: reported as the page's failure
                    console_errors.append(f"MathJax did not start: {type(error).__name__}")
            report = page.evaluate(PAGE_REPORT)
            problems = check_page(report)
            problems += [f"local link does not resolve: {href}"
                         for href in broken_links(path, html_root, links)]
            problems += [f"JavaScript error: {e}" for e in console_errors if not KNOWN_JS_ERROR.search(e)]
            problems += [f"request outside the book (blocked): {url}" for url in blocked[:5]]
            shot = args.screenshots / (path.with_suffix("").relative_to(html_root).as_posix()
                                       .replace("/", "__") + ".jpg")
            shot_start = time.time()
            page.screenshot(path=str(shot), full_page=True, type="jpeg", quality=85)
            shot_seconds = time.time() - shot_start
            page.close()
            status = "ok  " if not problems else "FAIL"
            print(f"{status} {name}: {report['typeset']} formulas, "
                  f"{len(report['outputs'])} outputs -> {shot} ({shot_seconds:.1f} s)", flush=True)
            for problem in problems:
                print(f"       {problem}", flush=True)
            if problems:
                failures[name] = problems
        browser.close()
    print(f"browser check of {len(pages)} pages in {time.time() - start:.0f} s; screenshots in "
          f"{args.screenshots}")
    print(f"{len(pages) - len(failures)} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
