"""Registers and stack of every Triton kernel as the GPU's own JIT compiled it: one decoding step at
four shapes and one training forward + backward at 64k tokens for each head configuration.

    python benchmarks/gpu_registers.py > book/data/kernel_registers_<gpu>.txt

The GPU's answer to what `benchmarks/decode_compile.py`, `band_registers.py` and
`select_registers.py` estimate offline (with this machine's Triton, which may differ from the
offline one). The stack is the kernel's local memory (Triton's `n_spills` counts it in 4-byte
words): spilled registers. The inputs are those of `python -m nsa.bench_decode` and
`python -m nsa.bench` (random, bf16, head dim 128, the paper's geometry). Needs a CUDA GPU.
"""
import argparse
import importlib
import pkgutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

DECODE = ((65536, 1, 64, 4), (65536, 16, 32, 8), (65536, 1, 32, 32), (131072, 2, 64, 4))  # context, batch, heads
TRAIN = ((64, 4), (32, 8), (32, 32))                                                       # at 64k tokens


def jit_kernels():
    """Every @triton.jit function of nsa.kernels' modules."""
    import nsa.kernels

    found = []
    for module in pkgutil.iter_modules(nsa.kernels.__path__):
        for value in vars(importlib.import_module(f"nsa.kernels.{module.name}")).values():
            if isinstance(value, JITFunction) and value not in found:
                found.append(value)
    return found


def report(label):
    """Print each kernel compiled since the last report, then forget it (the next shape compiles anew)."""
    for kernel in jit_kernels():
        for entry in kernel.device_caches.values():
            compiled = entry[0]                              # {specialisation: CompiledKernel}
            for binary in compiled.values():
                md = binary.metadata
                print(f"{label} | {kernel.__name__:40} {md.num_warps} warps, {md.num_stages} stages: {binary.n_regs} "
                      f"registers, {4 * binary.n_spills} bytes of stack, {md.shared} bytes of shared memory", flush=True)
            compiled.clear()


def main() -> int:
    argparse.ArgumentParser(description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()   # --help, no options
    if not torch.cuda.is_available():
        print("benchmarks/gpu_registers.py needs a CUDA GPU")
        return 2
    from nsa import native_sparse_attention
    from nsa.bench import make_inputs
    from nsa.bench_decode import make_step

    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    for context, batch, heads_q, heads_kv in DECODE:
        with torch.no_grad():
            make_step(context, batch, heads_q, heads_kv, 128)[0]()
        torch.cuda.synchronize()
        report(f"decode {heads_q}/{heads_kv} batch {batch} {context}")
    for heads_q, heads_kv in TRAIN:
        inputs, config = make_inputs(65536, heads_q, heads_kv, 128)
        o = native_sparse_attention(*inputs, config, backend="triton")
        o.backward(torch.ones_like(o))
        torch.cuda.synchronize()
        report(f"train {heads_q}/{heads_kv} 65536")
        del inputs, o
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
