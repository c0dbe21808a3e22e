"""Chapter 3: selection_scores, select_blocks, selected_attention — against plain loops."""

import math

import pytest
import torch

import nsa
from nsa import (NSAConfig, attention, block_selection_mask, compress, compressed_attention,
                 select_blocks, selected_attention, selection_scores)
from nsa.geometry import num_compressed_blocks
from nsa.geometry import overlap_weights

F64 = torch.float64
INF = math.inf


def randn(*shape, seed=0, dtype=F64, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(requires_grad)


def shared_tokens(i, j, l, d, l_sel):
    return len(set(range(i * d, i * d + l)) & set(range(j * l_sel, (j + 1) * l_sel)))


# ---------------------------------------------------------------------------------------------
# overlap weights (Eq. 9)


@pytest.mark.parametrize("N, l, d, l_sel", [(1, 32, 16, 64), (100, 32, 16, 64), (257, 8, 4, 16),
                                            (200, 16, 16, 16), (130, 12, 4, 8), (99, 8, 2, 32)])
def test_overlap_weights_count_shared_tokens(N, l, d, l_sel):
    W = overlap_weights(N, l, d, l_sel, dtype=F64)
    Nc, n_sel = num_compressed_blocks(N, l, d), math.ceil(N / l_sel)
    assert W.shape == (Nc, n_sel)
    for i in range(Nc):
        for j in range(n_sel):
            assert W[i, j] == shared_tokens(i, j, l, d, l_sel) / d


def test_papers_weights_1_2_2_2_1():
    W = overlap_weights(1024, 32, 16, 64)
    for j in range(1, 15):
        column = W[:, j]
        rows = column.nonzero().flatten().tolist()
        assert rows == list(range(4 * j - 1, 4 * j + 4))                     # blocks overlapping [64j, 64j+64)
        assert column[rows].tolist() == [1, 2, 2, 2, 1]


# ---------------------------------------------------------------------------------------------
# selection_scores


def loop_scores(q, k_cmp, Nk, config, mem, scale):
    B, Nq, Hq, _ = q.shape
    H = k_cmp.shape[2]
    G = Hq // H
    l, d, l_sel = config.compress_block_size, config.compress_stride, config.select_block_size
    Nc = k_cmp.shape[1] - mem
    n_sel = math.ceil(Nk / l_sel)
    out = torch.full((B, Nq, H, n_sel), -INF, dtype=F64)
    for b in range(B):
        for i in range(Nq):
            t = Nk - Nq + i
            visible = [c for c in range(Nc) if not config.causal or c * d + l - 1 <= t]
            for h in range(H):
                p_block = [0.0] * Nc
                for g in range(G):
                    logits = {r: float(q[b, i, h * G + g] @ k_cmp[b, r, h]) * scale
                              for r in list(range(mem)) + [mem + c for c in visible]}
                    if not logits:
                        continue
                    total = sum(math.exp(x) for x in logits.values())
                    for c in visible:
                        p_block[c] += math.exp(logits[mem + c]) / total
                for j in range(n_sel):
                    if config.causal and j > t // l_sel:
                        continue
                    out[b, i, h, j] = sum(p_block[c] * shared_tokens(c, j, l, d, l_sel) / d for c in range(Nc))
    return out


SCORE_CASES = [  # B, Nq, Nk, Hq, H, D, config, mem
    (1, 1, 1, 1, 1, 8, NSAConfig(), 0),
    (2, 17, 17, 2, 1, 8, NSAConfig(8, 4, 16, 4, 1, 1), 0),
    (1, 100, 100, 4, 1, 4, NSAConfig(8, 4, 16, 4, 1, 2), 0),
    (1, 20, 257, 4, 2, 8, NSAConfig(), 0),
    (2, 30, 257, 2, 2, 4, NSAConfig(16, 8, 32, 4, 1, 1), 2),
    (1, 6, 1000, 4, 1, 4, NSAConfig(), 1),
    (1, 30, 100, 4, 4, 4, NSAConfig(8, 4, 16, 4, 1, 1, causal=False), 1),
]


@pytest.mark.parametrize("case", SCORE_CASES, ids=str)
def test_selection_scores_are_a_loop(case):
    B, Nq, Nk, Hq, H, D, config, mem = case
    l, d = config.compress_block_size, config.compress_stride
    q = randn(B, Nq, Hq, D, seed=1)
    k_cmp = randn(B, mem + num_compressed_blocks(Nk, l, d), H, D, seed=2)
    _, lse = compressed_attention(q, k_cmp, k_cmp, l, d, 0.7, causal=config.causal, mem_kv_len=mem, seq_len_k=Nk)
    scores = selection_scores(q, k_cmp, lse, Nk, config, 0.7, mem_kv_len=mem)
    assert scores.shape == (B, Nq, H, math.ceil(Nk / config.select_block_size)) and scores.dtype == F64
    torch.testing.assert_close(scores, loop_scores(q, k_cmp, Nk, config, mem, 0.7))


def test_selection_scores_float32_for_half_inputs_and_no_grad():
    q = randn(1, 64, 4, 8, dtype=torch.float32).mul(100).half().requires_grad_(True)
    k_cmp = compress(randn(1, 64, 2, 8, seed=3, dtype=torch.float32).mul(100).half(), None, 8, 4)
    _, lse = compressed_attention(q, k_cmp, k_cmp, 8, 4)
    scores = selection_scores(q, k_cmp, lse, 64, NSAConfig(8, 4, 16, 2, 1, 1))
    assert scores.dtype == torch.float32 and not scores.requires_grad and not scores.isnan().any()
    assert (scores[:, 40:] > -INF).sum() > 0


# ---------------------------------------------------------------------------------------------
# select_blocks


def loop_select(scores, Nk, config):
    B, Nq, H, n_sel = scores.shape
    l_sel, n = config.select_block_size, config.num_selected_blocks
    out = torch.full((B, Nq, H, n), -1, dtype=torch.int32)
    for b in range(B):
        for i in range(Nq):
            own = (Nk - Nq + i) // l_sel
            allowed = range(n_sel) if not config.causal else range(min(own + 1, n_sel))
            for h in range(H):
                must = [j for j in allowed if j < config.num_initial_blocks
                        or own - config.num_local_blocks < j <= own]
                rest = [(float(scores[b, i, h, j]), j) for j in allowed
                        if j not in must and scores[b, i, h, j] > -INF]
                rest.sort(key=lambda sj: (-sj[0], sj[1]))
                chosen = sorted(must + [j for _, j in rest][: n - len(must)])
                for slot, j in enumerate(chosen):
                    out[b, i, h, slot] = j
    return out


@pytest.mark.parametrize("Nq, Nk, config", [
    (1, 1, NSAConfig()),
    (17, 17, NSAConfig(8, 4, 16, 3, 1, 1)),
    (100, 100, NSAConfig(8, 4, 8, 5, 0, 0)),
    (100, 257, NSAConfig(8, 4, 16, 6, 2, 2)),
    (40, 1000, NSAConfig()),
    (30, 200, NSAConfig(8, 4, 16, 4, 1, 3, causal=False)),
    (30, 50, NSAConfig(8, 4, 16, 16, 1, 2, causal=False)),
], ids=str)
def test_select_blocks_is_a_loop_with_ties(Nq, Nk, config):
    g = torch.Generator().manual_seed(Nq + Nk)
    n_sel = math.ceil(Nk / config.select_block_size)
    scores = torch.randint(0, 3, (2, Nq, 2, n_sel), generator=g).double()          # many ties
    scores[torch.rand(scores.shape, generator=g) < 0.15] = -INF
    if config.causal:
        t = torch.arange(Nk - Nq, Nk)[:, None]
        scores = scores.masked_fill((torch.arange(n_sel) > t // config.select_block_size)[:, None], -INF)
    out = select_blocks(scores, Nk, config)
    assert out.dtype == torch.int32 and out.shape == (2, Nq, 2, config.num_selected_blocks)
    assert torch.equal(out, loop_select(scores, Nk, config))


def test_select_blocks_rules():
    config = NSAConfig(8, 4, 16, 4, num_initial_blocks=1, num_local_blocks=2)
    Nk = 200
    scores = torch.zeros(1, Nk, 1, 13)
    scores[..., 7] = 5.0                                        # a strong block
    t = torch.arange(Nk)
    own = t // 16
    scores = scores.masked_fill((torch.arange(13) > own[:, None])[None, :, None], -INF)
    out = select_blocks(scores, Nk, config)[0, :, 0]           # (Nk, 4)
    for ti in range(Nk):
        row = out[ti].tolist()
        chosen = [j for j in row if j >= 0]
        assert chosen == sorted(chosen) and row[len(chosen):] == [-1] * (4 - len(chosen))
        assert all(j <= own[ti] for j in chosen)                              # causal
        assert 0 in chosen and own[ti].item() in chosen                        # forced initial, local
        if own[ti] >= 1:
            assert own[ti].item() - 1 in chosen
        assert len(chosen) == min(4, own[ti].item() + 1)                       # fewer available: all
        if own[ti] >= 7:
            assert 7 in chosen
    # ties go to the lower index: all scores equal -> the earliest free blocks
    flat = torch.zeros(1, 1, 1, 13)
    assert select_blocks(flat, 200, config)[0, 0, 0].tolist() == [0, 1, 11, 12]


def test_select_blocks_decoding_is_last_row():
    config = NSAConfig()
    scores = randn(2, 1000, 2, 16, seed=4)
    t = torch.arange(1000)[:, None]
    scores = scores.masked_fill((torch.arange(16) > t // 64)[:, None], -INF)
    full = select_blocks(scores, 1000, config)
    assert torch.equal(select_blocks(scores[:, -1:], 1000, config), full[:, -1:])
    assert torch.equal(select_blocks(scores[:, -37:], 1000, config), full[:, -37:])


# ---------------------------------------------------------------------------------------------
# selected_attention


def loop_selected(q, k, v, block_indices, l_sel, scale, causal):
    B, Nq, Hq, _ = q.shape
    Nk, H = k.shape[1], k.shape[2]
    G = Hq // H
    o = torch.zeros(B, Nq, Hq, v.shape[-1], dtype=F64)
    for b in range(B):
        for i in range(Nq):
            t = Nk - Nq + i
            for h in range(Hq):
                blocks = {int(j) for j in block_indices[b, i, h // G] if j >= 0}
                keys = [s for s in range(Nk) if s // l_sel in blocks and (not causal or s <= t)]
                if keys:
                    w = torch.softmax(k[b, keys, h // G].double() @ q[b, i, h].double() * scale, 0)
                    o[b, i, h] = w @ v[b, keys, h // G].double()
    return o


SEL_CASES = [  # B, Nq, Nk, Hq, H, Dqk, Dv, l_sel, n
    (1, 1, 1, 1, 1, 8, 8, 64, 16),
    (2, 17, 17, 2, 1, 8, 4, 4, 3),
    (1, 100, 100, 4, 1, 8, 8, 16, 3),
    (2, 30, 257, 4, 2, 8, 6, 64, 4),
    (1, 257, 257, 4, 4, 4, 4, 32, 2),
    (1, 5, 1000, 2, 1, 4, 4, 64, 16),
]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("case", SEL_CASES, ids=str)
def test_selected_attention_is_a_loop_and_the_dense_mask(case, causal):
    B, Nq, Nk, Hq, H, Dqk, Dv, l_sel, n = case
    q, k, v = randn(B, Nq, Hq, Dqk, seed=1), randn(B, Nk, H, Dqk, seed=2), randn(B, Nk, H, Dv, seed=3)
    g = torch.Generator().manual_seed(Nk)
    block_indices = torch.randint(-1, math.ceil(Nk / l_sel), (B, Nq, H, n), generator=g)
    if n > 1:
        block_indices[..., 1] = block_indices[..., 0]                      # a repeat counts once
    o = selected_attention(q, k, v, block_indices, l_sel, 0.6, causal=causal)
    assert o.shape == (B, Nq, Hq, Dv) and o.dtype == F64
    torch.testing.assert_close(o, loop_selected(q, k, v, block_indices, l_sel, 0.6, causal))
    mask = block_selection_mask(block_indices, l_sel, Nk, causal=causal)
    torch.testing.assert_close(o, attention(q, k, v, mask, scale=0.6))


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64, torch.int16])
def test_selected_attention_index_dtypes(index_dtype):
    q, k, v = randn(1, 20, 2, 4, seed=1), randn(1, 20, 1, 4, seed=2), randn(1, 20, 1, 4, seed=3)
    blocks = torch.tensor([0, 2, -1]).expand(1, 20, 1, 3)
    torch.testing.assert_close(selected_attention(q, k, v, blocks.to(index_dtype), 4),
                               selected_attention(q, k, v, blocks.long(), 4))


def test_gradcheck_selected_attention():
    q = randn(1, 9, 2, 3, seed=1, requires_grad=True)
    k = randn(1, 9, 1, 3, seed=2, requires_grad=True)
    v = randn(1, 9, 1, 2, seed=3, requires_grad=True)
    blocks = torch.tensor([[0, 2], [1, -1], [2, 0]]).repeat(3, 1)[None, :, None]   # (1, 9, 1, 2)
    assert torch.autograd.gradcheck(lambda q, k, v: selected_attention(q, k, v, blocks, 4), (q, k, v))


def test_gradcheck_selection_pipeline_branches():
    """Through compress(mean) + compressed_attention + selected_attention; no gradient through top-k."""
    config = NSAConfig(4, 2, 4, 2, 1, 1)
    q = randn(1, 10, 2, 3, seed=1, requires_grad=True)
    k = randn(1, 10, 1, 3, seed=2, requires_grad=True)
    v = randn(1, 10, 1, 2, seed=3, requires_grad=True)
    with torch.no_grad():
        k_cmp = compress(k, None, 4, 2)
        _, lse = compressed_attention(q, k_cmp, compress(v, None, 4, 2), 4, 2)
        blocks = select_blocks(selection_scores(q, k_cmp, lse, 10, config), 10, config)

    def f(q, k, v):
        o_cmp, _ = compressed_attention(q, compress(k, None, 4, 2), compress(v, None, 4, 2), 4, 2)
        return o_cmp + selected_attention(q, k, v, blocks, 4)

    assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_large_logits(dtype):
    """Scores of about 1e6 stay finite in half precision through selection and the selected
    branch (only finiteness: see test_compression's test of the same name)."""
    config = NSAConfig(8, 4, 16, 3, 1, 1)
    q = (randn(2, 100, 4, 16, seed=1, dtype=torch.float32) * 300).to(dtype).requires_grad_(True)
    k = (randn(2, 100, 2, 16, seed=2, dtype=torch.float32) * 300).to(dtype).requires_grad_(True)
    v = randn(2, 100, 2, 8, seed=3, dtype=dtype).requires_grad_(True)
    k_cmp = compress(k, None, 8, 4)
    _, lse = compressed_attention(q, k_cmp, k_cmp, 8, 4)
    blocks = select_blocks(selection_scores(q, k_cmp, lse, 100, config), 100, config)
    o = selected_attention(q, k, v, blocks, 16)
    assert o.dtype == dtype and o.isfinite().all()
    o.float().sum().backward()
    assert q.grad.isfinite().all() and k.grad.isfinite().all() and v.grad.isfinite().all()


def test_shorter_than_one_compression_block():
    """N < l: no compressed block, all scores 0; selection still takes forced then earliest blocks."""
    config = NSAConfig(32, 16, 16, 3, 1, 1)
    q, k, v = randn(1, 20, 2, 4, seed=1), randn(1, 20, 1, 4, seed=2), randn(1, 20, 1, 4, seed=3)
    k_cmp = compress(k, None, 32, 16)
    o_cmp, lse = compressed_attention(q, k_cmp, compress(v, None, 32, 16), 32, 16)
    assert k_cmp.shape[1] == 0 and torch.all(o_cmp == 0) and torch.all(lse == -INF)
    scores = selection_scores(q, k_cmp, lse, 20, config)
    assert torch.all(scores[:, -1] == 0)
    blocks = select_blocks(scores, 20, config)
    assert blocks[0, -1, 0].tolist() == [0, 1, -1]
    assert blocks[0, 0, 0].tolist() == [0, -1, -1]
    assert selected_attention(q, k, v, blocks, 16).isfinite().all()


# ---------------------------------------------------------------------------------------------
# bad input

_q, _k, _v = randn(3, 1, 20, 2, 8, seed=9)
_config = NSAConfig(8, 4, 16, 4, 1, 1)
_kc = compress(_k, None, 8, 4)
_lse = compressed_attention(_q, _kc, _kc, 8, 4)[1]
_scores = selection_scores(_q, _kc, _lse, 20, _config)
_blocks = select_blocks(_scores, 20, _config)


@pytest.mark.parametrize("call, error, words", [
    (lambda: selection_scores(_q[0], _kc, _lse, 20, _config), ValueError, "^q must have shape"),
    (lambda: selection_scores(_q, _kc.float(), _lse, 20, _config), TypeError, "k_cmp"),
    (lambda: selection_scores(_q, _kc, _lse[:, :5], 20, _config), ValueError, "lse"),
    (lambda: selection_scores(_q, _kc, _lse.long(), 20, _config), TypeError, "lse"),
    (lambda: selection_scores(_q, _kc, None, 20, _config), TypeError, "lse"),
    (lambda: selection_scores(_q, _kc, _lse.to("meta"), 20, _config), ValueError, "lse is on meta"),
    (lambda: selection_scores(_q, _kc, _lse, 40, _config), ValueError, "seq_len_k"),
    (lambda: selection_scores(_q, _kc, _lse, 10, _config), ValueError, "seq_len_k"),
    (lambda: selection_scores(_q, _kc, _lse, 20.0, _config), TypeError, "seq_len_k"),
    (lambda: selection_scores(_q, _kc, _lse, 20, {"select_block_size": 16}), TypeError, "config"),
    (lambda: selection_scores(_q, _kc, _lse, 20, _config, scale=0), ValueError, "scale"),
    (lambda: selection_scores(_q, _kc, _lse, 20, _config, mem_kv_len=9), ValueError, "mem_kv_len"),
    (lambda: selection_scores(_q, _kc, _lse, 20, _config, blocks_kept=[True] * 4), TypeError, "blocks_kept"),
    (lambda: selection_scores(_q, _kc, _lse, 20, _config, blocks_kept=torch.ones(1, 3, dtype=torch.bool)),
     ValueError, "blocks_kept"),
    (lambda: selection_scores(_q, _kc, _lse, 20, _config, blocks_kept=torch.ones(1, 4)), TypeError, "bool"),
    (lambda: select_blocks(_scores[0], 20, _config), ValueError, "scores"),
    (lambda: select_blocks(_scores.long(), 20, _config), TypeError, "scores"),
    (lambda: select_blocks(_scores, 40, _config), ValueError, "seq_len_k"),
    (lambda: select_blocks(_scores, 19, _config), ValueError, "seq_len_k"),
    (lambda: select_blocks(_scores, 20, None), TypeError, "config"),
    (lambda: selected_attention(_q, _k, _v, _blocks.double(), 16), TypeError, "block_indices"),
    (lambda: selected_attention(_q, _k, _v, _blocks[0], 16), ValueError, "block_indices"),
    (lambda: selected_attention(_q, _k, _v, _blocks[:, :3], 16), ValueError, "block_indices"),
    (lambda: selected_attention(_q, _k, _v, _blocks + 5, 16), ValueError, "block_indices"),
    (lambda: selected_attention(_q, _k, _v, _blocks - 3, 16), ValueError, "block_indices"),
    (lambda: selected_attention(_q, _k, _v, _blocks, 0), ValueError, "block_size"),
    (lambda: selected_attention(_q, _k, _v, _blocks, 16, causal=None), TypeError, "causal"),
    (lambda: selected_attention(_q, _k.float(), _v, _blocks, 16), TypeError, r"^k\.dtype is torch\.float32"),
    (lambda: selected_attention(_q, _k, _v[:, :5], _blocks, 16), ValueError, r"^v has \(batch, seq_len_k"),
    (lambda: selected_attention(_q, _k, _v, _blocks.tolist(), 16), TypeError, "block_indices"),
], ids=range(30))
def test_bad_input_names_the_argument(call, error, words):
    with pytest.raises(error, match=words):
        call()


def test_nan_scores_are_never_selected():
    """A NaN score counts as -inf (no host sync to look for it): only forced blocks are taken."""
    config = NSAConfig(8, 4, 8, 4, 1, 1)
    scores = torch.full((1, 3, 1, 5), float("nan"))
    chosen = select_blocks(scores, 40, config)                      # queries at 37, 38, 39: own block 4
    assert chosen.tolist() == [[[[0, 4, -1, -1]]] * 3]


def test_blocks_kept_removes_the_hidden_blocks_share():
    """Hiding compressed block 1 takes its Eq. 9 share, p[1] * W[1, :], out of every score."""
    kept = torch.tensor([[True, False, True, True]])
    scores = selection_scores(_q, _kc, _lse, 20, _config)
    hidden = selection_scores(_q, _kc, _lse, 20, _config, blocks_kept=kept)
    seen = nsa.masks.compressed_block_mask(20, 20, 8, 4)[None, :, 1, None]              # (1, Nq, 1)
    p1 = torch.exp(torch.einsum("bihd,bhd->bih", _q, _kc[:, 1]) * 8 ** -0.5 - _lse)      # (B, Nq, Hq)
    p1 = torch.where(seen, p1, 0.0)                      # (lse is -inf where a query sees nothing)
    share = p1[..., None] * overlap_weights(20, 8, 4, 16, dtype=p1.dtype)[1]             # group of 1
    assert (share > 0).any()
    torch.testing.assert_close(hidden, scores - share)
