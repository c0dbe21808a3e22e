"""The atomic adds of chapter 8b's kernels as a GPU executes them, compiled offline (no GPU needed).

    python benchmarks/atomics_sass.py [--heads 32/32] [--arch 90]

The key-block-centric launchers (`selected_by_block_fwd`, `selected_by_block_bwd`: 4k tokens,
bf16, d = 128, the paper's geometry) run with their launches recorded
(`offline_compile.recorded`); each recorded launch of the kernel that adds atomically (the
backward's gather kernel: dk, dv and dq; the forward stores its partial results) is compiled
for `sm_<arch>` with the launcher's meta-parameters, and its machine code (SASS, disassembled by
`cuobjdump`, shipped with Triton) is counted: the atomic instructions (`REDG`: an add whose
result is not read; `ATOMG`: one whose result is) and the memory-ordering instructions around
them (`MEMBAR.ALL.GPU`, `CCTL.IVALL`: a fence to the whole GPU and an invalidation of the SM's L1
cache). Triton's atomics default to acquire-release ordering, which sm_90 code implements with a
fence and an L1 invalidation around every atomic instruction; the kernels ask for relaxed
ordering (no kernel reads what another program adds during the same launch) and should show
none. Counts are static (instructions in the binary, not executions).
"""

import re
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent      # the checkout: its nsa, without an install
sys.path.insert(0, str(ROOT))

import triton  # noqa: F401 (before nsa: a machine without CUDA would switch on the interpreter otherwise)

import torch
from offline_compile import compile_launch, cuobjdump, heads_and_arch, recorded  # benchmarks/, this script's folder

KERNELS = ("selected_attention_backward_dkdv_kernel",)   # it adds atomically
OTHER_KERNELS = ("selected_by_block_forward_kernel", "merge_partials_kernel",   # launched too, recorded and
                 "gate_and_delta_kernel")                                        # left out: no atomics
ORDERING = ("MEMBAR.ALL.GPU", "CCTL.IVALL")


def sass_counts(compiled) -> Counter:
    """{opcode (with its modifiers): how many times it appears} in a compiled kernel's SASS."""
    sass = cuobjdump(compiled, "-sass")
    return Counter(re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]+)", sass))


def recorded_launches(heads_q, heads_kv, seq_len=4096, dim=128):
    """The key-block-centric launches of one selected-branch forward and backward."""
    from nsa import NSAConfig
    from nsa.kernels import selected

    config, bf16 = NSAConfig(), dict(dtype=torch.bfloat16)
    q = torch.empty(1, seq_len, heads_q, dim, **bf16)
    k = torch.empty(1, seq_len, heads_kv, dim, **bf16)
    blocks = torch.zeros(1, seq_len, heads_kv, config.num_selected_blocks, dtype=torch.int32)
    lse = torch.empty(1, seq_len, heads_q)
    with recorded(selected, KERNELS + OTHER_KERNELS) as launches:
        _, _, index = selected.selected_by_block_fwd(q, k, k, blocks, config.select_block_size, 0.1, True)
        selected.selected_by_block_bwd(q, q, k, k, q, lse, blocks, config.select_block_size, 0.1, True, index=index)
    return [launch for launch in launches if launch[0].fn.__name__ in KERNELS]


def main() -> int:
    arch, head_pairs = heads_and_arch(__doc__, "32/32")
    for heads, heads_q, heads_kv in head_pairs:
        for kernel, launch_args, meta in recorded_launches(heads_q, heads_kv):
            counts = sass_counts(compile_launch(kernel, launch_args, meta, arch))
            atomics = sum(n for op, n in counts.items() if op.startswith(("REDG", "ATOMG")))
            ordering = sum(counts[op] for op in ORDERING)
            variant = ", ".join(f"{key}={meta[key]}" for key in ("ATOMIC_DQ",) if key in meta)
            shown = ", ".join(f"{op} {n}" for op, n in sorted(counts.items())
                              if op.startswith(("REDG", "ATOMG")) or op in ORDERING)
            print(f"{heads:>5} {kernel.fn.__name__} ({variant}): {atomics} atomic instructions, "
                  f"{ordering} ordering instructions ({shown})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
