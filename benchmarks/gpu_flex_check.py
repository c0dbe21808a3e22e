"""GPU check of chapter 6's `flex` backend: outputs AND gradients against float64, beside `backend="torch"`.

Run on a CUDA machine from the repository root (not collected by pytest):

    python benchmarks/gpu_flex_check.py --out $OUT   # writes flex_gpu_check_<gpu>.txt, flex_mask_cost_<gpu>.csv

(`--no-eager` skips the eager pass, `--cases 0,2` picks cases, `--no-timing` skips part 2, to fit a
time limit; `--cpu-smoke` is a tiny forward-only run on the CPU.)

1. Correctness, for compiled FlexAttention (the default on CUDA) and for eager FlexAttention:
   o, and the gradients of q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, of `flex` and of `torch`,
   both in the case's dtype, each against `torch` in float64 on the same (dtype-rounded) inputs,
   as relative errors ||diff|| / ||ref||. A case passes when flex's error is within the dtype's
   tolerance or within twice the torch backend's own error (the dtype's rounding, not flex, then
   sets it). Also the share of (query, kv head) rows whose selected blocks differ when the
   selection is fed FlexAttention's lse instead of the reference's (a differing selection,
   possible in bf16 at near-ties, explains a local mismatch).
2. Timing (bf16, compiled): building the fine BlockMask per call vs the selected-branch attention
   it feeds, at a few lengths -> flex_mask_cost_<gpu>.csv (the chapter plots it from book/data/),
   and one forward of the whole flex backend vs the torch backend.
The last lines printed are a short table; exit status 1 if a tolerance check failed.
`--cpu-smoke` runs tiny forward-only cases on the CPU (no GPU needed), to catch mistakes before a GPU run.
"""

import argparse
import dataclasses
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import nsa  # noqa: E402
import nsa.flex  # noqa: E402
from nsa.compression import compressed_attention  # noqa: E402
from nsa.device import gpu_tag  # noqa: E402
from nsa.flex import _flex, create_compress_mask, create_fine_mask  # noqa: E402
from nsa.selection import select_blocks, selection_scores  # noqa: E402

DEVICE = "cuda"
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-3,  # relative error
             torch.float64: 1e-7}

CASES = [  # B, Nq, Nk, Hq, H, Dqk, Dv, mem_kv_len, causal, dtype, config overrides
    (2, 1024, 1024, 8, 2, 64, 64, 0, True, torch.bfloat16, {}),
    (1, 2048, 2048, 16, 1, 128, 128, 4, True, torch.bfloat16, {}),
    (1, 777, 1500, 4, 2, 64, 32, 1, True, torch.float32, dict(window_size=256)),
    (1, 333, 333, 4, 4, 64, 64, 0, False, torch.float32, dict(window_size=100)),
    (1, 1024, 1024, 8, 1, 192, 128, 0, True, torch.bfloat16, {}),           # the paper's head dims
    (1, 1, 4096, 8, 2, 64, 64, 2, True, torch.bfloat16, {}),                 # decoding
]
SMOKE_CASES = [
    (1, 100, 257, 4, 2, 16, 8, 1, True, torch.float32, dict(window_size=40)),
    (1, 1, 300, 2, 1, 16, 16, 0, True, torch.float64, dict(window_size=40)),
]


def make_inputs(B, Nq, Nk, Hq, H, Dqk, Dv, mem, config, dtype, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device=DEVICE, dtype=torch.float32).to(dtype)
    l, d = config.compress_block_size, config.compress_stride
    Nc = (Nk - l) // d + 1 if Nk >= l else 0
    q, k, v = r(B, Nq, Hq, Dqk), r(B, Nk, H, Dqk), r(B, Nk, H, Dv)
    k_cmp, v_cmp = r(B, mem + Nc, H, Dqk), r(B, mem + Nc, H, Dv)
    gates = torch.rand(3, B, Nq, Hq, generator=g, device=DEVICE).to(dtype)
    return [q, k, v, k_cmp, v_cmp, *gates]


NAMES = ["q", "k", "v", "k_cmp", "v_cmp", "g_cmp", "g_slc", "g_win"]


def forward_backward(inputs, config, backend, mem, grad_out, dtype=None):
    """o and the eight gradients; with dtype, of the inputs and grad_out converted to it first."""
    if dtype is not None:
        inputs, grad_out = [x.to(dtype) for x in inputs], grad_out.to(dtype)
    if DEVICE == "cpu":                                        # smoke run: forward only
        with torch.no_grad():
            o = nsa.native_sparse_attention(*inputs, config, backend=backend, mem_kv_len=mem)
        return o, [torch.zeros(()) for _ in inputs]
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    o = nsa.native_sparse_attention(*leaves, config, backend=backend, mem_kv_len=mem)
    o.backward(grad_out)
    return o.detach(), [x.grad for x in leaves]


def relative_error(x, ref):
    """||x - ref|| / ||ref|| in float64 (0 where both are all zeros, as the smoke run's gradients)."""
    diff = (x.double() - ref.double()).norm()
    return (diff / ref.double().norm().clamp_min(1e-300)).item() if diff > 0 else 0.0


def selection_mismatch(inputs, config, mem):
    """Share of (b, i, kv head) rows whose selected blocks differ between flex's lse and torch's."""
    q, k, v, k_cmp, v_cmp = inputs[:5]
    B, Nq, Hq, _ = q.shape
    Nk = k.shape[1]
    scale = q.shape[-1] ** -0.5
    with torch.no_grad():
        _, lse_torch = compressed_attention(q, k_cmp, v_cmp, config.compress_block_size,
                                            config.compress_stride, scale, causal=config.causal,
                                            mem_kv_len=mem, seq_len_k=Nk)
        if k_cmp.shape[1] == 0:
            return 0.0
        mask = create_compress_mask(Nq, k_cmp.shape[1] - mem, config.compress_stride, mem, config.causal,
                                    compress_block_size=config.compress_block_size, seq_len_k=Nk,
                                    device=q.device)
        _, lse_flex = _flex(q.transpose(1, 2), k_cmp.transpose(1, 2), v_cmp.transpose(1, 2), mask, scale,
                            return_lse=True)
        picks = [select_blocks(selection_scores(q, k_cmp, lse, Nk, config, scale, mem_kv_len=mem), Nk, config)
                 for lse in (lse_torch, lse_flex.transpose(1, 2))]
        return (picks[0] != picks[1]).any(-1).float().mean().item()


def check(lines, compiled, cases):
    nsa.flex.USE_COMPILE = compiled
    ok = True
    for B, Nq, Nk, Hq, H, Dqk, Dv, mem, causal, dtype, overrides in cases:
        config = dataclasses.replace(nsa.NSAConfig(), causal=causal, **overrides)
        label = (f"{'compiled' if compiled else 'eager':8s} B={B} Nq={Nq} Nk={Nk} Hq={Hq} H={H} "
                 f"D={Dqk}/{Dv} mem={mem} causal={causal} {str(dtype)[6:]}")
        try:
            inputs = make_inputs(B, Nq, Nk, Hq, H, Dqk, Dv, mem, config, dtype)
            grad_out = torch.randn(B, Nq, Hq, Dv, device=DEVICE).to(dtype)
            o_64, grads_64 = forward_backward(inputs, config, "torch", mem, grad_out, torch.float64)
            o_ref, grads_ref = forward_backward(inputs, config, "torch", mem, grad_out)
            o_flex, grads_flex = forward_backward(inputs, config, "flex", mem, grad_out)
            mismatch = selection_mismatch(inputs, config, mem)
        except Exception as error:  # report and go on: the lead wants every case's answer
            ok = False
            lines.append(f"FAIL {label}: {type(error).__name__}: {str(error)[:300]}")
            traceback.print_exc()
            continue
        tol = TOLERANCE[dtype]
        # (tensor, flex's error, torch's error), both against float64
        results = [("o", relative_error(o_flex, o_64), relative_error(o_ref, o_64))]
        results += [(f"d{name}", relative_error(gf, g64), relative_error(gr, g64))
                    for name, gf, gr, g64 in zip(NAMES, grads_flex, grads_ref, grads_64)]
        passed = all(math.isfinite(f) and f <= max(tol, 2 * t) for _, f, t in results)
        ok &= passed
        worst = max(results, key=lambda r: r[1])
        detail = " ".join(f"{name}:{f:.1e}/{t:.1e}" for name, f, t in results)
        lines.append(f"{'ok  ' if passed else 'FAIL'} {label}: worst flex error {worst[1]:.2e} ({worst[0]}; "
                     f"tol {tol:.0e} or 2x torch's); selection rows differing {mismatch:.2%}; "
                     f"flex/torch error against float64: {detail}")
        print(lines[-1], flush=True)
    return ok


def synchronize():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats=5):
    fn()
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def timings(lines, out, lengths=(2048, 8192, 16384), whole_lengths=(4096, 8192)):
    nsa.flex.USE_COMPILE = True
    Hq, H, D, l_sel, n = 16, 2, 128, 64, 16
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    rows = []
    for N in lengths:
        q = torch.randn(1, Hq, N, D, device=DEVICE, dtype=dtype)
        k, v = torch.randn(2, 1, H, N, D, device=DEVICE, dtype=dtype)
        own = torch.arange(N, device=DEVICE) // l_sel
        indices = (torch.rand(1, H, N, n, device=DEVICE) * (own[:, None] + 1)).long()
        make_mask = lambda: create_fine_mask(N, l_sel)(indices, Hq // H)
        block_mask = make_mask()
        mask_ms = timed(make_mask)
        attention_ms = timed(lambda: _flex(q, k, v, block_mask, D ** -0.5))
        rows.append((N, mask_ms, attention_ms))
        lines.append(f"N={N:6d} build fine mask {mask_ms:9.2f} ms   selected attention {attention_ms:8.2f} ms "
                     f"  ratio {mask_ms / attention_ms:6.2f}")
        print(lines[-1], flush=True)
        del block_mask
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    command = "python benchmarks/gpu_flex_check.py " + " ".join(sys.argv[1:])
    csv = [f"# {device_name()}, torch {torch.__version__}; made by: {command}",
           f"# fine mask: create_fine_mask(N, {l_sel})(indices (1, {H}, N, {n}), {Hq // H}); attention: "
           f"compiled flex_attention, {str(dtype)[6:]}, Hq={Hq}, H={H}, D={D}; median of 5 after a warm-up",
           "seq_len,mask_ms,attention_ms"]
    csv += [f"{N},{m:.3f},{a:.3f}" for N, m, a in rows]
    name = f"flex_mask_cost_{gpu_tag()}.csv" if DEVICE == "cuda" else "flex_mask_cost_cpu_smoke.csv"
    (out / name).write_text("\n".join(csv) + "\n")

    config = nsa.NSAConfig()
    for N in whole_lengths:
        inputs = make_inputs(1, N, N, 16, 2, 128, 128, 0, config, dtype)
        with torch.no_grad():
            ms = {backend: timed(lambda: nsa.native_sparse_attention(*inputs, config, backend=backend), 3)
                  for backend in ("torch", "flex")}
        lines.append(f"N={N:6d} whole forward ({str(dtype)[6:]}, Hq=16, H=2, D=128): torch {ms['torch']:8.2f} ms, "
                     f"flex {ms['flex']:8.2f} ms")
        print(lines[-1], flush=True)


def device_name():
    return torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"


def main():
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the results")
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny forward-only run on the CPU")
    parser.add_argument("--no-eager", action="store_true", help="check compiled FlexAttention only")
    parser.add_argument("--cases", default=None, help="comma-separated indices into CASES, e.g. 0,2,4")
    args = parser.parse_args()
    if args.cpu_smoke:
        DEVICE = "cpu"
    elif not torch.cuda.is_available():
        print("gpu_flex_check.py needs a CUDA device (or --cpu-smoke)")
        return 2
    for limit in ("recompile_limit", "cache_size_limit"):     # many shapes: keep them all compiled
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, 256)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"{device_name()}, torch {torch.__version__}: python benchmarks/gpu_flex_check.py " + " ".join(sys.argv[1:])]
    cases = SMOKE_CASES if args.cpu_smoke else CASES
    if args.cases:
        cases = [cases[int(i)] for i in args.cases.split(",")]
    ok = check(lines, True, cases)
    if not args.no_eager:
        ok &= check(lines, False, cases)
    if not args.no_timing:
        try:
            if args.cpu_smoke:
                timings(lines, out, lengths=(256,), whole_lengths=(256,))
            else:
                timings(lines, out)
        except Exception as error:
            lines.append(f"timing failed: {type(error).__name__}: {str(error)[:300]}")
            traceback.print_exc()
    lines.append("ALL OK" if ok else "SOME CHECKS FAILED")
    name = f"flex_gpu_check_{gpu_tag()}.txt" if DEVICE == "cuda" else "flex_gpu_check_cpu_smoke.txt"
    (out / name).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
