"""Compile chapter 13's four decoding kernels for a GPU offline (no GPU needed): time and registers.

    python benchmarks/decode_compile.py [--arch 90]

For each step shape below, `sparse_attention_decode_triton` runs on empty CPU tensors with its
kernel launches recorded instead of made (the tensors pose as CUDA ones, 132 multiprocessors, so
the launcher picks a GPU's splits and tiles); Triton then compiles each recorded launch for
`sm_<arch>` with the launcher's own meta-parameters, and `cuobjdump` reads its registers. A
kernel that Triton cannot finish compiling shows here as a hang (the CI test runs this with a
timeout): stage 3 once sent Triton 3.6 and 3.7 into an endless layout pass, found only when a
GPU machine waited on it. Triton is imported before `nsa`, so the kernels are compiled, not
interpreted.
"""

import argparse
import inspect
import sys
import time
import warnings

import triton  # before nsa: a machine without CUDA would switch on the interpreter otherwise
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import torch
from select_registers import resource_usage  # benchmarks/, this script's folder

# (query heads, kv heads, new tokens, batch, context): one token at the three head configurations
# of chapter 11, several tokens (speculative decoding), group 1 with two tokens
SHAPES = ((64, 4, 1, 1, 65536), (32, 8, 1, 16, 65536), (32, 32, 1, 1, 65536), (64, 4, 3, 2, 131072),
          (8, 8, 2, 1, 8192))
POINTER = {torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int32: "*i32", torch.int64: "*i64"}


class Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **meta)` records (kernel, args, meta)."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **meta: self.launches.append((self.kernel, args, meta))


def recorded_launches(heads_q, heads_kv, tokens, batch, context):
    from nsa import NSAConfig
    from nsa.geometry import num_compressed_blocks
    from nsa.kernels import decode

    launches, names = [], [n for n in vars(decode) if n.startswith("decode_") and n.endswith("_kernel")]
    saved = {n: getattr(decode, n) for n in names} | {"multiprocessors": decode.multiprocessors}
    config = NSAConfig()
    rows = num_compressed_blocks(context, config.compress_block_size, config.compress_stride)
    bf16 = dict(dtype=torch.bfloat16)
    q, gate = torch.empty(batch, tokens, heads_q, 128, **bf16), torch.empty(batch, tokens, heads_q, **bf16)
    cache, compressed = torch.empty(batch, context, heads_kv, 128, **bf16), torch.empty(batch, rows, heads_kv, 128, **bf16)
    lengths = torch.full((batch,), context - tokens, dtype=torch.int32)
    is_cuda = torch.Tensor.is_cuda
    try:
        for n in names:
            setattr(decode, n, Recorder(saved[n], launches))
        decode.multiprocessors = lambda device: 132
        torch.Tensor.is_cuda = property(lambda self: True)
        decode.sparse_attention_decode_triton(q, cache, cache, compressed, compressed, lengths, gate, gate, gate,
                                              config, 128 ** -0.5, 0)
    finally:
        torch.Tensor.is_cuda = is_cuda
        for n, fn in saved.items():
            setattr(decode, n, fn)
    return launches


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    print(f"triton {triton.__version__}, sm_{args.arch}")
    for shape in SHAPES:
        for kernel, launch_args, meta in recorded_launches(*shape):
            options = {key: meta.pop(key) for key in ("num_warps", "num_stages") if key in meta}
            params = list(inspect.signature(kernel.fn).parameters)
            signature = {p: POINTER[a.dtype] if isinstance(a, torch.Tensor) else "fp32" if isinstance(a, float)
                         else "i32" for p, a in zip(params, launch_args)}
            signature |= {p: "constexpr" for p in params[len(launch_args):]}
            start = time.perf_counter()
            compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=meta),
                                      target=GPUTarget("cuda", args.arch, 32), options=options)
            seconds = time.perf_counter() - start
            fields = resource_usage(compiled)
            heads_q, heads_kv, tokens, batch, context = shape
            print(f"{heads_q}/{heads_kv} heads, T={tokens}, batch {batch}, {context} tokens: {kernel.fn.__name__} "
                  f"compiled in {seconds:.1f} s, {fields['REG']} registers, {fields['STACK']} bytes of stack",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
