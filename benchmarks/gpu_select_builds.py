"""Chapter 9's selection kernel alone, timed with the package found in a given folder: two builds compared on a GPU.

    python benchmarks/gpu_select_builds.py DIR [--heads 64/4,32/8,32/32,32/1]

DIR holds a copy of `nsa/` and `kernels/` (e.g. `git archive REV nsa kernels | tar -x -C DIR`; its `nsa/kernels`
is linked to `../kernels` if missing), imported instead of the installed package; run the script once per build,
on one GPU, one after the other. For each head configuration: random bf16 inputs (seed 0, d = 128, 64k tokens, the
paper's geometry), the compressed branch's lse from `compressed_attention_triton`, then `select_blocks_triton` timed
(`triton.testing.do_bench`, median, ms). The last column sums the chosen block indices: two builds that select the
same blocks print the same sum. Prints CSV rows: build, heads, select_ms, checksum.
"""
import argparse
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("build", type=Path)
    parser.add_argument("--heads", default="64/4,32/8,32/32,32/1")
    args = parser.parse_args()
    build = args.build.resolve()
    link = build / "nsa" / "kernels"
    if not link.exists():
        link.symlink_to("../kernels")
    sys.path.insert(0, str(build))
    import torch
    from triton.testing import do_bench

    import nsa
    from nsa.kernels.band import compressed_attention_triton
    from nsa.kernels.selection import select_blocks_triton

    if not Path(nsa.__file__).resolve().is_relative_to(build):
        raise SystemExit(f"imported {nsa.__file__}, not the build in {build}")
    config = nsa.NSAConfig()
    N, l, d = 65536, config.compress_block_size, config.compress_stride
    for heads in args.heads.split(","):
        hq, hkv = map(int, heads.split("/"))
        gen = torch.Generator(device="cuda").manual_seed(0)
        rows = (N - l) // d + 1
        q = torch.randn(1, N, hq, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
        k = torch.randn(1, rows, hkv, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
        _, lse = compressed_attention_triton(q, k, k, l, d, seq_len_k=N)
        chosen = select_blocks_triton(q, k, lse, N, config)
        ms = do_bench(lambda: select_blocks_triton(q, k, lse, N, config), warmup=10, rep=100, return_mode="median")
        print(f"{build.name},{heads},{ms:.3f},{int(chosen.long().sum())}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
