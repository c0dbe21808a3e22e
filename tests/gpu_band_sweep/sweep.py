"""P2 sweep, run 1 (H100): old kernels (old_compressed.py = kernels/compressed.py at commit 5715c22) vs a first new version (masks at the edges in all band kernels; dk, dv query chunks). Run: python tests/gpu_band_sweep/sweep.py OUT_DIR (on a GPU; P2_TINY=1 TRITON_INTERPRET=1 for a CPU smoke test). The final kernels differ (see sweep2.py); this script does not run against them."""
# The "old" kernels are those of commit 5715c22; recreate them before running:
#   git show 5715c22:kernels/compressed.py > tests/gpu_band_sweep/old_compressed.py
import sys, time, math, csv, traceback
from pathlib import Path
import torch, triton
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(Path(__file__).resolve().parent))
import nsa  # noqa
import importlib.util
try:
    import nsa.kernels  # noqa
except ImportError:
    spec = importlib.util.spec_from_file_location("nsa.kernels", ROOT / "kernels" / "__init__.py",
                                                  submodule_search_locations=[str(ROOT / "kernels")])
    m = importlib.util.module_from_spec(spec); sys.modules["nsa.kernels"] = m; spec.loader.exec_module(m); nsa.kernels = m
from nsa.kernels import compressed as C
import old_compressed as O
from nsa.kernels.window import window_band
from nsa.config import NSAConfig

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/p2out"); OUT.mkdir(parents=True, exist_ok=True)
rows_csv = []
def rec(name, ms, err=""):
    rows_csv.append(dict(name=name, ms=f"{ms:.3f}", check=err)); print(f"  {name:46s} {ms:9.3f} ms  {err}", flush=True)
def bench(fn, rep=150):
    if TINY:
        t = time.time(); fn(); return (time.time() - t) * 1e3
    return triton.testing.do_bench(fn, warmup=30, rep=rep, return_mode="median")
def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()

import os
TINY = os.environ.get("P2_TINY") == "1"
N, B, Hq, H, D = (256, 1, 8, 2, 16) if TINY else (65536, 1, 64, 4, 128)
DT = torch.float16 if TINY else torch.bfloat16
G = Hq // H
cfg = NSAConfig(); l, d = cfg.compress_block_size, cfg.compress_stride
torch.manual_seed(0)
dev = "cpu" if TINY else "cuda"
q = torch.randn(B, N, Hq, D, device=dev, dtype=DT)
k = torch.randn(B, N, H, D, device=dev, dtype=DT)
v = torch.randn(B, N, H, D, device=dev, dtype=DT)
R = (N - l) // d + 1
kc = torch.randn(B, R, H, D, device=dev, dtype=DT)
vc = torch.randn(B, R, H, D, device=dev, dtype=DT)
do = torch.randn(B, N, Hq, D, device=dev, dtype=DT)
scale = D ** -0.5
bands = {"cmp": (kc, vc, C.compressed_band(R, l, d, 0, True)), "win": (k, v, window_band(cfg.window_size, True))}

def meta_for(mod, rows, block_n):
    meta, _ = mod.band_tiles(G, D, D, True, rows=rows if not TINY else 64); meta["BLOCK_N"] = block_n; return meta

def fwd_launch(mod, kk, vv, band, rows, bn, w, s, o, lse):
    meta = meta_for(mod, rows, bn)
    grid = (triton.cdiv(N, meta["BLOCK_M"]), B, H)
    return lambda: mod.band_attention_forward_kernel[grid](q, kk, vv, o, lse, scale * C.LOG2E, N, N, kk.shape[1], *band,
                                                          HEADS_Q=Hq, num_warps=w, num_stages=s, **meta)

def dq_launch(mod, kk, vv, band, o, lse, delta, dq, rows, bn, w, s):
    meta = meta_for(mod, rows, bn)
    grid = (triton.cdiv(N, meta["BLOCK_M"]), B, H)
    return lambda: mod.band_attention_backward_dq_kernel[grid](q, kk, vv, o, do, lse, delta, dq, scale * C.LOG2E, scale,
                                                              N, N, kk.shape[1], *band, HEADS_Q=Hq, num_warps=w, num_stages=s, **meta)

def dkdv_old(kk, vv, band, lse, delta, dk, dv, rows=64, bn=64, w=4, s=2):
    meta = meta_for(O, rows, bn)
    grid = (triton.cdiv(kk.shape[1], bn), B, H)
    return lambda: O.band_attention_backward_dkdv_kernel[grid](q, kk, vv, do, lse, delta, dk, dv, scale * C.LOG2E, scale,
                                                               N, N, kk.shape[1], *band, HEADS_Q=Hq, num_warps=w, num_stages=s, **meta)

def dkdv_new(kk, vv, band, lse, delta, rows, bn, w, s, chunk):
    meta = meta_for(C, rows, bn)
    nrows = kk.shape[1]
    chunk = triton.cdiv(chunk, meta["BLOCK_M"]) * meta["BLOCK_M"]
    nch = triton.cdiv(N, chunk)
    grid = (triton.cdiv(nrows, bn), nch, B * H)
    def run():
        if nch == 1:
            dk, dv = torch.empty_like(kk), torch.empty_like(vv)
        else:
            dk = torch.empty(nch, *kk.shape, device=dev, dtype=torch.float32)
            dv = torch.empty(nch, *vv.shape, device=dev, dtype=torch.float32)
        C.band_attention_backward_dkdv_kernel[grid](q, kk, vv, do, lse, delta, dk, dv, scale * C.LOG2E, scale,
                                                    N, N, nrows, *band, chunk, HEADS_Q=Hq, num_warps=w, num_stages=s, **meta)
        if nch > 1:
            dk, dv = dk.sum(0).to(kk.dtype), dv.sum(0).to(vv.dtype)
        return dk, dv
    return run

summary = {}
def sweep(section, name, make, ref=None, compare=None):
    try:
        fn = make()
        out = fn()
        if not TINY: torch.cuda.synchronize()
        err = ""
        if ref is not None:
            err = compare(out, ref)
        ms = bench(fn)
        rec(f"{section}:{name}", ms, err)
        summary.setdefault(section, []).append((ms, name, err))
        return out
    except Exception as e:
        print(f"  {section}:{name} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
        return None

t0 = time.time()
# ---------------- forward ----------------
print("== forward ==", flush=True)
fwd_ref = {}
for bname, (kk, vv, band) in bands.items():
    o0 = torch.empty(B, N, Hq, D, device=dev, dtype=DT); l0 = torch.empty(B, N, Hq, device=dev)
    base = (256, 64, 8, 2) if bname == "cmp" else (64, 32, 4, 3)
    f = fwd_launch(O, kk, vv, band, *base, o0, l0)
    sweep(f"fwd_{bname}", f"old_r{base[0]}_n{base[1]}_w{base[2]}_s{base[3]}", lambda: (lambda: (f(), (o0, l0))[1]))
    fwd_ref[bname] = (o0.clone(), l0.clone())
    cfgs = ([(256, 64, 8, 2), (256, 64, 8, 3), (128, 64, 8, 3), (256, 128, 8, 2), (128, 128, 8, 2)]
            if bname == "cmp" else [(64, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 2)])
    for c in cfgs:
        o1 = torch.full_like(o0, float("nan")); l1 = torch.full_like(l0, float("nan"))
        f1 = fwd_launch(C, kk, vv, band, *c, o1, l1)
        sweep(f"fwd_{bname}", f"new_r{c[0]}_n{c[1]}_w{c[2]}_s{c[3]}", (lambda f1=f1, o1=o1, l1=l1: (lambda: (f1(), (o1, l1))[1])),
              fwd_ref[bname], lambda out, ref: f"o {rel(out[0], ref[0]):.1e} lse {rel(out[1][torch.isfinite(ref[1])], ref[1][torch.isfinite(ref[1])]):.1e} inf-rows-same {torch.equal(torch.isfinite(out[1]), torch.isfinite(ref[1]))}")
print(f"({time.time() - t0:.0f} s)", flush=True)

# ---------------- dq ----------------
print("== dq ==", flush=True)
deltas = {}
for bname, (kk, vv, band) in bands.items():
    o0, l0 = fwd_ref[bname]
    delta = torch.empty(B, N, Hq, device=dev); dq0 = torch.empty_like(q)
    f = dq_launch(O, kk, vv, band, o0, l0, delta, dq0, 128, 64, 8, 2)
    sweep(f"dq_{bname}", "old_r128_n64_w8_s2", lambda: (lambda: (f(), dq0)[1]))
    deltas[bname] = delta.clone(); dq_ref = dq0.clone()
    for c in [(128, 64, 8, 2), (128, 64, 8, 3), (256, 64, 8, 2), (64, 64, 4, 3)]:
        dq1 = torch.full_like(q, float("nan")); d1 = torch.empty_like(delta)
        f1 = dq_launch(C, kk, vv, band, o0, l0, d1, dq1, *c)
        sweep(f"dq_{bname}", f"new_r{c[0]}_n{c[1]}_w{c[2]}_s{c[3]}", (lambda f1=f1, dq1=dq1: (lambda: (f1(), dq1)[1])),
              dq_ref, lambda out, ref: f"dq {rel(out, ref):.1e}")
print(f"({time.time() - t0:.0f} s)", flush=True)

# ---------------- dk, dv ----------------
print("== dk dv ==", flush=True)
for bname, (kk, vv, band) in bands.items():
    o0, l0 = fwd_ref[bname]; delta = deltas[bname]
    dk0, dv0 = torch.empty_like(kk), torch.empty_like(vv)
    f = dkdv_old(kk, vv, band, l0, delta, dk0, dv0)
    sweep(f"dkdv_{bname}", "old_r64_n64_w4_s2", lambda: (lambda: (f(), (dk0, dv0))[1]))
    ref = (dk0.clone(), dv0.clone())
    chunks = (2048, 4096, 8192, 1 << 20) if bname == "cmp" else (1 << 20,)
    cfgs = [(64, 64, 4, 2), (64, 128, 8, 2), (128, 64, 8, 2), (64, 128, 4, 2), (64, 64, 4, 3)]
    for c in cfgs:
        for ch in (chunks if c == cfgs[0] else ((4096,) if bname == "cmp" else (1 << 20,))):
            sweep(f"dkdv_{bname}", f"new_r{c[0]}_n{c[1]}_w{c[2]}_s{c[3]}_c{ch}",
                  lambda c=c, ch=ch: dkdv_new(kk, vv, band, l0, delta, *c, ch), ref,
                  lambda out, ref: f"dk {rel(out[0], ref[0]):.1e} dv {rel(out[1], ref[1]):.1e}")
print(f"({time.time() - t0:.0f} s)", flush=True)

# ---------------- selection ----------------
print("== selection ==", flush=True)
lse = fwd_ref["cmp"][1]
def sel_launch(mod, out, w, bm=16):
    return lambda: mod.select_blocks_kernel[(triton.cdiv(N, bm), B, H)](
        q, kc, lse, out, scale * C.LOG2E, N, N, 0, R, triton.cdiv(N, cfg.select_block_size),
        HEADS_Q=Hq, GROUP=G, GROUP_PAD=G, DIM_QK=D, BLOCK_DQK=max(16, D), CMP_BLOCK=l, CMP_STRIDE=d, SEL_BLOCK=cfg.select_block_size,
        NUM_SELECT=cfg.num_selected_blocks, SLOTS=16, NUM_INITIAL=cfg.num_initial_blocks, NUM_LOCAL=cfg.num_local_blocks,
        CAUSAL=True, BLOCK_M=bm, BLOCK_S=C.SELECT_STEP, num_warps=w)
idx0 = torch.empty(B, N, H, 16, device=dev, dtype=torch.int32)
f = sel_launch(O, idx0, 4)
sweep("select", "old_w4", lambda: (lambda: (f(), idx0)[1]))
idx_ref = idx0.clone()
for w, bm in ((4, 16), (8, 16), (2, 16), (4, 32)):
    idx1 = torch.full_like(idx0, -7)
    f1 = sel_launch(C, idx1, w, bm)
    sweep("select", f"new_w{w}_m{bm}", (lambda f1=f1, idx1=idx1: (lambda: (f1(), idx1)[1])), idx_ref,
          lambda out, ref: f"rows identical {(out == ref).all(-1).float().mean().item():.5f}")
print(f"({time.time() - t0:.0f} s)", flush=True)

# ---------------- whole op with the launchers' defaults ----------------
print("== whole NSA (new defaults) ==", flush=True)
from nsa.kernels.sparse_attention import triton_sparse_attention
from nsa.kernels.compressed import compressed_attention_triton
from nsa.kernels.window import sliding_window_attention_triton
gates = [torch.rand(B, N, Hq, device=dev, dtype=DT) for _ in range(3)]
inputs = [x.requires_grad_() for x in (q, k, v, kc, vc, *gates)]
fwd = lambda: triton_sparse_attention(*inputs, cfg, scale, 0)
with torch.no_grad():
    sweep("whole", "nsa_fwd", lambda: fwd)
sweep("whole", "nsa_fwd_bwd", lambda: (lambda: torch.autograd.grad(fwd(), inputs, do)))
qq, kcc, vcc = inputs[0], inputs[3], inputs[4]
sweep("whole", "cmp_fwd_bwd", lambda: (lambda: torch.autograd.grad(compressed_attention_triton(qq, kcc, vcc, l, d, scale, seq_len_k=N)[0], (qq, kcc, vcc), do)))
sweep("whole", "win_fwd_bwd", lambda: (lambda: torch.autograd.grad(sliding_window_attention_triton(qq, inputs[1], inputs[2], cfg.window_size, scale), (qq, inputs[1], inputs[2]), do)))
sys.path.insert(0, str(ROOT / "tests"))
try:
    from gpu_check_nsa import profile_kernels
    if not TINY: profile_kernels(fwd, inputs, do)
except Exception:
    traceback.print_exc()
print(f"({time.time() - t0:.0f} s)", flush=True)

with open(OUT / "p2_sweep.csv", "w", newline="") as fh:
    wr = csv.DictWriter(fh, fieldnames=["name", "ms", "check"]); wr.writeheader(); wr.writerows(rows_csv)
print("\n== best per section (ms) ==")
for section, items in summary.items():
    items.sort()
    old = [x for x in items if x[1].startswith("old")]
    print(f"{section:10s} best {items[0][1]:34s} {items[0][0]:8.3f}  {items[0][2]}   old {old[0][0] if old else float('nan'):8.3f}")
