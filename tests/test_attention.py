"""Chapter 1: dense attention and masks, against PyTorch's SDPA and by definition."""

import pytest
import torch
import torch.nn.functional as F

import nsa
from nsa import attention, block_selection_mask, causal_mask, sliding_window_mask

SHAPES = [  # B, Nq, Nk, Hq, H, Dqk, Dv
    (1, 1, 1, 1, 1, 8, 8),
    (2, 17, 17, 4, 4, 16, 16),
    (1, 1, 100, 8, 2, 16, 8),
    (3, 100, 257, 8, 1, 32, 24),
    (1, 257, 257, 16, 2, 8, 8),
]


def random_qkv(B, Nq, Nk, Hq, H, Dqk, Dv, dtype=torch.float64, requires_grad=False):
    g = torch.Generator().manual_seed(B * 1000 + Nq + Nk)
    make = lambda *s: torch.randn(*s, generator=g, dtype=dtype).requires_grad_(requires_grad)
    return make(B, Nq, Hq, Dqk), make(B, Nk, H, Dqk), make(B, Nk, H, Dv)


def sdpa(q, k, v, mask=None, scale=None):
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask, scale=scale, enable_gqa=True)
    return o.transpose(1, 2)


def loop_reference(q, k, v, mask, scale):
    """Per query and head, straight from the paper's Eq. (1); no broadcasting tricks."""
    B, Nq, Hq, _ = q.shape
    G = Hq // k.shape[2]
    o = torch.zeros(B, Nq, Hq, v.shape[-1], dtype=q.dtype)
    for b in range(B):
        for i in range(Nq):
            for h in range(Hq):
                keys = mask[i].nonzero().flatten()
                if len(keys) == 0:
                    continue
                w = torch.softmax(k[b, keys, h // G] @ q[b, i, h] * scale, dim=0)
                o[b, i, h] = w @ v[b, keys, h // G]
    return o


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_sdpa(shape):
    q, k, v = random_qkv(*shape)
    Nq, Nk = shape[1], shape[2]
    torch.testing.assert_close(attention(q, k, v), sdpa(q, k, v))
    mask = causal_mask(Nq, Nk)
    torch.testing.assert_close(attention(q, k, v, mask, scale=0.7), sdpa(q, k, v, mask, scale=0.7))


@pytest.mark.parametrize("shape", SHAPES[:4], ids=str)
def test_matches_loop_reference_with_window(shape):
    q, k, v = random_qkv(*shape)
    mask = sliding_window_mask(shape[1], shape[2], 5)
    torch.testing.assert_close(attention(q, k, v, mask), loop_reference(q, k, v, mask, shape[5] ** -0.5))


def test_masks_by_definition():
    Nq, Nk, w = 7, 20, 4
    causal, window = causal_mask(Nq, Nk), sliding_window_mask(Nq, Nk, w)
    for i in range(Nq):
        t = Nk - Nq + i
        for s in range(Nk):
            assert causal[i, s] == (s <= t)
            assert window[i, s] == (t - w < s <= t)
    indices = torch.tensor([[[[0, -1]], [[2, 0]]]])  # (B=1, Nq=2, H=1, n=2)
    m = block_selection_mask(indices, 4, 12)[0, 0]    # queries at t = 10, 11
    assert m[0].nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert m[1].nonzero().flatten().tolist() == [0, 1, 2, 3, 8, 9, 10, 11]
    assert block_selection_mask(indices, 4, 12, causal=False)[0, 0, 0].sum() == 4


def test_query_that_sees_nothing_gets_zero_and_minus_inf():
    q, k, v = random_qkv(1, 4, 6, 2, 1, 8, 8, requires_grad=True)
    mask = causal_mask(4, 6).clone()
    mask[1] = False
    o, lse = attention(q, k, v, mask, return_lse=True)
    assert torch.all(o[:, 1] == 0) and torch.all(lse[:, 1] == float("-inf"))
    (o.sum()).backward()
    assert all(t.grad.isfinite().all() for t in (q, k, v))


def test_gradcheck():
    q, k, v = random_qkv(1, 5, 9, 4, 2, 4, 3, requires_grad=True)
    mask = sliding_window_mask(5, 9, 3)
    assert torch.autograd.gradcheck(lambda q, k, v: attention(q, k, v, mask), (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_large_logits(dtype):
    q, k, v = random_qkv(2, 33, 33, 4, 2, 16, 16)
    q, k, v = (q * 30).to(dtype), k.to(dtype), v.to(dtype)   # logits in the hundreds
    ref = attention(q.double(), k.double(), v.double(), causal_mask(33, 33))
    out = attention(q, k, v, causal_mask(33, 33))
    assert out.dtype == dtype and out.isfinite().all()
    torch.testing.assert_close(out.double(), ref, atol=3e-2, rtol=3e-2)


def test_package_exposes_device():
    assert nsa.device.DEVICE.type == ("cuda" if nsa.device.HAS_CUDA else "cpu")
    assert nsa.device.sized(cpu=1, gpu=2) == (2 if nsa.device.FULL_SIZE else 1)


# DESIGN.md's public API, and what the later chapters add to it (no test file imports them all)
PUBLIC = ("NSAConfig", "attention", "compress", "CompressionMLP", "compressed_attention", "selection_scores",
          "select_blocks", "selected_attention", "sliding_window_attention", "native_sparse_attention",
          "SparseAttention", "create_compress_mask", "create_fine_mask", "create_sliding_mask", "causal_mask",
          "sliding_window_mask", "block_selection_mask", "compressed_block_mask", "KVCache",
          "sparse_attention_with_kvcache", "DecodeGraph", "context_parallel_sparse_attention", "available_backends",
          "TensorParallelSparseAttention")


def test_package_exports_the_public_api():
    assert [name for name in PUBLIC if not hasattr(nsa, name)] == []
    assert callable(nsa.SparseAttention(16, 2).new_cache)


def test_star_import_takes_the_public_api_only():
    assert sorted(nsa.__all__) == sorted(PUBLIC)
    namespace = {}
    exec("from nsa import *", namespace)
    assert sorted(name for name in namespace if name != "__builtins__") == sorted(PUBLIC)


BAD = [
    ("q", lambda q, k, v: attention(q.numpy(), k, v), TypeError),
    ("q", lambda q, k, v: attention(q[0], k, v), ValueError),
    ("k", lambda q, k, v: attention(q, k[..., 0], v), ValueError),
    ("v", lambda q, k, v: attention(q, k, v[:, :-1]), ValueError),
    ("heads", lambda q, k, v: attention(q[:, :, :3], k, v), ValueError),
    ("head dim", lambda q, k, v: attention(q[..., :4], k, v), ValueError),
    ("batch", lambda q, k, v: attention(q[:1], k, v), ValueError),
    ("seq_len_q", lambda q, k, v: attention(q.repeat(1, 3, 1, 1), k, v), ValueError),
    ("dtype", lambda q, k, v: attention(q.float(), k, v), TypeError),
    ("floating-point", lambda q, k, v: attention(q.long(), k.long(), v.long()), TypeError),
    ("scale", lambda q, k, v: attention(q, k, v, scale=-1.0), ValueError),
    ("scale", lambda q, k, v: attention(q, k, v, scale="big"), TypeError),
    ("mask", lambda q, k, v: attention(q, k, v, mask=torch.ones(3, 3, dtype=torch.bool)), ValueError),
    ("mask", lambda q, k, v: attention(q, k, v, mask=torch.ones(5, 8)), TypeError),
    # a mask made on another device than q (meta stands in for a CPU mask beside CUDA inputs)
    ("mask", lambda q, k, v: attention(q, k, v, mask=torch.ones(5, 8, dtype=torch.bool, device="meta")), ValueError),
    ("return_lse", lambda q, k, v: attention(q, k, v, return_lse=1), TypeError),
    ("seq_len_q", lambda q, k, v: causal_mask("a", 3), TypeError),
    ("seq_len_k", lambda q, k, v: sliding_window_mask(4, -1, 2), ValueError),
    ("seq_len_k", lambda q, k, v: block_selection_mask(torch.zeros(1, 2, 1, 1, dtype=torch.long), 16, -5), ValueError),
    # more queries than keys: the queries sit at the end of the keys, as in attention itself
    ("seq_len_k", lambda q, k, v: causal_mask(5, 3), ValueError),
    ("seq_len_k", lambda q, k, v: sliding_window_mask(5, 3, 2, causal=False), ValueError),
    ("seq_len_k", lambda q, k, v: block_selection_mask(torch.zeros(1, 5, 1, 1, dtype=torch.long), 2, 3), ValueError),
    ("seq_len_k", lambda q, k, v: nsa.compressed_block_mask(5, 3, 2, 1), ValueError),
    ("device", lambda q, k, v: causal_mask(4, 4, device="foo"), ValueError),
    ("device", lambda q, k, v: sliding_window_mask(4, 4, 2, device=3.5), TypeError),
    ("device", lambda q, k, v: nsa.compressed_block_mask(4, 40, 2, 2, device="nowhere"), ValueError),
    ("stride", lambda q, k, v: nsa.compressed_block_mask(4, 40, 2, 0), ValueError),
    ("mem_kv_len", lambda q, k, v: nsa.compressed_block_mask(4, 40, 2, 2, mem_kv_len=-1), ValueError),
    ("window_size", lambda q, k, v: sliding_window_mask(4, 4, 0), ValueError),
    ("block_size", lambda q, k, v: block_selection_mask(torch.zeros(1, 2, 1, 1, dtype=torch.long), 0, 4), ValueError),
    ("block_indices", lambda q, k, v: block_selection_mask(torch.zeros(1, 2, 1, 1), 2, 4), TypeError),
]


@pytest.mark.parametrize("name,call,error", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_names_the_problem(name, call, error):
    q, k, v = random_qkv(2, 5, 8, 4, 2, 8, 8)
    with pytest.raises(error) as info:
        call(q, k, v)
    assert name in str(info.value) or name.split()[0] in str(info.value), str(info.value)
