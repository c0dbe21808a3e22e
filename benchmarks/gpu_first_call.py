"""How long the first call of a new shape takes with the Triton backend (GPU).

    python benchmarks/gpu_first_call.py [--heads 32/32,64/4] [--seq-lens 16k,16385,64k,65000] [--out DIR]
        [--build shipped]

Each shape runs in a fresh Python process, as a user's new training job would: it imports nsa,
makes bf16 inputs (batch 1, d = 128, the paper's geometry) and times (synchronised) one
forward + backward of `native_sparse_attention(..., backend="triton")` at 1000 tokens (the
process's own warm-up: CUDA, loading or compiling the kernels), then the first and the second
call at the shape: the first is what a new shape costs a running job. All processes share one
Triton cache folder, emptied at the start, so the first process pays for compiling everything
("first ever") and each later one finds on disk what earlier shapes compiled; the script also
counts the kernels each process compiled (new entries in the cache folder). `--out DIR` puts the
rows into DIR/first_call_<gpu>.csv under the label `--build` (replacing that label's earlier
rows, keeping the other builds' that the appendix compares). `--tiny` runs the same on small sizes
in Triton's CPU interpreter (which compiles nothing), into DIR/first_call_cpu.csv: a check of the
script only.
"""

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nsa.bench import parse_heads, parse_lengths  # noqa: E402


def child(seq_len, heads_q, heads_kv, tiny):
    """One process: the seconds of a first forward + backward at 1000 tokens (the process's own
    warm-up: CUDA, loading kernels), then of the first and second call at `seq_len`, as JSON."""
    import torch

    import nsa
    from nsa import NSAConfig, compress, native_sparse_attention

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype, dim = (torch.float32, 16) if tiny else (torch.bfloat16, 128)
    config = NSAConfig(16, 8, 16, 4, 1, 1, 32) if tiny else NSAConfig()
    g = torch.Generator(device=device).manual_seed(0)
    r = lambda *s: torch.randn(*s, device=device, generator=g, dtype=dtype)

    def inputs(n):
        q, k, v = r(1, n, heads_q, dim), r(1, n, heads_kv, dim), r(1, n, heads_kv, dim)
        k_cmp = compress(k, block_size=config.compress_block_size, stride=config.compress_stride).contiguous()
        v_cmp = compress(v, block_size=config.compress_block_size, stride=config.compress_stride).contiguous()
        gates = [torch.sigmoid(r(1, n, heads_q)) for _ in range(3)]
        return [x.requires_grad_() for x in (q, k, v, k_cmp, v_cmp, *gates)]

    def timed(tensors):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        native_sparse_attention(*tensors, config, backend="triton").sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    warm_s = timed(inputs(40 if tiny else 1000))
    tensors = inputs(seq_len)
    first_s = timed(tensors)
    second_s = timed(tensors)
    print(json.dumps({"warm_s": warm_s, "first_s": first_s, "second_s": second_s, "nsa": nsa.__version__}))


def cache_entries(folder):
    return sum(1 for _ in Path(folder).iterdir()) if Path(folder).exists() else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=parse_heads, default=parse_heads("32/32,64/4"))
    parser.add_argument("--seq-lens", type=parse_lengths, default=parse_lengths("16k,16385,64k,65000"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--build", default="shipped", help="the label of these rows in the CSV")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--child", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child, args.tiny)
    heads, lengths = args.heads, args.seq_lens
    if args.tiny:
        heads, lengths = [(2, 1)], [37, 40]
    cache = tempfile.mkdtemp(prefix="triton-cache-")
    env = dict(os.environ, TRITON_CACHE_DIR=cache, PYTHONPATH=str(ROOT))
    rows = []
    print(f"{'heads':>6} {'N':>7} {'1000 tok s':>11} {'first call s':>13} {'second s':>9} {'compiled':>9} "
          f"{'process s':>10}")
    for heads_q, heads_kv in heads:
        for seq_len in lengths:
            before = cache_entries(cache)
            start = time.perf_counter()
            done = subprocess.run([sys.executable, __file__, "--child", str(seq_len), str(heads_q), str(heads_kv)]
                                  + (["--tiny"] if args.tiny else []), env=env, capture_output=True, text=True)
            wall = time.perf_counter() - start
            if done.returncode:
                print(done.stderr[-2000:])
                raise SystemExit(f"the process for N = {seq_len}, heads {heads_q}/{heads_kv} failed")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            row = dict(build=args.build, warm_up="40 tokens" if args.tiny else "1000 tokens",
                       heads=f"{heads_q}/{heads_kv}", seq_len=seq_len, warm_s=f"{result['warm_s']:.2f}",
                       first_s=f"{result['first_s']:.2f}", second_s=f"{result['second_s']:.3f}",
                       compiled=cache_entries(cache) - before, process_s=f"{wall:.1f}")
            rows.append(row)
            print(f"{row['heads']:>6} {seq_len:7d} {row['warm_s']:>11} {row['first_s']:>13} {row['second_s']:>9} "
                  f"{row['compiled']:>9d} {row['process_s']:>10}", flush=True)
    if args.out:
        from nsa.device import gpu_tag
        path = args.out / f"first_call_{gpu_tag()}.csv"
        label = f"# build {args.build}:"
        comments, kept = [], []
        if path.exists():
            with path.open() as f:
                lines = f.read().splitlines()
            comments = [line for line in lines if line.startswith("#") and not line.startswith(label)]
            kept = [r for r in csv.DictReader(line for line in lines if not line.startswith("#"))
                    if r["build"] != args.build]
        args.out.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            for line in comments + [f"{label} python benchmarks/gpu_first_call.py {' '.join(sys.argv[1:])}"]:
                f.write(line + "\n")
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(kept + rows)


if __name__ == "__main__":
    main()
