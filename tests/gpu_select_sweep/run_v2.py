"""select_v2 variants: agreement with the float32 torch selection and the current kernel; timings."""
import os, sys, itertools
sys.path.insert(0, os.path.dirname(__file__))
import nsa
import torch, triton
from nsa import NSAConfig
from nsa.selection import select_blocks, selection_scores
from nsa.kernels.compressed import select_blocks_triton, head_dim_block, LOG2E
from run_select_variants import inputs
from select_v2 import select_v2_kernel

def run(q, k_cmp, lse, N, config, eq9, merge, pre, warps, block_m=16):
    B, Nq, Hq, D = q.shape
    H = k_cmp.shape[2]; G = Hq // H
    out = torch.empty(B, Nq, H, config.num_selected_blocks, device=q.device, dtype=torch.int32)
    select_v2_kernel[(triton.cdiv(Nq, block_m), B, H)](
        q, k_cmp, lse, out, D ** -0.5 * LOG2E, Nq, N, 0, k_cmp.shape[1], triton.cdiv(N, 64),
        HEADS_Q=Hq, GROUP=G, GROUP_PAD=triton.next_power_of_2(G), DIM_QK=D, BLOCK_DQK=head_dim_block(D),
        CMP_BLOCK=32, CMP_STRIDE=16, SEL_BLOCK=64, NUM_SELECT=16, SLOTS=16, NUM_INITIAL=1, NUM_LOCAL=2,
        CAUSAL=True, BLOCK_M=block_m, BLOCK_S=16, EQ9=eq9, MERGE=merge, PREFETCH=pre, num_warps=warps)
    return out

VARIANTS = [(1, 0, False), (1, 1, False), (1, 1, True), (0, 1, True)]
if __name__ == "__main__":
    gpu = torch.cuda.is_available()
    dev = "cuda" if gpu else "cpu"
    dtype = torch.bfloat16 if gpu else torch.float32
    sizes = [(4096, 64, 4), (4096, 32, 8)] if gpu else [(300, 16, 1), (200, 8, 2)]
    for N, Hq, H in sizes:
        q, k_cmp, lse, config = inputs(N, Hq, H, 128 if gpu else 32, dtype, dev)
        ref = select_blocks(selection_scores(q.float(), k_cmp.float(), lse, N, config), N, config).sort(-1).values
        cur = select_blocks_triton(q, k_cmp, lse, N, config)
        rows = lambda x: (x.sort(-1).values == ref).all(-1).float().mean().item()
        print(f"check N={N} {Hq}/{H} current vs torch fp32: {rows(cur):.5f}")
        for eq9, merge, pre in VARIANTS[1:]:
            for bm in ((16, 32) if Hq // H == 4 else (16,)):
                got = run(q, k_cmp, lse, N, config, eq9, merge, pre, 4, bm)
                print(f"check N={N} {Hq}/{H} eq9 {eq9} merge {merge} prefetch {pre} bm {bm}: vs torch {rows(got):.5f} vs current {(got == cur).all(-1).float().mean().item():.5f}")
    if gpu:
        from triton.testing import do_bench
        for Hq, H in ((64, 4), (32, 8)):
            q, k_cmp, lse, config = inputs(65536, Hq, H, 128, dtype, dev)
            t0 = do_bench(lambda: select_blocks_triton(q, k_cmp, lse, 65536, config), warmup=20, rep=100, return_mode="median")
            print(f"64k {Hq}/{H} current {t0:.2f} ms", flush=True)
            for (eq9, merge, pre), warps, bm in itertools.product(VARIANTS, (4, 8), (16, 32)):
                if bm == 32 and Hq // H != 4:
                    continue
                t = do_bench(lambda: run(q, k_cmp, lse, 65536, config, eq9, merge, pre, warps, bm), warmup=20, rep=100, return_mode="median")
                print(f"64k {Hq}/{H} eq9 {eq9} merge {merge} prefetch {pre} warps {warps} bm {bm}: {t:.2f} ms", flush=True)
