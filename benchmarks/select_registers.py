"""Registers and stack of chapter 9's selection kernel, compiled offline for a GPU (no GPU needed).

    python benchmarks/select_registers.py [--build DIR] [--arch 90]

Triton compiles `select_blocks_kernel` for `sm_<arch>` (bf16, d = 128, the paper's geometry, the
launcher's tiles, `select_tiles`, and 4 warps, 3 stages) at 32/32, 32/8 and 64/4 heads, and `cuobjdump` (shipped
with Triton) reads each binary's registers per thread and stack bytes (spills) — what a timing
cannot show, and a hint where a change moved the time. `--build DIR` compiles the package found
in DIR instead of the installed one (a copy of `nsa/` and `kernels/`, e.g. `git archive REV nsa
kernels | tar -x -C DIR`; its `nsa/kernels` is linked to `../kernels` if missing). Triton is imported before `nsa`,
so the kernels are compiled, not interpreted. The numbers depend on Triton's version: compare
builds compiled by the same one.
"""

import argparse
import sys
from pathlib import Path

import triton  # before nsa: a machine without CUDA would switch on the interpreter otherwise
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from offline_compile import resource_usage  # benchmarks/, this script's folder

HEADS = ((32, 32), (32, 8), (64, 4))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", type=Path, default=None, help="default: the installed nsa")
    parser.add_argument("--arch", type=int, default=90)
    args = parser.parse_args()
    if args.build is not None:
        link = args.build / "nsa" / "kernels"
        if not link.exists():
            link.symlink_to("../kernels")
        sys.path.insert(0, str(args.build.resolve()))
    import warnings
    warnings.simplefilter("ignore")
    from nsa.kernels import topk                                  # noqa: E402
    from nsa.kernels.common import head_dim_block                 # noqa: E402

    kernel, config = topk.select_blocks_kernel, __import__("nsa").NSAConfig()
    print(f"{topk.__file__}: triton {triton.__version__}, sm_{args.arch}")
    for heads_q, heads_kv in HEADS:
        group = heads_q // heads_kv
        group_pad = triton.next_power_of_2(group)
        constants = dict(HEADS_Q=heads_q, GROUP=group, DIM_QK=128, BLOCK_DQK=head_dim_block(128),
                         CMP_BLOCK=config.compress_block_size, CMP_STRIDE=config.compress_stride,
                         SEL_BLOCK=config.select_block_size, NUM_SELECT=config.num_selected_blocks,
                         SLOTS=triton.next_power_of_2(config.num_selected_blocks),
                         NUM_INITIAL=config.num_initial_blocks, NUM_LOCAL=config.num_local_blocks, CAUSAL=True)
        if "GROUP_PAD" in kernel.arg_names:   # an older build: the group's heads as rows of one tile
            constants["GROUP_PAD"] = group_pad
        if hasattr(topk, "select_tiles"):    # the launcher's tiles; an older build's rule otherwise
            constants["BLOCK_M"], constants["BLOCK_S"] = topk.select_tiles(group_pad, config, True)
        else:
            constants["BLOCK_M"], constants["BLOCK_S"] = max(16, 128 // group_pad), topk.SELECT_STEP
        types = {"Q": "*bf16", "K_CMP": "*bf16", "LSE": "*fp32", "BLOCK_INDICES": "*i32", "scale_log2": "fp32",
                 **{name: "i32" for name in ("seq_len_q", "seq_len_k", "mem_kv_len", "num_cmp", "num_sel")},
                 **{name: "*i32" for name in ("CU_Q", "CU_K", "CU_CMP")}}
        # -- a build with packed sequences (chapter 10) compiles both ways; without (CU_None), one --
        for packed in ((False, True) if "PACKED" in kernel.arg_names else (None,)):
            extra = {} if packed is None else {"PACKED": packed}
            if "FIRST_IN_LOOP" in kernel.arg_names:   # as the launcher sets it
                extra["FIRST_IN_LOOP"] = group_pad > 1
            if packed is False:
                extra.update(CU_Q=None, CU_K=None, CU_CMP=None)
            signature = {name: "constexpr" if name in {**constants, **extra} else types[name]
                         for name in kernel.arg_names}
            pointers_aligned = {(i,): [["tt.divisibility", 16]] for i in range(4)}
            compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs={**constants, **extra},
                                                attrs=pointers_aligned),
                                      target=GPUTarget("cuda", args.arch, 32), options=dict(num_warps=4, num_stages=3))
            fields = resource_usage(compiled)
            print(f"{heads_q}/{heads_kv} heads, {constants['BLOCK_M']} positions{' (packed)' if packed else ''}: "
                  f"{fields['REG']} registers, {fields['STACK']} bytes of stack")
    return 0


if __name__ == "__main__":
    sys.exit(main())
