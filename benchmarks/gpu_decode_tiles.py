"""The decoding kernels' token tiles swept on a GPU: how many rows should a program of stage 3's window
(of stage 2, and of stage 1: the earlier sweeps) hold when a step brings several new tokens?

    python benchmarks/gpu_decode_tiles.py [--out book/data/decode_window_sweep_<gpu>.csv]

Chapter 13's launcher cuts a step's new tokens into tiles of programs of their own once they and
the group's query heads (padded) make more rows than `nsa.kernels.decode.DECODE_MAX_ROWS` (stage
1, the compressed attention, whose rows are the operands of `tl.dot`), `SELECT_MAX_ROWS`
(stage 2, the selection) or `WINDOW_MAX_ROWS` (stage 3's window) allow. For each shape in the
script's `SHAPES` (`nsa.bench_decode.make_step`: bf16, d = 128, the paper's geometry, T new
tokens per row) and each combination of the values in its `VALUES`, the step is checked against
the float64 reference (relative error <= 1e-2) and its CUDA-graph replay timed
(`triton.testing.do_bench`, median). Writes one CSV row per (shape, combination); the first line
says what ran.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from nsa.bench_decode import make_step, sweep_constants, write_sweep  # noqa: E402
from nsa.device import gpu_tag  # noqa: E402
from nsa.kernels import decode  # noqa: E402

SHAPES = ((65536, 1, 4, 64, 4), (65536, 16, 4, 64, 4), (65536, 1, 16, 64, 4), (65536, 16, 16, 64, 4),
          (65536, 16, 4, 32, 8), (65536, 16, 16, 32, 8), (65536, 1, 16, 32, 8), (65536, 16, 16, 32, 32))
# (context, batch, new tokens, query heads, kv heads); the values. Earlier sweeps took stage 1's and stage 2's
# tiles at other shapes: DECODE_MAX_ROWS = 64, 128 and SELECT_MAX_ROWS = 32, 64
# (book/data/decode_tile_sweep_h100_first.csv), then SELECT_MAX_ROWS = 1, 4, 16, 128 (decode_tile_sweep_h100.csv)
VALUES = dict(DECODE_MAX_ROWS=(128,), SELECT_MAX_ROWS=(16,), WINDOW_MAX_ROWS=(16, 32, 64))
COLUMNS = ["context", "batch", "tokens", "heads_q", "heads_kv", *(name.lower() for name in VALUES), "shipped",
           "graph_us", "relative_error"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    shipped = tuple(getattr(decode, name) for name in VALUES)
    rows = []
    for context, batch, tokens, heads_q, heads_kv in SHAPES:
        step = make_step(context, batch, heads_q, heads_kv, 128, tokens=tokens)
        try:
            for combination, us, err in sweep_constants(step, VALUES):
                rows.append([context, batch, tokens, heads_q, heads_kv, *combination, int(combination == shipped),
                             f"{us:.2f}", f"{err:.2e}"])
                print(",".join(map(str, rows[-1])), flush=True)
        except RuntimeError as failed:
            print(f"FAILED: {context} tokens, batch {batch}, T = {tokens}, {heads_q}/{heads_kv}, {failed}")
            return 1
        del step
        torch.cuda.empty_cache()
    write_sweep(args.out or Path(f"book/data/decode_window_sweep_{gpu_tag()}.csv"), "gpu_decode_tiles.py", COLUMNS,
                rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
