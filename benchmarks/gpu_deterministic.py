"""What reproducible gradients cost the whole NSA op, and whether they reproduce (GPU).

    python benchmarks/gpu_deterministic.py [--heads 64/4,32/8,32/32] [--seq-len 64k] [--no-fill] [--tiny]

Under `torch.use_deterministic_algorithms(True)` the Triton backward takes its reproducible path
(chapter 8): the chunks of each key block in the selected branch's gather kernel add their `dk, dv`
in turn, and for the GQA groups that run key-block-centric (chapter 8b) each row's `dq` over each
block goes to a slot, the slots summed in order (a group of kv heads at a time), instead of atomic
adds. For each head shape, on `nsa.bench`'s inputs (bf16, d = 128, the paper's geometry, `--seq-len`
tokens): forward + backward of `native_sparse_attention(backend="triton")` by default and under the
switch — the time (triton.testing.do_bench, median), the peak memory, how many elements of the eight
gradients differ between two runs of each, and the largest difference between the two modes
(relative to the gradient's largest entry). PyTorch's own setting `fill_uninitialized_memory` (on by
default under the switch: every torch.empty is filled) is left as a user gets it — the kernels'
launchers turn it off for their own buffers (`written_before_read`) — and `--no-fill` turns it off
everywhere (`torch.utils.deterministic.fill_uninitialized_memory = False`), to see what remains.
`--tiny`: a small problem in Triton's CPU interpreter, one run of each mode (a check of the script;
there every run is the same).
"""

import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from nsa.bench import make_inputs, parse_heads, parse_lengths  # noqa: E402
from nsa.sparse_attention import native_sparse_attention  # noqa: E402


def row_text(heads, mode, ms, peak, differ, worst) -> str:
    """One line of the table: heads, mode, fwd+bwd ms, peak GiB, elements differing, vs default."""
    return f"{heads:>6} {mode:>13} {ms:11.2f} {peak:9.2f} {differ:19d} {worst:11.1e}"


@contextlib.contextmanager
def deterministic_algorithms(on: bool):
    """torch.use_deterministic_algorithms(on) for the block, then as it was."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", default="64/4,32/8,32/32")
    parser.add_argument("--seq-len", default="64k")
    parser.add_argument("--tiny", action="store_true", help="a small problem in the CPU interpreter")
    parser.add_argument("--no-fill", action="store_true", help="torch.empty unfilled under the switch")
    args = parser.parse_args()
    torch.utils.deterministic.fill_uninitialized_memory = not args.no_fill
    if not args.tiny and not torch.cuda.is_available():
        print("gpu_deterministic.py needs a CUDA GPU (or --tiny)")
        return 2
    device, dtype = ("cpu", torch.float32) if args.tiny else ("cuda", torch.bfloat16)
    N = 40 if args.tiny else parse_lengths(args.seq_len)[0]
    dim = 16 if args.tiny else 128
    print(f"{N} tokens, d = {dim}, {dtype}, " + (torch.cuda.get_device_name() if device == "cuda" else "interpreter"))
    header = (f"{'heads':>6} {'mode':>13} {'fwd+bwd ms':>11} {'peak GiB':>9} {'elements differing':>19} "
              f"{'vs default':>11}")
    rows = []
    for heads_q, heads_kv in parse_heads(args.heads):
        tensors, config = make_inputs(N, heads_q, heads_kv, dim, dtype, device)
        do = torch.randn(1, N, heads_q, dim, device=device, dtype=dtype)

        def step():
            for t in tensors:
                t.grad = None
            native_sparse_attention(*tensors, config, backend="triton").backward(do)
            return [t.grad.clone() for t in tensors]

        runs = {}
        for mode, on in (("default", False), ("deterministic", True)):
            with deterministic_algorithms(on):
                runs[mode] = [step()] if args.tiny else [step(), step()]
                ms, peak = float("nan"), float("nan")
                if not args.tiny:
                    from triton.testing import do_bench
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    step()
                    peak = torch.cuda.max_memory_allocated() / 2**30
                    ms = do_bench(step, warmup=10, rep=100, return_mode="median")
            differ = sum((a != b).sum().item() for a, b in zip(*runs[mode])) if len(runs[mode]) == 2 else -1
            worst = max(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()
                        for a, b in zip(runs[mode][0], runs["default"][0]))
            rows.append((f"{heads_q}/{heads_kv}", mode, ms, peak, differ, worst))
            print(row_text(*rows[-1]), flush=True)
            if on:
                assert differ <= 0, f"{heads_q}/{heads_kv}: {differ} elements differ between two reproducible runs"
                assert worst < (1e-5 if args.tiny else 3e-2), (heads_q, heads_kv, worst)
        del tensors, runs
        if device == "cuda":
            torch.cuda.empty_cache()
    print(header)
    for row in rows:
        print(row_text(*row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
