"""Stage 2 of the decoding step (the selection) swept on a GPU: its programs per SM and its warps.

    python benchmarks/gpu_decode_select_sweep.py [--out book/data/decode_select_sweep_<gpu>.csv]

Chapter 13's stage 2 reads the compressed scores back and keeps a top-n per split; its splits aim for
`SELECT_PROGRAMS_PER_SM` programs per multiprocessor (`nsa.kernels.decode`, 16 shipped) and it runs
`max(1, tile * group_pad // 16)` warps. At batch 16 it reads its scores at about a quarter of the memory's
bandwidth, which looks like latency: more programs in flight, or more warps each, might hide it. For each shape
in `SHAPES` (`nsa.bench_decode.make_step`: bf16, d = 128, the paper's geometry, one token a step) and each
value of `SELECT_PROGRAMS_PER_SM` in 4, 8, 16, 32 with the shipped warps and with 2 and 4 forced, the step is
checked against float64 (relative error <= 1e-2) and its CUDA-graph replay timed (`nsa.bench_decode.sweep_constants`).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from nsa.bench_decode import make_step, sweep_constants, write_sweep  # noqa: E402
from nsa.device import gpu_tag  # noqa: E402
from nsa.kernels import decode  # noqa: E402

SHAPES = ((65536, 1, 64, 4), (65536, 16, 64, 4), (131072, 16, 64, 4), (65536, 1, 32, 8),
          (65536, 16, 32, 8))              # (context, batch, query heads, kv heads)
VALUES = dict(SELECT_PROGRAMS_PER_SM=(4, 8, 16, 32))
WARPS = (None, 2, 4)                       # None: the launcher's own choice
COLUMNS = ["context", "batch", "heads_q", "heads_kv", "select_programs_per_sm", "select_warps", "shipped",
           "graph_us", "relative_error"]


class ForcedWarps:
    """Stands in for `decode.decode_select_kernel`: launches it with `warps` warps (None: as asked)."""

    def __init__(self, kernel, warps):
        self.kernel, self.warps = kernel, warps

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            return self.kernel[grid](*args, **{**kwargs, "num_warps": self.warps or kwargs["num_warps"]})
        return launch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    kernel, shipped = decode.decode_select_kernel, decode.SELECT_PROGRAMS_PER_SM
    rows = []
    for context, batch, heads_q, heads_kv in SHAPES:
        step = make_step(context, batch, heads_q, heads_kv, 128)
        try:
            for warps in WARPS:
                decode.decode_select_kernel = ForcedWarps(kernel, warps)
                for (programs,), us, err in sweep_constants(step, VALUES):
                    rows.append([context, batch, heads_q, heads_kv, programs, warps or "shipped",
                                 int(programs == shipped and warps is None), f"{us:.2f}", f"{err:.1e}"])
                    print(",".join(map(str, rows[-1])), flush=True)
        except RuntimeError as failed:
            print(f"FAILED: {context} tokens, batch {batch}, {heads_q}/{heads_kv}, {failed}")
            return 1
        finally:
            decode.decode_select_kernel = kernel
        del step
        torch.cuda.empty_cache()
    write_sweep(args.out or Path(f"book/data/decode_select_sweep_{gpu_tag()}.csv"), "gpu_decode_select_sweep.py",
                COLUMNS, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
