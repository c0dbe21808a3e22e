"""Chapter 2: NSAConfig, compress, CompressionMLP, compressed_attention — against plain loops."""

import dataclasses
import math

import pytest
import torch

import nsa
from nsa import CompressionMLP, NSAConfig, attention, causal_mask, compress, compressed_attention
from nsa.geometry import num_compressed_blocks
from nsa.masks import compressed_block_mask

F64 = torch.float64


def randn(*shape, seed=0, dtype=F64, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(requires_grad)


# ---------------------------------------------------------------------------------------------
# NSAConfig


def test_config_defaults_are_the_papers():
    c = NSAConfig()
    assert (c.compress_block_size, c.compress_stride, c.select_block_size, c.num_selected_blocks,
            c.num_initial_blocks, c.num_local_blocks, c.window_size, c.causal) == (32, 16, 64, 16, 1, 2, 512, True)
    assert NSAConfig(8, 4, 16, 4, 1, 1, 32, False).causal is False  # positional order is the documented one
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.window_size = 3  # frozen


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(compress_block_size=0), ValueError, "compress_block_size"),
    (dict(compress_stride=-1), ValueError, "compress_stride"),
    (dict(select_block_size=2.0), TypeError, "select_block_size"),
    (dict(num_selected_blocks=True), TypeError, "num_selected_blocks"),
    (dict(window_size=0), ValueError, "window_size"),
    (dict(num_initial_blocks=-1), ValueError, "num_initial_blocks"),
    (dict(num_local_blocks=-2), ValueError, "num_local_blocks"),
    (dict(causal=1), TypeError, "causal"),
    (dict(compress_stride=64), ValueError, "compress_stride"),
    (dict(compress_block_size=40), ValueError, "compress_block_size"),
    (dict(select_block_size=40), ValueError, "select_block_size"),
    (dict(num_selected_blocks=2), ValueError, "num_selected_blocks"),
])
def test_config_rejects(kwargs, error, words):
    with pytest.raises(error, match=words):
        NSAConfig(**kwargs)


def test_config_accepts_edge_cases():
    NSAConfig(num_initial_blocks=0, num_local_blocks=0)
    NSAConfig(compress_block_size=16, compress_stride=16, select_block_size=16, num_selected_blocks=3)
    NSAConfig(num_selected_blocks=3, num_initial_blocks=1, num_local_blocks=2)


# ---------------------------------------------------------------------------------------------
# compress


@pytest.mark.parametrize("N", [1, 17, 31, 32, 33, 100, 257])
@pytest.mark.parametrize("l, d", [(32, 16), (8, 4), (16, 16), (4, 2), (6, 2)])
def test_compress_mean_is_a_loop_over_blocks(N, l, d):
    x = randn(2, N, 3, 5, seed=N)
    out = compress(x, None, l, d)
    starts = [s for s in range(0, N) if s + l <= N and s % d == 0]
    assert out.shape == (2, len(starts), 3, 5) == (2, num_compressed_blocks(N, l, d), 3, 5)
    for i, s in enumerate(starts):
        torch.testing.assert_close(out[:, i], x[:, s:s + l].sum(1) / l)


def test_num_compressed_blocks():
    assert [num_compressed_blocks(n, 32, 16) for n in (0, 1, 31, 32, 47, 48, 64, 65536)] == [0, 0, 0, 1, 1, 2, 3, 4095]


def test_compress_with_mlp_matches_block_by_block():
    torch.manual_seed(0)
    phi = CompressionMLP(head_dim=6, block_size=8, hidden_dim=10, out_dim=7).double()
    x = randn(2, 30, 3, 6)
    out = compress(x, phi, 8, 4)
    assert out.shape == (2, 6, 3, 7)
    for i in range(6):
        for h in range(3):
            block = x[:, 4 * i: 4 * i + 8, h] + phi.position            # (2, 8, 6)
            torch.testing.assert_close(out[:, i, h], phi.mlp(block.reshape(2, 48)))


def test_compress_shorter_than_one_block():
    x = randn(2, 5, 3, 4, requires_grad=True)
    phi = CompressionMLP(4, 8).double()
    for f in (None, phi):
        out = compress(x, f, 8, 4)
        assert out.shape == (2, 0, 3, 4)
    # usable downstream: a query that sees nothing is 0 / -inf with finite (zero) gradients
    q = randn(2, 5, 3, 4, requires_grad=True, seed=1)
    o, lse = compressed_attention(q, compress(x, phi, 8, 4), compress(x, None, 8, 4), 8, 4)
    assert torch.all(o == 0) and torch.all(lse == float("-inf"))
    o.sum().backward()
    assert torch.all(q.grad == 0)


def test_gradcheck_compress_mlp_and_compressed_attention():
    torch.manual_seed(0)
    phi_k = CompressionMLP(4, 4, hidden_dim=6).double()
    phi_v = CompressionMLP(3, 4, hidden_dim=5).double()
    q = randn(1, 11, 2, 4, seed=1, requires_grad=True)
    k = randn(1, 11, 1, 4, seed=2, requires_grad=True)
    v = randn(1, 11, 1, 3, seed=3, requires_grad=True)

    def f(q, k, v, position):
        params = dict(phi_k.named_parameters(), position=position)
        phi = lambda blocks: torch.func.functional_call(phi_k, params, (blocks,))
        o, lse = compressed_attention(q, compress(k, phi, 4, 2), compress(v, phi_v, 4, 2), 4, 2)
        return o, lse.masked_fill(lse == float("-inf"), 0.0)

    position = phi_k.position.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (q, k, v, position))


# ---------------------------------------------------------------------------------------------
# compressed_attention against a loop


def loop_compressed_attention(q, k_cmp, v_cmp, l, d, Nk, mem, causal, scale):
    B, Nq, Hq, _ = q.shape
    G = Hq // k_cmp.shape[2]
    o = torch.zeros(B, Nq, Hq, v_cmp.shape[-1], dtype=F64)
    lse = torch.full((B, Nq, Hq), -math.inf, dtype=F64)
    for b in range(B):
        for i in range(Nq):
            t = Nk - Nq + i
            for h in range(Hq):
                logits, values = [], []
                for r in range(k_cmp.shape[1]):
                    block = r - mem
                    if r < mem or not causal or block * d + l - 1 <= t:
                        logits.append(float(q[b, i, h].double() @ k_cmp[b, r, h // G].double()) * scale)
                        values.append(v_cmp[b, r, h // G].double())
                if logits:
                    m = max(logits)
                    w = [math.exp(x - m) for x in logits]
                    total = sum(w)
                    o[b, i, h] = sum(wi * vi for wi, vi in zip(w, values)) / total
                    lse[b, i, h] = m + math.log(total)
    return o, lse


CASES = [  # B, Nq, Nk, Hq, H, Dqk, Dv, l, d, mem
    (1, 1, 1, 1, 1, 8, 8, 32, 16, 0),
    (2, 17, 17, 2, 1, 8, 4, 8, 4, 0),
    (1, 100, 100, 4, 1, 8, 8, 32, 16, 0),
    (2, 40, 257, 4, 2, 8, 6, 32, 16, 0),
    (1, 257, 257, 4, 4, 4, 4, 16, 8, 2),
    (1, 7, 100, 2, 1, 8, 8, 8, 8, 3),
    (1, 1, 1000, 4, 2, 4, 4, 32, 16, 1),
]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_compressed_attention_is_a_loop(case, causal):
    B, Nq, Nk, Hq, H, Dqk, Dv, l, d, mem = case
    Nc = num_compressed_blocks(Nk, l, d)
    q = randn(B, Nq, Hq, Dqk, seed=1)
    k_cmp, v_cmp = randn(B, mem + Nc, H, Dqk, seed=2), randn(B, mem + Nc, H, Dv, seed=3)
    o, lse = compressed_attention(q, k_cmp, v_cmp, l, d, 0.4, causal=causal, mem_kv_len=mem, seq_len_k=Nk)
    o_ref, lse_ref = loop_compressed_attention(q, k_cmp, v_cmp, l, d, Nk, mem, causal, 0.4)
    assert o.dtype == F64 and lse.dtype == F64 and o.shape == (B, Nq, Hq, Dv) and lse.shape == (B, Nq, Hq)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(lse, lse_ref)


def test_visibility_rule():
    mask = compressed_block_mask(100, 100, 32, 16, mem_kv_len=2)
    t = torch.arange(100)[:, None]
    i = torch.arange(mask.shape[1] - 2)[None]
    assert mask[:, :2].all()
    assert torch.equal(mask[:, 2:], i * 16 + 31 <= t)
    assert compressed_block_mask(5, 100, 32, 16, causal=False).all()
    assert torch.equal(compressed_block_mask(5, 100, 8, 4), compressed_block_mask(100, 100, 8, 4)[-5:])


def test_l_d_1_is_causal_attention():
    q, k, v = randn(2, 30, 4, 8, seed=1), randn(2, 70, 2, 8, seed=2), randn(2, 70, 2, 5, seed=3)
    o, lse = compressed_attention(q, compress(k, None, 1, 1), compress(v, None, 1, 1), 1, 1, seq_len_k=70)
    o_ref, lse_ref = attention(q, k, v, causal_mask(30, 70), return_lse=True)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(lse, lse_ref)


def test_seq_len_k_inference():
    q, k_cmp, v_cmp = randn(1, 100, 2, 8, seed=1), randn(1, 5, 2, 8, seed=2), randn(1, 5, 2, 8, seed=3)
    full = compressed_attention(q, k_cmp, v_cmp, 32, 16)                     # Nq == Nk == 100
    last = compressed_attention(q[:, -1:], k_cmp, v_cmp, 32, 16)             # decoding: no seq_len_k
    torch.testing.assert_close(last[0], full[0][:, -1:])
    tail = compressed_attention(q[:, -9:], k_cmp, v_cmp, 32, 16, seq_len_k=100)
    torch.testing.assert_close(tail[0], full[0][:, -9:])
    torch.testing.assert_close(tail[1], full[1][:, -9:])
    with pytest.raises(ValueError, match="seq_len_k"):
        compressed_attention(q[:, -9:], k_cmp, v_cmp, 32, 16)               # ambiguous
    non_causal = compressed_attention(q[:, -9:], k_cmp, v_cmp, 32, 16, causal=False)
    torch.testing.assert_close(non_causal[0], compressed_attention(q, k_cmp, v_cmp, 32, 16, causal=False)[0][:, -9:])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_half_precision_large_logits(dtype):
    """Scores of about 1e6 (inputs scaled by 300) stay finite in half precision, outputs and
    gradients. Only finiteness: at such scores a unit of rounding in a score is a factor e in its
    probability, so a comparison with float64 would measure the conditioning, not the code."""
    q = (randn(2, 70, 4, 16, seed=1, dtype=torch.float32) * 300).to(dtype).requires_grad_(True)
    k = (randn(2, 70, 2, 16, seed=2, dtype=torch.float32) * 300).to(dtype).requires_grad_(True)
    o, lse = compressed_attention(q, compress(k, None, 8, 4), compress(k, None, 8, 4), 8, 4, mem_kv_len=0)
    assert o.dtype == dtype and lse.dtype == torch.float32
    assert o.isfinite().all() and not lse.isnan().any()
    o.float().sum().backward()
    assert q.grad.isfinite().all() and k.grad.isfinite().all()


def test_memory_only_when_no_block():
    q = randn(1, 10, 2, 4, seed=1)
    mem_k, mem_v = randn(1, 2, 1, 4, seed=2), randn(1, 2, 1, 3, seed=3)
    o, lse = compressed_attention(q, mem_k, mem_v, 32, 16, mem_kv_len=2)     # 10 keys: no block
    o_ref, lse_ref = loop_compressed_attention(q, mem_k, mem_v, 32, 16, 10, 2, True, 0.5)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(lse, lse_ref)


# ---------------------------------------------------------------------------------------------
# bad input

q0, kc0 = torch.randn(1, 20, 4, 8), torch.randn(1, 3, 2, 8)


@pytest.mark.parametrize("call, error, words", [
    (lambda: compress(torch.randn(2, 5, 8), None, 4, 2), ValueError, "^x must have shape"),
    (lambda: compress([1, 2], None, 4, 2), TypeError, "^x must be a torch.Tensor"),
    (lambda: compress(torch.ones(1, 5, 1, 2, dtype=torch.long)), TypeError, "^x must be a floating-point"),
    (lambda: compress(torch.randn(1, 5, 1, 2), None, 0, 2), ValueError, "block_size"),
    (lambda: compress(torch.randn(1, 5, 1, 2), None, 4, 2.0), TypeError, "stride"),
    (lambda: compress(torch.randn(1, 5, 1, 2), "mlp", 4, 2), TypeError, "phi"),
    (lambda: compress(torch.randn(1, 9, 1, 2), lambda b: b.sum(), 4, 2), ValueError, "phi"),
    (lambda: CompressionMLP(0, 4), ValueError, "head_dim"),
    (lambda: CompressionMLP(4, None), TypeError, "block_size"),
    (lambda: CompressionMLP(4, 4, hidden_dim=-1), ValueError, "hidden_dim"),
    (lambda: CompressionMLP(4, 4)(torch.randn(1, 2, 3, 5, 4)), ValueError, "blocks"),
    # a CompressionMLP built for other blocks: the message names the MLP's sizes and the blocks'
    (lambda: compress(torch.randn(1, 64, 1, 16), CompressionMLP(8, 16), 16, 8), ValueError,
     r"CompressionMLP \(head_dim=8, block_size=16\) takes blocks of shape \(\.\.\., 16, 8\), got \(1, 7, 1, 16, 16\)"),
    (lambda: compressed_attention(q0[0], kc0, kc0), ValueError, "^q must have shape"),
    (lambda: compressed_attention(q0, kc0[0], kc0), ValueError, "k_cmp"),
    (lambda: compressed_attention(q0, kc0, None), TypeError, "v_cmp"),
    (lambda: compressed_attention(q0, kc0.double(), kc0), TypeError, "k_cmp"),
    (lambda: compressed_attention(q0, kc0, kc0.double()), TypeError, "v_cmp"),
    (lambda: compressed_attention(q0, torch.randn(1, 3, 3, 8), torch.randn(1, 3, 3, 8)), ValueError, "heads"),
    (lambda: compressed_attention(q0, torch.randn(1, 3, 2, 7), kc0), ValueError, "head dim"),
    (lambda: compressed_attention(q0, kc0, torch.randn(1, 4, 2, 8)), ValueError, "v_cmp"),
    (lambda: compressed_attention(q0, kc0, kc0, 8, 0), ValueError, "stride"),
    (lambda: compressed_attention(q0, kc0, kc0, -8, 4), ValueError, "block_size"),
    (lambda: compressed_attention(q0, kc0, kc0, 8, 4, scale=-1.0), ValueError, "scale"),
    (lambda: compressed_attention(q0, kc0, kc0, 8, 4, causal="yes"), TypeError, "causal"),
    (lambda: compressed_attention(q0, kc0, kc0, 8, 4, mem_kv_len=4), ValueError, "mem_kv_len"),
    (lambda: compressed_attention(q0, kc0, kc0, 8, 4, mem_kv_len=1.0), TypeError, "mem_kv_len"),
    (lambda: compressed_attention(q0, kc0, kc0, 8, 4, seq_len_k=100), ValueError, "seq_len_k"),
    (lambda: compressed_attention(q0, kc0, kc0, 8, 4, seq_len_k=10), ValueError, "seq_len_k"),
    (lambda: compressed_attention(q0, kc0, kc0, 8, 4, seq_len_k="16"), TypeError, "seq_len_k"),
    (lambda: compressed_attention(q0, kc0, kc0, 32, 16), ValueError, "seq_len_k"),
    # Nq == Nk, blocks of another geometry: the counts both ways, and the geometry to pass
    (lambda: compressed_attention(q0, kc0, kc0, 4, 4), ValueError,
     r"k_cmp holds 3 compressed blocks .*, but 20 keys give 5 \(block_size 4, stride 4\): pass the block_size"),
], ids=range(31))
def test_bad_input_names_the_argument(call, error, words):
    with pytest.raises(error, match=words):
        call()
