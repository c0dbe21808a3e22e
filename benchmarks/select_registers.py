"""Registers and stack of chapter 9's selection kernel, compiled offline for a GPU (no GPU needed).

    python benchmarks/select_registers.py [--build DIR] [--arch 90]

The launcher (`select_blocks_triton`) runs on empty CPU tensors posing as CUDA ones at 64k tokens
(bf16, d = 128, the paper's geometry) with 32/32, 32/8 and 64/4 heads, its kernel launch recorded
instead of made (`offline_compile.recorded`); Triton compiles each recorded launch for `sm_<arch>`
as its JIT would at that launch (`offline_compile.compile_launch`), and `cuobjdump` (shipped with
Triton) reads the binary's registers per thread and stack bytes (spills) — what a timing cannot
show, and a hint where a change moved the time. A build with packed sequences (chapter 10) is
compiled both ways: for a batch, and for one packed sequence of the same length. `--build DIR`
compiles the package found in DIR instead of the installed one (a copy of `nsa/` and `kernels/`,
e.g. `git archive REV nsa kernels | tar -x -C DIR`; its `nsa/kernels` is linked to `../kernels`
if missing). Triton is imported before `nsa`, so the kernels are compiled, not interpreted. The
numbers depend on Triton's version: compare builds compiled by the same one.
"""

import argparse
import importlib
import sys
import warnings
from pathlib import Path

import torch
import triton  # before nsa: a machine without CUDA would switch on the interpreter otherwise

from offline_compile import compile_launch, recorded, resource_usage  # benchmarks/, this script's folder

HEADS = ((32, 32), (32, 8), (64, 4))
SEQ_LEN = 65536


def recorded_selections(selection, heads_q, heads_kv, config):
    """The launcher's kernel launches at these heads: (packed?, (kernel, args, meta)) for a batch of
    one sequence, and, where the build packs sequences, for that sequence packed."""
    from nsa.geometry import num_compressed_blocks

    rows = num_compressed_blocks(SEQ_LEN, config.compress_block_size, config.compress_stride)
    q = torch.empty(1, SEQ_LEN, heads_q, 128, dtype=torch.bfloat16)
    k_cmp = torch.empty(1, rows, heads_kv, 128, dtype=torch.bfloat16)
    lse = torch.empty(1, SEQ_LEN, heads_q)
    selection.check_kernel_inputs = lambda *args, **kwargs: None        # CPU tensors posing as CUDA ones
    found = []
    with recorded(selection, ["select_blocks_kernel"]) as launches:
        selection.select_blocks_triton(q, k_cmp, lse, SEQ_LEN, config)
    found.append((False, launches[-1]))
    if hasattr(selection, "PackedRows"):
        cu = lambda n: torch.tensor([0, n], dtype=torch.int32)
        packed = selection.PackedRows(cu(SEQ_LEN), cu(SEQ_LEN), cu(rows), SEQ_LEN, rows)
        with recorded(selection, ["select_blocks_kernel"]) as launches:
            selection.select_blocks_launch(q, k_cmp, lse, SEQ_LEN, config, 128 ** -0.5, 0, packed)
        found.append((True, launches[-1]))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", type=Path, default=None, help="default: this checkout's nsa")
    parser.add_argument("--arch", type=int, default=90)
    args = parser.parse_args()
    if args.build is not None:
        link = args.build / "nsa" / "kernels"
        if not link.exists():
            link.symlink_to("../kernels")
        sys.path.insert(0, str(args.build.resolve()))
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # the checkout: its nsa, without an install
    warnings.simplefilter("ignore")
    import nsa
    selection = None
    for name in ("selection", "topk"):     # the module's name, and its name in builds before the rename
        try:
            module = importlib.import_module(f"nsa.kernels.{name}")
        except ImportError:
            continue
        # an editable install answers for a module the build lacks: take only the build's own
        if args.build is None or args.build.resolve() in Path(module.__file__).resolve().parents:
            selection = module
            break
    if selection is None:
        sys.exit(f"{args.build}: no kernels/selection.py (or topk.py) of its own")

    print(f"{selection.__file__}: triton {triton.__version__}, sm_{args.arch}")
    for heads_q, heads_kv in HEADS:
        for packed, (kernel, launch_args, meta) in recorded_selections(selection, heads_q, heads_kv, nsa.NSAConfig()):
            fields = resource_usage(compile_launch(kernel, launch_args, meta, args.arch))
            print(f"{heads_q}/{heads_kv} heads, {meta['BLOCK_M']} positions{' (packed)' if packed else ''}: "
                  f"{fields['REG']} registers, {fields['STACK']} bytes of stack", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
