"""One-off H100 sweep (python tests/gpu_sweep_bwd.py): band dk/dv tiles (as written vs transposed), selected dk/dv tiles, reverse index v1 vs v2. Output: book/data/bwd_tiles_sweep_h100.csv."""
import sys, os, time
sys.path.insert(0, os.path.dirname(__file__))
import torch, triton
from triton.testing import do_bench
from nsa.bench import make_inputs
from nsa.kernels import compressed as C, selected as S
from nsa.kernels.window import window_band
from gpu_sweep_bwd_dkdv_t import band_dkdv_t_kernel

def bench(fn):
    if DEV != "cuda": return 0.0
    return do_bench(fn, warmup=10, rep=60, return_mode="median")
rows_out = []
def add(name, ms, note=""):
    rows_out.append((name, ms, note)); print(f"{name:50s} {ms:8.3f} {note}", flush=True)

def reverse_v2(block_indices, num_blocks, chunk):
    B, Nq, H, n = block_indices.shape
    device = block_indices.device
    per_head = block_indices.permute(0, 2, 1, 3).reshape(B * H, Nq * n)
    key = torch.where(per_head >= 0, per_head, num_blocks)
    key = (key + torch.arange(B * H, device=device, dtype=torch.int32)[:, None] * (num_blocks + 1)).flatten()
    sorted_key, order = torch.sort(key)
    queries = ((order % (Nq * n)) // n).to(torch.int32)
    edges = torch.searchsorted(sorted_key, torch.arange(B * H * (num_blocks + 1) + 1, device=device, dtype=torch.int32))
    starts = edges[:-1].view(B * H, num_blocks + 1)[:, :num_blocks]
    counts = (edges[1:] - edges[:-1]).view(B * H, num_blocks + 1)[:, :num_blocks]
    num_chunks = (counts + chunk - 1) // chunk
    last_chunk = num_chunks.cumsum(1)
    U = num_blocks + -(-(Nq * n) // chunk)
    program = torch.arange(U, device=device).expand(B * H, U).contiguous()
    block = torch.searchsorted(last_chunk, program, right=True)
    has_work = block < num_blocks
    block = block.clamp(max=num_blocks - 1)
    nth = program - (last_chunk - num_chunks).gather(1, block)
    begin = starts.gather(1, block) + nth * chunk
    end = torch.minimum(begin + chunk, (starts + counts).gather(1, block))
    return queries, torch.where(has_work, block, -1).to(torch.int32), torch.where(has_work, begin, 0).to(torch.int32), torch.where(has_work, end, 0).to(torch.int32)

N = int(os.environ.get("N", 65536)); DEV = os.environ.get("DEV", "cuda")
for Hq, H in ((64, 4), (32, 8)):
    (q, k, v, k_cmp, v_cmp, *_), config = make_inputs(N, Hq, H, 128, **({} if DEV == "cuda" else dict(dtype=torch.float16, device=DEV)))
    q, k, v, k_cmp, v_cmp = [t.detach() for t in (q, k, v, k_cmp, v_cmp)]
    G, D, scale = Hq // H, 128, 128 ** -0.5
    do = torch.randn_like(q)
    tag = f"{Hq}/{H}"
    # -- band dk/dv --
    bands = {"cmp": (k_cmp, v_cmp, C.compressed_band(k_cmp.shape[1], 32, 16, 0, True), 2048),
             "win": (k, v, window_band(512, True), None)}
    for name, (kk, vv, band, chunk) in bands.items():
        o_b, lse_b = C.band_attention_forward(q, kk, vv, scale, N, band)
        delta = (do.float() * o_b.float()).sum(-1)
        R = kk.shape[1]
        ref = None
        for kern, label, cfgs in ((C.band_attention_backward_dkdv_kernel, "orig", [(64, 64, 4, 3), (64, 64, 4, 2)]),
                                  (band_dkdv_t_kernel, "trans", [(64, 64, 4, 3), (64, 64, 4, 2), (64, 128, 8, 2), (64, 128, 8, 3),
                                                                  (32, 128, 4, 3), (32, 128, 4, 2), (32, 128, 8, 3), (128, 64, 8, 2), (32, 64, 4, 3)])):
            for rows, bn, w, s in cfgs:
                meta, _ = C.band_tiles(G, D, D, True, rows=rows)
                meta["BLOCK_N"] = bn
                ch = triton.cdiv(chunk or N, meta["BLOCK_M"]) * meta["BLOCK_M"]
                nch = triton.cdiv(N, ch)
                dk = torch.empty(nch, *kk.shape, device=DEV, dtype=torch.float32)
                dv = torch.empty(nch, *vv.shape, device=DEV, dtype=torch.float32)
                grid = (triton.cdiv(R, bn), nch, H)
                fn = lambda: kern[grid](q, kk, vv, do, lse_b, delta, dk, dv, scale * C.LOG2E, scale, N, N, R, *band, ch,
                                        HEADS_Q=Hq, num_warps=w, num_stages=s, **meta)
                try:
                    fn()
                    res = dk.sum(0)
                    if ref is None: ref = res.clone()
                    err = ((res - ref).norm() / ref.norm()).item()
                    add(f"{tag} dkdv_{name}_{label}_r{rows}_n{bn}_w{w}_s{s}", bench(fn), f"rel {err:.1e}")
                except Exception as e:
                    print(f"{tag} dkdv_{name}_{label}_r{rows}_n{bn}_w{w}_s{s} FAIL {type(e).__name__}: {str(e)[:100]}", flush=True)
        del o_b, lse_b, delta, dk, dv
    # -- selected: indices, reverse index, dk/dv tiles --
    with torch.no_grad():
        o_c, lse_c = C.compressed_attention_triton(q, k_cmp, v_cmp, 32, 16, scale, seq_len_k=N)
        idx = C.select_blocks_triton(q, k_cmp, lse_c, N, config, scale)
    prep = S.prepare_block_indices(idx, 64, N)
    NB = -(-N // 64)
    a = S.reverse_block_index(prep, NB, 1024); b = reverse_v2(prep, NB, 1024)
    same = all(torch.equal(x, y) for x, y in zip(a[1:], b[1:]))
    add(f"{tag} reverse_index_v1", bench(lambda: S.reverse_block_index(prep, NB, 1024)))
    add(f"{tag} reverse_index_v2", bench(lambda: reverse_v2(prep, NB, 1024)), f"chunks same {same}")
    add(f"{tag} prepare_block_indices", bench(lambda: S.prepare_block_indices(idx, 64, N)))
    Qt = S.default_queries_per_tile(G)
    if Qt > 1:
        add(f"{tag} prepare_query_tiles", bench(lambda: S.prepare_query_tiles(prep, Qt)))
    o_s, lse_s = S.selected_attention_fwd(q, k, v, prep, 64, scale, True)
    base = None
    for rows, w, s in ((64, 4, 2), (64, 4, 3), (128, 8, 2), (128, 4, 2), (64, 8, 2), (32, 4, 3), (128, 8, 3)):
        fn = lambda: S.selected_attention_bwd(do, q, k, v, o_s, lse_s, prep, 64, scale, True, rows=rows, dkdv_warps=w, dkdv_stages=s)
        try:
            dq, dk, dv = fn()
            if base is None: base = dk.float()
            err = ((dk.float() - base).norm() / base.norm()).item()
            add(f"{tag} selected_bwd_rows{rows}_w{w}_s{s}", bench(fn), f"rel {err:.1e}")
        except Exception as e:
            print(f"{tag} selected_bwd rows{rows} w{w} s{s} FAIL {type(e).__name__}: {str(e)[:100]}", flush=True)
    del q, k, v, k_cmp, v_cmp, do, o_s, lse_s, prep, idx
    torch.cuda.empty_cache()
print("\n== summary")
for r in rows_out: print(f"{r[0]:50s} {r[1]:8.3f} {r[2]}")
