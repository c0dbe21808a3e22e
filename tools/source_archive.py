"""Sphinx extension: ship the book's source with the book, as `_downloads/nsa-book-source.zip`.

A reader of the HTML gets each chapter from the page's download button, but a chapter imports
`nsa` and some read `book/data/`: they need the repository. After a successful build this
writes a zip of the repository's files (the ones git tracks, or, outside a git checkout, the
folder less `.git`, `.venv` and `_build`) into the HTML output; the intro links to it and says
`pip install -e .` inside it. `_config.yml` loads it through `sphinx.local_extensions`.
"""

import subprocess
import zipfile
from pathlib import Path

ARCHIVE = "nsa-book-source.zip"
SKIP = {".git", ".venv", "_build", ".pytest_cache", "__pycache__", ".ipynb_checkpoints"}


def source_files(root: Path) -> list[Path]:
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True,
                                check=True).stdout.decode().split("\0")
        files = [root / name for name in listed if name]
    except (OSError, subprocess.CalledProcessError):
        files = [p for p in root.rglob("*") if not SKIP & set(p.relative_to(root).parts)]
    return sorted(p for p in files if p.is_file())


def write_archive(app, exception) -> None:
    if exception is not None or app.builder.format != "html":
        return
    root = Path(app.srcdir)
    target = Path(app.outdir) / "_downloads" / ARCHIVE
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in source_files(root):
            archive.write(path, Path("nsa-book") / path.relative_to(root))


def setup(app):
    app.connect("build-finished", write_archive)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
