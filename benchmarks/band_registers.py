"""Registers and stack of chapters 9-10's band kernels, compiled offline for a GPU (no GPU needed).

    python benchmarks/band_registers.py [--heads 32/32,32/8,64/4] [--arch 90] [--fused-window]

The band kernels' launchers (`band_attention_forward`, `band_attention_backward`: NSA's
compressed branch and its window, 64k tokens, bf16, d = 128, the paper's geometry, NSA's gated
backward) run with their launches recorded (`offline_compile.recorded`); each recorded launch is
compiled for `sm_<arch>` with the launcher's tiles, then with half the query rows and with the
other warp count (4 or 8), and `cuobjdump` reads the registers per thread and the stack bytes
(spills). A lead for tuning, not a timing: the GPU's Triton version may allocate otherwise, and
the tiles that run fastest there are what a GPU measures. `--fused-window` compiles instead the
window's dk, dv kernel as NSA's fused backward launches it (ADD_TO_DKDV: the selected branch's
float32 dk, dv taken in; gated; a float32 dq), at the launcher's tile.
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent      # the checkout: its nsa, without an install
sys.path.insert(0, str(ROOT))

import triton  # noqa: F401 (before nsa: a machine without CUDA would switch on the interpreter otherwise)

import torch
from offline_compile import (compile_launch, heads_and_arch, recorded,  # benchmarks/, this script's folder
                             resource_usage)

KERNELS = ("band_attention_forward_kernel", "band_attention_backward_dq_kernel", "band_attention_backward_dkdv_kernel")


def recorded_launches(heads_q, heads_kv, seq_len=65536, dim=128):
    """The band launches of one NSA forward and backward (compressed branch, then window)."""
    from nsa import NSAConfig
    from nsa.geometry import num_compressed_blocks
    from nsa.kernels import band

    config, bf16 = NSAConfig(), dict(dtype=torch.bfloat16)
    rows = num_compressed_blocks(seq_len, config.compress_block_size, config.compress_stride)
    q, lse = torch.empty(1, seq_len, heads_q, dim, **bf16), torch.empty(1, seq_len, heads_q)
    k, k_cmp = torch.empty(1, seq_len, heads_kv, dim, **bf16), torch.empty(1, rows, heads_kv, dim, **bf16)
    gate = torch.empty(1, seq_len, heads_q, **bf16)
    bands = (("compressed", k_cmp, band.compressed_band(rows, config.compress_block_size, config.compress_stride,
                                                       0, True)),
             ("window", k, band.window_band(config.window_size, True)))
    with recorded(band, KERNELS) as launches:
        for name, keys, which in bands:
            band.band_attention_forward(q, keys, keys, dim ** -0.5, seq_len, which)
            band.band_attention_backward(q, q, keys, keys, q, lse, dim ** -0.5, seq_len, which, gate=gate,
                                         d_gate=gate, dq=q)
    branch = ["compressed"] * 3 + ["window"] * 3                  # three launches per band, in order
    return list(zip(branch, launches))


def fused_window_dkdv(heads_q, heads_kv, seq_len=65536, dim=128):
    """The window's dk, dv launch of NSA's fused backward: the selected branch's float32 dk, dv in."""
    from nsa import NSAConfig
    from nsa.kernels import band

    bf16 = dict(dtype=torch.bfloat16)
    q, lse, gate = torch.empty(1, seq_len, heads_q, dim, **bf16), torch.empty(1, seq_len, heads_q), \
        torch.empty(1, seq_len, heads_q, **bf16)
    k = torch.empty(1, seq_len, heads_kv, dim, **bf16)
    dkdv = (torch.empty(1, seq_len, heads_kv, dim), torch.empty(1, seq_len, heads_kv, dim))
    with recorded(band, KERNELS[1:]) as launches:       # its dq launch, then its dk, dv launch
        band.band_attention_backward(q, q, k, k, q, lse, dim ** -0.5, seq_len,
                                     band.window_band(NSAConfig().window_size, True), gate=gate, d_gate=gate,
                                     dq=torch.empty(1, seq_len, heads_q, dim), dq_out=q, dkdv=dkdv)
    return launches[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fused-window", action="store_true",
                        help="the window's dk, dv kernel as NSA's fused backward launches it, at its tile")
    arch, head_pairs, args = heads_and_arch(parser.description, "32/32,32/8,64/4", parser)
    if args.fused_window:
        for heads, heads_q, heads_kv in head_pairs:
            kernel, launch_args, meta = fused_window_dkdv(heads_q, heads_kv)
            fields = resource_usage(compile_launch(kernel, launch_args, meta, arch))
            print(f"{heads:>5} window, fused {kernel.fn.__name__} {meta['BLOCK_M'] * meta['GROUP_PAD']} rows x "
                  f"{meta['BLOCK_N']} keys, {meta['num_warps']} warps, {meta['num_stages']} stages: "
                  f"{fields['REG']} registers, {fields['STACK']:>4} bytes of stack", flush=True)
        return 0
    for heads, heads_q, heads_kv in head_pairs:
        for branch, (kernel, launch_args, meta) in recorded_launches(heads_q, heads_kv):
            group_pad, launcher = meta["GROUP_PAD"], (meta["BLOCK_M"], meta["num_warps"])
            for block_m, warps in (launcher, (max(1, launcher[0] // 2), launcher[1]),
                                   (launcher[0], 12 - launcher[1])):
                fields = resource_usage(compile_launch(kernel, launch_args,
                                                       {**meta, "BLOCK_M": block_m, "num_warps": warps}, arch))
                label = " (launcher)" if (block_m, warps) == launcher else ""
                print(f"{heads:>5} {branch:10s} {kernel.fn.__name__:36s} {block_m * group_pad:3d} rows x "
                      f"{meta['BLOCK_N']} keys, {warps} warps, {meta['num_stages']} stages: {fields['REG']} registers, "
                      f"{fields['STACK']:>4} bytes of stack{label}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
