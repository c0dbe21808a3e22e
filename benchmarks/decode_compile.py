"""Compile chapter 13's decoding kernels for a GPU offline (no GPU needed): time and registers.

    python benchmarks/decode_compile.py [--arch 90]

For each step shape in the script's `SHAPES`, a layer's step — its cache writes with the MLP phi (the new keys and
values appended, `compress_mlp_kernel` for both, the write; then the write of mean pooling, which
takes the means itself) and `sparse_attention_decode_triton`'s
four kernels — runs on empty CPU tensors with its kernel launches recorded instead of made (the
tensors pose as CUDA ones, 132 multiprocessors, so the launchers pick a GPU's splits and tiles);
Triton then compiles each recorded launch for
`sm_<arch>` with the launcher's own meta-parameters, and `cuobjdump` reads its registers. A
kernel that Triton cannot finish compiling shows here as a hang (the CI test runs this with a
timeout): stage 3 once sent Triton 3.6 and 3.7 into an endless layout pass, found only when a
GPU machine waited on it. Triton is imported before `nsa`, so the kernels are compiled, not
interpreted.
"""

import argparse
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent      # the checkout: its nsa, without an install
sys.path.insert(0, str(ROOT))

import triton  # before nsa: a machine without CUDA would switch on the interpreter otherwise

import torch
from offline_compile import compile_launch, recorded, resource_usage  # benchmarks/, this script's folder

# (query heads, kv heads, new tokens, batch, context): one token at the three head configurations
# of chapter 11, several tokens (speculative decoding), group 1 with two tokens
SHAPES = ((64, 4, 1, 1, 65536), (32, 8, 1, 16, 65536), (32, 32, 1, 1, 65536), (64, 4, 3, 2, 131072),
          (8, 8, 2, 1, 8192))


def recorded_launches(heads_q, heads_kv, tokens, batch, context):
    from nsa import CompressionMLP, NSAConfig
    from nsa.geometry import num_compressed_blocks
    from nsa.kernels import cache as writes
    from nsa.kernels import decode

    names = [n for n in vars(decode) if n.startswith("decode_") and n.endswith("_kernel")]
    config = NSAConfig()
    rows = num_compressed_blocks(context, config.compress_block_size, config.compress_stride)
    bf16 = dict(dtype=torch.bfloat16)
    q, gate = torch.empty(batch, tokens, heads_q, 128, **bf16), torch.empty(batch, tokens, heads_q, **bf16)
    cache, compressed = torch.empty(batch, context, heads_kv, 128, **bf16), torch.empty(batch, rows, heads_kv, 128, **bf16)
    cache_seqlens = torch.full((batch,), context - tokens, dtype=torch.int32)
    l, d = config.compress_block_size, config.compress_stride
    phi = CompressionMLP(128, l).to(torch.bfloat16)
    new = torch.empty(batch, tokens, heads_kv, 128, **bf16)
    with recorded(writes, ["append_tokens_kernel", "compress_mlp_kernel", "write_blocks_kernel"]) as launches:
        writes.append_tokens_triton([cache, cache], [new, new], cache_seqlens)
        for phis in ([phi, phi], [None, None]):
            writes.compress_new_blocks_triton([cache, cache], [compressed, compressed], phis, cache_seqlens,
                                              cache_seqlens + tokens, tokens, l, d)
    with recorded(decode, names, multiprocessors=132) as attention:
        decode.sparse_attention_decode_triton(q, cache, cache, compressed, compressed, cache_seqlens, gate, gate, gate,
                                              config, 128 ** -0.5, 0)
    return launches + attention


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    print(f"triton {triton.__version__}, sm_{args.arch}")
    for shape in SHAPES:
        for kernel, launch_args, meta in recorded_launches(*shape):
            start = time.perf_counter()
            compiled = compile_launch(kernel, launch_args, meta, args.arch)
            seconds = time.perf_counter() - start
            fields = resource_usage(compiled)
            heads_q, heads_kv, tokens, batch, context = shape
            print(f"{heads_q}/{heads_kv} heads, T={tokens}, batch {batch}, {context} tokens: {kernel.fn.__name__} "
                  f"compiled in {seconds:.1f} s, {fields['REG']} registers, {fields['STACK']} bytes of stack",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
