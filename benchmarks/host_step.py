"""The host's time in one decoding step of a `SparseAttention` layer, measured without a GPU.

    python benchmarks/host_step.py [--width 256] [--heads 8/2] [--dim-head 32] [--context 4096]
        [--mean] [--steps 1000] [--profile N]

Without a CUDA graph a decoding step costs what the host spends on it, not what the GPU does:
at one token a row the kernels are short and the host is the slower side (chapter 13). This
script measures that host time on the CPU. The layer's tensors stay on the CPU but say they are
on CUDA; Triton takes its real launch path (binding and specialising every argument, finding the
compiled kernel, which it compiles once for sm_90 on first use), and only the last call, to the
driver's launcher, does nothing: a `DriverBase` of Triton's whose launcher is a no-op. PyTorch's
own operations (the projections, views, allocations) run on the CPU on the step's small tensors.
So the number is the Python and dispatch cost of a step on this machine, without CUDA's own
launch cost (a few microseconds a kernel) and with the CPU's arithmetic for the small
projections instead (`--width` keeps it small; one thread). Prints the median over five rounds
of `--steps` steps each (the cache rolled back between rounds, so every step sees the same
context) — a time that varies from run to run on a shared machine: compare builds in turns —
and the Python function calls a step makes (cProfile's count, the same in every run), and with
`--profile N` the N functions with the most own time.
Import triton before nsa (this script does): `nsa` would switch on Triton's interpreter on a
machine without CUDA otherwise.
"""

import argparse
import cProfile
import contextlib
import pstats
import statistics
import sys
import time
import warnings
from pathlib import Path

import triton  # before nsa: a machine without CUDA would switch on the interpreter otherwise

import torch
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.runtime import driver

ROOT = Path(__file__).resolve().parent.parent
WARM_UP = 50      # steps before the timed ones
sys.path.insert(0, str(ROOT))


class LaunchesNothing(DriverBase):
    """A CUDA driver for Triton that launches nothing: an sm_90 target, device 0, stream 0, a
    kernel "loaded" without a GPU, and a launcher that returns at once."""

    class utils:                                          # noqa: N801  (Triton reads driver.utils)
        @staticmethod
        def load_binary(name, kernel, shared, device):
            return 1, 1, 0, 0, 1024                   # module, function, registers, spills, max threads

        @staticmethod
        def get_device_properties(device):
            return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}

    @classmethod
    def is_active(cls):
        return True

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def launcher_cls(self, src, metadata):
        return lambda *args: None

    def map_python_to_cpp_type(self, ty):
        raise NotImplementedError

    def get_benchmarker(self):
        raise NotImplementedError

    def get_device_interface(self):
        raise NotImplementedError


@contextlib.contextmanager
def launching_nothing():
    """Inside: Triton's launches go through `LaunchesNothing`, every tensor says it is on CUDA
    (the layer and the launchers take their GPU paths), and the decoding launchers size their
    splits for an H200's 132 multiprocessors."""
    from nsa.kernels import common, decode
    saved = common.INTERPRET, decode.multiprocessors, driver._active
    driver.set_active(LaunchesNothing())
    common.INTERPRET = True                   # the CPU tensors pass the kernels' device check
    decode.multiprocessors = lambda device: 132
    torch.Tensor.is_cuda = property(lambda self: True)
    try:
        yield
    finally:
        del torch.Tensor.is_cuda                  # TensorBase's own again
        common.INTERPRET, decode.multiprocessors = saved[:2]
        driver.set_active(saved[2])             # None: Triton finds the machine's own driver when asked


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", default="8/2")
    parser.add_argument("--dim-head", type=int, default=32)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--mean", action="store_true", help="mean pooling instead of the paper's MLP phi")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--profile", type=int, default=0, metavar="N")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    from nsa import SparseAttention
    heads, kv_heads = map(int, args.heads.split("/"))
    torch.set_num_threads(1)           # the small projections' arithmetic on one thread (a GPU's host does none)
    torch.manual_seed(0)
    layer = SparseAttention(args.width, heads=heads, kv_heads=kv_heads, dim_head=args.dim_head, backend="triton",
                            compress_mlp=not args.mean).eval()
    with launching_nothing(), torch.no_grad():
        cache = layer.new_cache(1, args.context + max(args.steps, WARM_UP))
        layer(torch.randn(1, args.context, args.width), cache=cache)        # a prefill: its launches compile
        x = torch.randn(1, 1, args.width)
        for _ in range(WARM_UP):                                                # every step's kernels compiled
            layer(x, cache=cache)
        rounds = []
        for _ in range(5):
            cache.truncate_(args.context)
            start = time.perf_counter()
            for _ in range(args.steps):
                layer(x, cache=cache)
            rounds.append((time.perf_counter() - start) / args.steps * 1e6)
        print(f"triton {triton.__version__}, torch {torch.__version__}; width {args.width}, heads {args.heads}, "
              f"head dim {args.dim_head}, {'mean pooling' if args.mean else 'MLP phi'}, context {args.context}: "
              f"{statistics.median(rounds):.0f} us of host time per layer step "
              f"(rounds {', '.join(f'{r:.0f}' for r in rounds)})")
        cache.truncate_(args.context)
        profile = cProfile.Profile()
        profile.runcall(lambda: [layer(x, cache=cache) for _ in range(args.steps)])
        stats = pstats.Stats(profile)
        print(f"{stats.total_calls / args.steps:.0f} Python function calls per layer step "
              "(cProfile: a count, not a time)")
        if args.profile:
            stats.sort_stats("tottime").print_stats(args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
