"""The decoding kernels' token tiles swept on a GPU: how many rows should a program of stages 1 and
2 hold when a step brings several new tokens?

    python benchmarks/gpu_decode_tiles.py [--out book/data/decode_tile_sweep_<gpu>.csv]

Chapter 13's launcher cuts a step's new tokens into tiles of programs of their own once they and
the group's query heads (padded) make more rows than `nsa.kernels.decode.DECODE_MAX_ROWS` (stage
1, the compressed attention, whose rows are the operands of `tl.dot`) or `SELECT_MAX_ROWS`
(stage 2, the selection) allow. For each shape in the script's `SHAPES` (`nsa.bench_decode.make_step`:
bf16, d = 128, the paper's geometry, T new tokens per row) and each combination of the values in
its `VALUES`, the step is checked against the float64 reference (relative error <= 1e-2) and its
CUDA-graph replay timed (`triton.testing.do_bench`, median). Writes one CSV row per (shape,
combination); the first line says what ran.
"""

import argparse
import csv
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from nsa.bench_decode import graphed, make_step  # noqa: E402
from nsa.device import gpu_tag  # noqa: E402
from nsa.kernels import decode  # noqa: E402

SHAPES = ((65536, 1, 4, 64, 4), (65536, 1, 16, 64, 4), (65536, 16, 4, 64, 4), (65536, 16, 16, 64, 4),
          (65536, 1, 16, 32, 8), (65536, 16, 16, 32, 8), (65536, 1, 16, 32, 32), (65536, 16, 16, 32, 32))
# (context, batch, new tokens, query heads, kv heads); the values (a first sweep also took DECODE_MAX_ROWS = 64
# and SELECT_MAX_ROWS = 32, 64 at the first six shapes: book/data/decode_tile_sweep_h100_first.csv)
VALUES = dict(DECODE_MAX_ROWS=(128,), SELECT_MAX_ROWS=(1, 4, 16, 128))
COLUMNS = ["context", "batch", "tokens", "heads_q", "heads_kv", *(name.lower() for name in VALUES), "shipped",
           "graph_us", "relative_error"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(f"book/data/decode_tile_sweep_{gpu_tag()}.csv")
    shipped = tuple(getattr(decode, name) for name in VALUES)
    rows = []
    for context, batch, tokens, heads_q, heads_kv in SHAPES:
        step = make_step(context, batch, heads_q, heads_kv, 128, tokens=tokens)
        with torch.no_grad():
            expected = step.reference()
            for combination in itertools.product(*VALUES.values()):
                for name, value in zip(VALUES, combination):
                    setattr(decode, name, value)
                got = step.nsa()
                err = ((got.float() - expected).abs().max() / expected.abs().max()).item()
                if err > 1e-2:
                    print(f"FAILED: {context} tokens, batch {batch}, T = {tokens}, {heads_q}/{heads_kv}, "
                          f"{combination}: {err:.2e}")
                    return 1
                replay, _ = graphed(step.nsa)
                us = do_bench(replay, warmup=30, rep=150, return_mode="median") * 1e3
                rows.append([context, batch, tokens, heads_q, heads_kv, *combination,
                             int(combination == shipped), f"{us:.2f}", f"{err:.2e}"])
                print(",".join(map(str, rows[-1])), flush=True)
        del step, expected
        torch.cuda.empty_cache()
    for name, value in zip(VALUES, shipped):
        setattr(decode, name, value)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        f.write(f"# python benchmarks/gpu_decode_tiles.py; {torch.cuda.get_device_name()}, torch {torch.__version__}, "
                f"triton {decode.triton.__version__}; bf16, d = 128, paper geometry; graph replay, do_bench median\n")
        csv.writer(f).writerows([COLUMNS, *rows])
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
