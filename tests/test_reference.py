"""The naive NSA reference (tests/nsa_reference.py) checked against DESIGN.md's rules one by one.

Only chapter 1's dense `nsa.attention` and masks are used as a second opinion: the reference must
stay independent of the chapters it judges (2-5)."""

from types import SimpleNamespace

import pytest
import torch

from nsa import attention, causal_mask, sliding_window_mask
from nsa_reference import naive_nsa, overlap


def config(l=8, d=4, l_sel=16, n=4, n_init=1, n_local=2, w=32, causal=True):
    return SimpleNamespace(compress_block_size=l, compress_stride=d, select_block_size=l_sel,
                           num_selected_blocks=n, num_initial_blocks=n_init,
                           num_local_blocks=n_local, window_size=w, causal=causal)


def inputs(B, Nq, Nk, Hq, H, Dqk, Dv, cfg, mem=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    l, d = cfg.compress_block_size, cfg.compress_stride
    Nc = (Nk - l) // d + 1 if Nk >= l else 0
    gates = [torch.rand(B, Nq, Hq, generator=g, dtype=torch.float64) for _ in range(3)]
    return (r(B, Nq, Hq, Dqk), r(B, Nk, H, Dqk), r(B, Nk, H, Dv),
            r(B, mem + Nc, H, Dqk), r(B, mem + Nc, H, Dv), *gates)


def cmp_mask(Nq, Nk, Nc, l, d, mem=0, causal=True):
    t = torch.arange(Nk - Nq, Nk)[:, None]
    last = torch.arange(Nc)[None, :] * d + l - 1
    real = (last <= t) if causal else torch.ones(Nq, Nc, dtype=torch.bool)
    return torch.cat([torch.ones(Nq, mem, dtype=torch.bool), real], dim=1)


def test_eq9_weights_are_1_2_2_2_1_for_the_papers_geometry():
    # selection block j = 1 covers keys [64, 128); compressed blocks i cover [16 i, 16 i + 32)
    weights = [overlap(i, 1, 32, 16, 64) / 16 for i in range(10)]
    assert weights == [0, 0, 0, 1, 2, 2, 2, 1, 0, 0]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("mem", [0, 3])
def test_compressed_branch_is_dense_attention_over_visible_blocks(causal, mem):
    cfg = config(causal=causal)
    B, Nq, Nk, Hq, H = 2, 9, 37, 4, 2
    q, k, v, kc, vc, *gates = inputs(B, Nq, Nk, Hq, H, 8, 6, cfg, mem=mem)
    _, parts = naive_nsa(q, k, v, kc, vc, *gates, cfg, None, mem)
    mask = cmp_mask(Nq, Nk, kc.shape[1] - mem, 8, 4, mem, causal)
    # chapter 1's attention wants Nq <= Nk; here there are fewer blocks than queries, so by hand
    logits = torch.einsum("bihd,bjhd->bhij", q, kc.repeat_interleave(2, dim=2)) * 8 ** -0.5
    logits = logits.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(logits, -1)                            # (B, Hq, Nq)
    probs = torch.exp(logits - lse[..., None]).nan_to_num(0.0)
    o = torch.einsum("bhij,bjhd->bihd", probs, vc.repeat_interleave(2, dim=2))
    lse = lse.transpose(1, 2)
    torch.testing.assert_close(parts["o_cmp"], o)
    torch.testing.assert_close(parts["lse_cmp"], lse)
    # p_cmp = exp(s - lse) over the real blocks; with memory present they sum to < 1
    total = parts["p_cmp"].sum(-1)
    if mem:
        assert (total < 1).all()
    else:
        seen = mask.any(-1)[None, :, None].expand_as(total)
        torch.testing.assert_close(total[seen], torch.ones_like(total[seen]))


def test_query_before_the_first_block_gets_zero_and_minus_inf():
    cfg = config()
    q, k, v, kc, vc, *gates = inputs(1, 5, 5, 2, 1, 4, 4, cfg)  # Nk < l: no compressed block
    assert kc.shape[1] == 0
    o, parts = naive_nsa(q, k, v, kc, vc, *gates, cfg)
    assert (parts["o_cmp"] == 0).all() and (parts["lse_cmp"] == float("-inf")).all()
    assert o.isfinite().all()


@pytest.mark.parametrize("causal", [True, False])
def test_window_branch_matches_mask(causal):
    cfg = config(w=5, causal=causal)
    q, k, v, kc, vc, *gates = inputs(2, 13, 30, 4, 1, 8, 8, cfg)
    _, parts = naive_nsa(q, k, v, kc, vc, *gates, cfg)
    if causal:
        mask = sliding_window_mask(13, 30, 5)
    else:
        t, s = torch.arange(17, 30)[:, None], torch.arange(30)[None, :]
        mask = (s > t - 5) & (s < t + 5)
    torch.testing.assert_close(parts["o_win"], attention(q, k, v, mask))


@pytest.mark.parametrize("causal", [True, False])
def test_selecting_every_block_is_full_attention(causal):
    cfg = config(n=8, causal=causal)          # 8 blocks of 16 >= 100 keys
    q, k, v, kc, vc, *gates = inputs(1, 20, 100, 2, 2, 8, 4, cfg)
    _, parts = naive_nsa(q, k, v, kc, vc, *gates, cfg)
    torch.testing.assert_close(parts["o_slc"], attention(q, k, v, causal_mask(20, 100) if causal else None))


def test_scores_follow_eq9_and_are_shared_by_the_group():
    cfg = config()
    B, Nq, Nk, Hq, H = 1, 6, 50, 4, 2
    q, k, v, kc, vc, *gates = inputs(B, Nq, Nk, Hq, H, 8, 8, cfg)
    _, parts = naive_nsa(q, k, v, kc, vc, *gates, cfg)
    p, scores = parts["p_cmp"], parts["scores"]
    Nc, n_sel = p.shape[-1], scores.shape[-1]
    assert n_sel == 4                                             # ceil(50 / 16)
    W = torch.tensor([[overlap(i, j, 8, 4, 16) / 4 for j in range(n_sel)] for i in range(Nc)],
                     dtype=torch.float64)
    expected = (p @ W).view(B, Nq, H, 2, n_sel).sum(3)            # sum over the GQA group
    t = torch.arange(Nk - Nq, Nk)
    allowed = torch.arange(n_sel)[None, :] <= (t // 16)[:, None]   # (Nq, n_sel)
    allowed = allowed[None, :, None].expand_as(expected)
    torch.testing.assert_close(scores[allowed], expected[allowed])
    assert (scores[~allowed] == float("-inf")).all()


def test_forced_blocks_ties_and_planted_block():
    cfg = config(l=8, d=4, l_sel=16, n=4, n_init=1, n_local=2)
    Nk, Hq, H, D = 160, 2, 1, 8                                   # 10 selection blocks
    q, k, v, kc, vc, *gates = inputs(1, 1, Nk, Hq, H, D, D, cfg)
    # tie: a zero query sees all blocks with equal probability -> interior blocks tie, lower wins
    _, parts = naive_nsa(torch.zeros_like(q), k, v, kc, vc, *gates, cfg)
    assert parts["selected"][0][0][0] == [0, 1, 8, 9]
    # planted: compressed blocks 20..22 (keys 80..107) align with the query -> selection block 5
    kc = kc.clone()
    kc[0, 20:23, 0] = q[0, 0, 0] * 10
    _, parts = naive_nsa(q, k, v, kc, vc, *gates, cfg)
    assert parts["selected"][0][0][0] == [0, 5, 8, 9]


def test_fewer_blocks_than_slots_selects_all_and_decoding_is_the_last_row():
    cfg = config(n=4)
    q, k, v, kc, vc, *gates = inputs(1, 40, 40, 2, 1, 8, 8, cfg)
    o, parts = naive_nsa(q, k, v, kc, vc, *gates, cfg)
    for i in range(40):
        assert parts["selected"][0][i][0] == list(range(i // 16 + 1))[:4]
    o_last, _ = naive_nsa(q[:, -1:], k, v, kc, vc, *(g[:, -1:] for g in gates), cfg)
    torch.testing.assert_close(o_last, o[:, -1:])


def test_gates_combine_the_three_branches():
    """Gates of one branch give that branch alone, equal to chapter 1's attention under the
    branch's mask (the selected one built from the blocks the reference chose); any gates give
    the gated sum of the three."""
    cfg = config()
    q, k, v, kc, vc, g1, g2, g3 = inputs(2, 7, 80, 4, 2, 8, 4, cfg)   # 5 selection blocks, 4 chosen
    one, zero = torch.ones_like(g1), torch.zeros_like(g1)
    o_cmp, parts = naive_nsa(q, k, v, kc, vc, one, zero, zero, cfg, 0.3)
    torch.testing.assert_close(o_cmp, attention(q, kc, vc, cmp_mask(7, 80, kc.shape[1], 8, 4), scale=0.3))
    o_slc, _ = naive_nsa(q, k, v, kc, vc, zero, one, zero, cfg, 0.3)
    chosen = torch.zeros(2, 2, 7, 80, dtype=torch.bool)                          # (B, H, Nq, Nk)
    for b in range(2):
        for i in range(7):
            for h in range(2):
                for j in parts["selected"][b][i][h]:
                    chosen[b, h, i, j * 16:(j + 1) * 16] = True
    assert not chosen.all(-1).any()                                               # a block left out
    torch.testing.assert_close(o_slc, attention(q, k, v, chosen & causal_mask(7, 80), scale=0.3))
    o_win, _ = naive_nsa(q, k, v, kc, vc, zero, zero, one, cfg, 0.3)
    torch.testing.assert_close(o_win, attention(q, k, v, sliding_window_mask(7, 80, 32), scale=0.3))
    o, _ = naive_nsa(q, k, v, kc, vc, g1, g2, g3, cfg, 0.3)
    torch.testing.assert_close(o, g1[..., None] * o_cmp + g2[..., None] * o_slc + g3[..., None] * o_win)


def test_non_causal_forced_local_blocks_and_candidates():
    cfg = config(n=3, n_init=1, n_local=2, causal=False)
    q, k, v, kc, vc, *gates = inputs(1, 1, 160, 1, 1, 8, 8, cfg)
    q = torch.zeros_like(q)                                       # all ties: forced + lowest
    _, parts = naive_nsa(q, k, v, kc, vc, *gates, cfg)
    assert parts["selected"][0][0][0] == [0, 8, 9]                # t = 159: own block 9
    assert (parts["scores"] > float("-inf")).all()                 # every block is a candidate
