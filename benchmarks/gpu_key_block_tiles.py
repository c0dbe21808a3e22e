"""Tiles of chapter 8b's key-block-centric kernels on a GPU: each launch of one selected-branch
forward and gated backward re-run with other tiles, checked against the shipped tiles' result,
then timed.

    python benchmarks/gpu_key_block_tiles.py [--heads 32/32,32/8,32/4] [--seq-len 65536] [--out DIR]
    python benchmarks/gpu_key_block_tiles.py --tiny      # CPU, Triton's interpreter: checks, no timing

For each head configuration (bf16, d = 128, the paper's n = 16 blocks of l' = 64, random valid
selections with block 0 and the query's own block forced) the launchers `selected_by_block_fwd`
and `selected_by_block_bwd` (with a gate and a dq buffer, as NSA's fused backward calls it) run
once with their launches recorded: the partial results, their merge, and the gather kernel
(dk, dv, dq). Each launch is re-made with every variant of its tile — (gathered rows per step,
warps, stages) for the partials and the gather kernel, (rows per program, warps) for the merge:
its outputs restored to what they held before, launched once and compared with the shipped
launch's outputs (largest difference over the largest entry; NaN and infinities in the same
places), then timed (`triton.testing.do_bench`, median, ms). A line per variant is printed and
appended to `DIR/key_block_tiles_<gpu>.csv` as it is measured, so a run cut short keeps what it
measured. Compiled offline as the JIT compiles them (`benchmarks/offline_compile.py`, Triton 3.7.1
for sm_90), the partials kernel at its launch of 64 gathered rows and 4 warps spills nothing and
the gather kernel, which holds dk and dv in float32, 360-400 bytes of stack; with 8 warps and 32
gathered rows it spills nothing. On the H200 every 8-warp variant was slower; the gather kernel's
launch became 32 rows in 3 stages (book/data/key_block_tiles_h200.csv).
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent      # the checkout: its nsa, without an install
sys.path.insert(0, str(ROOT))

import torch
import triton

from gpu_band_tiles import difference, open_sweep, run_variant, sweep_arguments   # benchmarks/, this script's folder
from nsa.kernels import selected

# (gathered rows per step, warps, stages) of the partials and gather kernels; (rows, warps) of the merge
VARIANTS = {
    "selected_by_block_forward_kernel": [(64, 4, 1), (64, 8, 1), (32, 4, 1), (128, 8, 1), (64, 4, 2), (32, 4, 2),
                                         (64, 8, 2)],
    "merge_partials_kernel": [(8, 4), (4, 4), (16, 4), (16, 8), (32, 8)],
    "selected_attention_backward_dkdv_kernel": [(64, 4, 1), (32, 4, 1), (32, 4, 2), (32, 4, 3), (64, 4, 2),
                                                (16, 4, 1), (16, 4, 2), (64, 8, 1), (128, 8, 1)],
}
SHORT = {"selected_by_block_forward_kernel": "partials", "merge_partials_kernel": "merge",
         "selected_attention_backward_dkdv_kernel": "gather"}


def random_selection(seq_len, heads_kv, n, block_size, generator, device):
    """(1, N, H, n) int32 prepared block indices: block 0 and the query's own block, then random
    earlier blocks, ascending, -1 where fewer than n exist."""
    num_blocks = -(-seq_len // block_size)
    own = torch.arange(seq_len, device=device) // block_size
    scores = torch.rand(1, seq_len, heads_kv, num_blocks, generator=generator, device=device)
    blocks = torch.arange(num_blocks, device=device)
    scores = scores.masked_fill(blocks == 0, 2.0).masked_fill(blocks == own[:, None, None], 3.0)
    scores = scores.masked_fill(blocks > own[:, None, None], -1.0)
    top = scores.topk(min(n, num_blocks), dim=-1)
    chosen = torch.where(top.values >= 0, top.indices, -1).to(torch.int32)
    if chosen.shape[-1] < n:
        chosen = torch.cat([chosen, chosen.new_full((*chosen.shape[:-1], n - chosen.shape[-1]), -1)], -1)
    return selected.prepare_block_indices(chosen, block_size, seq_len, True)


class Recording:
    """Stands in for the merge kernel, launched as `kernel[grid](*args, **meta)`: launches it,
    recording the launch like `keep` below, with its grid as a function of its tiles."""

    def __init__(self, kernel, keep):
        self.kernel, self.keep = kernel, keep

    def __getitem__(self, grid):
        def launch(*args, num_warps=4, num_stages=3, **meta):   # the merge: one program per BLOCK_ROWS rows
            rows = args[5]                                      # merge_partials_kernel's num_rows
            return self.keep(self.kernel, lambda tiles: (triton.cdiv(rows, tiles["BLOCK_ROWS"]),), args, meta,
                             num_warps, num_stages)
        return launch


def record_launches(heads_q, heads_kv, seq_len, dim=128, n=16, block_size=64, device="cuda",
                    dtype=torch.bfloat16):
    """Run the key-block-centric launchers once; return each launch as (kernel, grid_of_tiles,
    args, meta, warps, stages, outputs: {arg index: (before, after)})."""
    g = torch.Generator(device=device).manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, device=device, dtype=dtype)
    q, k, v, do = r(1, seq_len, heads_q, dim), r(1, seq_len, heads_kv, dim), r(1, seq_len, heads_kv, dim), \
        r(1, seq_len, heads_q, dim)
    gate = torch.rand(1, seq_len, heads_q, generator=g, device=device, dtype=dtype)
    prepared = random_selection(seq_len, heads_kv, n, block_size, g, device)
    launches, real, merge = [], selected.launch_fitting, selected.merge_partials_kernel

    def keep(kernel, grid, args, meta, num_warps, num_stages, shrink=()):
        tensors = {i: a.clone() for i, a in enumerate(args) if isinstance(a, torch.Tensor)}
        if kernel is merge:
            kernel[grid(meta)](*args, **meta, num_warps=num_warps)
            tiles = meta
        else:
            tiles = real(kernel, grid, args, meta, num_warps, num_stages, shrink)
        outputs = {i: (before, args[i].clone()) for i, before in tensors.items() if not same(before, args[i])}
        launches.append((kernel, grid, args, tiles, num_warps, num_stages, outputs))
        return tiles

    selected.launch_fitting, selected.merge_partials_kernel = keep, Recording(merge, keep)
    try:
        scale = dim ** -0.5
        o, lse, index = selected.selected_by_block_fwd(q, k, v, prepared, block_size, scale, True)
        dq, d_gate = torch.zeros(q.shape, device=device, dtype=torch.float32), torch.empty_like(gate)
        selected.selected_by_block_bwd(do, q, k, v, o, lse, prepared, block_size, scale, True, gate=gate,
                                       d_gate=d_gate, dq=dq, index=index)
    finally:
        selected.launch_fitting, selected.merge_partials_kernel = real, merge
    return launches


def same(a, b):
    """Equal, NaN included (the forward's buffer is not filled: unwritten slots hold what they held)."""
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.dtype == b.dtype else False


def unwritten_is_nan(x, ref):
    """`difference`, with NaN allowed where the shipped launch left NaN: the forward's partials
    buffer is not filled, and its unwritten slots hold what they held."""
    return difference(x, ref, nan_where_ref=True)


def variant_meta(name, tiles, variant):
    """The meta-parameters and (warps, stages) of one variant of a recorded launch."""
    if name == "merge_partials_kernel":
        rows, warps = variant
        return {**tiles, "BLOCK_ROWS": rows}, warps, 1
    rows, warps, stages = variant
    return {**tiles, "BLOCK_Q": max(1, rows // tiles["BLOCK_GQ"])}, warps, stages


def shipped_variant(name, tiles, warps, stages):
    if name == "merge_partials_kernel":
        return (tiles["BLOCK_ROWS"], warps)
    return (tiles["BLOCK_Q"] * tiles["BLOCK_GQ"], warps, stages)


def main() -> int:
    args = sweep_arguments(__doc__, "32/32,32/8,32/4", "100 tokens, 4/2 heads of 16, 4 blocks of "
                           "16, float32, on the CPU: the launches and checks of two variants per kernel, not timed")
    setup = dict(dim=16, n=4, block_size=16, device="cpu", dtype=torch.float32) if args.tiny else {}
    f, writer = open_sweep(args, "gpu_key_block_tiles.py", "key_block_tiles",
                           ["heads", "tokens", "kernel", "rows", "warps", "stages", "shipped", "difference", "ms"],
                           "shipped: the launcher's tiles when it ran; rows: gathered rows per step (merge: rows "
                           "per program)")
    with f:
        for heads in args.heads.split(","):
            heads_q, heads_kv = map(int, heads.split("/"))
            for kernel, grid, launch_args, tiles, warps, stages, outputs in record_launches(
                    heads_q, heads_kv, args.seq_len, **setup):
                name = kernel.fn.__name__
                shipped = shipped_variant(name, tiles, warps, stages)
                variants = list(dict.fromkeys([shipped, *VARIANTS[name]]))
                for variant in variants[:2] if args.tiny else variants:
                    meta, w, s = variant_meta(name, tiles, variant)
                    launch = lambda: kernel[grid(meta)](*launch_args, **meta, num_warps=w, num_stages=s)
                    try:
                        diff, ms = run_variant(launch, launch_args, outputs, unwritten_is_nan, timed=not args.tiny)
                    except Exception as error:   # a variant that does not fit: say so, go on
                        print(f"{heads} {SHORT[name]} {variant}: {type(error).__name__}", flush=True)
                        continue
                    row = [heads, args.seq_len, SHORT[name], variant[0], variant[1],
                           variant[2] if len(variant) > 2 else "", variant == shipped, f"{diff:.2e}", f"{ms:.3f}"]
                    writer.writerow(row)
                    f.flush()
                    print(" ".join(str(x) for x in row), flush=True)
                for i, (_, after) in outputs.items():    # later kernels read these: the shipped result
                    launch_args[i].copy_(after)
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return 0


if __name__ == "__main__":
    sys.exit(main())
