"""Tiles of chapters 9-10's band kernels on a GPU: each launch of NSA's compressed branch and
window re-run with other tiles, checked against the shipped tiles' result, then timed.

    python benchmarks/gpu_band_tiles.py [--heads 32/32,32/8,64/4] [--seq-len 65536] [--out DIR]
    python benchmarks/gpu_band_tiles.py --tiny      # CPU, Triton's interpreter: checks, no timing

For each head configuration (bf16, d = 128, the paper's geometry, NSA's gated backward) the band
launchers (`band_attention_forward`, `band_attention_backward`) run once with their launches
recorded: the forward, `dq` and `dk dv` kernels of the compressed branch, then of the window.
Each launch is re-made with every variant of (query rows, key rows per step, warps, stages):
its outputs restored to what they held before, launched once and compared with the shipped
launch's outputs (largest difference over the largest entry, -inf entries in the same places),
then timed (`triton.testing.do_bench`, median, ms). A line per variant is printed and appended to
`DIR/band_tiles_<gpu>.csv` as it is measured, so a run cut short keeps what it measured.
"""

import argparse
import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent      # the checkout: its nsa, without an install
sys.path.insert(0, str(ROOT))

import torch
import triton
from triton.testing import do_bench

from nsa import NSAConfig
from nsa.device import gpu_tag
from nsa.geometry import num_compressed_blocks
from nsa.kernels import band

# (query rows, key rows per step, warps, stages); the dk dv kernel's "rows" are the query rows of
# its inner loop and its key rows are the rows it holds
VARIANTS = {
    "band_attention_forward_kernel": [(256, 64, 8, 2), (128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 4, 2),
                                      (256, 32, 8, 2), (128, 32, 4, 3), (64, 32, 4, 3), (64, 64, 4, 3)],
    "band_attention_backward_dq_kernel": [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 8, 3), (64, 64, 4, 3),
                                          (64, 32, 4, 3), (128, 32, 8, 3), (64, 64, 4, 2)],
    "band_attention_backward_dkdv_kernel": [(64, 64, 4, 2), (64, 64, 8, 2), (64, 64, 8, 3), (32, 64, 4, 2),
                                            (128, 64, 8, 2), (64, 128, 8, 2), (32, 32, 4, 2), (64, 32, 4, 3)],
}
SHORT = {"band_attention_forward_kernel": "fwd", "band_attention_backward_dq_kernel": "dq",
         "band_attention_backward_dkdv_kernel": "dkdv"}


def record_launches(heads_q, heads_kv, seq_len, dim=128, device="cuda", dtype=torch.bfloat16):
    """Run the band launchers of one NSA forward and backward; return each launch as
    (branch, kernel, grid_of_tiles, args, meta, warps, stages, outputs: {arg index: (before, after)})."""
    config, dev = NSAConfig(), dict(device=device, dtype=dtype)
    rows = num_compressed_blocks(seq_len, config.compress_block_size, config.compress_stride)
    g = torch.Generator(device=device).manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, **dev)
    q, k, v, do = r(1, seq_len, heads_q, dim), r(1, seq_len, heads_kv, dim), r(1, seq_len, heads_kv, dim), \
        r(1, seq_len, heads_q, dim)
    k_cmp, v_cmp = r(1, rows, heads_kv, dim), r(1, rows, heads_kv, dim)
    gate = torch.rand(1, seq_len, heads_q, generator=g, **dev)
    bands = (("compressed", k_cmp, v_cmp, band.compressed_band(rows, config.compress_block_size,
                                                                config.compress_stride, 0, True)),
             ("window", k, v, band.window_band(config.window_size, True)))
    launches, real = [], band.launch_fitting

    def keep(kernel, grid, args, meta, num_warps, num_stages, shrink=()):
        tensors = {i: a.clone() for i, a in enumerate(args) if isinstance(a, torch.Tensor)}
        tiles = real(kernel, grid, args, meta, num_warps, num_stages, shrink)
        outputs = {i: (before, args[i].clone()) for i, before in tensors.items() if not torch.equal(before, args[i])}
        launches.append((kernel, grid, args, tiles, num_warps, num_stages, outputs))
        return tiles

    band.launch_fitting = keep
    try:
        for name, keys, values, which in bands:
            o, lse = band.band_attention_forward(q, keys, values, dim ** -0.5, seq_len, which)
            dq, d_gate = torch.zeros_like(q), torch.empty_like(gate)
            band.band_attention_backward(do, q, keys, values, o, lse, dim ** -0.5, seq_len, which, gate=gate,
                                         d_gate=d_gate, dq=dq)
    finally:
        band.launch_fitting = real
    branch = ["compressed"] * 3 + ["window"] * 3
    return [(b, *launch) for b, launch in zip(branch, launches)]


def difference(x, ref, chunk=1 << 26, nan_where_ref=False):
    """Largest |x - ref| over the largest |ref| (finite entries); inf unless the infinities are in
    the same places, and any NaN at all (with `nan_where_ref`: unless NaN is where ref holds NaN,
    a buffer's entries no launch writes). In chunks of the flattened tensors: chapter 8b's partials
    buffer is n outputs (8.6 GB at 64k tokens, 32 heads), and a float32 copy of it whole does not
    fit beside the rest."""
    x, ref = x.reshape(-1), ref.reshape(-1)
    largest_error, largest = 0.0, 0.0
    for start in range(0, ref.numel(), chunk):
        a, b = x[start:start + chunk], ref[start:start + chunk]
        finite, infinite = torch.isfinite(b), torch.isinf(b)
        nan_ok = torch.equal(torch.isnan(a), torch.isnan(b)) and (nan_where_ref or not torch.isnan(b).any())
        if not (nan_ok and torch.equal(finite, torch.isfinite(a)) and torch.equal(a[infinite], b[infinite])):
            return float("inf")
        a, b = a[finite].float(), b[finite].float()
        if b.numel():
            largest_error = max(largest_error, (a - b).abs().max().item())
            largest = max(largest, b.abs().max().item())
    return largest_error / max(largest, 1e-30)


def run_variant(launch, launch_args, outputs, compare=difference, timed=True):
    """One variant of a recorded launch: its outputs restored to what they held before, launched
    once, compared with the shipped launch's outputs (`compare`, the largest over the outputs),
    then timed unless not `timed` (NaN). Returns (difference, ms); raises what the launch raises."""
    for i, (before, _) in outputs.items():
        launch_args[i].copy_(before)
    launch()
    diff = max((compare(launch_args[i], after) for i, (_, after) in outputs.items()), default=0.0)
    return diff, (do_bench(launch, warmup=10, rep=60) if timed else float("nan"))


def sweep_arguments(description, default_heads, tiny_help):
    """A tile sweep's command line: --heads, --seq-len, --out, and --tiny (4/2 heads, 100 tokens)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", default=default_heads)
    parser.add_argument("--seq-len", type=int, default=65536)
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--tiny", action="store_true", help=tiny_help)
    args = parser.parse_args()
    if args.tiny:
        args.heads, args.seq_len = "4/2", 100
    return args


def open_sweep(args, script, stem, columns, note):
    """The sweep's CSV `<out>/<stem>_<gpu or tiny>.csv`, opened to append; a new one starts with
    the command, the machine and `note`, then the column names. Returns (file, csv writer)."""
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{stem}_{'tiny' if args.tiny else gpu_tag()}.csv"
    fresh = not path.exists()
    f = path.open("a", newline="")
    writer = csv.writer(f)
    if fresh:
        device = "CPU interpreter" if args.tiny else torch.cuda.get_device_name()
        f.write(f"# python benchmarks/{script} --heads {args.heads} --seq-len {args.seq_len} "
                f"({device}, triton {triton.__version__}, torch {torch.__version__}); {note}\n")
        writer.writerow(columns)
    return f, writer


def main() -> int:
    args = sweep_arguments(__doc__, "32/32,32/8,64/4", "100 tokens, 4/2 heads of 16, float32, "
                           "on the CPU: the launches and checks of two variants per kernel, not timed")
    setup = dict(dim=16, device="cpu", dtype=torch.float32) if args.tiny else {}
    f, writer = open_sweep(args, "gpu_band_tiles.py", "band_tiles",
                           ["heads", "tokens", "branch", "kernel", "rows", "keys", "warps", "stages", "shipped",
                            "difference", "ms"], "shipped: the launcher's tiles when it ran")
    with f:
        for heads in args.heads.split(","):
            heads_q, heads_kv = map(int, heads.split("/"))
            for branch, kernel, grid, launch_args, tiles, warps, stages, outputs in record_launches(
                    heads_q, heads_kv, args.seq_len, **setup):
                name = kernel.fn.__name__
                group_pad = tiles["GROUP_PAD"]
                row_key, col_key = ("BLOCK_M", "BLOCK_N")
                shipped = (tiles[row_key] * group_pad, tiles[col_key], warps, stages)
                variants = list(dict.fromkeys([shipped, *VARIANTS[name]]))
                for variant in variants[:2] if args.tiny else variants:
                    rows, keys, w, s = variant
                    if rows < group_pad:
                        continue
                    meta = {**tiles, row_key: rows // group_pad, col_key: keys}
                    launch = lambda: kernel[grid(meta)](*launch_args, **meta, num_warps=w, num_stages=s)
                    try:
                        diff, ms = run_variant(launch, launch_args, outputs, timed=not args.tiny)
                    except Exception as error:   # a variant that does not fit: say so, go on
                        print(f"{heads} {branch} {SHORT[name]} {variant}: {type(error).__name__}", flush=True)
                        continue
                    row = [heads, args.seq_len, branch, SHORT[name], rows, keys, w, s, variant == shipped,
                           f"{diff:.2e}", f"{ms:.3f}"]
                    writer.writerow(row)
                    f.flush()
                    print(*row, flush=True)
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
