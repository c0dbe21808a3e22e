"""One decoding step, or one training forward + backward, inside a profiled range for Nsight Compute
(`ncu --profile-from-start off`): warm-up calls first (compilation, allocation), then the one call
between `cudaProfilerStart` and `cudaProfilerStop`.

    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section Occupancy \\
        --section WarpStateStats --section LaunchStats --section SchedulerStats -k regex:decode_ \\
        python benchmarks/ncu_step.py decode --context 64k --batch 16 --heads 64/4
    ncu ... python benchmarks/ncu_step.py train --seq-len 64k --heads 64/4

The inputs are those of `python -m nsa.bench_decode` (`make_step`) and `python -m nsa.bench`
(`make_inputs`): random, bf16, head dim 128, the paper's geometry. Needs a CUDA GPU.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from nsa.bench import parse_heads, parse_lengths  # noqa: E402


def profiled(fn, warm_up=3):
    for _ in range(warm_up):
        fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["decode", "train"])
    parser.add_argument("--context", "--seq-len", dest="length", type=parse_lengths, default=parse_lengths("64k"))
    parser.add_argument("--batch", type=int, default=1, help="decode only; training runs batch 1")
    parser.add_argument("--heads", type=parse_heads, default=parse_heads("64/4"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/ncu_step.py needs a CUDA GPU")
        return 2
    (length,), ((heads_q, heads_kv),) = args.length, args.heads
    if args.what == "decode":
        from nsa.bench_decode import make_step
        step = make_step(length, args.batch, heads_q, heads_kv, 128)[0]
        with torch.no_grad():
            profiled(step)
    else:
        from nsa import native_sparse_attention
        from nsa.bench import make_inputs
        inputs, config = make_inputs(length, heads_q, heads_kv, 128)

        def forward_backward():
            o = native_sparse_attention(*inputs, config, backend="triton")
            o.backward(torch.ones_like(o))
        profiled(forward_backward, warm_up=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
