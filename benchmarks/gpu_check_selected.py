"""GPU check and timing of chapter 8's selected-attention kernels (nsa.kernels.selected).

Not collected by pytest (no test_ prefix); a GPU user runs it from the repository root:

    PYTHONUNBUFFERED=1 python benchmarks/gpu_check_selected.py [--out DIR] [--quick]

1. Correctness: bf16 (and fp16) kernels against a float64 reference, forward and backward, at lengths
   1k to 64k, printing relative errors ||x - ref|| / ||ref|| for o, lse, dq, dk, dv. The reference
   gathers each query's selected keys in chunks of queries (exact, no N x N matrix), so every row is
   checked, also at 64k; it is itself checked against chapter 1's dense masked attention at 1k.
   Every case runs with the default tiles of queries and with one query per tile (or, where one is
   the default, at groups of 16, with 4).
2. Timing (triton.testing.do_bench, median): paper geometry (64 query heads, 4 kv heads, d = 128,
   n = 16, l' = 64, bf16, batch 1) at 8k-64k with random valid block indices (block 0 and the
   query's own block forced): forward, forward + backward, a per-kernel breakdown, and SDPA (flash
   backend, causal) beside it.
3. Variants (--variants, at 64k): the forward and the backward (its dq kernel, the reverse index and
   the dk, dv gather kernel) with 1-8 queries per tile on three kinds
   of selections — random (as above), chapter 3's selection run on random q, k ("real"), and on
   q, k with planted structure (neighbouring queries favour the same blocks) — with the number of
   distinct blocks per query, and a loads-only copy of the forward loop (the floor of its loads).
CSV files go to --out (default book/data): selected_attention_<gpu>_errors.csv,
selected_attention_<gpu>_times.csv and (--variants) selected_attention_<gpu>_variants.csv.
"""

import argparse
import csv
import math
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import nsa  # noqa: E402,F401

try:  # an uninstalled checkout: kernels/ is importable as nsa.kernels once nsa's path has ROOT
    import nsa.kernels  # noqa: F401
except ImportError:
    nsa.__path__.append(str(ROOT))
from nsa import attention, block_selection_mask  # noqa: E402
from nsa.device import gpu_tag  # noqa: E402
from nsa.kernels import selected as sel  # noqa: E402

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SMOKE = False  # --smoke: tiny shapes on the CPU interpreter, every code path once, no timing


def random_block_indices(B, Nq, Nk, H, n, block_size, causal=True, seed=0):
    """(B, Nq, H, n) int32: block 0 and the query's own block forced, the rest random earlier
    distinct blocks; sorted ascending, -1 last where fewer than n blocks exist."""
    gen = torch.Generator(DEV).manual_seed(seed)
    t = torch.arange(Nk - Nq, Nk, device=DEV)
    own = t // block_size
    num_blocks = -(-Nk // block_size)
    limit = own if causal else torch.full_like(own, num_blocks - 1)
    out = torch.empty(B, Nq, H, n, device=DEV, dtype=torch.int32)
    blocks = torch.arange(num_blocks, device=DEV)
    for c0 in range(0, Nq, 4096):                       # chunks of queries keep the scores small
        c1 = min(Nq, c0 + 4096)
        scores = torch.rand(B, c1 - c0, H, num_blocks, device=DEV, generator=gen)
        scores = scores.masked_fill(blocks == 0, 2.0).masked_fill(blocks == own[c0:c1, None, None], 3.0)
        scores = scores.masked_fill(blocks > limit[c0:c1, None, None], -1.0)
        top = scores.topk(min(n, num_blocks), dim=-1)
        chosen = torch.where(top.values >= 0, top.indices, num_blocks).sort(dim=-1).values
        chosen = torch.where(chosen == num_blocks, -1, chosen)
        out[:, c0:c1, :, :chosen.shape[-1]] = chosen.to(torch.int32)
        out[:, c0:c1, :, chosen.shape[-1]:] = -1
    return out


def reference_fp64(q, k, v, do, prepared, block_size, scale, causal, chunk=256):
    """Float64 o, lse, dq, dk, dv by gathering each query's selected keys (chunks of queries)."""
    B, Nq, Hq, Dqk = q.shape
    _, Nk, H, Dv = v.shape
    G = Hq // H
    q64, k64, v64, do64 = q.double(), k.double(), v.double(), do.double()
    o = torch.empty(B, Nq, Hq, Dv, device=DEV, dtype=torch.float64)
    lse = torch.empty(B, Nq, Hq, device=DEV, dtype=torch.float64)
    dq = torch.empty_like(q64)
    dk = torch.zeros_like(k64)
    dv = torch.zeros_like(v64)
    offs = torch.arange(block_size, device=DEV)
    heads = torch.arange(H, device=DEV)[None, :, None]
    for b in range(B):
        for c0 in range(0, Nq, chunk):
            c1 = min(Nq, c0 + chunk)
            C = c1 - c0
            idx = prepared[b, c0:c1].long()                                   # (C, H, n)
            pos = (idx[..., None] * block_size + offs).flatten(2)             # (C, H, L)
            valid = (idx[..., None] >= 0).expand(*idx.shape, block_size).flatten(2) & (pos < Nk)
            if causal:
                t = torch.arange(Nk - Nq + c0, Nk - Nq + c1, device=DEV)[:, None, None]
                valid = valid & (pos <= t)
            pos = pos.clamp(0, Nk - 1)
            hh = heads.expand_as(pos)
            Kg, Vg = k64[b][pos, hh], v64[b][pos, hh]                         # (C, H, L, D)
            qg = q64[b, c0:c1].view(C, H, G, Dqk)
            dog = do64[b, c0:c1].view(C, H, G, Dv)
            s = torch.einsum("chgd,chld->chgl", qg, Kg) * scale
            s = s.masked_fill(~valid[:, :, None], -math.inf)
            l_ = torch.logsumexp(s, -1)                                        # (C, H, G)
            p = torch.where(valid[:, :, None], torch.exp(s - l_[..., None]), 0.0)
            oc = torch.einsum("chgl,chld->chgd", p, Vg)
            delta = (oc * dog).sum(-1)
            dp = torch.einsum("chgd,chld->chgl", dog, Vg)
            ds = p * (dp - delta[..., None])
            o[b, c0:c1] = oc.reshape(C, Hq, Dv)
            lse[b, c0:c1] = l_.reshape(C, Hq)
            dq[b, c0:c1] = (torch.einsum("chgl,chld->chgd", ds, Kg) * scale).reshape(C, Hq, Dqk)
            dKg = torch.einsum("chgl,chgd->chld", ds, qg) * scale
            dVg = torch.einsum("chgl,chgd->chld", p, dog)
            dk[b].index_put_((pos, hh), dKg, accumulate=True)
            dv[b].index_put_((pos, hh), dVg, accumulate=True)
    return o, lse, dq, dk, dv


def rel(x, ref):
    x, ref = x.double(), ref.double()
    finite = torch.isfinite(ref)
    if not torch.equal(torch.isfinite(x), finite):
        return float("nan")
    return ((x[finite] - ref[finite]).norm() / ref[finite].norm().clamp_min(1e-30)).item()


def check_reference_itself():
    """The gathered float64 reference equals chapter 1's dense masked attention (and its autograd)."""
    B, N, Hq, H, D, n, l = 1, (200 if SMOKE else 1000), 8, 2, 64, 4, 64
    gen = torch.Generator(DEV).manual_seed(1)
    q, k, v, do = (torch.randn(*s, device=DEV, dtype=torch.float64, generator=gen)
                   for s in ((B, N, Hq, D), (B, N, H, D), (B, N, H, D), (B, N, Hq, D)))
    idx = random_block_indices(B, N, N, H, n, l)
    prepared = sel.prepare_block_indices(idx, l, N, True)
    o, lse, dq, dk, dv = reference_fp64(q, k, v, do, prepared, l, D ** -0.5, True)
    q_, k_, v_ = (x.clone().requires_grad_() for x in (q, k, v))
    o_ref, lse_ref = attention(q_, k_, v_, block_selection_mask(idx, l, N), return_lse=True)
    grads = torch.autograd.grad(o_ref, (q_, k_, v_), do)
    for name, x, r in zip(("o", "lse", "dq", "dk", "dv"), (o, lse, dq, dk, dv), (o_ref, lse_ref, *grads)):
        torch.testing.assert_close(x, r, msg=lambda m: f"reference {name}: {m}")
    print(f"gathered float64 reference == chapter 1 dense reference (N = {N})")


def correctness(errors_csv):
    # name, B, N (Nq = Nk unless given), Hq, H, Dqk, Dv, n, l', causal, dtype, Nq
    cases = [
        ("g16_d128", 1, 1024, 16, 1, 128, 128, 16, 64, True, torch.bfloat16, None),
        ("g1_d64", 2, 1000, 2, 2, 64, 64, 16, 64, True, torch.bfloat16, None),
        ("g2_d64_noncausal", 1, 2049, 4, 2, 64, 64, 8, 64, False, torch.bfloat16, None),
        ("g4_d192_128_l32", 2, 3001, 16, 4, 192, 128, 16, 32, True, torch.bfloat16, None),
        ("g16_decode_tail", 1, 4096, 16, 1, 128, 128, 16, 64, True, torch.bfloat16, 77),
        ("g8_d192_128_fp16", 1, 4096, 16, 2, 192, 128, 16, 64, True, torch.float16, None),
        ("paper_64_4_d128", 1, 8192, 64, 4, 128, 128, 16, 64, True, torch.bfloat16, None),
        ("g8_d192_128", 1, 16384, 16, 2, 192, 128, 16, 64, True, torch.bfloat16, None),
        ("g8_d192_128_64k", 1, 65536, 16, 2, 192, 128, 16, 64, True, torch.bfloat16, None),
        ("paper_64_4_d128_64k", 1, 65536, 64, 4, 128, 128, 16, 64, True, torch.bfloat16, None),
    ]
    if SMOKE:
        cases = [("smoke_g4", 1, 100, 8, 2, 32, 16, 3, 16, True, torch.float32, None),
                 ("smoke_g1_tail", 2, 70, 2, 2, 16, 16, 2, 32, True, torch.float16, 9),
                 ("smoke_noncausal", 1, 50, 3, 1, 16, 16, 2, 16, False, torch.float32, None)]
    worst = 0.0
    print(f"{'case':24s} {'dkdv':7s} {'Q':4s} {'N':>6s} {'o':>9s} {'lse':>9s} {'dq':>9s} {'dk':>9s} {'dv':>9s}")
    for name, B, N, Hq, H, Dqk, Dv, n, l, causal, dtype, Nq in cases:
        try:
            Nq = Nq or N
            gen = torch.Generator(DEV).manual_seed(N)
            q = torch.randn(B, Nq, Hq, Dqk, device=DEV, generator=gen).to(dtype)
            k = torch.randn(B, N, H, Dqk, device=DEV, generator=gen).to(dtype)
            v = torch.randn(B, N, H, Dv, device=DEV, generator=gen).to(dtype)
            do = torch.randn(B, Nq, Hq, Dv, device=DEV, generator=gen).to(dtype)
            idx = random_block_indices(B, Nq, N, H, n, l, causal=causal, seed=N)
            prepared = sel.prepare_block_indices(idx, l, N, causal)
            ref = reference_fp64(q, k, v, do, prepared, l, Dqk ** -0.5, causal,
                                 chunk=max(64, 2 ** 22 // (Hq * n * l)))
            other = 4 if sel.default_queries_per_tile(Hq // H) == 1 else 1     # the non-default tiles too
            runs = [("gather", None), ("gather", other)]
            for dkdv, tile in runs:
                qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
                o, lse = sel.selected_attention_triton(qq, kk, vv, idx, l, causal=causal,
                                                       return_lse=True, queries_per_tile=tile)
                dq, dk, dv = torch.autograd.grad(o, (qq, kk, vv), do)
                errs = [rel(x, r) for x, r in zip((o, lse, dq, dk, dv), ref)]
                worst = max([worst] + [e if e == e else float("inf") for e in errs])
                Q = tile or sel.default_queries_per_tile(Hq // H)
                print(f"{name:24s} {dkdv:7s} Q={Q:<2d} {N:6d} " + " ".join(f"{e:9.2e}" for e in errs))
                errors_csv.writerow([name, dkdv, Q, B, Nq, N, Hq, H, Dqk, Dv, n, l, causal,
                                     str(dtype).split(".")[-1], *[f"{e:.3e}" for e in errs]])
                del o, lse, dq, dk, dv, qq, kk, vv
            del q, k, v, do, ref
            torch.cuda.empty_cache()
        except Exception:
            traceback.print_exc()
            worst = float("inf")
    print(f"worst relative error: {worst:.2e} ({'PASS' if worst < 1e-2 else 'FAIL'} against 1e-2)")


def bench(fn):
    if SMOKE:
        fn()
        return 0.0
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def timing(times_csv, configs):
    """configs: (N, Hq, H, full); `full` adds the per-kernel breakdown."""
    D, n, l = (16, 2, 16) if SMOKE else (128, 16, 64)
    dtype = torch.float16 if SMOKE else torch.bfloat16
    longest = max(N for N, _, _, full in configs if full)
    table = []
    for N, Hq, H, full in configs:
        def record(impl, pass_, ms, note=""):
            table.append((N, Hq, H, impl, pass_, ms, note))
            times_csv.writerow([impl, N, Hq, H, D, n, l, pass_, f"{ms:.4f}", note])
            print(f"  N = {N:6d} {Hq:2d}/{H:<2d} {impl:28s} {pass_:8s} {ms:9.3f} ms {note}")

        try:
            gen = torch.Generator(DEV).manual_seed(N)
            q = torch.randn(1, N, Hq, D, device=DEV, generator=gen).to(dtype)
            k = torch.randn(1, N, H, D, device=DEV, generator=gen).to(dtype)
            v = torch.randn(1, N, H, D, device=DEV, generator=gen).to(dtype)
            do = torch.randn(1, N, Hq, D, device=DEV, generator=gen).to(dtype)
            idx = random_block_indices(1, N, N, H, n, l, seed=N)
            scale = D ** -0.5
            with torch.no_grad():
                record("nsa_selected_triton", "fwd",
                       bench(lambda: sel.selected_attention_triton(q, k, v, idx, l, check_indices=False)))
            qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
            def fwd_bwd():
                o_ = sel.selected_attention_triton(qq, kk, vv, idx, l, check_indices=False)
                torch.autograd.grad(o_, (qq, kk, vv), do)
            record("nsa_selected_triton_gather", "fwd_bwd", bench(fwd_bwd))
            del qq, kk, vv
            # -- SDPA, flash backend, causal; kv heads expanded (flash wants equal heads) --
            try:
                from torch.nn.attention import SDPBackend, sdpa_kernel
                qt = q.transpose(1, 2).contiguous().requires_grad_()
                kt = k.repeat_interleave(Hq // H, dim=2).transpose(1, 2).contiguous().requires_grad_()
                vt = v.repeat_interleave(Hq // H, dim=2).transpose(1, 2).contiguous().requires_grad_()
                dot_ = do.transpose(1, 2).contiguous()
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    with torch.no_grad():
                        record("sdpa_flash", "fwd",
                               bench(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)))

                    def sdpa_both():
                        o_ = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
                        torch.autograd.grad(o_, (qt, kt, vt), dot_)
                    record("sdpa_flash", "fwd_bwd", bench(sdpa_both))
                del qt, kt, vt, dot_
            except Exception:
                traceback.print_exc()
            if not full:
                continue
            # -- breakdown --
            prepared = sel.prepare_block_indices(idx, l, N, True)
            Q, tiles = sel.query_tiles(prepared, Hq // H)
            record("prepare_block_indices", "fwd", bench(lambda: sel.prepare_block_indices(idx, l, N, True)))
            record("forward_kernel", "fwd", bench(lambda: sel.selected_attention_fwd(q, k, v, prepared, l, scale,
                                                                                      True, Q, tiles)))
            o, lse = sel.selected_attention_fwd(q, k, v, prepared, l, scale, True, Q, tiles)
            nb = -(-N // l)
            record("reverse_block_index", "bwd", bench(lambda: sel.reverse_block_index(prepared, nb, 1024)))
            record("backward_gather_total", "bwd", bench(
                lambda: sel.selected_attention_bwd(do, q, k, v, o, lse, prepared, l, scale, True, Q, tiles)))
            delta = torch.empty(1, N, Hq, device=DEV)
            dq = torch.empty_like(q)
            num_tiles, num_entries = tiles[0].shape[1], tiles[0].shape[-1]
            meta, warps, stages = sel.tile_launch(Hq // H, Q, num_entries, D, D, l, q.element_size())
            record("backward_dq_kernel", "bwd", bench(lambda: sel.selected_attention_backward_dq_kernel[(num_tiles, H)](
                q, k, v, o, do, None, None, lse, *tiles, dq, delta, None, None, None, None, scale, N, N, num_tiles,
                num_entries, HEADS_KV=H, CAUSAL=True, GATED=False, ADD_TO_DQ=False, PACKED=False, **meta,
                num_warps=warps, num_stages=stages)))
            index = sel.reverse_block_index(prepared, nb, 1024)
            record("backward_dkdv_kernel", "bwd", bench(
                lambda: sel.selected_attention_dkdv(q, k, v, do, lse, delta, prepared, l, scale, True, index=index)))
            del q, k, v, do, o, lse, dq
            torch.cuda.empty_cache()
        except Exception:
            traceback.print_exc()
    return table



# ---------------------------------------------------------------- variants (--variants)
def real_selection(q, k, num_selected=16, block_size=64, chunk=1024):
    """Chapters 2-3's block selection (mean-pooled k_cmp, Eq. 9 scores, top-n with forced blocks)
    run on q, k; in chunks of queries, each chunk end-aligned to the prefix of keys it can see."""
    from nsa import NSAConfig, compress, select_blocks, selection_scores
    cfg = NSAConfig(select_block_size=block_size, num_selected_blocks=num_selected)
    B, N, Hq, D = q.shape
    H = k.shape[2]
    l, d = cfg.compress_block_size, cfg.compress_stride
    k_cmp = compress(k.float(), None, l, d)                                      # (B, Nc, H, D)
    out = torch.empty(B, N, H, num_selected, device=DEV, dtype=torch.int32)
    for c0 in range(0, N, chunk):
        c1 = min(N, c0 + chunk)
        kc = k_cmp[:, :max(0, (c1 - l) // d + 1)]
        qc = q[:, c0:c1].float()
        s = torch.einsum("bihgd,bchd->bihgc", qc.view(B, c1 - c0, H, Hq // H, D), kc) * D ** -0.5
        t = torch.arange(c0, c1, device=DEV)
        visible = (torch.arange(kc.shape[1], device=DEV) * d + l - 1)[None, :] <= t[:, None]
        lse = torch.logsumexp(s.masked_fill(~visible[None, :, None, None], -math.inf), -1)
        scores = selection_scores(qc, kc, lse.reshape(B, c1 - c0, Hq), c1, cfg)
        out[:, c0:c1] = select_blocks(scores, c1, cfg).to(torch.int32)
    return out


def planted_inputs(N, Hq, H, D, gen, directions=64, strength=4.0, segment=1024):
    """Random q, k, v plus structure: key block j leans towards direction j % 64, the queries of
    each 1024-token segment towards one direction, so neighbouring queries favour the same blocks."""
    q = torch.randn(1, N, Hq, D, device=DEV, generator=gen)
    k = torch.randn(1, N, H, D, device=DEV, generator=gen)
    v = torch.randn(1, N, H, D, device=DEV, generator=gen)
    u = torch.nn.functional.normalize(torch.randn(directions, D, device=DEV, generator=gen), dim=-1)
    positions = torch.arange(N, device=DEV)
    k += strength * u[(positions // 64) % directions][None, :, None, :]
    q += strength * u[(positions // segment * 7) % directions][None, :, None, :]
    return (x.to(torch.bfloat16) for x in (q, k, v))


import triton.language as tl  # noqa: E402


@triton.jit
def loads_only_kernel(K, V, BLOCK_INDICES, OUT, seq_len_q, seq_len_k, num_slots,
                      HEADS_KV: tl.constexpr, DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """The forward's loop and loads (one query per program, branch-free), no arithmetic but a sum:
    the time this design needs just to read its blocks."""
    i = tl.program_id(0)
    b = tl.program_id(1) // HEADS_KV
    h = tl.program_id(1) % HEADS_KV
    offs_key = tl.arange(0, BLOCK_SIZE)
    offs_d = tl.arange(0, DIM)
    acc = tl.zeros([BLOCK_SIZE, DIM], dtype=tl.float32)
    slots = BLOCK_INDICES + ((b * seq_len_q + i).to(tl.int64) * HEADS_KV + h) * num_slots
    for slot in range(num_slots):
        block = tl.load(slots + slot)
        keys = tl.maximum(block, 0) * BLOCK_SIZE + offs_key
        kv_rows = (b * seq_len_k + keys).to(tl.int64) * HEADS_KV + h
        ok = (keys < seq_len_k) & (block >= 0)
        k = tl.load(K + kv_rows[:, None] * DIM + offs_d[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(V + kv_rows[:, None] * DIM + offs_d[None, :], mask=ok[:, None], other=0.0)
        acc += k.to(tl.float32) + v.to(tl.float32)
    tl.store(OUT + ((b * seq_len_q + i).to(tl.int64) * HEADS_KV + h) * DIM + offs_d, tl.sum(acc, 0))


def variants(variants_csv):
    """Forward and dq kernels with 1-8 queries per tile at 64k on three kinds of selections."""
    N, D, n, l = (200, 16, 4, 16) if SMOKE else (65536, 128, 16, 64)
    dtype = torch.float16 if SMOKE else torch.bfloat16
    table = []
    configs = [(64, 4, "random"), (64, 4, "real"), (64, 4, "planted"), (32, 8, "random"), (32, 8, "real")]
    if SMOKE:
        configs = [(8, 2, "random"), (8, 2, "real"), (4, 2, "planted")]
    for Hq, H, kind in configs:
        try:
            gen = torch.Generator(DEV).manual_seed(N + Hq)
            if kind == "planted":
                q, k, v = planted_inputs(N, Hq, H, D, gen, segment=64 if SMOKE else 1024)
            else:
                q, k, v = (torch.randn(1, N, h_, D, device=DEV, generator=gen).to(dtype) for h_ in (Hq, H, H))
            do = torch.randn(1, N, Hq, D, device=DEV, generator=gen).to(dtype)
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
            idx = (random_block_indices(1, N, N, H, n, l, seed=N) if kind == "random"
                   else real_selection(q, k, n, l, chunk=64 if SMOKE else 1024))
            prepared = sel.prepare_block_indices(idx, l, N, True)
            scale = D ** -0.5
            Q0, tiles0 = sel.query_tiles(prepared, Hq // H)
            o, lse = sel.selected_attention_fwd(q, k, v, prepared, l, scale, True, Q0, tiles0)
            per_query = (prepared >= 0).sum(-1).float().mean().item()

            def record(kernel, Q, ms, union, note=""):
                table.append((kind, Hq, H, kernel, Q, ms, union, note))
                variants_csv.writerow([kind, N, Hq, H, D, n, l, kernel, Q, f"{ms:.4f}", f"{union:.3f}", note])
                print(f"  {kind:8s} {Hq}/{H} {kernel:12s} Q={Q:<2d} {ms:8.3f} ms  distinct blocks/query {union:6.2f} {note}")

            out = torch.empty(1, N, H, D, device=DEV)
            record("loads_only", 1, bench(lambda: loads_only_kernel[(N, H)](
                k, v, prepared, out, N, N, n, HEADS_KV=H, DIM=D, BLOCK_SIZE=l, num_warps=2, num_stages=3)), per_query)
            for Q in (1, 2, 4) if (Hq // H >= 16 and kind != "planted") else (1, 2, 4, 8):
                tiles = sel.prepare_query_tiles(prepared, Q) if Q > 1 else (prepared,) * 3
                union = tiles[2].float().mean().item() / Q if Q > 1 else per_query
                if Q > 1:
                    record("prepare_tiles", Q, bench(lambda: sel.prepare_query_tiles(prepared, Q)), union)
                record("forward", Q, bench(lambda: sel.selected_attention_fwd(
                    q, k, v, prepared, l, scale, True, Q, tiles)), union)
                record("backward", Q, bench(lambda: sel.selected_attention_bwd(
                    do, q, k, v, o, lse, prepared, l, scale, True, Q, tiles)), union)
            del q, k, v, do, o, lse, out
            torch.cuda.empty_cache()
        except Exception:
            traceback.print_exc()
    return table


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "book" / "data"))
    parser.add_argument("--quick", action="store_true", help="timing at 8k and 64k only")
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: test the script")
    parser.add_argument("--variants", action="store_true", help="also time tiles of queries on three "
                        "kinds of selections at 64k (selected_attention_<gpu>_variants.csv)")
    args = parser.parse_args()
    global SMOKE
    SMOKE = args.smoke
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu_name = torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu (interpreter)"
    print(f"torch {torch.__version__}, triton {triton.__version__}, {gpu_name}")
    flags = [a for a in sys.argv[1:] if a in ("--quick", "--skip-check", "--smoke", "--variants")]
    command = " ".join(["python benchmarks/gpu_check_selected.py", *flags])
    start = time.time()
    if not args.skip_check:
        with (out / f"selected_attention_{gpu_tag()}_errors.csv").open("w", newline="", buffering=1) as f:
            f.write(f"# {command}; torch {torch.__version__}, triton {triton.__version__}, "
                    f"{gpu_name}; relative error ||x - ref|| / ||ref|| vs float64\n")
            w = csv.writer(f)
            w.writerow(["case", "dkdv", "queries_per_tile", "batch", "seq_len_q", "seq_len_k", "heads_q", "heads_kv", "dim_qk",
                        "dim_v", "num_selected_blocks", "select_block_size", "causal", "dtype",
                        "o", "lse", "dq", "dk", "dv"])
            try:
                check_reference_itself()
            except Exception:
                traceback.print_exc()
            correctness(w)
        print(f"[correctness took {time.time() - start:.0f} s]")
    lengths = [8192, 65536] if args.quick else [8192, 16384, 32768, 65536]
    configs = [(N, 64, 4, True) for N in lengths] + [(65536, 32, 8, False)]
    if SMOKE:
        lengths = [64, 100]
        configs = [(64, 8, 2, True), (100, 8, 2, True), (100, 4, 4, False)]
    with (out / f"selected_attention_{gpu_tag()}_times.csv").open("w", newline="", buffering=1) as f:
        f.write(f"# {command}; torch {torch.__version__}, triton {triton.__version__}, "
                f"{gpu_name}; do_bench median ms, bf16, batch 1, causal\n")
        w = csv.writer(f)
        w.writerow(["impl", "seq_len", "heads_q", "heads_kv", "head_dim", "num_selected_blocks",
                    "select_block_size", "pass", "ms", "note"])
        table = timing(w, configs)
    if args.variants:
        with (out / f"selected_attention_{gpu_tag()}_variants.csv").open("w", newline="", buffering=1) as f:
            f.write(f"# {command}; torch {torch.__version__}, triton {triton.__version__}, "
                    f"{gpu_name}; do_bench median ms, bf16, batch 1, causal; union = distinct blocks "
                    f"per query (per tile / Q)\n")
            w = csv.writer(f)
            w.writerow(["selection", "seq_len", "heads_q", "heads_kv", "head_dim", "num_selected_blocks",
                        "select_block_size", "kernel", "queries_per_tile", "ms", "union", "note"])
            print("\nvariants: queries per tile on three kinds of selections")
            variants(w)
    print(f"[total {time.time() - start:.0f} s]")
    print("\nms, median             heads " + "".join(f"{N:>10d}" for N in lengths))
    keys = sorted({(impl, p, hq, h) for _, hq, h, impl, p, _, note in table if not note},
                  key=lambda x: (-x[2], x[1], x[0]))
    for impl, p, hq, h in keys:
        cells = {N: ms for N, hq_, h_, i, pp, ms, note in table
                 if (i, pp, hq_, h_) == (impl, p, hq, h) and not note}
        print(f"{impl + ' ' + p:34s} {hq:2d}/{h:<2d}" + "".join(f"{cells.get(N, float('nan')):10.2f}" for N in lengths))


if __name__ == "__main__":
    main()
