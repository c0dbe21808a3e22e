"""GPU check of the Triton kernels at GQA groups above 16 (multi-query attention with 32 or 64 query heads).

Not collected by pytest (no test_ prefix); a GPU user runs it from the repository root:

    PYTHONUNBUFFERED=1 python benchmarks/gpu_check_groups.py

1. Accuracy, bf16 against float64 (gpu_check_nsa.check_accuracy: outputs, gradients and the selected blocks) at
   groups 32 (32/1 and 64/2 heads, d = 128), 24 (48/2, padded to 32) and 64 (64/1, d = 64). Group 64 lies beyond
   the package's limit (nsa.kernels.common.MAX_GROUP_SIZE = 32, set by the fused selection's shared memory at
   d = 128), so this script raises the limit for its own process: the check shows the kernels are right there too
   where they fit.
2. The whole op at 64k tokens, 32/1 and 64/2 heads, d = 128, timed beside SDPA flash (gpu_check_nsa.timing).
3. One decoding step at a 64k context, batch 1 and 16, the same heads (nsa.bench_decode, graph replays beside SDPA).
"""
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
import torch  # noqa: E402

from nsa.kernels import common  # noqa: E402

common.MAX_GROUP_SIZE = 128  # this process only: group 64 at d = 64 fits the selection's shared memory
import gpu_check_nsa as g  # noqa: E402
from nsa import NSAConfig  # noqa: E402
from nsa.bench_decode import main as bench_decode  # noqa: E402

g.DEVICE, g.DETERMINISTIC = "cuda", False
paper = NSAConfig()
print("== accuracy (bf16 against float64)", flush=True)
for label, Nq, Hq, H, D in (("group 32, 32/1 d128", 1000, 32, 1, 128), ("group 32, 64/2 d128", 4099, 64, 2, 128),
                            ("group 64, 64/1 d64", 2053, 64, 1, 64), ("group 24, 48/2 d128", 777, 48, 2, 128)):
    start = time.time()
    g.check_accuracy(label, 1, Nq, Nq, Hq, H, D, D, paper, 0, [(0, min(Nq, 768))], torch.bfloat16)
    print(f"   {time.time() - start:.0f} s", flush=True)
    torch.cuda.empty_cache()
print("== timing at 64k", flush=True)
for Hq, H in ((32, 1), (64, 2)):
    print(f"-- {Hq}/{H}", flush=True)
    g.timing(65536, 1, Hq, H, 128)
    torch.cuda.empty_cache()
print("== decoding", flush=True)
bench_decode(["--contexts", "64k", "--batches", "1,16", "--heads", "32/1,64/2", "--out", "/tmp/decode_groups.csv"])
