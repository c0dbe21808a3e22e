"""The tools behind what a reader sees: directive hiding, the source archive, the chapter
runner's environment and the browser check's rules (the browser itself runs in `make test`)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import browser_check  # noqa: E402
import execute  # noqa: E402
import hide_directives  # noqa: E402
import source_archive  # noqa: E402


def test_strip_directives_keeps_the_code():
    assert hide_directives.strip_directives("#| export\nimport torch\n") == "import torch"
    assert hide_directives.strip_directives("#| default_exp selection") == ""
    assert hide_directives.strip_directives("#| export kernels.common\n\n@triton.jit\ndef f(): ...") == (
        "@triton.jit\ndef f(): ...")
    # only the leading directive lines: a `#|` later in a cell is code (or a string) and stays
    source = "x = 1\n#| not a head\n"
    assert hide_directives.strip_directives(source) == source


def test_source_archive_holds_the_repository():
    files = {p.relative_to(ROOT).as_posix() for p in source_archive.source_files(ROOT)}
    assert {"pyproject.toml", "requirements.txt", "book/intro.md", "nsa/__init__.py"} <= files
    assert not any(name.startswith((".venv/", "_build/", ".git/")) for name in files)


def test_chapter_runner_environment(monkeypatch):
    monkeypatch.setattr(execute, "_has_cuda", lambda: False)
    monkeypatch.delenv("NSA_DEVICE", raising=False)
    assert execute.book_environment() == {"TQDM_DISABLE": "1", "TRITON_INTERPRET": "1"}
    monkeypatch.setattr(execute, "_has_cuda", lambda: True)
    assert execute.book_environment() == {"TQDM_DISABLE": "1"}  # a GPU keeps real kernels


def clean_report(**changes):
    report = {"math": 2, "typeset": 2, "untypeset": [], "mathjax_errors": [], "broken_images": [],
              "outputs": ["loss 0.1", "configs 100% done"], "stderr": 0,
              "prose": "Attention, plain text.", "page": "Attention, plain text.\nimport torch"}
    report.update(changes)
    return report


def test_browser_check_rules():
    assert browser_check.check_page(clean_report()) == []
    found = {
        "untypeset": clean_report(untypeset=["\\(x\\)"]),
        "raw TeX": clean_report(prose="see \\(x^2\\) here"),
        "images": clean_report(broken_images=["fig.png"]),
        "stderr": clean_report(stderr=1),
        "warning": clean_report(outputs=["/x.py:3: UserWarning: nsa: no CUDA device"]),
        "traceback": clean_report(outputs=["Traceback (most recent call last):"]),
        "progress bar": clean_report(outputs=["nsa:  40%|████      | 120/300 [00:10<00:15, 11.9it/s]"]),
        "role": clean_report(page="as in {eq}`eq-attn`"),
        "directive": clean_report(page="code\n#| export\nimport torch"),
    }
    for what, report in found.items():
        assert browser_check.check_page(report), what


def test_browser_check_links(tmp_path):
    (tmp_path / "book").mkdir()
    (tmp_path / "book" / "a.html").write_text(
        '<h1 id="top">A</h1><a href="b.html#part">ok</a><a href="b.html#gone">bad anchor</a>'
        '<a href="missing.html">bad file</a><a href="https://example.org/x">external</a>'
        '<a href="#top">self</a><a href="../_downloads/src.zip">download</a>')
    (tmp_path / "book" / "b.html").write_text('<section id="part"></section>')
    (tmp_path / "_downloads").mkdir()
    (tmp_path / "_downloads" / "src.zip").write_bytes(b"PK")
    broken = browser_check.broken_links(tmp_path / "book" / "a.html", tmp_path, {})
    assert broken == ["b.html#gone", "missing.html"]
