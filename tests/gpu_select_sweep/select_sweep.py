"""One-off sweep of the selection kernel's variants (chapter 9): rows identical to the float32
reference at 4k, then median time at 64k, bf16, d=128, paper geometry. Writes a CSV to argv[1]."""
import csv, itertools, os, sys
sys.path.insert(0, os.path.dirname(__file__))
import nsa, torch, triton
from triton.testing import do_bench
from nsa.selection import select_blocks, selection_scores
from nsa.kernels.compressed import select_blocks_triton, head_dim_block, LOG2E
from run_select_variants import inputs, run_variant
from run_v2 import run

VARIANTS = {   # name: (callable(q, k_cmp, lse, N, config, warps, bm), warps list, bm list)
    "old: W dots tf32x3 + while merge": (lambda *a, w, bm: run_variant(*a, a[0].shape[-1] ** -0.5, 0, w, bm), (4, 8), (16,)),
    "old: W dots tf32x3, no merge": (lambda *a, w, bm: run_variant(*a, a[0].shape[-1] ** -0.5, 2, w, bm), (4, 8), (16,)),
    "no Eq. 9, no merge": (lambda *a, w, bm: run_variant(*a, a[0].shape[-1] ** -0.5, 3, w, bm), (4, 8), (16,)),
    "W dots tf32x3 + tl.sort merge": (lambda *a, w, bm: run_variant(*a, a[0].shape[-1] ** -0.5, 1, w, bm), (4, 8), (16,)),
    "by place + tl.sort merge": (lambda *a, w, bm: run_variant(*a, a[0].shape[-1] ** -0.5, 4, w, bm), (4, 8), (16,)),
    "by place, no merge": (lambda *a, w, bm: run(*a, 1, 0, False, w, bm), (4, 8), (16, 32)),
    "by place + while merge": (lambda *a, w, bm: run(*a, 1, 1, False, w, bm), (4, 8), (16, 32)),
    "by place + while merge + prefetch": (lambda *a, w, bm: run(*a, 1, 1, True, w, bm), (4,), (16, 32)),
}
rows = []
out = sys.argv[1] if len(sys.argv) > 1 else "select_sweep.csv"
for Hq, H in ((64, 4), (32, 8)):
    q, k_cmp, lse, config = inputs(4096, Hq, H, 128, torch.bfloat16, "cuda")
    ref = select_blocks(selection_scores(q.float(), k_cmp.float(), lse, 4096, config), 4096, config).sort(-1).values
    same = lambda x: (x.sort(-1).values == ref).all(-1).float().mean().item()
    checks = {"new kernel (select_blocks_triton)": same(select_blocks_triton(q, k_cmp, lse, 4096, config))}
    for name, (fn, warps, bms) in VARIANTS.items():
        checks[name] = same(fn(q, k_cmp, lse, 4096, config, w=4, bm=16))
    q, k_cmp, lse, config = inputs(65536, Hq, H, 128, torch.bfloat16, "cuda")
    t = do_bench(lambda: select_blocks_triton(q, k_cmp, lse, 65536, config), warmup=20, rep=100, return_mode="median")
    rows.append(dict(variant="new kernel (select_blocks_triton)", heads_q=Hq, heads_kv=H, warps="", block_m="", ms=f"{t:.3f}",
                     rows_identical_4k=f"{checks['new kernel (select_blocks_triton)']:.5f}"))
    print(rows[-1], flush=True)
    for name, (fn, warps, bms) in VARIANTS.items():
        for w, bm in itertools.product(warps, bms):
            if bm == 32 and Hq // H != 4:
                continue
            t = do_bench(lambda: fn(q, k_cmp, lse, 65536, config, w=w, bm=bm), warmup=20, rep=100, return_mode="median")
            rows.append(dict(variant=name, heads_q=Hq, heads_kv=H, warps=w, block_m=bm, ms=f"{t:.3f}",
                             rows_identical_4k=f"{checks[name]:.5f}"))
            print(rows[-1], flush=True)
    with open(out, "w", newline="") as f:
        f.write(f"# python tests/gpu_select_sweep/select_sweep.py (one-off, see chapter 9); {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; seq_len 65536, d 128, bf16, l=32 d=16 l'=64 n=16; rows_identical_4k: selection equal to the float32 PyTorch reference at 4096 tokens\n")
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader(); wr.writerows(rows)
