"""The decoding kernels' split constants swept on a GPU: is the shipped choice the fastest?

    python benchmarks/gpu_decode_splits.py [--out book/data/decode_split_sweep_<gpu>.csv]

Chapter 13's launcher picks each stage's splits from three constants of `nsa.kernels.decode`:
`PROGRAMS_PER_SM` (programs per multiprocessor the splits aim for), `DECODE_BLOCK_N` (compressed
rows per step of stage 1) and `STEPS_PER_SPLIT` (steps a split of stage 1 takes at least). For
each shape in the script's `SHAPES` (`nsa.bench_decode.make_step`: bf16, d = 128, the paper's
geometry, one new token per row) and each combination of the values in its `VALUES`, the step is
checked against the float64 reference (relative error <= 1e-2) and its CUDA-graph replay timed
(`triton.testing.do_bench`, median). Writes one CSV row per (shape, combination); the first line says what ran.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from nsa.bench_decode import make_step, sweep_constants, write_sweep  # noqa: E402
from nsa.device import gpu_tag  # noqa: E402
from nsa.geometry import num_compressed_blocks  # noqa: E402
from nsa.kernels import decode  # noqa: E402

SHAPES = ((65536, 1, 64, 4), (131072, 1, 64, 4), (65536, 16, 64, 4), (131072, 16, 64, 4), (65536, 1, 32, 8),
          (65536, 16, 32, 8))              # (context, batch, query heads, kv heads)
VALUES = dict(PROGRAMS_PER_SM=(2, 4), DECODE_BLOCK_N=(64, 128), STEPS_PER_SPLIT=(2, 4, 8))
COLUMNS = ["context", "batch", "heads_q", "heads_kv", *(name.lower() for name in VALUES), "splits_c", "shipped",
           "graph_us", "relative_error"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    shipped = tuple(getattr(decode, name) for name in VALUES)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for context, batch, heads_q, heads_kv in SHAPES:
        step = make_step(context, batch, heads_q, heads_kv, 128)
        compressed = num_compressed_blocks(context, step.config.compress_block_size, step.config.compress_stride)
        try:
            for combination, us, err in sweep_constants(step, VALUES):
                programs_per_sm, block_n, steps_per_split = combination
                splits_c = decode.split_count(batch * heads_kv, -(-compressed // block_n), programs_per_sm * sms,
                                              steps_per_split)
                rows.append([context, batch, heads_q, heads_kv, *combination, splits_c, int(combination == shipped),
                             f"{us:.2f}", f"{err:.2e}"])
                print(",".join(map(str, rows[-1])), flush=True)
        except RuntimeError as failed:
            print(f"FAILED: {context} tokens, batch {batch}, {heads_q}/{heads_kv}, {failed}")
            return 1
        del step
        torch.cuda.empty_cache()
    write_sweep(args.out or Path(f"book/data/decode_split_sweep_{gpu_tag()}.csv"), "gpu_decode_splits.py", COLUMNS,
                rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
