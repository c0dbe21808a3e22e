"""Per-kernel GPU time of `nsa_triton` on a GPU (torch.profiler, after 3 warm-up steps), the paper's
geometry, bf16, d = 128, batch 1:

    python benchmarks/gpu_profile_nsa.py [--heads 64/4,32/8,32/32] [--seq-len 64k] [--docs 128]

For each head configuration: the forward's launches in order, each one's mean device time over 5
forwards (PyTorch's own kernels between two Triton launches - the reverse index's sort, fills -
added into one line); then one forward + backward with the kernels of the same name added (the
compressed and window branches share the band kernels), mean of 5. With --docs D the tokens are D
documents of equal length packed into one row (`cu_seqlens`, benchmarks/gpu_packed.py's inputs).
Beside each kernel time: the call's time (triton.testing.do_bench, median), the host's time to
issue it (wall clock from a synchronised start to the call's return, median of 5) and the lines
that synchronised the host with the GPU inside it (`torch.cuda.set_sync_debug_mode`): a call
slower than its kernels waits on the host. An H100 run of the second part is book/data/profile_fwd_bwd_h100.txt.
"""
import argparse
import collections
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from nsa import NSAConfig, native_sparse_attention  # noqa: E402
from nsa.bench import parse_heads, parse_lengths, make_inputs  # noqa: E402
from gpu_packed import packed_inputs  # noqa: E402  (benchmarks/, this script's folder)

REPEATS = 5


def kernel_events(step):
    """The device kernels of REPEATS calls of `step` (after 3 warm-up calls): [(name, ms)]."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(REPEATS):
            step()
        torch.cuda.synchronize()
    return [(e.name, e.time_range.elapsed_us() / 1e3) for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA]


def call_times(step):
    """(the call's median time by do_bench, the host's median time to issue it, ms; the places in
    the call that synchronised the host with the GPU, as 'file:line' with their count)."""
    from triton.testing import do_bench

    wall = do_bench(step)
    host = []
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        host.append((time.perf_counter() - start) * 1e3)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    places = collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught
                                 if "synchroniz" in str(w.message))
    return wall, statistics.median(host), places


def print_call_times(what, step):
    wall, host, places = call_times(step)
    syncs = ", ".join(f"{place} x{n}" for place, n in places.items()) or "none"
    print(f"   {what}: call {wall:.2f} ms (do_bench median), host {host:.2f} ms to issue it; syncs: {syncs}")


def is_triton(name):
    return not (name.startswith(("void ", "Memcpy", "Memset")) or "::" in name)


def forward_in_order(events):
    """One forward's launches in order, each the mean of REPEATS; PyTorch's kernels between two
    Triton launches in one line."""
    per = len(events) // REPEATS
    mean = [(events[i][0], sum(events[r * per + i][1] for r in range(REPEATS)) / REPEATS) for i in range(per)]
    runs = []                                       # [Triton kernel name or None for PyTorch's, ms, launches]
    for name, ms in mean:
        if not is_triton(name) and runs and runs[-1][0] is None:
            runs[-1][1:] = runs[-1][1] + ms, runs[-1][2] + 1
        else:
            runs.append([name if is_triton(name) else None, ms, 1])
    return [(name or f"PyTorch's kernels ({launches} launches)", ms) for name, ms, launches in runs]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=parse_heads, default=parse_heads("64/4,32/8,32/32"))
    parser.add_argument("--seq-len", type=parse_lengths, default=parse_lengths("64k"))
    parser.add_argument("--docs", type=int, default=1, help="documents of equal length packed in the tokens")
    args = parser.parse_args()
    for N in args.seq_len:
        for Hq, H in args.heads:
            packing = {}
            if args.docs > 1:
                config = NSAConfig()
                lengths = [N // args.docs + (i < N % args.docs) for i in range(args.docs)]
                inputs, packing["cu_seqlens"] = packed_inputs(lengths, Hq, H, 128, config)
                inputs = [t.requires_grad_() for t in inputs]
            else:
                inputs, config = make_inputs(N, Hq, H, 128)

            def forward():
                return native_sparse_attention(*inputs, config, backend="triton", **packing)

            def forward_backward():
                for t in inputs:
                    t.grad = None
                o = forward()
                o.backward(torch.ones_like(o))

            with torch.no_grad():
                lines = forward_in_order(kernel_events(forward))
            print(f"== {N} tokens in {args.docs} documents, heads {Hq}/{H}: forward, kernel time {sum(ms for _, ms in lines):.2f} ms, launches in order")
            for name, ms in lines:
                print(f"  {ms:8.3f} ms  {name[:90]}")
            with torch.no_grad():
                print_call_times("forward", forward)
            total, count = collections.defaultdict(float), collections.Counter()
            for name, ms in kernel_events(forward_backward):
                total[name] += ms / REPEATS
                count[name] += 1
            print(f"== {N} tokens in {args.docs} documents, heads {Hq}/{H}: forward + backward, kernel time {sum(total.values()):.2f} ms")
            for name, ms in sorted(total.items(), key=lambda x: -x[1])[:14]:
                print(f"  {ms:8.3f} ms  x{count[name] // REPEATS}  {name[:90]}")
            print_call_times("forward + backward", forward_backward)
            del inputs
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
