"""Run every chapter of the book top to bottom, as a reader would on a GPU, and report each one.

    python benchmarks/run_book.py --out book/data            # every chapter, in the book's order
    python benchmarks/run_book.py --chapters 06,08 --out /tmp  # some of them

Each chapter runs in a process of its own, from the book/ folder (where its relative paths
point), its code cells executed in order in one namespace — what Jupyter does, without Jupyter
(the GPU image has none) — with matplotlib drawing off-screen. For each chapter: passed, or the
failing cell and the end of its traceback; the wall time; and the peak GPU memory PyTorch
allocated (torch.cuda.max_memory_allocated). Writes book_run_<gpu>.csv (and .log, the full
output) into --out and prints a table last; exits 1 when a chapter fails.
"""

import argparse
import contextlib
import importlib.util
import csv
import json
import linecache
import os
import re
import subprocess
import sys
import time
import traceback
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BOOK = ROOT / "book"


def chapters_in_order() -> list[Path]:
    """The notebooks of book/_toc.yml, in the book's order."""
    toc = (BOOK / "_toc.yml").read_text()
    return [ROOT / f"{name}.ipynb" for name in re.findall(r"file:\s*(book/\S+)", toc)
            if (ROOT / f"{name}.ipynb").exists()]


@contextlib.contextmanager
def ipython_display_stand_in(source: str):
    """While a cell that imports IPython runs where IPython is missing (the GPU image has no Jupyter):
    a stand-in for `IPython.display`, which chapters use to put a table they build on the page
    (`Markdown(text)` keeps the text, `display` prints it). Only for that cell: libraries that
    find an IPython module ask it for more (matplotlib: `get_ipython`, `version_info`)."""
    if "IPython" not in source or importlib.util.find_spec("IPython") is not None:
        yield
        return
    display = types.ModuleType("IPython.display")
    display.Markdown, display.display = type("Markdown", (str,), {}), print
    ipython = types.ModuleType("IPython")
    ipython.display = display
    sys.modules.update({"IPython": ipython, "IPython.display": display})
    try:
        yield
    finally:
        del sys.modules["IPython"], sys.modules["IPython.display"]


def run_one(notebook: Path, report: Path) -> None:
    """In this process: execute the notebook's code cells in order; write a JSON report."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.show = lambda *args, **kwargs: plt.close("all")     # nothing to show off-screen
    os.chdir(notebook.parent)
    sys.path.insert(0, str(ROOT))
    cells = [c for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code"]
    namespace = {"__name__": "__main__"}
    result = dict(chapter=notebook.stem, status="passed", cells=len(cells), failed_cell="", error="")
    start = time.time()
    for index, cell in enumerate(cells):
        source = "".join(cell["source"])
        filename = f"<{notebook.stem} code cell {index}>"
        # as IPython does: inspect.getsource (which @triton.jit reads) finds the cell's lines here
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        try:
            with ipython_display_stand_in(source):
                exec(compile(source, filename, "exec"), namespace)
        except BaseException as error:                     # report it and stop, as a notebook would
            result.update(status="failed", failed_cell=str(index),
                          error=f"{type(error).__name__}: {str(error)[:300]}")
            traceback.print_exc()
            break
    result["seconds"] = round(time.time() - start, 1)
    try:
        import torch
        result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else 0.0
    except ImportError:
        result["peak_gib"] = 0.0
    report.write_text(json.dumps(result))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=BOOK / "data")
    parser.add_argument("--chapters", default=None, help="comma-separated prefixes, e.g. 01,08,engineering")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per chapter")
    parser.add_argument("--one", type=Path, help=argparse.SUPPRESS)       # the child process
    parser.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        run_one(args.one.resolve(), args.report)
        return 0

    import torch

    from nsa.device import gpu_tag
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    tag = gpu_tag()
    notebooks = chapters_in_order()
    if args.chapters:
        wanted = args.chapters.split(",")
        notebooks = [nb for nb in notebooks if any(nb.stem.startswith(w) for w in wanted)]
    args.out.mkdir(parents=True, exist_ok=True)
    log = (args.out / f"book_run_{tag}.log").open("w")
    header = f"# python benchmarks/run_book.py; {gpu}, torch {torch.__version__}"
    try:
        import triton
        header += f", triton {triton.__version__}"
    except ImportError:
        pass
    print(header, file=log, flush=True)
    rows = []
    for notebook in notebooks:
        report = args.out / f".{notebook.stem}.json"
        start = time.time()
        env = dict(os.environ, MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
        try:
            completed = subprocess.run([sys.executable, __file__, "--one", str(notebook), "--report", str(report)],
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                       timeout=args.timeout)
            output = completed.stdout
            row = json.loads(report.read_text()) if report.exists() else dict(
                chapter=notebook.stem, status="failed", failed_cell="", error=f"exit {completed.returncode}")
        except subprocess.TimeoutExpired as timeout:
            output = timeout.stdout or ""
            row = dict(chapter=notebook.stem, status="failed", failed_cell="", error=f"timeout after {args.timeout} s")
        report.unlink(missing_ok=True)
        row.setdefault("seconds", round(time.time() - start, 1))
        row.setdefault("peak_gib", "")
        rows.append(row)
        print(f"== {notebook.stem}: {row['status']} in {row['seconds']} s, peak {row['peak_gib']} GiB "
              f"{row['error']}", flush=True)
        print(f"== {notebook.stem}\n{output}", file=log, flush=True)
    fields = ["chapter", "status", "seconds", "peak_gib", "failed_cell", "error"]
    with (args.out / f"book_run_{tag}.csv").open("w", newline="") as f:
        f.write(header + "\n")
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    total = sum(float(r["seconds"]) for r in rows)
    print(f"\n{'chapter':40s} {'status':8s} {'s':>7s} {'peak GiB':>9s}")
    for r in rows:
        print(f"{r['chapter']:40s} {r['status']:8s} {float(r['seconds']):7.1f} {str(r['peak_gib']):>9s}")
    print(f"{'total':40s} {'':8s} {total:7.1f}")
    return 0 if all(r["status"] == "passed" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
