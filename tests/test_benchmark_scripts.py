"""The GPU scripts' CPU modes (`--tiny`, in Triton's interpreter): a script broken by a change to
the package is found here, not after a GPU machine has started for it."""

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_script(name, *args):
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), "--tiny", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def test_check_nsa_tiny_compares_with_the_reference(tmp_path):
    """The script's accuracy check, here with the op's reproducible path (--deterministic)."""
    out = run_script("gpu_check_nsa.py", "--out", str(tmp_path), "--deterministic")
    assert (tmp_path / "nsa_triton_errors_tiny_cpu_deterministic.csv").exists()
    summary = out[out.index("== summary =="):].splitlines()[2:]
    assert summary and all(line.rstrip().endswith("ok") for line in summary if line.strip())


def test_first_call_tiny_adds_its_rows_under_a_build_label(tmp_path):
    kept = tmp_path / "first_call_cpu.csv"
    kept.write_text("# an earlier build\nbuild,warm_up,heads,seq_len,warm_s,first_s,second_s,compiled,process_s\n"
                    "earlier,none,2/1,37,,1.0,0.5,0,2.0\ntest,none,2/1,37,,9.0,9.0,9,9.0\n")
    run_script("gpu_first_call.py", "--out", str(tmp_path), "--build", "test")
    with kept.open() as f:
        lines = f.read().splitlines()
    rows = list(csv.DictReader(line for line in lines if not line.startswith("#")))
    assert [r["build"] for r in rows] == ["earlier", "test", "test"]          # the old "test" row replaced
    assert [int(r["seq_len"]) for r in rows[1:]] == [37, 40]
    assert all(float(r["first_s"]) > 0 and r["warm_up"] == "40 tokens" for r in rows[1:])
    assert lines[0] == "# an earlier build" and lines[1].startswith("# build test:")


def test_specialisation_tiny_runs_every_kernel_and_variant():
    out = run_script("gpu_specialisation.py")
    lines = [line for line in out.splitlines() if line.endswith(("same", "DIFFERENT"))]
    assert len(lines) == 4 * 4 and all(   # 4 kernels x shipped, all specialised, all unspecialised, no alignment
        line.endswith("same") for line in lines), out


def test_select_registers_compiles_the_selection_for_a_gpu_offline():
    """No GPU needed: Triton compiles the kernel for sm_90 and cuobjdump reads its resources."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "select_registers.py")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if "registers" in line]
    assert len(lines) == 6 and sum("(packed)" in line for line in lines) == 3, done.stdout   # both ways, 3 groups
    for line in lines:
        registers = int(line.split(": ")[1].split()[0])
        assert 0 < registers <= 255, line


OFFLINE_COPY = """
import sys
import torch
import triton
import triton.language as tl
sys.path.insert(0, sys.argv[1])
from offline_compile import compile_launch


@triton.jit
def copy_rows(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < n), mask=offs < n)


x = torch.empty(1024, dtype=torch.bfloat16)
print(compile_launch(copy_rows, (x, x, 1024), {"BLOCK": 1024, "num_warps": 4}).asm["ptx"])
"""


def test_offline_compile_specialises_arguments_as_the_jit_does(tmp_path):
    """No GPU needed: a recorded launch compiles as Triton's JIT would compile it on a GPU, with its
    16-byte-aligned pointers and its n (a multiple of 16) known to be so, hence 16-byte loads and
    stores (eight bf16 each). Without that, every load is one element wide, no copy is pipelined,
    and the registers and spills the offline scripts report are not the GPU's."""
    script = tmp_path / "copy_rows.py"
    script.write_text(OFFLINE_COPY)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(script), str(ROOT / "benchmarks")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert re.search(r"ld\.global(\.\w+)*\.v4\.b32", done.stdout), done.stdout[-3000:]
    assert re.search(r"st\.global(\.\w+)*\.v4\.b32", done.stdout), done.stdout[-3000:]


def test_decode_kernels_compile_for_a_gpu_offline():
    """No GPU needed: every decoding kernel compiles for sm_90, with the launcher's meta-parameters,
    in bounded time (stage 3 once never finished compiling: Triton's layout pass looped)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode_compile.py")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if "compiled in" in line]
    assert len(lines) == 5 * (4 + 4), done.stdout        # five shapes: four cache writes, four attention kernels
    assert all(float(line.split("compiled in ")[1].split()[0]) < 60 for line in lines), done.stdout


def test_loop_loads_finds_no_wait_in_the_decoding_steps_writers_or_attention_loops():
    """No GPU needed: compiled for sm_90, the MLP writer's, the shares' write and the attention's
    loops hold no load their step waits for (the position embedding fetched a step ahead, the sum
    of the shares unrolled); mean pooling's write, a position at a time over a contiguous cache,
    and stage 2's later selection steps, gathering scores, wait."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "loop_loads.py"), "--only", "decode"], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    verdicts = {}
    for line in done.stdout.splitlines():
        if "tokens: " in line:
            label, kernel, verdict = line.rsplit(": ", 2)
            verdicts.setdefault(kernel, set()).add(verdict)
    assert len(verdicts) == 8, done.stdout          # append, MLP, the write (two ways), four attention kernels
    assert verdicts["compress_mlp_kernel"] == {"2 loads in loops, 0 waited for in the step"}, done.stdout
    for kernel in ("append_tokens_kernel", "write_blocks_kernel (the MLP's shares)", "decode_compressed_kernel",
                   "decode_sparse_kernel", "decode_merge_kernel"):
        assert verdicts[kernel] == {"none"}, (kernel, done.stdout)
    for kernel in ("write_blocks_kernel (mean pooling)", "decode_select_kernel"):
        assert all("waited for in the step" in v and not v.endswith(" 0 waited for in the step")
                   for v in verdicts[kernel]), (kernel, done.stdout)


def test_warp_specialisation_partitions_only_a_descriptor_loop_of_four_warps():
    """No GPU needed: compiled for sm_90, Triton splits the toy attention loop into warp groups only
    when its keys come through tensor descriptors and it has 4 warps (the appendix's claim)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    variants = ["ptr m128 w8 s2", "desc m128 w4 s2", "desc WS m128 w4 s2", "desc WS m128 w8 s2"]
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_warp_specialise.py"), "--offline",
                           "--variants", ",".join(variants)], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    found = {line[:22].strip(): line.split()[line.split().index("partitioned") + 1]
             for line in done.stdout.splitlines() if "partitioned" in line}
    assert found == {"ptr m128 w8 s2": "False", "desc m128 w4 s2": "False", "desc WS m128 w4 s2": "True",
                     "desc WS m128 w8 s2": "False"}, done.stdout


def test_host_step_times_a_step_through_tritons_launch_path():
    """No GPU needed: host_step.py runs a layer's decoding steps with Triton's own launch path (a
    driver that launches nothing) and reports the host time of a step; its profile shows the
    launches went through Triton's JIT, not around it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "host_step.py"), "--context", "64", "--steps",
                           "20", "--profile", "60"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert re.search(r"\d+ us of host time per layer step", done.stdout), done.stdout[-2000:]
    assert re.search(r"triton/runtime/jit\.py:\d+\(run\)", done.stdout), done.stdout[-3000:]
    assert "sparse_attention_decode_triton" in done.stdout, done.stdout[-3000:]


def test_band_registers_compiles_the_band_kernels_for_a_gpu_offline():
    """No GPU needed: the band kernels' recorded launches compile for sm_90 (one head config)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "band_registers.py"), "--heads", "64/4"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    launchers = [line for line in done.stdout.splitlines() if line.endswith("(launcher)")]
    assert len(launchers) == 6, done.stdout                  # forward, dq, dk dv of two bands
    assert all(0 < int(line.split(": ")[1].split()[0]) <= 255 for line in launchers), done.stdout


def test_key_block_kernels_add_atomically_without_fences():
    """No GPU needed: chapter 8b's gather kernel compiles for sm_90 to atomic adds with relaxed ordering,
    with no GPU-wide fence nor L1 invalidation around them (Triton's default, acq_rel, puts both
    around every atomic instruction)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "atomics_sass.py")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if "atomic instructions" in line]
    assert len(lines) == 1, done.stdout                      # the backward's gather kernel
    for line in lines:
        atomics, ordering = (int(part.split()[0]) for part in line.split(": ")[1].split(", ")[:2])
        assert atomics > 0 and ordering == 0, line


def test_key_block_tiles_sweep_checks_every_variant(tmp_path):
    """The key-block-centric tile sweep re-makes each recorded launch (partials, merge, gather)
    with another tile and finds it equal."""
    run_script("gpu_key_block_tiles.py", "--out", str(tmp_path))
    with (tmp_path / "key_block_tiles_tiny.csv").open() as f:
        rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    assert [row["kernel"] for row in rows] == ["partials"] * 2 + ["merge"] * 2 + ["gather"] * 2, rows
    assert [row["shipped"] for row in rows] == ["True", "False"] * 3
    assert all(float(row["difference"]) < 1e-5 for row in rows), rows


def test_band_tiles_sweep_checks_every_variant(tmp_path):
    """The tile sweep re-makes each recorded band launch with another tile and finds it equal."""
    run_script("gpu_band_tiles.py", "--out", str(tmp_path))
    with (tmp_path / "band_tiles_tiny.csv").open() as f:
        rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    assert len(rows) == 12, rows                   # 3 kernels x 2 bands x (launcher + 1 variant)
    assert sum(row["shipped"] == "True" for row in rows) == 6
    assert all(float(row["difference"]) < 1e-5 for row in rows), rows


def test_packed_check_reports_each_tensor_and_the_selections():
    """gpu_packed.py's check, on the CPU: every tensor's worst error and, per document, the rows
    whose Triton selection equals float64's own."""
    out = run_script("gpu_packed.py")
    line = next(line for line in out.splitlines() if line.startswith("4/2: worst relative error"))
    for name in ("o", "dq", "dk", "dv", "dk_cmp", "dv_cmp", "dg_cmp", "dg_slc", "dg_win"):
        assert re.search(rf"[( ]{name} [0-9.]+e", line), line
    assert "161: " in line, line
    assert float(line.split("per document: ")[1].split()[0]) < 1e-2, line


def test_training_variants_smoke_run_writes_the_chapters_columns(tmp_path):
    """Chapter 12's variants script, two variants for two steps: one row each, every measure a rate."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cpu_training_variants.py"), "--out",
                           str(tmp_path), "--only", "0", "3", "--steps", "2"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    with (tmp_path / "training_variants_cpu.csv").open() as f:
        assert f.readline().startswith("# python benchmarks/cpu_training_variants.py")
        rows = list(csv.DictReader(f))
    assert [row["steps"] for row in rows] == ["2", "2"] and "gate" in rows[1]["variant"]
    for row in rows:
        assert all(0 <= float(row[key]) <= 1 for key in ("accuracy_beyond_window", "accuracy_free_slot",
                                                         "selection_min", "selection_max", "chance")), row


def test_gather_chunks_tiny_compares_the_two_chunkings():
    """Both chunkings of the gather kernel's reverse index give the same dk, dv (to rounding); in the
    interpreter, whose programs run in turn, every run the same bits."""
    out = run_script("gpu_gather_chunks.py", "--heads", "4/2")
    row = next(line.split() for line in out.splitlines() if line.strip().startswith("4/2"))
    assert row[3:5] == ["0", "0"] and float(row[5]) < 1e-5, out


def test_deterministic_tiny_reproduces_and_matches_the_default():
    """The whole op's reproducible path against the default one (in the interpreter one run of
    each, whose programs run in turn: whether two runs give the same bits is a GPU's question)."""
    out = run_script("gpu_deterministic.py", "--heads", "4/2")
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("4/2")]
    assert [row[1] for row in rows[-2:]] == ["default", "deterministic"], out
    assert float(rows[-1][5]) < 1e-5, out            # the interpreter: one run each (-1: not counted)


def test_select_tiles_tiny_launches_the_selection_kernel_by_hand():
    """The one script that writes a package kernel's launch by hand (its meta-parameters by name)."""
    out = run_script("gpu_select_tiles.py")
    assert re.search(r"positions\s+16 \(rows\s+32\) step 16 warps 4 stages 2: .* same$", out, re.M), out


def test_decode_layers_tiny_keeps_other_builds_rows(tmp_path):
    run_script("gpu_decode_layers.py", "--out", str(tmp_path), "--build", "first", "--kv-per-branch")
    out = run_script("gpu_decode_layers.py", "--out", str(tmp_path), "--build", "second", "--dense")
    assert out.count("ms a token") == 2 and "dense baseline:" in out
    lines = (tmp_path / "decode_layers_cpu.csv").read_text().splitlines()
    assert [line.split(";")[0] for line in lines if line.startswith("#")] == [
        "# python benchmarks/gpu_decode_layers.py --tiny --out " + str(tmp_path) + " --build first --kv-per-branch",
        "# python benchmarks/gpu_decode_layers.py --tiny --out " + str(tmp_path) + " --build second --dense"]
    rows = list(csv.DictReader(line for line in lines if not line.startswith("#")))
    assert [r["build"] for r in rows] == ["first", "second", "dense baseline"]
    assert all(float(r["ms_per_token"]) > 0 and float(r["ms_per_token_synced"]) > 0 for r in rows)


def test_check_layer_cache_tiny_meets_its_goal(tmp_path):
    out = run_script("gpu_check_layer_cache.py", "--out", str(tmp_path))
    table = out[out.index(" dtype "):].splitlines()[1:]
    assert len(table) == 2 and all(line.endswith("ok") for line in table), out          # mlp, kv-per-branch
    assert (tmp_path / "layer_cache_check_cpu.csv").read_text().startswith("# python benchmarks/gpu_check_layer_cache.py")


def test_a_second_checkout_runs_its_own_kernels(tmp_path):
    """A checkout beside another that is installed in editable mode (a build to compare against):
    its nsa loads its own kernels/, not the installed checkout's. (It needs the other install: a
    machine where this checkout is not installed in editable mode has nothing else to find.)"""
    probe = subprocess.run([sys.executable, "-c", "import sys; print(any('editable' in repr(f) for f in sys.meta_path))"],
                           cwd="/", capture_output=True, text=True, timeout=60)
    if probe.stdout.strip() != "True":
        pytest.skip("no checkout is installed in editable mode: no other nsa.kernels to find")
    for name in ("nsa", "kernels"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    code = f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import nsa; print(nsa.__file__, nsa.kernels.__file__)"
    done = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TRITON_INTERPRET="1"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert [Path(p) for p in done.stdout.split()] == [tmp_path / "nsa" / "__init__.py",
                                                       tmp_path / "kernels" / "__init__.py"], done.stdout


def test_a_source_checkout_imports_the_kernels_without_installing():
    """`python benchmarks/...` from a checkout that was never `pip install`ed: nsa loads kernels/
    beside itself as nsa.kernels (pyproject's mapping), so the Triton backend registers."""
    code = ("import sys; sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f)]; "
            f"sys.path.insert(0, {str(ROOT)!r}); import importlib.util, nsa; "
            "print(nsa.kernels.__file__, sorted(nsa.available_backends()), importlib.util.find_spec('nsa.tests'))")
    done = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TRITON_INTERPRET="1"))
    assert done.returncode == 0, done.stderr[-2000:]
    path, backends = done.stdout.split(" ", 1)
    assert Path(path) == ROOT / "kernels" / "__init__.py" and "'triton'" in backends, done.stdout
    assert backends.rstrip().endswith("None"), done.stdout          # kernels/ alone: no nsa.tests and the like
