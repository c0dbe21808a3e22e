"""The all-pairs union of a query tile's blocks (chapter 8's `query_tiles_kernel`) with one, two and
four warps a program.

    python benchmarks/gpu_query_tiles.py [--out FILE.csv]

Random prepared block indices (each query's 16 blocks drawn among those at or before its own, the
first and its two local blocks among them, as the selection's forced blocks make them) for 64k
tokens, at 32/8 and 64/4 heads (8 and 4 kv heads), 4 queries a tile; each launch's outputs
checked equal to the one-warp launch's, then timed with triton.testing.do_bench (median ms).
"""

import argparse
import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent      # the checkout: its nsa, without an install
sys.path.insert(0, str(ROOT))

import torch
import triton

from nsa.kernels.common import next_power_of_2
from nsa.kernels.selected import prepare_block_indices, query_tiles_kernel, query_tiles_shapes


def random_indices(N, H, n, l_sel, generator):
    """(1, N, H, n) block indices as the selection gives them: the first block, the own block and
    the one before it, and n - 3 more drawn among the blocks at or before the own one."""
    own = (torch.arange(N, device="cuda") // l_sel)[None, :, None, None].expand(1, N, H, 1)
    drawn = (torch.rand(1, N, H, n - 3, device="cuda", generator=generator) * (own + 1)).long()
    raw = torch.cat([torch.zeros_like(own), own - 1, own, drawn], dim=-1).clamp(min=0).int()
    return prepare_block_indices(raw, l_sel, N)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    N, n, l_sel, Q = 65536, 16, 64, 4
    g = torch.Generator("cuda").manual_seed(0)
    rows = []
    for heads_q, H in ((32, 8), (64, 4)):
        prepared = random_indices(N, H, n, l_sel, g)
        outs = [torch.empty(s, dtype=torch.int32, device="cuda") for s in query_tiles_shapes(1, N, H, n, Q)]
        T = outs[2].shape[1]

        def launch(warps, into):
            query_tiles_kernel[(T, H)](prepared, *into, N, T, HEADS_KV=H, NUM_SLOTS=n, QUERIES_PER_TILE=Q,
                                       BLOCK_E=next_power_of_2(Q * n), num_warps=warps)

        launch(1, outs)
        for warps in (1, 2, 4):
            got = [torch.empty_like(x) for x in outs]
            launch(warps, got)
            assert all(torch.equal(a, b) for a, b in zip(got, outs)), f"{warps} warps differ from one"
            ms = triton.testing.do_bench(lambda: launch(warps, got))
            rows.append(dict(heads=f"{heads_q}/{H}", tokens=N, queries_per_tile=Q, warps=warps, ms=round(ms, 4)))
            print(f"{heads_q}/{H}, {N} tokens, Q = {Q}: {warps} warp(s) {ms:.3f} ms")
    if args.out is not None:
        with args.out.open("w", newline="") as f:
            f.write(f"# python benchmarks/gpu_query_tiles.py ({torch.cuda.get_device_name()}, triton "
                    f"{triton.__version__}, torch {torch.__version__})\n")
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
