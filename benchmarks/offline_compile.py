"""Compile the book's Triton kernels for a GPU on a machine without one: what the offline scripts
(`select_registers.py`, `decode_compile.py`, `band_registers.py`) share.

A launcher runs on empty CPU tensors posing as CUDA ones, with its kernels replaced by recorders
(`recorded`): each `kernel[grid](*args, **meta)` is kept instead of made. `compile_launch` then
compiles a recorded launch for `sm_<arch>` with the launcher's own meta-parameters, and
`resource_usage` reads the binary's registers and stack (spills) with `cuobjdump`. Import triton
before nsa (these scripts do), so that the kernels are compiled, not interpreted.
"""

import argparse
import contextlib
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

def cuobjdump(compiled, *flags) -> str:
    """What cuobjdump (shipped with Triton) prints for a compiled kernel's binary with `flags`."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([str(tool), *flags, f.name], capture_output=True, text=True, check=True).stdout


def resource_usage(compiled) -> dict:
    """A compiled kernel's resources as cuobjdump reads its binary: {"REG": registers per thread,
    "STACK": bytes of stack, "SHARED": ..., ...} as strings."""
    usage = cuobjdump(compiled, "--dump-resource-usage")
    return dict(item.split(":") for line in usage.splitlines() if "REG:" in line for item in line.split())


class Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **meta)` records (kernel, args, meta), and the
    grid into `grids` if given."""

    def __init__(self, kernel, launches, grids=None):
        self.kernel, self.launches, self.grids = kernel, launches, grids

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.launches.append((self.kernel, args, dict(meta)))
            if self.grids is not None:
                self.grids.append(tuple(grid))
        return launch


@contextlib.contextmanager
def recorded(module, names, multiprocessors=None, grids=None):
    """Inside: the kernels `names` of `module` record their launches into the yielded list (and
    their grids into `grids`, a list, if given), and every tensor says it is on CUDA (so launchers
    pick a GPU's tiles); `multiprocessors`, if given, is what `module.multiprocessors` answers."""
    launches, saved = [], {name: getattr(module, name) for name in names}
    if multiprocessors is not None:
        saved["multiprocessors"] = module.multiprocessors
    is_cuda = torch.Tensor.is_cuda
    try:
        for name in names:
            setattr(module, name, Recorder(saved[name], launches, grids))
        if multiprocessors is not None:
            module.multiprocessors = lambda device: multiprocessors
        torch.Tensor.is_cuda = property(lambda self: True)
        yield launches
    finally:
        torch.Tensor.is_cuda = is_cuda
        for name, value in saved.items():
            setattr(module, name, value)


def compile_launch(kernel, args, meta, arch: int = 90):
    """Compile one recorded launch for sm_<arch> as Triton's JIT compiles it at launch on a GPU:
    its arguments bound by Triton's own binder (`JITFunction.run`'s path: pointers and integers
    divisible by 16 marked so, an integer 1 made a constant, the kernel's `do_not_specialize`
    honoured, None a constexpr), the meta-parameters as constexprs, num_warps and num_stages as
    options. Returns Triton's compiled kernel."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **meta)
    options, signature, constexprs, attrs = kernel._pack_args(backend, dict(meta), bound_args, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def heads_and_arch(description: str, default_heads: str, parser: argparse.ArgumentParser | None = None):
    """The command line the head-sweeping offline scripts share: --heads (comma-separated
    query/kv pairs) and --arch, added to `parser` (a script's own flags) or a new one. Silences
    warnings and prints Triton's version and the target; returns (arch, [(label, heads_q,
    heads_kv), ...]), and with `parser` the parsed arguments too."""
    own = parser
    parser = parser or argparse.ArgumentParser(description=description,
                                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", default=default_heads)
    parser.add_argument("--arch", type=int, default=90)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    print(f"triton {triton.__version__}, sm_{args.arch}")
    pairs = [(heads, *map(int, heads.split("/"))) for heads in args.heads.split(",")]
    return (args.arch, pairs) if own is None else (args.arch, pairs, args)
