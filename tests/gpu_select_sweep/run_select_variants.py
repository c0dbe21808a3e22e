"""Select-kernel variants: same blocks as the current kernel (CPU or GPU), then timings (GPU)."""
import os, sys, itertools
sys.path.insert(0, os.path.dirname(__file__))
import nsa  # interpreter on CPU
import torch, triton
from nsa import NSAConfig, compress
from nsa.kernels.compressed import compressed_attention_triton, select_blocks_triton, head_dim_block, LOG2E
from select_variants import select_blocks_kernel

def run_variant(q, k_cmp, lse, N, config, scale, mode, warps, block_m=16, block_s=16):
    B, Nq, Hq, D = q.shape
    H = k_cmp.shape[2]
    l, d, ls = config.compress_block_size, config.compress_stride, config.select_block_size
    out = torch.empty(B, Nq, H, config.num_selected_blocks, device=q.device, dtype=torch.int32)
    G = Hq // H
    select_blocks_kernel[(triton.cdiv(Nq, block_m), B, H)](
        q, k_cmp, lse, out, scale * LOG2E, Nq, N, 0, k_cmp.shape[1], triton.cdiv(N, ls),
        HEADS_Q=Hq, GROUP=G, GROUP_PAD=triton.next_power_of_2(G), DIM_QK=D, BLOCK_DQK=head_dim_block(D),
        CMP_BLOCK=l, CMP_STRIDE=d, SEL_BLOCK=ls, NUM_SELECT=config.num_selected_blocks,
        SLOTS=triton.next_power_of_2(config.num_selected_blocks), NUM_INITIAL=config.num_initial_blocks,
        NUM_LOCAL=config.num_local_blocks, CAUSAL=True, BLOCK_M=block_m, BLOCK_S=block_s, MODE=mode, num_warps=warps)
    return out

def inputs(N, Hq, H, D, dtype, device):
    config = NSAConfig()
    g = torch.Generator(device=device).manual_seed(N)
    q = torch.randn(1, N, Hq, D, generator=g, device=device, dtype=dtype)
    k = torch.randn(1, N, H, D, generator=g, device=device, dtype=dtype)
    v = torch.randn(1, N, H, D, generator=g, device=device, dtype=dtype)
    k_cmp = compress(k, block_size=32, stride=16).contiguous()
    v_cmp = compress(v, block_size=32, stride=16).contiguous()
    _, lse = compressed_attention_triton(q, k_cmp, v_cmp, 32, 16, D ** -0.5, seq_len_k=N)
    return q, k_cmp, lse, config

if __name__ == "__main__":
    gpu = torch.cuda.is_available()
    dev = "cuda" if gpu else "cpu"
    dtype = torch.bfloat16 if gpu else torch.float32
    sizes = [(4096, 64, 4), (4096, 32, 8)] if gpu else [(300, 16, 1), (200, 8, 2)]
    for N, Hq, H in sizes:
        q, k_cmp, lse, config = inputs(N, Hq, H, 128 if gpu else 32, dtype, dev)
        ref = select_blocks_triton(q, k_cmp, lse, N, config)
        for mode in (1, 4, 5):
            got = run_variant(q, k_cmp, lse, N, config, q.shape[-1] ** -0.5, mode, 4)
            same = (got == ref).all(-1).float().mean().item()
            print(f"check N={N} {Hq}/{H} mode {mode}: rows identical {same:.6f}")
    if gpu:
        from triton.testing import do_bench
        print("timings at 64k")
        for Hq, H in ((64, 4), (32, 8)):
            q, k_cmp, lse, config = inputs(65536, Hq, H, 128, dtype, dev)
            s = q.shape[-1] ** -0.5
            t0 = do_bench(lambda: select_blocks_triton(q, k_cmp, lse, 65536, config), warmup=20, rep=100, return_mode="median")
            print(f"{Hq}/{H} current {t0:.2f} ms", flush=True)
            for mode, warps in itertools.product((0, 1, 2, 3, 4, 5), (4, 8)):
                t = do_bench(lambda: run_variant(q, k_cmp, lse, 65536, config, s, mode, warps), warmup=20, rep=100, return_mode="median")
                kern = select_blocks_kernel
                print(f"{Hq}/{H} mode {mode} warps {warps}: {t:.2f} ms", flush=True)
