"""Which kernels NSA's Triton backend compiles when a sequence length of a new class arrives (GPU).

    python benchmarks/gpu_length_class_kernels.py --heads 64/4 [--lengths 1000,16384,16385,65536]

One process, one emptied Triton cache (TRITON_CACHE_DIR), bf16, d = 128, the paper's geometry: a
forward + backward of `native_sparse_attention(..., backend="triton")` at each length in turn,
timed (synchronised), and after each call the kernels it added to the cache, by name. Triton
compiles a kernel again for an integer argument of a new class (equal to 1, divisible by 16) unless
`do_not_specialize` names it, and for a new pointer dtype or constexpr; the list says which kernels
a running job pays for at a new length (chapter 7, the appendix's "Length specialisation"). The
output is what `book/data/first_call_kernels_h100.txt` holds, one run per head configuration. Needs
a CUDA GPU: Triton's CPU interpreter compiles nothing.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

CACHE = tempfile.mkdtemp(prefix="nsa_triton_cache_")
os.environ["TRITON_CACHE_DIR"] = CACHE                # before triton is imported: an empty cache of our own

ROOT = Path(__file__).resolve().parent.parent         # the checkout: its nsa, without an install
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from nsa import native_sparse_attention  # noqa: E402
from nsa.bench import make_inputs, parse_heads, parse_lengths  # noqa: E402


def compiled_kernels() -> dict[str, str]:
    """{cache entry: the kernel's name} for every compiled kernel in the cache (its .ttir file)."""
    return {entry.name: ttir.stem for entry in Path(CACHE).iterdir() if entry.is_dir()
            for ttir in entry.glob("*.ttir")}


def forward_backward_seconds(seq_len: int, heads_q: int, heads_kv: int) -> float:
    """Seconds of one synchronised forward + backward at `seq_len` tokens (batch 1, bf16, d = 128)."""
    inputs, config = make_inputs(seq_len, heads_q, heads_kv, 128)
    torch.cuda.synchronize()
    start = time.perf_counter()
    native_sparse_attention(*inputs, config, backend="triton").sum().backward()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", default="64/4", help="one head configuration, query/kv")
    parser.add_argument("--lengths", default="1000,16384,16385,65536", help="the calls' lengths, in order")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_length_class_kernels.py needs a CUDA GPU (the interpreter compiles nothing)")
        return 2
    (heads_q, heads_kv), = parse_heads(args.heads)
    print(f"== {heads_q}/{heads_kv} on {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for seq_len in parse_lengths(args.lengths):
        before = compiled_kernels()
        seconds = forward_backward_seconds(seq_len, heads_q, heads_kv)
        new = sorted(name for entry, name in compiled_kernels().items() if entry not in before)
        print(f"{seq_len}: {seconds:.2f} s, {len(new)} new: {new}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
