"""Where a decoding step's time goes, on a GPU: each kernel's device time and the host's share.

    python benchmarks/gpu_decode_profile.py [--contexts 64k,128k] [--batches 1,16] [--heads 64/4,32/8]
                                            [--tokens 1,16] [--max-splits 16,64]

For each shape (chapter 13's step, `nsa.bench_decode.make_step`, with `--tokens` new tokens per
row, 1 by default): the step run eagerly 50 times
under `torch.profiler`, each kernel's mean device time per step; the eager step's host time
(measured with `cProfile` on, which adds its own overhead) and the twelve Python functions that
take most of it; the graph replay's time (`do_bench`, median). Prints a table per shape.
`--max-splits` repeats it all for each cap on a stage's splits (`nsa.kernels.decode.MAX_SPLITS`,
which at batch 1 mostly sets the selection's splits: how the step's length depends on them).
"""

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent      # the checkout: its nsa, without an install
sys.path.insert(0, str(ROOT))

import torch
from torch.profiler import ProfilerActivity, profile

from nsa.bench import parse_heads, parse_lengths
from nsa.bench_decode import _parse_batches, _parse_tokens, graphed, make_step


def kernel_times(step, repeats=50):
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            step()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / repeats) for e in prof.key_averages() if e.device_time_total > 0]
    return sorted(rows, key=lambda r: -r[1])


def host_profile(step, repeats=200):
    profiler = cProfile.Profile()
    torch.cuda.synchronize()
    start = time.perf_counter()
    profiler.enable()
    for _ in range(repeats):
        step()
    profiler.disable()
    host_us = (time.perf_counter() - start) / repeats * 1e6
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(12)
    return host_us, text.getvalue()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=parse_lengths, default=parse_lengths("64k,128k"))
    parser.add_argument("--batches", type=_parse_batches, default=_parse_batches("1,16"))
    parser.add_argument("--heads", type=parse_heads, default=parse_heads("64/4,32/8"))
    parser.add_argument("--tokens", type=_parse_tokens, default=_parse_tokens("1"))
    parser.add_argument("--max-splits", default=None, help="comma-separated caps, e.g. 8,16,32,64")
    args = parser.parse_args()
    from nsa.kernels import decode
    for cap in [int(c) for c in args.max_splits.split(",")] if args.max_splits else [decode.MAX_SPLITS]:
        decode.MAX_SPLITS = cap
        print(f"\n######## MAX_SPLITS = {cap}")
        profile_all(args)


def profile_all(args):
    from triton.testing import do_bench

    shapes = [(heads, batch, tokens, context) for heads in args.heads for batch in args.batches
              for tokens in args.tokens for context in args.contexts]
    for (heads_q, heads_kv), batch, tokens, context in shapes:
        nsa_step = make_step(context, batch, heads_q, heads_kv, 128, tokens=tokens).nsa
        with torch.no_grad():
            for _ in range(3):
                nsa_step()
            replay, _ = graphed(nsa_step)
            graph_us = do_bench(replay, warmup=50, rep=300, return_mode="median") * 1e3
            kernels = kernel_times(nsa_step)
            host_us, text = host_profile(nsa_step)
        print(f"\n== {context} tokens, batch {batch}, {tokens} new, heads {heads_q}/{heads_kv}: graph replay "
              f"{graph_us:.1f} us, eager host time {host_us:.1f} us per step")
        for name, us in kernels:
            print(f"  {us:8.1f} us  {name[:90]}")
        print(f"  {sum(us for _, us in kernels):8.1f} us  (all kernels)")
        if (batch, tokens, context) == (args.batches[0], args.tokens[0], args.contexts[0]):
            print(text[:3500])


if __name__ == "__main__":
    main()
