"""GPU check of the Triton kernels at GQA groups above 16: multi-query attention with 32 to 128 query heads.

Not collected by pytest (no test_ prefix); a GPU user runs it from the repository root:

    PYTHONUNBUFFERED=1 python benchmarks/gpu_check_groups.py [--skip-decode]

1. Accuracy against float64 (gpu_check_nsa.check_accuracy: outputs, gradients and the selected blocks) in bf16 at
   groups 24 (48/2, padded to 32), 32 (32/1 and 64/2), 48 (48/1, padded to 64), 64 (64/1) and 128 (128/1) with
   d = 128, Falcon-7B's 71 (71/1, padded to 128) with d = 64; and in float32 at group 16 with d = 256, where the
   selection holds 8 of the group's q tiles and reads the others again at every step.
2. The whole op at 64k tokens, 32/1, 64/1 and 128/1 heads, d = 128, timed beside SDPA flash (gpu_check_nsa.timing).
3. One decoding step at a 64k context, batch 1 and 16, 32/1, 64/1 and 128/1 heads (nsa.bench_decode: graph replays
   beside SDPA).
"""
import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
import torch  # noqa: E402

import gpu_check_nsa as g  # noqa: E402
from nsa import NSAConfig  # noqa: E402
from nsa.bench_decode import main as bench_decode  # noqa: E402

BF16, FP32 = torch.bfloat16, torch.float32
CASES = (("group 24, 48/2 d128", 777, 48, 2, 128, BF16), ("group 32, 32/1 d128", 1000, 32, 1, 128, BF16),
         ("group 32, 64/2 d128", 4099, 64, 2, 128, BF16), ("group 48, 48/1 d128", 1500, 48, 1, 128, BF16),
         ("group 64, 64/1 d128", 2053, 64, 1, 128, BF16), ("group 128, 128/1 d128", 1100, 128, 1, 128, BF16),
         ("group 71, 71/1 d64", 1300, 71, 1, 64, BF16), ("group 16, 16/1 d256 fp32", 900, 16, 1, 256, FP32))
TIMED = ((32, 1), (64, 1), (128, 1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-decode", action="store_true")
    args = parser.parse_args()
    g.DEVICE, g.DETERMINISTIC = "cuda", False
    failed = 0
    print("== accuracy against float64", flush=True)
    for label, N, Hq, H, D, dtype in CASES:
        start = time.time()
        try:
            g.check_accuracy(label, 1, N, N, Hq, H, D, D, NSAConfig(), 0, [(0, min(N, 768))], dtype)
        except Exception as error:          # report and go on: one table for every group
            failed += 1
            print(f"{label} FAILED: {type(error).__name__}: {str(error)[:400]}", flush=True)
        print(f"   {time.time() - start:.0f} s", flush=True)
        torch.cuda.empty_cache()
    print("== timing at 64k", flush=True)
    for Hq, H in TIMED:
        print(f"-- {Hq}/{H}", flush=True)
        g.timing(65536, 1, Hq, H, 128)
        torch.cuda.empty_cache()
    if not args.skip_decode:
        print("== decoding", flush=True)
        bench_decode(["--contexts", "64k", "--batches", "1,16", "--heads", ",".join(f"{a}/{b}" for a, b in TIMED),
                      "--out", "/tmp/decode_groups.csv"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
