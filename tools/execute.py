"""Execute the chapters once, in parallel, into the jupyter-cache that the book build reads.

    python tools/execute.py [--fresh] [--jobs N] book/*.ipynb  # execute, cache, fail on an error
    python tools/execute.py --check book/*.ipynb               # execute nothing: all cached?

`_config.yml` sets `execute_notebooks: cache`, so myst-nb (inside `jupyter-book build`) looks each
notebook up in the jupyter-cache and only executes the ones it misses. This script fills that
cache first, the way myst-nb's own cache client does on a miss (myst_nb/core/execute/cache.py):
the notebook read with nbformat as version 4, executed by jupyter-cache's `single_nb_execution`
(nbclient, the notebook's kernel, cwd = the notebook's folder, `execute.timeout` and
`execute.allow_errors` from _config.yml), then stored with `cache_notebook_bundle`, which keys it
by the hash of its code cells and kernelspec, the key myst-nb matches. The differences: several
notebooks run at once (one kernel each, in worker processes; only this process writes the cache's
database), and a failure is reported by notebook and cell, with the cell's source and traceback,
and exits 1. A notebook that did run is then looked up as myst-nb will: a miss also exits 1.

The cache key is the notebook's code, not the package's: a chapter that imports `nsa` would match
a record made with an older package. `--fresh` deletes the cache first; `make test` and `make
book` always pass it.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

import nbformat
import yaml
from jupyter_cache import get_cache
from jupyter_cache.base import CacheBundleIn
from jupyter_cache.cache.db import NbProjectRecord
from jupyter_cache.executors.utils import single_nb_execution
from nbclient.exceptions import CellExecutionError, CellTimeoutError

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# jupyter-book's default for `execute.cache`: myst-nb puts it beside the html output folder.
DEFAULT_CACHE = "_build/.jupyter_cache"
CELL_ERRORS = (CellExecutionError, CellTimeoutError)


def read_notebook(path: Path) -> nbformat.NotebookNode:
    """Read a notebook as myst-nb does (myst_nb.core.read.standard_nb_read)."""
    return nbformat.reads(path.read_text(encoding="utf8"), as_version=4)


def execution_settings(config: Path) -> dict:
    """The `execute:` settings of a Jupyter Book _config.yml, with jupyter-book's defaults."""
    book_config = (yaml.safe_load(config.read_text()) if config.exists() else None) or {}
    execute = book_config.get("execute") or {}
    return {
        "cache": execute.get("cache") or DEFAULT_CACHE,
        "timeout": execute.get("timeout", 30),
        "allow_errors": execute.get("allow_errors", False),
        "run_in_temp": execute.get("run_in_temp", False),
    }


KERNEL_STARTS = 3   # tries to start a notebook's kernel before its failure counts (see execute_one)


def execute_one(job: tuple[str, int, bool, bool]) -> dict:
    """Run in a worker process: execute one notebook; return it (as JSON) or where it failed.

    A failure before the first cell ran (a kernel that did not start) is tried again, up to
    KERNEL_STARTS times in all: nothing of the notebook has run, and a kernel's start can lose a
    race that is not the notebook's — jupyter_client picks free ports and the kernel binds them
    later, so kernels starting side by side (the jobs, a test suite beside them) now and then
    take the same one ("Address already in use"). A cell's error is never run again."""
    for starts in range(1, KERNEL_STARTS + 1):
        result = _execute_once(job)
        if result["ok"] or result["cell"] is not None:
            break
    result["kernel_starts"] = starts
    return result


def _execute_once(job: tuple[str, int, bool, bool]) -> dict:
    """One try of `execute_one`."""
    path, timeout, allow_errors, run_in_temp = job
    nb = read_notebook(Path(path))
    current = {"index": None}

    def on_cell_execute(cell, cell_index, **_):
        current["index"] = cell_index

    start = time.time()
    folder = str(Path(path).parent)
    cwd_context = tempfile.TemporaryDirectory() if run_in_temp else nullcontext(folder)
    try:
        with cwd_context as cwd:
            result = single_nb_execution(
                nb, cwd=str(Path(cwd).resolve()), timeout=timeout, allow_errors=allow_errors,
                meta_override=True, on_cell_execute=on_cell_execute,
            )
        err, exc_string, seconds = result.err, result.exc_string, result.time
    except Exception as e:  # a dead kernel, a kernel that does not start: not a cell's error
        err, exc_string, seconds = e, traceback.format_exc(), time.time() - start
    if err is None:
        return {"path": path, "ok": True, "seconds": seconds, "nb": nbformat.writes(nb), "cell": None}
    index = current["index"]
    cell = nb.cells[index] if index is not None else None
    return {
        "path": path, "ok": False, "seconds": seconds,
        "cell": index, "cells": len(nb.cells),
        "execution_count": cell.get("execution_count") if cell is not None else None,
        "error": type(err).__name__,
        # A cell's error or timeout reads as the cell's source and the kernel's traceback;
        # anything else (a dead kernel) gets the Python traceback.
        "message": ANSI.sub("", str(err) if isinstance(err, CELL_ERRORS) else exc_string),
        "traceback": exc_string,
    }


def where(r: dict) -> str:
    """Which cell failed, counted as a reader of the notebook counts them."""
    if r["cell"] is None:
        return f"before the first cell (its kernel tried to start {r['kernel_starts']} times)"
    return (f"cell {r['cell'] + 1} of {r['cells']} (counting markdown cells; index {r['cell']},"
            f" In [{r['execution_count']}])")


def describe_failure(r: dict) -> str:
    bar = "=" * 100
    head = f"FAILED {r['shown']}: {r['error']} in {where(r)}"
    return f"{bar}\n{head}\n{bar}\n{r['message'].rstrip()}\n{bar}"


def check(cache, paths: list[Path]) -> list[str]:
    """The notebooks for which myst-nb's lookup (match_cache_notebook) would miss, so execute."""
    missing = []
    for path in paths:
        try:
            cache.match_cache_notebook(read_notebook(path))
        except KeyError:
            missing.append(str(path))
    return missing


def book_environment() -> dict:
    """What the chapters' kernels inherit so that the book's outputs hold no console noise.

    * `TQDM_DISABLE=1`: no progress bars (tqdm reads its defaults from `TQDM_*` variables).
    * Without CUDA, `TRITON_INTERPRET=1` is set here, before any kernel starts: `import nsa`
      then has nothing to switch on and no warning to print into every chapter's first output.
      A user importing `nsa` on a CPU is still told once (nsa/device.py); the book says it in
      its intro and in chapter 7.
    """
    env = {"TQDM_DISABLE": "1"}
    if os.environ.get("NSA_DEVICE") == "cpu" or not _has_cuda():
        env["TRITON_INTERPRET"] = "1"
    return env


def _has_cuda() -> bool:
    import torch  # here, not at the top: --check needs no torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--config", type=Path, default=Path("_config.yml"),
                        help="Jupyter Book config to read `execute:` from (default: _config.yml)")
    parser.add_argument("--cache", help="jupyter-cache folder (default: execute.cache, else "
                        f"{DEFAULT_CACHE}; a relative path is taken from the current folder)")
    parser.add_argument("--jobs", "-j", type=int, default=2,
                        help="notebooks run at once (default 2)")
    parser.add_argument("--fresh", action="store_true", help="delete the cache first")
    parser.add_argument("--check", action="store_true",
                        help="execute nothing; fail unless every notebook is in the cache")
    args = parser.parse_args(argv)

    settings = execution_settings(args.config)
    cache_path = Path(args.cache or settings["cache"])
    paths = [p.resolve() for p in args.notebooks]
    for p in paths:
        if not p.is_file():
            parser.error(f"no such notebook: {p}")
        # myst-nb lets a notebook's metadata override the execution settings; this script does not
        # read those, so it refuses a notebook that sets them rather than run it differently.
        mystnb = read_notebook(p).metadata.get("mystnb", {})
        overrides = [key for key in mystnb if key.startswith("execution")]
        if overrides:
            parser.error(f"{p}: metadata.mystnb sets {overrides}; tools/execute.py ignores those")

    if args.check:
        missing = check(get_cache(str(cache_path)), paths)
        for path in missing:
            print(f"not in the cache {cache_path}: {path}")
        print(f"{len(paths) - len(missing)} of {len(paths)} notebooks cached in {cache_path}")
        return 1 if missing else 0

    if args.fresh and cache_path.exists():
        shutil.rmtree(cache_path)
    cache = get_cache(str(cache_path))
    print(f"executing {len(paths)} notebooks, {args.jobs} at a time, timeout"
          f" {settings['timeout']} s a cell, into {cache_path}", flush=True)

    for name, value in book_environment().items():  # the workers and their kernels inherit these
        os.environ.setdefault(name, value)
    jobs = [(str(p), settings["timeout"], settings["allow_errors"], settings["run_in_temp"])
            for p in paths]
    failures, start = [], time.time()
    # Workers only execute; this process alone writes the cache (one SQLite writer).
    with multiprocessing.get_context("spawn").Pool(max(1, min(args.jobs, len(jobs)))) as pool:
        for r in pool.imap_unordered(execute_one, jobs):
            r["shown"] = _relative(r["path"])
            record = cache.add_nb_to_project(r["path"])  # as myst-nb does (`jcache project list`)
            if r["ok"]:
                nb = nbformat.reads(r["nb"], as_version=4)
                NbProjectRecord.remove_tracebacks([record.pk], cache.db)
                cache.cache_notebook_bundle(
                    CacheBundleIn(nb, record.uri, data={"execution_seconds": r["seconds"]}),
                    check_validity=False, overwrite=True,
                )
                started = f" (its kernel started at try {r['kernel_starts']})" if r["kernel_starts"] > 1 else ""
                print(f"ok     {r['seconds']:7.1f} s  {r['shown']}{started}", flush=True)
            else:
                NbProjectRecord.set_traceback(record.uri, r["traceback"], cache.db)
                failures.append(r)
                print(f"FAILED {r['seconds']:7.1f} s  {r['shown']}", flush=True)
                print(describe_failure(r), flush=True)

    # What the book build will look up: a miss here would make it execute that notebook again.
    failed = {r["path"] for r in failures}
    missing = check(cache, [p for p in paths if str(p) not in failed])
    print(f"{len(paths) - len(failures)} of {len(paths)} notebooks executed without error"
          f" in {time.time() - start:.0f} s")
    for r in failures:
        print(f"  FAILED {r['shown']}: {r['error']} in {where(r)}")
    for path in missing:
        print(f"  executed, but myst-nb's lookup misses it (the build would run it again): {path}")
    return 1 if failures or missing else 0


def _relative(path: str) -> str:
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


if __name__ == "__main__":
    sys.exit(main())
