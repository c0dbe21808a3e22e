"""GPU check and timing of the selected branch's two designs across GQA group sizes (chapter 8b).

Not collected by pytest (no test_ prefix); a GPU user runs it from the repository root:

    PYTHONUNBUFFERED=1 python benchmarks/gpu_selected_groups.py [--out DIR] [--seq-lens 16k,64k]
        [--peers DIR]

1. Correctness: chapter 8's query-centric launchers and chapter 8b's key-block-centric ones, bf16,
   against the float64 gathered reference of gpu_check_selected.py (every row), forward and
   backward, at lengths that are multiples of no block, for groups 1, 2, 3, 4, 8 and 16; and the
   public `selected_attention_triton` (autograd, design picked by group) at groups 1 and 16.
2. Timing (triton.testing.do_bench, median): the paper's geometry (d = 128, n = 16, l' = 64, bf16,
   batch 1, random valid selections with block 0 and the query's own block forced) at each
   --seq-lens, heads 32/32, 32/16, 32/8, 32/4 and 64/4: each design's forward (index preparation
   included), forward + backward, and the backward alone building its own plan (as after the other
   design's forward), SDPA flash over the same tokens (kv heads expanded), and,
   with --peers DIR holding XunhaoLai's `native_sparse_attention` package and FSA's `fsa` and
   `nsa_ref` packages (their public repositories, XunhaoLai/native-sparse-attention-triton and
   Relaxed-System-Lab/Flash-Sparse-Attention: benchmark-only dependencies), their
   `topk_sparse_attention` and `FSA_topk_sparse_attention` on the same selections, each first
   compared with chapter 8's output (the relative difference is printed).
Writes DIR/selected_groups_<gpu>.csv (impl, seq_len, heads_q, heads_kv, head_dim, pass, ms) and
DIR/selected_groups_<gpu>_errors.csv; prints a table last.
"""

import argparse
import csv
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

import nsa  # noqa: E402,F401
from nsa.bench import parse_heads, parse_lengths  # noqa: E402
from nsa.device import gpu_tag  # noqa: E402
from nsa.kernels import selected as sel  # noqa: E402

from gpu_check_selected import random_block_indices, reference_fp64, rel  # noqa: E402

DEV = torch.device("cuda")
HEADS = [(32, 32), (32, 16), (32, 8), (32, 4), (64, 4)]


def design_fns(design, q, k, v, do, indices, block_size, scale):
    """(forward, forward + backward, backward alone) closures of one design's launchers, index preparation
    included."""
    def forward():
        prepared = sel.prepare_block_indices(indices, block_size, k.shape[1], True)
        if design == "key_block_centric":
            o, lse, index = sel.selected_by_block_fwd(q, k, v, prepared, block_size, scale, True)
            return prepared, None, index, (o, lse)
        Q, tiles = sel.query_tiles(prepared, q.shape[2] // k.shape[2])
        return prepared, Q, tiles, sel.selected_attention_fwd(q, k, v, prepared, block_size, scale, True, Q, tiles)

    def forward_backward():
        prepared, Q, tiles, (o, lse) = forward()
        if design == "key_block_centric":
            return o, lse, *sel.selected_by_block_bwd(do, q, k, v, o, lse, prepared, block_size, scale, True,
                                                      index=tiles)
        return o, lse, *sel.selected_attention_bwd(do, q, k, v, o, lse, prepared, block_size, scale, True, Q, tiles)

    saved = []

    def backward():
        """The backward alone, building its own plan (the reverse index or the query tiles), as
        when the forward ran the other design."""
        if not saved:
            prepared, _, _, (o, lse) = forward()
            saved.extend((prepared, o, lse))
        prepared, o, lse = saved
        if design == "key_block_centric":
            return sel.selected_by_block_bwd(do, q, k, v, o, lse, prepared, block_size, scale, True)
        Q, tiles = sel.query_tiles(prepared, q.shape[2] // k.shape[2])
        return sel.selected_attention_bwd(do, q, k, v, o, lse, prepared, block_size, scale, True, Q, tiles)
    return forward, forward_backward, backward


def inputs(N, Hq, H, D=128, n=16, block_size=64, seed=0, dtype=torch.bfloat16):
    gen = torch.Generator(DEV).manual_seed(seed)
    make = lambda *s: torch.randn(*s, device=DEV, dtype=dtype, generator=gen)
    q, k, v, do = make(1, N, Hq, D), make(1, N, H, D), make(1, N, H, D), make(1, N, Hq, D)
    return q, k, v, do, random_block_indices(1, N, N, H, n, block_size, seed=seed)


def correctness(errors_csv):
    rows, worst = [], 0.0
    for N, Hq, H, n in [(1000, 4, 4, 16), (1000, 6, 3, 16), (4097, 8, 2, 16), (4097, 12, 4, 16),
                        (3001, 32, 4, 16), (2049, 16, 1, 8), (16385, 32, 32, 16)]:
        q, k, v, do, indices = inputs(N, Hq, H, n=n, seed=N + Hq)
        scale = 128 ** -0.5
        prepared = sel.prepare_block_indices(indices, 64, N, True)
        ref = reference_fp64(q, k, v, do, prepared, 64, scale, True)
        for design in ("query_centric", "key_block_centric"):
            forward, forward_backward, backward = design_fns(design, q, k, v, do, indices, 64, scale)
            got = forward_backward()
            errs = [rel(x, r) for x, r in zip(got, ref)]
            alone = [rel(x, r) for x, r in zip(backward(), ref[2:])]     # the backward with its own plan
            worst = max([worst] + errs + alone)
            rows.append(dict(design=design, seq_len=N, heads_q=Hq, heads_kv=H,
                             **{c: f"{e:.2e}" for c, e in zip(("o", "lse", "dq", "dk", "dv"), errs)}))
            print(f"{design:18s} N={N:6d} {Hq:2d}/{H:<2d} " + " ".join(f"{c}={e:.1e}" for c, e in
                  zip(("o", "lse", "dq", "dk", "dv"), errs)), flush=True)
    for Hq, H in ((8, 8), (16, 1)):                       # the public entry point through autograd
        q, k, v, do, indices = inputs(3001, Hq, H, seed=Hq)
        prepared = sel.prepare_block_indices(indices, 64, 3001, True)
        ref = reference_fp64(q, k, v, do, prepared, 64, 128 ** -0.5, True)
        qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
        o, lse = sel.selected_attention_triton(qq, kk, vv, indices, 64, return_lse=True)
        o.backward(do)
        errs = [rel(x, r) for x, r in zip((o, lse, qq.grad, kk.grad, vv.grad), ref)]
        worst = max([worst] + errs)
        print(f"selected_attention_triton {Hq}/{H}: " + " ".join(f"{e:.1e}" for e in errs), flush=True)
    with open(errors_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"worst relative error {worst:.2e}")
    assert worst < 1e-2, worst


def xunhaolai_topk(q, k, v, topk, block_size, cu_seqlens, scale):
    from native_sparse_attention.ops import topk_sparse_attention
    return topk_sparse_attention(q, k, v, topk, block_size, cu_seqlens, scale)


def fsa_topk(q, k, v, topk, block_size, cu_seqlens, scale):
    from fsa.ops import FSA_topk_sparse_attention
    return FSA_topk_sparse_attention(q, k, v, topk, block_size, cu_seqlens, scale)


PEERS = {"xunhaolai_topk": xunhaolai_topk, "fsa_topk": fsa_topk}


def peer_fn(attend, q, k, v, do, indices, N, block_size, scale):
    """A peer's varlen top-k attention on the same selections: (forward, forward + backward).
    Both peers take q (N, Hq, d), k, v (N, H, d), block indices (H, N, n) int32 with -1 padding
    and flash-attn's cu_seqlens."""
    cu = torch.tensor([0, N], device=DEV, dtype=torch.int32)
    topk = indices[0].permute(1, 0, 2).contiguous()                    # (H, N, n), -1 padding
    q1, k1, v1 = (x[0].detach().requires_grad_() for x in (q, k, v))

    def forward():
        return attend(q1, k1, v1, topk, block_size, cu, scale)

    def forward_backward():
        torch.autograd.grad(forward(), (q1, k1, v1), do[0])
    return forward, forward_backward


IMPLS = ("query_centric", "key_block_centric", "sdpa_flash", *PEERS)


def timing(times_csv, lengths, peers, heads=HEADS, impls=IMPLS):
    rows = []
    for N in lengths:
        for Hq, H in heads:
            q, k, v, do, indices = inputs(N, Hq, H)
            scale = 128 ** -0.5
            record = lambda impl, pass_, ms: rows.append(dict(impl=impl, seq_len=N, heads_q=Hq, heads_kv=H,
                                                              head_dim=128, pass_=pass_, ms=f"{ms:.3f}"))
            for design in [d for d in ("query_centric", "key_block_centric") if d in impls]:
                fwd, both, bwd = design_fns(design, q, k, v, do, indices, 64, scale)
                record(design, "fwd", do_bench(fwd))
                record(design, "fwd_bwd", do_bench(both))
                record(design, "bwd", do_bench(bwd))
            if "sdpa_flash" in impls:
                qd, kd, vd = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in
                              (q, k.repeat_interleave(Hq // H, 2), v.repeat_interleave(Hq // H, 2)))
                dod = do.transpose(1, 2).contiguous()
                sdpa = lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True)
                with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                    with torch.no_grad():
                        record("sdpa_flash", "fwd", do_bench(sdpa))
                    record("sdpa_flash", "fwd_bwd", do_bench(lambda: torch.autograd.grad(sdpa(), (qd, kd, vd), dod)))
                del qd, kd, vd
            ours = None
            for name, attend in PEERS.items():
                if peers and name in impls:
                    try:
                        fwd, both = peer_fn(attend, q, k, v, do, indices, N, 64, scale)
                        if ours is None:   # chapter 8's output on the same selections, (N, Hq, Dv)
                            ours = design_fns("query_centric", q, k, v, do, indices, 64, scale)[0]()[3][0][0].float()
                        difference = ((fwd().float() - ours).norm() / ours.norm()).item()
                        print(f"{name} {N} {Hq}/{H}: output differs from ours by {difference:.2e} (relative)")
                        record(name, "fwd", do_bench(fwd))
                        record(name, "fwd_bwd", do_bench(both))
                    except Exception as failure:       # a peer that fails is reported, not fatal
                        print(f"{name} {N} {Hq}/{H}: {type(failure).__name__}: {failure}"[:300])
            torch.cuda.empty_cache()
            for r in rows[-12:]:
                if int(r["seq_len"]) == N and (r["heads_q"], r["heads_kv"]) == (Hq, H):
                    print(f"{r['impl']:20s} {N:6d} {Hq:3d}/{H:<3d} {r['pass_']:8s} {r['ms']:>10s}", flush=True)
    with open(times_csv, "w", newline="") as f:
        f.write(f"# python benchmarks/gpu_selected_groups.py {' '.join(sys.argv[1:])}; "
                f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
                f"{platform.python_version()}, {time.strftime('%Y-%m-%d')}\n")
        writer = csv.DictWriter(f, fieldnames=["impl", "seq_len", "heads_q", "heads_kv", "head_dim", "pass", "ms"])
        writer.writeheader()
        writer.writerows({**{k_: v_ for k_, v_ in r.items() if k_ != "pass_"}, "pass": r["pass_"]} for r in rows)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "book" / "data")
    parser.add_argument("--seq-lens", type=parse_lengths, default=parse_lengths("16k,64k"))
    parser.add_argument("--peers", type=Path, default=None,
                        help="folder holding native_sparse_attention, fsa and nsa_ref")
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--heads", type=parse_heads, default=HEADS)
    parser.add_argument("--impls", default=",".join(IMPLS))
    args = parser.parse_args()
    if args.peers:
        sys.path.insert(0, str(args.peers.resolve()))
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.skip_check:
        correctness(args.out / f"selected_groups_{gpu_tag()}_errors.csv")
    lengths, heads = args.seq_lens, args.heads
    rows = timing(args.out / f"selected_groups_{gpu_tag()}.csv", lengths, args.peers, heads, args.impls.split(","))
    print(f"\n{'N':>6s} {'heads':>6s} {'pass':>8s}" + "".join(f"{i:>14s}" for i in
          ("query_c", "key_block_c", "sdpa_flash", "xunhaolai", "fsa")))
    ms = {(r["impl"], r["seq_len"], r["heads_q"], r["heads_kv"], r["pass_"]): r["ms"] for r in rows}
    for N in lengths:
        for Hq, H in heads:
            for pass_ in ("fwd", "fwd_bwd", "bwd"):
                print(f"{N:6d} {Hq:3d}/{H:<2d} {pass_:>8s}" + "".join(
                    f"{ms.get((i, N, Hq, H, pass_), '-'):>14s}" for i in
                    IMPLS))


if __name__ == "__main__":
    main()
