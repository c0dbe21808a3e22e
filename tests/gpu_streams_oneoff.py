"""One-off H100 experiment (python tests/gpu_streams_oneoff.py, 64k): do the load-bound selected kernels overlap with the compute-bound band kernels on two CUDA streams? (Answer: no.)"""
import torch, triton
from triton.testing import do_bench
from nsa.bench import make_inputs
from nsa.kernels import compressed as C, selected as S
from nsa.kernels.window import window_band
torch.backends.cuda.matmul.allow_tf32 = True
ms = lambda f: do_bench(f, warmup=10, rep=60, return_mode="median")
for Hq, H in ((64, 4), (32, 8)):
    (q, k, v, k_cmp, v_cmp, gc, gs, gw), config = make_inputs(65536, Hq, H, 128)
    q, k, v, k_cmp, v_cmp, gc, gs, gw = [t.detach() for t in (q, k, v, k_cmp, v_cmp, gc, gs, gw)]
    scale, N = 128 ** -0.5, 65536
    band_c = C.compressed_band(k_cmp.shape[1], 32, 16, 0, True)
    band_w = window_band(512, True)
    o_c, lse_c = C.band_attention_forward(q, k_cmp, v_cmp, scale, N, band_c)
    idx = C.select_blocks_triton(q, k_cmp, lse_c, N, config, scale)
    prep = S.prepare_block_indices(idx, 64, N)
    Q = S.default_queries_per_tile(Hq // H)
    tiles = S.prepare_query_tiles(prep, Q) if Q > 1 else None
    sel_fwd = lambda: S.selected_attention_fwd(q, k, v, prep, 64, scale, True, queries_per_tile=Q, tiles=tiles)
    win_fwd = lambda: C.band_attention_forward(q, k, v, scale, N, band_w)
    o_s, lse_s = sel_fwd(); o_w, lse_w = win_fwd()
    do = torch.randn_like(q)
    d = [(do.float() * o.float()).sum(-1) for o in (o_c, o_s, o_w)]
    def sel_bwd(dq=None):
        S.selected_attention_bwd(do, q, k, v, o_s, lse_s, prep, 64, scale, True, queries_per_tile=Q, tiles=tiles, gate=gs, delta=d[1].clone(), dq=dq)
    def cmp_bwd(dq=None):
        return C.band_attention_backward(do, q, k_cmp, v_cmp, o_c, lse_c, scale, N, band_c, gate=gc, delta=d[0].clone(), dq=dq)
    def win_bwd(dq=None):
        C.band_attention_backward(do, q, k, v, o_w, lse_w, scale, N, band_w, gate=gw, delta=d[2].clone(), dq=dq)
    side = torch.cuda.Stream()
    def two(f, g):
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            g()
        f()
        main.wait_stream(side)
    def bwd_seq():
        dq = cmp_bwd()[0]; sel_bwd(dq); win_bwd(dq)
    def bwd_par():
        dq2 = torch.empty_like(q)
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            sel_bwd(None)
        dq = cmp_bwd()[0]; win_bwd(dq)
        main.wait_stream(side)
    t = dict(sel_fwd=ms(sel_fwd), win_fwd=ms(win_fwd), both_fwd_seq=ms(lambda: (sel_fwd(), win_fwd())),
             both_fwd_streams=ms(lambda: two(sel_fwd, win_fwd)),
             sel_bwd=ms(lambda: sel_bwd()), cmp_bwd=ms(lambda: cmp_bwd()), win_bwd=ms(lambda: win_bwd()),
             bwd_seq=ms(bwd_seq), bwd_streams=ms(bwd_par))
    print(f"{Hq}/{H}: " + ", ".join(f"{a} {b:.2f}" for a, b in t.items()), flush=True)
