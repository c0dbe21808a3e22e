"""tools/execute.py runs notebooks once into the jupyter-cache that the book build reads."""

import subprocess
import sys
from pathlib import Path

import nbformat
from jupyter_cache import get_cache
from myst_nb.core.config import NbParserConfig
from myst_nb.core.execute import create_client

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "execute.py"
KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}


def _write(path, cells):
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": KERNELSPEC})
    nb.cells = [nbformat.v4.new_markdown_cell(s) if kind == "md" else nbformat.v4.new_code_cell(s)
                for kind, s in cells]
    nbformat.write(nb, path)
    return path


def _run(tmp_path, *args):
    config = tmp_path / "_config.yml"
    if not config.exists():
        config.write_text("execute:\n  execute_notebooks: cache\n  timeout: 3\n")
    return subprocess.run(
        [sys.executable, SCRIPT, "--config", config, "--cache", tmp_path / "cache", *args],
        capture_output=True, text=True, cwd=tmp_path, timeout=300)


class _Log:
    def __init__(self):
        self.lines = []

    def info(self, msg, **_):
        self.lines.append(msg)

    debug = warning = error = info


def _myst_nb_lookup(path, cache):
    """What the book build does with a notebook in `execute_notebooks: cache` mode."""
    config = NbParserConfig(execution_mode="cache", execution_cache_path=str(cache),
                            execution_raise_on_error=True)
    log = _Log()
    notebook = nbformat.reads(path.read_text(), as_version=4)
    with create_client(notebook, str(path), config, log) as client:
        pass
    return log.lines, client.notebook


def test_passing_notebook_is_cached_where_myst_nb_finds_it(tmp_path):
    book = tmp_path / "book"
    book.mkdir()
    nb = _write(book / "ok.ipynb", [("md", "# ok"), ("code", "x = 6 * 7\nprint(x)"),
                                   ("code", "import os\nprint(os.getcwd())")])
    r = _run(tmp_path, "--jobs", "2", nb)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok" in r.stdout and "1 of 1 notebooks executed without error" in r.stdout

    log, merged = _myst_nb_lookup(nb, tmp_path / "cache")
    assert any(line.startswith("Using cached notebook") for line in log), log
    assert not any("Executing" in line for line in log), log
    assert merged.cells[1].outputs[0]["text"] == "42\n"
    assert merged.cells[2].outputs[0]["text"].strip() == str(book)  # cwd: the notebook's folder
    assert _run(tmp_path, "--check", nb).returncode == 0

    # --fresh empties the cache first: a record of an older notebook is gone.
    other = _write(book / "other.ipynb", [("code", "1 + 1")])
    assert _run(tmp_path, "--fresh", other).returncode == 0
    check = _run(tmp_path, "--check", nb, other)
    assert check.returncode == 1
    assert f"not in the cache {tmp_path / 'cache'}: {nb}" in check.stdout


def test_failing_cell_is_reported_with_notebook_cell_and_traceback(tmp_path):
    ok = _write(tmp_path / "ok.ipynb", [("code", "print('fine')")])
    bad = _write(tmp_path / "bad.ipynb", [
        ("md", "# bad"),
        ("code", "y = 1"),
        ("code", "def divide():\n    return y / 0\n\ndivide()"),
        ("code", "print('never runs')"),
    ])
    slow = _write(tmp_path / "slow.ipynb", [("code", "import time\ntime.sleep(60)")])
    r = _run(tmp_path, "--jobs", "2", ok, bad, slow)
    out = r.stdout
    assert r.returncode == 1, out + r.stderr
    assert "FAILED bad.ipynb: CellExecutionError in cell 3 of 4" in out, out
    assert "return y / 0" in out and "ZeroDivisionError" in out and "division by zero" in out
    assert "\x1b[" not in out  # the kernel's traceback without its colour codes
    # the timeout comes from the config's execute.timeout (3 s here)
    assert "FAILED slow.ipynb: CellTimeoutError in cell 1 of 1" in out, out
    assert "time.sleep(60)" in out
    assert "1 of 3 notebooks executed without error" in out

    # the passing notebook is cached, the failing ones are not
    cache = get_cache(str(tmp_path / "cache"))
    cache.match_cache_notebook(nbformat.read(ok, as_version=4))
    check = _run(tmp_path, "--check", ok, bad, slow)
    assert check.returncode == 1 and "1 of 3 notebooks cached" in check.stdout


def _execute_module():
    """tools/execute.py imported as a module (it is a script, not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("execute_tool", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_kernel_that_fails_to_start_is_started_again_but_a_cell_error_is_not(tmp_path, monkeypatch):
    execute = _execute_module()
    real, calls, lost = execute.single_nb_execution, [], []

    def losing_its_first_start(nb, **kwargs):           # as a kernel whose port was taken meanwhile
        calls.append(1)
        if not lost:
            lost.append(1)
            raise RuntimeError("Address already in use (addr='tcp://127.0.0.1:60967')")
        return real(nb, **kwargs)

    monkeypatch.setattr(execute, "single_nb_execution", losing_its_first_start)
    ok = _write(tmp_path / "ok.ipynb", [("code", "x = 6 * 7")])
    r = execute.execute_one((str(ok), 30, False, False))
    assert r["ok"] and r["kernel_starts"] == 2 and len(calls) == 2

    calls.clear()
    bad = _write(tmp_path / "bad.ipynb", [("code", "x = 1"), ("code", "raise ValueError('a cell')")])
    r = execute.execute_one((str(bad), 30, False, False))
    assert not r["ok"] and r["cell"] == 1 and r["kernel_starts"] == 1 and len(calls) == 1

    def never_starting(nb, **kwargs):
        calls.append(1)
        raise RuntimeError("Address already in use")

    calls.clear()
    monkeypatch.setattr(execute, "single_nb_execution", never_starting)
    r = execute.execute_one((str(ok), 30, False, False))
    assert not r["ok"] and len(calls) == execute.KERNEL_STARTS
    assert execute.where(r) == f"before the first cell (its kernel tried to start {execute.KERNEL_STARTS} times)"
