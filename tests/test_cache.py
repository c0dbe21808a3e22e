"""Chapter 13: decoding with a KV cache.

Everything here is checked against the plain (cache-free) computation, which the other test
files check against the float64 reference: a cache must give the plain result exactly, up to
the dtype's rounding."""

import copy
import warnings

import pytest
import torch

import nsa
from nsa import KVCache, NSAConfig, SparseAttention, native_sparse_attention, sparse_attention_with_kvcache
from nsa.backends import select_decoder
from nsa.checks import check_keys
from nsa.compression import CompressionMLP, compress
from nsa.device import DEVICE
from nsa.geometry import num_compressed_blocks
from tolerance import close

SMALL = NSAConfig(8, 4, 16, 4, 1, 2, 32)         # 8/4/16, n = 4, w = 32
ODD = NSAConfig(12, 4, 8, 3, 0, 1, 20)           # l' < l, no initial block


def chunks(total, sizes):
    """Split `total` tokens into consecutive chunk sizes, cycling through `sizes`."""
    out, i = [], 0
    while sum(out) < total:
        out.append(min(sizes[i % len(sizes)], total - sum(out)))
        i += 1
    return out


def whole(q, k, v, config, mem_k, mem_v, phis, gates, backend="torch"):
    """The plain computation: compress the whole sequence, prepend the memory rows, attend."""
    l, d = config.compress_block_size, config.compress_stride
    k_cmp = torch.cat([mem_k, compress(k, phis[0], l, d)], 1)
    v_cmp = torch.cat([mem_v, compress(v, phis[1], l, d)], 1)
    return native_sparse_attention(q, k, v, k_cmp, v_cmp, *gates, config, None, backend, mem_kv_len=mem_k.shape[1])


FUNCTIONAL = [  # B, N, Hq, H, Dqk, Dv, config, mem, mlp, chunk sizes, dtype, backend
    (2, 100, 4, 2, 16, 8, SMALL, 0, False, [1], torch.float64, "torch"),
    (1, 257, 8, 1, 16, 16, SMALL, 2, True, [17, 1, 5], torch.float64, "torch"),
    (2, 61, 2, 2, 8, 12, ODD, 1, True, [3, 1], torch.float64, "torch"),
    (1, 70, 4, 1, 16, 16, SMALL, 0, False, [33, 1, 4], torch.float32, "triton"),
]


@pytest.mark.parametrize("case", FUNCTIONAL, ids=lambda c: f"B{c[0]}-N{c[1]}-Hq{c[2]}-H{c[3]}-mem{c[7]}-"
                         f"{'mlp' if c[8] else 'mean'}-{c[11]}")
def test_functional_step_by_step_equals_whole_sequence(case):
    B, N, Hq, H, Dqk, Dv, config, mem, mlp, sizes, dtype, backend = case
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)
    q, k, v = r(B, N, Hq, Dqk), r(B, N, H, Dqk), r(B, N, H, Dv)
    gates = [torch.rand(B, N, Hq, generator=g, dtype=torch.float64).to(dtype) for _ in range(3)]
    mem_k, mem_v = r(B, mem, H, Dqk), r(B, mem, H, Dv)
    l, d = config.compress_block_size, config.compress_stride
    phis = (CompressionMLP(Dqk, l).to(dtype), CompressionMLP(Dv, l).to(dtype)) if mlp else (None, None)
    device = DEVICE if backend == "triton" else "cpu"          # made on the CPU, moved: the same numbers
    q, k, v, mem_k, mem_v, *gates = (x.to(device) for x in (q, k, v, mem_k, mem_v, *gates))
    phis = tuple(phi if phi is None else phi.to(device) for phi in phis)
    with torch.no_grad():
        expected = whole(q, k, v, config, mem_k, mem_v, phis, gates, backend)
        blocks = mem + num_compressed_blocks(N, l, d)
        k_cache, v_cache = (torch.zeros(B, N, H, D, dtype=dtype, device=device) for D in (Dqk, Dv))
        k_cmp = torch.full((B, blocks, H, Dqk), float("nan"), dtype=dtype, device=device)
        v_cmp = torch.zeros(B, blocks, H, Dv, dtype=dtype, device=device)
        k_cmp[:, :mem], v_cmp[:, :mem] = mem_k, mem_v
        start = 0
        for T in chunks(N, sizes):
            at = slice(start, start + T)
            o = sparse_attention_with_kvcache(q[:, at], k_cache, v_cache, k_cmp, v_cmp, [start] * B,
                                              *(x[:, at] for x in gates), config, k=k[:, at], v=v[:, at],
                                              phi_k=phis[0], phi_v=phis[1], mem_kv_len=mem, backend=backend)
            tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else close(dtype, 2e-5)
            torch.testing.assert_close(o, expected[:, at], **tol)
            start += T
    torch.testing.assert_close(k_cache, k, rtol=0, atol=0)
    assert not k_cmp.isnan().any()                       # every compressed block written


def test_functional_rows_at_different_lengths_and_cache_already_filled():
    """cache_seqlens per row; k = v = None when the caller wrote the new tokens themselves."""
    torch.manual_seed(1)
    config, B, H, Hq, D = SMALL, 3, 2, 4, 8
    lengths = [0, 17, 40]
    N = max(lengths) + 1
    k_cache, v_cache = torch.randn(B, N, H, D, dtype=torch.float64), torch.randn(B, N, H, D, dtype=torch.float64)
    blocks = num_compressed_blocks(N, 8, 4)
    k_cmp, v_cmp = torch.zeros(B, blocks, H, D, dtype=torch.float64), torch.zeros(B, blocks, H, D, dtype=torch.float64)
    for b, n in enumerate(lengths):                      # the caller's own cache: tokens and blocks in place
        c = num_compressed_blocks(n + 1, 8, 4)
        k_cmp[b, :c], v_cmp[b, :c] = compress(k_cache[b:b + 1, :n + 1], None, 8, 4)[0], compress(v_cache[b:b + 1, :n + 1], None, 8, 4)[0]
    q = torch.randn(B, 1, Hq, D, dtype=torch.float64)
    gates = [torch.rand(B, 1, Hq, dtype=torch.float64) for _ in range(3)]
    o = sparse_attention_with_kvcache(q, k_cache, v_cache, k_cmp, v_cmp, torch.tensor(lengths), *gates, config)
    for b, n in enumerate(lengths):
        kb, vb = k_cache[b:b + 1, :n + 1], v_cache[b:b + 1, :n + 1]
        ref = whole(q[b:b + 1], kb, vb, config, kb[:, :0], vb[:, :0], (None, None), [x[b:b + 1] for x in gates])
        torch.testing.assert_close(o[b:b + 1], ref, rtol=1e-10, atol=1e-10)


LAYERS = [  # kwargs of SparseAttention, chunk sizes (after a prefill of odd length 23)
    (dict(heads=4, kv_heads=2), [1, 1, 6]),
    (dict(heads=4, kv_heads=1, num_mem_kv=2, compress_mlp=True), [1, 5, 17]),
    (dict(heads=2, kv_heads=2, compress_mlp=False, dim_head=16, dim_head_v=8), [3]),
    (dict(heads=4, kv_heads=2, kv_per_branch=True, num_mem_kv=1), [1, 7]),
]
LAYER_GEOMETRY = dict(compress_block_size=8, compress_stride=4, select_block_size=16, num_selected_blocks=4,
                      window_size=32, backend="torch")


@pytest.mark.parametrize("kwargs,sizes", LAYERS, ids=["gqa", "memory-mlp-chunks", "mean-dqk-ne-dv", "kv-per-branch"])
def test_layer_with_cache_equals_layer_on_whole_sequence(kwargs, sizes):
    torch.manual_seed(3)
    layer = SparseAttention(32, **kwargs, **LAYER_GEOMETRY).double().eval()
    B, N, prefill = 2, 120, 23
    x = torch.randn(B, N, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = layer(x)
        cache = layer.new_cache(B, N)
        assert isinstance(cache, KVCache) and cache.k_cmp.dtype == torch.float64
        outputs = [layer(x[:, :prefill], cache=cache)]
        start = prefill
        for T in chunks(N - prefill, sizes):
            outputs.append(layer(x[:, start:start + T], cache=cache))
            start += T
    assert cache.lengths == [N] * B
    torch.testing.assert_close(torch.cat(outputs, 1), expected, rtol=1e-10, atol=1e-10)


def test_layer_rows_of_different_lengths_with_new_tokens_argument():
    """Right-padded chunks: row b appends new_tokens[b] of the T tokens; its padding's outputs are 0,
    and each row's outputs equal the layer on that row's own sequence."""
    torch.manual_seed(4)
    layer = SparseAttention(32, heads=4, kv_heads=2, num_mem_kv=1, **LAYER_GEOMETRY).double().eval()
    sequences = [torch.randn(1, n, 32, dtype=torch.float64) for n in (50, 31, 1)]
    cache = layer.new_cache(3, 64)
    outputs = [[] for _ in sequences]
    with torch.no_grad():
        steps = [[7, 7, 1], [20, 1, 0], [1, 1, 0], [22, 22, 0]]   # tokens per row at each step
        for counts in steps + [[50 - sum(s[0] for s in steps), 31 - sum(s[1] for s in steps), 0]]:
            T = max(counts)
            if T == 0:
                continue
            x = torch.zeros(3, T, 32, dtype=torch.float64)
            for b, c in enumerate(counts):
                done = sum(o.shape[1] for o in outputs[b])
                x[b, :c] = sequences[b][0, done:done + c]
            y = layer(x, cache=cache, new_tokens=counts)
            for b, c in enumerate(counts):
                assert torch.all(y[b, c:] == 0)
                outputs[b].append(y[b:b + 1, :c])
        assert cache.lengths == [50, 31, 1]
        for b, seq in enumerate(sequences):
            torch.testing.assert_close(torch.cat(outputs[b], 1), layer(seq), rtol=1e-10, atol=1e-10)


def test_a_cache_made_before_the_weights_load_decodes_with_the_loaded_ones():
    """The memory rows come from the layer when a row starts, not when its cache was made: a cache
    made before load_state_dict (or a row truncated to nothing after) decodes with the weights
    as they are."""
    torch.manual_seed(7)
    layer, trained = (SparseAttention(32, heads=4, kv_heads=2, num_mem_kv=2, **LAYER_GEOMETRY).double().eval()
                      for _ in range(2))
    x = torch.randn(2, 20, 32, dtype=torch.float64)
    with torch.no_grad():
        cache = layer.new_cache(2, 24)
        layer.load_state_dict(trained.state_dict())
        torch.testing.assert_close(layer(x, cache=cache), layer(x), rtol=1e-10, atol=1e-10)
        layer.load_state_dict(SparseAttention(32, heads=4, kv_heads=2, num_mem_kv=2, **LAYER_GEOMETRY).state_dict())
        cache.truncate_([0, 20])            # row 0 starts again with the new weights (row 1 keeps its past)
        y = layer(x[:1, :3].expand(2, 3, 32), cache=cache, new_tokens=[3, 0])
        torch.testing.assert_close(y[:1], layer(x[:1, :3]), rtol=1e-10, atol=1e-10)


def test_layer_decodes_under_autocast_with_a_cache_of_its_dtype():
    """Under torch.autocast the projections give bfloat16: a bfloat16 cache of a float32 layer
    decodes as the layer computes under autocast on the whole sequence; a float64 layer, which
    autocast leaves as it is, decodes with its float64 cache."""
    torch.manual_seed(8)
    layer = SparseAttention(32, heads=4, kv_heads=2, num_mem_kv=1, **LAYER_GEOMETRY).eval()
    x = torch.randn(2, 21, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = layer(x)
        cache = layer.new_cache(2, 21, dtype=torch.bfloat16)
        steps = torch.cat([layer(x[:, :13], cache=cache),
                           *(layer(x[:, t:t + 1], cache=cache) for t in range(13, 21))], 1)
    assert steps.dtype == full.dtype == torch.bfloat16
    torch.testing.assert_close(steps.float(), full.float(), rtol=2e-2, atol=2e-2)
    layer, x = layer.double(), x.double()                  # autocast leaves float64 as it is
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cache = layer.new_cache(2, 21)
        torch.testing.assert_close(layer(x, cache=cache), layer(x), rtol=1e-10, atol=1e-10)


def triton_layer(**kwargs):
    """A small float32 layer on the decoding kernels (Triton's interpreter on the CPU, else the GPU),
    made on the CPU (the same weights everywhere) and moved to DEVICE."""
    layer = SparseAttention(32, heads=4, kv_heads=1, **{**LAYER_GEOMETRY, "backend": "triton"}, **kwargs)
    return layer.eval().to(DEVICE)


@pytest.mark.parametrize("kwargs", [dict(), dict(kv_per_branch=True, num_mem_kv=1)], ids=["shared", "kv-per-branch"])
def test_layer_with_cache_on_triton_backend_under_interpreter(kwargs):
    torch.manual_seed(5)
    layer = triton_layer(**kwargs)
    x = torch.randn(1, 45, 32).to(DEVICE)
    with torch.no_grad():
        expected = layer(x)
        cache = layer.new_cache(1, 45)
        got = torch.cat([layer(x[:, :40], cache=cache)] + [layer(x[:, i:i + 1], cache=cache) for i in range(40, 45)], 1)
    torch.testing.assert_close(got, expected, **close(torch.float32, 2e-5))


def test_decoding_kernels_compute_no_nan_in_lanes_they_mask():
    """Stage 2's probabilities of the compressed blocks a row does not see: a row whose lse is
    -inf must not compute -inf - -inf (NaN, masked afterwards, but the interpreter warns and a
    GPU carries NaN through the lanes). Every interpreter warning is an error here; on a GPU (no
    such warnings) the steps must still equal the whole sequence."""
    torch.manual_seed(0)
    layer = SparseAttention(32, heads=1, kv_heads=1, dim_head=16, compress_block_size=8, compress_stride=4,
                            select_block_size=16, num_selected_blocks=3, window_size=16, backend="triton",
                            compress_mlp=False).eval().to(DEVICE)
    x = torch.randn(2, 30, 32).to(DEVICE)
    with torch.no_grad(), warnings.catch_warnings():
        if DEVICE.type == "cpu":
            warnings.simplefilter("error")
        cache = layer.new_cache(2, 30)
        got = torch.cat([layer(x[:, :24], cache=cache)] + [layer(x[:, i:i + 1], cache=cache) for i in range(24, 30)], 1)
    with torch.no_grad():
        torch.testing.assert_close(got, layer(x), **close(torch.float32, 2e-5))


def test_layer_on_triton_with_rows_appending_different_counts():
    """One step whose rows append 3 and 1 tokens, on the decoding kernels (chosen once for the
    step): each row equals the layer on its own sequence, the padding's outputs are 0."""
    torch.manual_seed(6)
    layer = triton_layer()
    sequences = [torch.randn(1, 43, 32).to(DEVICE), torch.randn(1, 41, 32).to(DEVICE)]
    with torch.no_grad():
        cache = layer.new_cache(2, 48)
        layer(torch.cat([s[:, :40] for s in sequences]), cache=cache)
        x = torch.zeros(2, 3, 32, device=DEVICE)
        x[0], x[1, :1] = sequences[0][0, 40:], sequences[1][0, 40:]
        y = layer(x, cache=cache, new_tokens=[3, 1])
        for b, s in enumerate(sequences):
            torch.testing.assert_close(y[b, :s.shape[1] - 40], layer(s)[0, 40:], **close(torch.float32, 2e-5))
    assert torch.all(y[1, 1:] == 0) and cache.lengths == [43, 41]


@pytest.mark.parametrize("kwargs", [LAYERS[0][0], LAYERS[1][0], LAYERS[3][0]], ids=["gqa", "memory-mlp", "kv-per-branch"])
def test_truncate_rolls_back_rejected_drafts(kwargs):
    """Speculative decoding: drafts that complete compressed blocks, rejected by different amounts
    per row, then the right tokens: the layer on the whole sequence kept."""
    torch.manual_seed(4)
    layer = SparseAttention(32, **kwargs, **LAYER_GEOMETRY).double().eval()
    x = torch.randn(2, 60, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = layer(x)
        cache = layer.new_cache(2, 64)
        layer(x[:, :29], cache=cache)
        drafts = torch.randn(2, 7, 32, dtype=torch.float64)       # 29..35: blocks ending at 32 and 36
        drafts[0, :3] = x[0, 29:32]                               # row 0 accepts three, row 1 none
        layer(drafts, cache=cache)
        cache.truncate_(torch.tensor([32, 29]))
        caught_up = layer(x[:, 29:32], cache=cache, new_tokens=[0, 3])
        rest = [layer(x[:, 32:45], cache=cache), layer(x[:, 45:46], cache=cache), layer(x[:, 46:60], cache=cache)]
    torch.testing.assert_close(caught_up[1], expected[1, 29:32], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.cat(rest, 1), expected[:, 32:], rtol=1e-10, atol=1e-10)
    assert cache.lengths == [60, 60]


def test_truncate_on_the_decoding_kernels_under_interpreter():
    """The same rollback on the decoding kernels (float32, Triton's interpreter): what lies past
    a row's new length, stale compressed blocks included, is never read."""
    torch.manual_seed(8)
    layer = triton_layer()
    x = torch.randn(2, 44, 32).to(DEVICE)
    with torch.no_grad():
        expected = layer(x)
        cache = layer.new_cache(2, 48)
        layer(x[:, :29], cache=cache)
        drafts = torch.randn(2, 7, 32).to(DEVICE)                 # 29..35: blocks ending at 32 and 36
        drafts[0, :3] = x[0, 29:32]
        layer(drafts, cache=cache)
        cache.truncate_([32, 29])
        caught_up = layer(x[:, 29:32], cache=cache, new_tokens=[0, 3])
        rest = [layer(x[:, i:i + 1], cache=cache) for i in range(32, 38)]    # past 36: the stale block redone
    torch.testing.assert_close(caught_up[1], expected[1, 29:32], **close(torch.float32, 2e-5))
    torch.testing.assert_close(torch.cat(rest, 1), expected[:, 32:38], **close(torch.float32, 2e-5))


def test_truncate_to_one_length_and_to_nothing():
    torch.manual_seed(5)
    layer = SparseAttention(32, heads=4, kv_heads=2, num_mem_kv=1, **LAYER_GEOMETRY).double().eval()
    x, y = torch.randn(2, 30, 32, dtype=torch.float64), torch.randn(2, 30, 32, dtype=torch.float64)
    with torch.no_grad():
        cache = layer.new_cache(2, 30)
        layer(x, cache=cache)
        assert cache.truncate_(0) is cache and cache.lengths == [0, 0]
        torch.testing.assert_close(layer(y, cache=cache), layer(y), rtol=1e-10, atol=1e-10)   # a fresh start
        cache.truncate_(torch.tensor(11))                   # a 0-d tensor: as the int
        torch.testing.assert_close(layer(x[:, 11:], cache=cache), layer(torch.cat([y[:, :11], x[:, 11:]], 1))[:, 11:],
                                   rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("rows", [[1, 0], [1, 1, 0], [0], torch.tensor([0, 0, 0, 1])], ids=["swap", "beams", "one", "tensor"])
def test_reorder_keeps_the_rows_asked_for(rows):
    """Beam search: row i continues old row rows[i]; the batch may grow (beams) or shrink."""
    torch.manual_seed(6)
    layer = SparseAttention(32, heads=4, kv_heads=2, num_mem_kv=1, kv_per_branch=True, **LAYER_GEOMETRY).double().eval()
    x = torch.randn(2, 40, 32, dtype=torch.float64)
    picked = torch.as_tensor(rows)
    with torch.no_grad():
        cache = layer.new_cache(2, 50)
        layer(x[:, :33], cache=cache, new_tokens=[33, 30])           # rows of different lengths
        assert cache.reorder_(rows) is cache
        assert cache.batch_size == len(picked) and cache.lengths == [[33, 30][r] for r in picked.tolist()]
        y = torch.randn(len(picked), 4, 32, dtype=torch.float64)
        got = layer(y, cache=cache)
        for i, r in enumerate(picked.tolist()):
            kept = x[r:r + 1, :cache.lengths[i] - 4]
            torch.testing.assert_close(got[i], layer(torch.cat([kept, y[i:i + 1]], 1))[0, -4:], rtol=1e-10, atol=1e-10)


def snapshot(cache):
    return (list(cache.lengths), cache.k_cmp.clone(), cache.v_cmp.clone(),
            {b: t.clone() for b, t in cache.keys.items()}, {b: t.clone() for b, t in cache.values.items()})


def assert_unchanged(cache, before):
    lengths, k_cmp, v_cmp, keys, values = before
    assert cache.lengths == lengths
    assert torch.equal(cache.k_cmp, k_cmp) and torch.equal(cache.v_cmp, v_cmp)
    assert all(torch.equal(cache.keys[b], keys[b]) and torch.equal(cache.values[b], values[b]) for b in keys)


def with_lengths(lengths):
    """A step after `cache.lengths = lengths` (a field one may assign, checked by the step), the
    lengths put back afterwards."""
    def call(layer, cache):
        before, cache.lengths = cache.lengths, lengths
        try:
            layer(torch.randn(2, 1, 32), cache=cache)
        finally:
            cache.lengths = before
    return call


BAD_STEPS = [  # (what the call passes, error type, words the message must hold)
    ("full", lambda layer, cache: layer(torch.randn(2, 5, 32), cache=cache), ValueError, "do not fit"),
    ("dtype", lambda layer, cache: layer(torch.randn(2, 1, 32, dtype=torch.float64), cache=cache), TypeError, "float64"),
    ("autocast", lambda layer, cache: torch.autocast("cpu", dtype=torch.bfloat16)(layer)(torch.randn(2, 1, 32),
                                                                                        cache=cache),
     TypeError, r"x is torch.float32 on cpu, computed in torch.bfloat16 under torch.autocast"),
    ("batch", lambda layer, cache: layer(torch.randn(3, 1, 32), cache=cache), ValueError, "batch 3"),
    ("empty", lambda layer, cache: layer(torch.randn(2, 0, 32), cache=cache), ValueError, "T >= 1"),
    ("dim", lambda layer, cache: layer(torch.randn(2, 1, 31), cache=cache), ValueError, "dim = 32"),
    ("k", lambda layer, cache: layer(torch.randn(2, 1, 32), torch.randn(2, 1, 32), cache=cache), ValueError, "k = v = mask = "),
    ("new-tokens-long", lambda layer, cache: layer(torch.randn(2, 2, 32), cache=cache, new_tokens=[3, 1]), ValueError,
     "new_tokens[0]"),
    ("new-tokens-count", lambda layer, cache: layer(torch.randn(2, 2, 32), cache=cache, new_tokens=[1]), ValueError,
     "one count per batch row"),
    ("new-tokens-neg", lambda layer, cache: layer(torch.randn(2, 2, 32), cache=cache, new_tokens=[1, -1]), ValueError,
     "new_tokens[1]"),
    ("both-names", lambda layer, cache: layer(torch.randn(2, 1, 32), cache=cache, new_tokens=[1, 1], lengths=[1, 1]),
     TypeError, "new_tokens= only"),
    ("not-a-cache", lambda layer, cache: layer(torch.randn(2, 1, 32), cache={"k": 1}), TypeError, "nsa.KVCache"),
    ("new-tokens-no-cache", lambda layer, cache: layer(torch.randn(2, 1, 32), new_tokens=[1, 1]), ValueError,
     "new_tokens"),
    ("grad", lambda layer, cache: torch.enable_grad()(layer)(torch.randn(2, 1, 32), cache=cache), ValueError,
     "torch.no_grad()"),
    ("other-layer", lambda layer, cache: SparseAttention(32, heads=4, kv_heads=2, num_mem_kv=1, **LAYER_GEOMETRY).eval()(
        torch.randn(2, 1, 32), cache=cache), ValueError, "another layer"),
    ("truncate-longer", lambda layer, cache: cache.truncate_([16, 17]), ValueError, "lengths[1] = 17"),
    ("truncate-count", lambda layer, cache: cache.truncate_([3]), ValueError, "one count per batch row"),
    ("truncate-negative", lambda layer, cache: cache.truncate_(-1), ValueError, "lengths[0]"),
    ("truncate-float", lambda layer, cache: cache.truncate_(torch.tensor([1.0, 2.0])), TypeError, "integer tensor"),
    ("truncate-float-scalar", lambda layer, cache: cache.truncate_(2.0), TypeError, "an int \\(every row\\)"),
    ("truncate-float-0d", lambda layer, cache: cache.truncate_(torch.tensor(2.0)), TypeError, "integer tensor"),
    ("reorder-range", lambda layer, cache: cache.reorder_([0, 2]), ValueError, "0 to 1"),
    ("reorder-empty", lambda layer, cache: cache.reorder_([]), ValueError, "at least one"),
    ("reorder-2d", lambda layer, cache: cache.reorder_(torch.zeros(2, 2, dtype=torch.long)), ValueError, "1-D"),
    ("reorder-type", lambda layer, cache: cache.reorder_(0), TypeError, "list, tuple"),
    ("reorder-negative", lambda layer, cache: cache.reorder_([1, -1]), ValueError, "rows[1]"),
    ("lengths-count", with_lengths([5]), ValueError, "cache.lengths must hold one count per batch row"),
    ("lengths-float", with_lengths([3.0, 2]), TypeError, "cache.lengths[0] must be an int"),
    ("lengths-negative", with_lengths([16, -3]), ValueError, "cache.lengths[1] must be an int >= 0"),
    ("lengths-long", with_lengths([21, 2]), ValueError, "at most max_seq_len = 20"),
]


@pytest.mark.parametrize("name,call,error,words", BAD_STEPS, ids=[b[0] for b in BAD_STEPS])
def test_bad_cache_use_is_rejected_and_leaves_the_cache_unchanged(name, call, error, words):
    torch.manual_seed(6)
    layer = SparseAttention(32, heads=4, kv_heads=2, num_mem_kv=1, **LAYER_GEOMETRY).eval()
    cache = layer.new_cache(2, 20)
    with torch.no_grad():
        layer(torch.randn(2, 16, 32), cache=cache)
        before = snapshot(cache)
        with pytest.raises(error, match=words.replace("[", r"\[").replace("]", r"\]")):
            call(layer, cache)
    assert_unchanged(cache, before)


def test_a_cache_steps_under_inference_mode_and_no_grad_alike():
    """A cache made or stepped under torch.inference_mode() takes later steps, truncate_ and
    reorder_ under torch.no_grad() (and the reverse): its tensors are ordinary ones whichever mode
    made them, and every step equals the layer on the whole sequence."""
    torch.manual_seed(4)
    layer = SparseAttention(32, **LAYERS[1][0], **LAYER_GEOMETRY).double().eval()
    x = torch.randn(2, 48, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = layer(x)
    with torch.inference_mode():
        cache = layer.new_cache(2, 48)
        outputs = [layer(x[:, :39], cache=cache)]
    with torch.no_grad():
        outputs.append(layer(x[:, 39:40], cache=cache))
    with torch.inference_mode():
        outputs.append(layer(x[:, 40:43], cache=cache))
    with torch.no_grad():
        cache.truncate_(41)                                  # drafts 41, 42 rejected, then taken again
        outputs.append(layer(x[:, 41:45], cache=cache))
    torch.testing.assert_close(torch.cat(outputs[:2] + [outputs[2][:, :1], outputs[3]], 1), expected[:, :45],
                               rtol=1e-10, atol=1e-10)
    with torch.inference_mode():
        cache.reorder_([1, 0, 1])                            # a new batch size: new tensors
    with torch.no_grad():
        last = layer(x[[1, 0, 1], 45:48], cache=cache)
    torch.testing.assert_close(last, expected[[1, 0, 1], 45:48], rtol=1e-10, atol=1e-10)
    assert not any(t.is_inference() for t in [*cache.keys.values(), cache.k_cmp, cache._device_lengths()])


def test_functional_caches_the_step_may_not_write_are_refused_unchanged():
    """Caches made under torch.inference_mode() and stepped outside it, or requiring grad while grad
    is on, are refused before anything is written; a phi of the wrong output dim is named."""
    B, N, H, D = 1, 16, 1, 8
    blocks = num_compressed_blocks(N, 8, 4)
    q, k, v = torch.randn(B, 2, 2, D), torch.randn(B, 2, H, D), torch.randn(B, 2, H, D)
    gates = [torch.rand(B, 2, 2) for _ in range(3)]
    v_cache, k_cmp, v_cmp = torch.zeros(B, N, H, D), torch.zeros(B, blocks, H, D), torch.zeros(B, blocks, H, D)
    with torch.inference_mode():
        k_cache = torch.zeros(B, N, H, D)
    step = lambda k_cache, v_cache, **kw: sparse_attention_with_kvcache(q, k_cache, v_cache, k_cmp, v_cmp, [0],
                                                                        *gates, SMALL, k=k, v=v, **kw)
    with torch.no_grad(), pytest.raises(ValueError, match=r"k_cache was made under torch.inference_mode\(\)"):
        step(k_cache, v_cache)
    assert not k_cache.any() and not v_cache.any() and not k_cmp.any() and not v_cmp.any()
    with torch.inference_mode():                             # under the mode that made it: written
        step(k_cache, v_cache)
    assert torch.equal(k_cache[:, :2], k) and torch.equal(v_cache[:, :2], v)
    v_cache.zero_()
    with pytest.raises(ValueError, match="v_cache requires grad"):
        step(torch.zeros(B, N, H, D), v_cache.clone().requires_grad_())
    for backend in ("torch", "triton"):                     # the triton decoder brings writers of its own
        device = DEVICE if backend == "triton" else "cpu"
        caches = [x.to(device) for x in (torch.zeros(B, N, H, D), v_cache, k_cmp, v_cmp)]
        inputs = [x.to(device) for x in (q, *gates, k, v)]
        with torch.no_grad(), pytest.raises(ValueError, match="phi maps blocks to dim 4, but its compressed cache "
                                                              "holds dim 8"):
            sparse_attention_with_kvcache(inputs[0], *caches, torch.tensor([0], device=device), *inputs[1:4], SMALL,
                                          k=inputs[4], v=inputs[5], phi_k=lambda blocks: blocks.mean(3)[..., :4],
                                          backend=backend)
        assert not caches[2].any() and not caches[3].any()


def test_new_cache_arguments_are_checked():
    layer = SparseAttention(32, heads=4, **LAYER_GEOMETRY)
    with pytest.raises(ValueError, match="batch_size"):
        layer.new_cache(0, 10)
    with pytest.raises(TypeError, match="max_seq_len"):
        layer.new_cache(1, 10.0)
    with pytest.raises(TypeError, match="dtype"):
        layer.new_cache(1, 10, dtype=torch.int32)
    noncausal = SparseAttention(32, heads=4, **{**LAYER_GEOMETRY, "causal": False})
    with pytest.raises(ValueError, match="causal"):
        noncausal.new_cache(1, 10)
    masked = SparseAttention(32, heads=4, mask=torch.ones(1, 4, dtype=torch.bool), **LAYER_GEOMETRY)
    with pytest.raises(ValueError, match="new_tokens="):
        masked(torch.randn(1, 1, 32), cache=masked.new_cache(1, 4))
    with pytest.raises(ValueError, match="device='gpu'"):
        layer.new_cache(1, 10, device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            layer.new_cache(1, 10, device="cuda")
    with pytest.raises(ValueError, match="meta device holds no values"):
        layer.new_cache(1, 10, device="meta")
    with pytest.raises(ValueError, match="meta device holds no values"):       # a layer on meta: its default
        SparseAttention(32, heads=4, **LAYER_GEOMETRY).to("meta").new_cache(1, 10)
    half = layer.new_cache(2, 10, dtype=torch.float16)
    assert half.k_cmp.dtype == torch.float16 and half.keys["shared"].shape == (2, 10, 4, 8)


def test_a_step_the_backend_refuses_leaves_the_cache_unchanged():
    """The layer's backend checks the step before the cache changes (the Triton kernels take no
    float64)."""
    layer = SparseAttention(32, heads=4, **{**LAYER_GEOMETRY, "backend": "triton"}).double().eval()
    cache = layer.new_cache(1, 40)
    before = snapshot(cache)
    with torch.no_grad(), pytest.raises(ValueError, match="triton: q.dtype is torch.float64"):
        layer(torch.randn(1, 4, 32, dtype=torch.float64), cache=cache)
    assert_unchanged(cache, before)


def test_functional_bad_arguments_leave_the_caches_unchanged():
    B, N, H, D = 1, 16, 1, 8
    k_cache, v_cache = torch.zeros(B, N, H, D), torch.zeros(B, N, H, D)
    blocks = num_compressed_blocks(N, 8, 4)
    k_cmp, v_cmp = torch.zeros(B, blocks, H, D), torch.zeros(B, blocks, H, D)
    q, k, v = torch.randn(B, 2, 2, D), torch.randn(B, 2, H, D), torch.randn(B, 2, H, D)
    gates = [torch.rand(B, 2, 2) for _ in range(3)]
    cases = [
        (dict(cache_seqlens=[15]), ValueError, "do not fit"),
        (dict(cache_seqlens=[1, 2]), ValueError, "one count per batch row"),
        (dict(cache_seqlens=15), ValueError, "cache row 0 holds 15"),        # an int: every row's
        (dict(cache_seqlens=torch.tensor([1.0])), TypeError, "integer"),
        (dict(cache_seqlens=torch.zeros(2, dtype=torch.int32)), ValueError, r"got shape \(2,\)"),
        (dict(cache_seqlens=torch.zeros(1, dtype=torch.int32, device="meta")), ValueError, "meta device"),
        (dict(k_cmp_cache=torch.zeros(B, blocks + 1, H, D)), ValueError, "k_cmp_cache"),
        (dict(v=None), ValueError, "together"),
        (dict(k=torch.randn(B, 3, H, D)), ValueError, "new tokens' keys"),
        (dict(config=NSAConfig(8, 4, 16, 4, 1, 2, 32, causal=False)), ValueError, "causal"),
        (dict(phi_k=3), TypeError, "phi_k"),
        (dict(k=torch.randn(B, 2, H, D, requires_grad=True)), ValueError, "no_grad"),
        # the Triton kernels need l' a power of two: refused by the backend, before the write
        (dict(config=NSAConfig(8, 4, 12, 4, 1, 2, 32), backend="triton"), ValueError, "triton"),
    ]
    for change, error, words in cases:
        args = dict(q=q, k_cache=k_cache, v_cache=v_cache, k_cmp_cache=k_cmp, v_cmp_cache=v_cmp, cache_seqlens=[0],
                    g_cmp=gates[0], g_slc=gates[1], g_win=gates[2], config=SMALL, k=k, v=v)
        args.update(change)
        with pytest.raises(error, match=words):
            sparse_attention_with_kvcache(**args)
        assert not k_cache.any() and not k_cmp.any() and not v_cache.any() and not v_cmp.any()


DECODER_CASES = [  # B, cache_seqlens, T, Hq, H, Dqk, Dv, mem, capacity
    (1, [0], 1, 1, 1, 16, 16, 0, 40),              # group 1, the first token
    (2, [37, 100], 1, 6, 2, 16, 8, 2, 150),        # group 3 (padded to 4), memory, rows apart, Dqk != Dv
    (1, [150], 3, 16, 1, 16, 16, 1, 200),          # group 16, 3 new tokens
    (2, [16, 63], 5, 8, 2, 8, 24, 0, 80),          # group 4, 5 new tokens, lengths at block edges
    (2, [90, 131], 13, 32, 2, 16, 8, 1, 160),      # group 16, 13 tokens: stage 1 in two tiles, stage 2 in 13
    (1, [70], 20, 2, 2, 16, 16, 0, 120),           # group 1, 20 tokens: stage 2 in two tiles of 16
    (2, [40, 77], 2, 32, 1, 16, 16, 1, 100),       # group 32 (MQA): stage 2 a token of 32 rows a program
]


@pytest.mark.parametrize("case", DECODER_CASES, ids=lambda c: f"B{c[0]}-T{c[2]}-Hq{c[3]}-H{c[4]}-mem{c[7]}")
def test_triton_decoder_equals_the_torch_step_and_ignores_what_lies_past_each_row(case):
    """The decoding kernels (interpreter, float32) against the reference step in float64; the
    caches hold NaN past each row's tokens and blocks, which neither may read. (The interpreter
    has no register limit: that the cases below are cut into tiles is asserted, not assumed.)"""
    from nsa.kernels.decode import (DECODE_MAX_ROWS, SELECT_MAX_ROWS, WINDOW_MAX_ROWS, decode_tokens_pad,
                                    decode_tokens_tile)
    B, _, T, Hq, H = case[:5]
    if (T, Hq // H) == (13, 16):
        assert decode_tokens_tile(decode_tokens_pad(T, 16), 16, DECODE_MAX_ROWS) == 8           # 2 tiles of 16
        assert decode_tokens_tile(16, 16, SELECT_MAX_ROWS) == 1                                  # 13 tiles
        assert decode_tokens_tile(16, 16, WINDOW_MAX_ROWS) == 4        # windows: 4 tiles, the last of one token
    if (T, Hq // H) == (5, 4):
        assert decode_tokens_tile(decode_tokens_pad(T, 4), 4, WINDOW_MAX_ROWS) == 8              # 5 of 8 real
    if (T, Hq // H) == (20, 1):
        assert decode_tokens_tile(32, 1, SELECT_MAX_ROWS) == 16                                  # 2 tiles of 32
        assert decode_tokens_tile(32, 1, WINDOW_MAX_ROWS) == 32        # every window in one tile
    check_decoder(case, NSAConfig(8, 4, 16, 4, 1, 2, 32))


@pytest.mark.parametrize("config", [NSAConfig(16, 4, 16, 4, 1, 2, 32), NSAConfig(8, 8, 16, 4, 1, 2, 32)],
                         ids=["three-spill", "no-spill"])
@pytest.mark.parametrize("case", DECODER_CASES[1:3], ids=["group3", "group16"])
def test_triton_decoder_at_other_overlaps_of_compressed_and_selection_blocks(case, config):
    """Compressed blocks that spill three stride-steps into the next selection block (l = 4d), and
    none (l = d): the decoding kernels' selection reads only the spilling blocks of a neighbour."""
    check_decoder(case, config, sharpness=4.0)


def test_triton_decoder_merges_more_selection_lists_than_it_chooses_blocks():
    """50 selection blocks, n = 4: the selection runs in 8 splits (CPU: 2 "multiprocessors"), so
    stage 3 takes the best 4 of 8 lists of 4 keys; the step still equals the reference."""
    from nsa.kernels import decode
    assert decode.split_count(1, 13, decode.SELECT_PROGRAMS_PER_SM * 2) == 8
    check_decoder((1, [700], 1, 4, 1, 16, 16, 0, 800), NSAConfig(8, 4, 16, 4, 1, 2, 32), sharpness=4.0)


@pytest.mark.parametrize("num_selected", [4, 3])
def test_triton_decoder_merges_many_steps_in_one_selection_split(monkeypatch, num_selected):
    """Two selection splits where each row's tokens see 44 and 33 selection blocks of 4 slots a
    step: a split takes four to six steps and merges the later ones into its running top (stage 2's
    bitonic merge, up to five times), with n = 3 a superset of 4 slots; two rows of three new
    tokens each (stage 2's rows: tokens, each its own top)."""
    from nsa.kernels import decode
    monkeypatch.setattr(decode, "MAX_SPLITS", 2)
    assert decode.split_count(2 * 2, 13, decode.SELECT_PROGRAMS_PER_SM * 2) == 2     # B x H programs, 13 steps
    config = NSAConfig(8, 4, 16, num_selected, 1, 2, 32)
    check_decoder((2, [700, 513], 3, 8, 2, 16, 16, 0, 800), config, sharpness=4.0)


@pytest.mark.parametrize("case", [(2, [37, 100], 5, 6, 2, 16, 8, 2, 150), DECODER_CASES[4]],
                         ids=["group3-T5", "group16-T13"])
def test_triton_decoder_reads_only_what_its_stages_wrote(monkeypatch, case):
    """Every scratch buffer of the step filled with NaN (floats) or garbage (the lists' int64 keys)
    before the kernels run: the output still equals the reference, so no stage reads a row that
    the stage before did not write — here with token tiles that leave out tiles of padding tokens
    alone (13 tokens at group 16: stage 1 two tiles of 8, stage 2 thirteen of one, the window four
    of four) and window tiles whose padding heads and tokens store nothing (5 tokens at group 3
    padded to 4: one window tile of 8 tokens)."""
    empty = torch.empty

    def poisoned(*shape, **kwargs):
        out = empty(*shape, **kwargs)
        return out.fill_(float("nan") if out.is_floating_point() else 2 ** 40)

    check_decoder(case, NSAConfig(8, 4, 16, 4, 1, 2, 32), poison=lambda: monkeypatch.setattr(torch, "empty", poisoned))


def check_decoder(case, config, sharpness=1.0, poison=None):
    """The test above for one step shape and geometry; `sharpness` scales the queries, so that a
    few compressed blocks hold most of the probability and Eq. 9's weights decide the selection;
    `poison`, if given, is called after the reference step and before the kernels'."""
    B, lengths, T, Hq, H, Dqk, Dv, mem, capacity = case
    l, d = config.compress_block_size, config.compress_stride
    g = torch.Generator().manual_seed(7)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    k_cache, v_cache = r(B, capacity, H, Dqk), r(B, capacity, H, Dv)
    rows = mem + num_compressed_blocks(capacity, l, d)
    k_cmp, v_cmp = (torch.full((B, rows, H, D), float("nan"), dtype=torch.float64) for D in (Dqk, Dv))
    k_cmp[:, :mem], v_cmp[:, :mem] = r(B, mem, H, Dqk), r(B, mem, H, Dv)
    for b, n in enumerate(lengths):
        k_cache[b, n + T:], v_cache[b, n + T:] = float("nan"), float("nan")
        c = num_compressed_blocks(n + T, l, d)
        k_cmp[b, mem:mem + c] = compress(k_cache[b:b + 1, :n + T], None, l, d)[0]
        v_cmp[b, mem:mem + c] = compress(v_cache[b:b + 1, :n + T], None, l, d)[0]
    q, gates = sharpness * r(B, T, Hq, Dqk), [torch.rand(B, T, Hq, generator=g, dtype=torch.float64) for _ in range(3)]
    args = (q, k_cache, v_cache, k_cmp, v_cmp, lengths, *gates, config)
    expected = sparse_attention_with_kvcache(*args, mem_kv_len=mem, backend="torch")
    assert not expected.isnan().any()
    kernel_args = [x.float().to(DEVICE) if isinstance(x, torch.Tensor) else x for x in args]
    dims = check_keys(*kernel_args[:3], "k_cache", "v_cache")
    assert select_decoder("triton", kernel_args[:5], dims, config) is not None    # the decoding kernels, no fallback
    if poison is not None:
        poison()
    got = sparse_attention_with_kvcache(*kernel_args, mem_kv_len=mem, backend="triton")
    torch.testing.assert_close(got.double().cpu(), expected, **close(torch.float32, 2e-5))


def test_triton_decoder_is_used_for_short_steps_only(monkeypatch):
    config = NSAConfig(8, 4, 16, 4, 1, 2, 32)
    cache = torch.zeros(1, 64, 1, 16, device=DEVICE)
    for T, Hq, used in ((1, 16, True), (8, 16, True), (16, 16, True), (17, 16, False), (32, 4, True),
                        (33, 4, False), (128, 1, True), (129, 1, False)):
        q = torch.zeros(1, T, Hq, 16, device=DEVICE)
        dims = check_keys(q, cache, cache, "k_cache", "v_cache")
        assert (select_decoder("triton", (q, cache), dims, config) is not None) == used, (T, Hq)
        auto = select_decoder("auto", (q, cache), dims, config)       # auto: the GPU's, on a CPU the reference
        assert (auto is not None) == (used and DEVICE.type == "cuda"), (T, Hq)
        assert select_decoder("torch", (q, cache), dims, config) is None


def test_compress_new_blocks_with_rows_adding_different_counts():
    """Lengths as tensors, each row adding its own count; NaN past each row's tokens never
    reaches a block that is not complete."""
    from nsa.cache import compress_new_blocks
    torch.manual_seed(8)
    B, N, H, D, l, d = 3, 60, 2, 8, 8, 4
    keys = torch.randn(B, N, H, D, dtype=torch.float64)
    phi = CompressionMLP(D, l).double()
    k_cmp = torch.full((B, num_compressed_blocks(N, l, d), H, D), float("nan"), dtype=torch.float64)
    lengths = [0, 0, 0]
    for counts in ([1, 9, 0], [7, 1, 17], [0, 13, 2], [20, 3, 30], [32, 34, 11]):
        new = [n + c for n, c in zip(lengths, counts)]
        visible = keys.clone()
        for b, n in enumerate(new):
            visible[b, n:] = float("nan")                       # tokens not yet in the cache
        with torch.no_grad():
            compress_new_blocks([visible], [k_cmp], [phi], torch.tensor(lengths), torch.tensor(new), max(counts), l, d)
        for b, n in enumerate(new):
            done = num_compressed_blocks(n, l, d)
            with torch.no_grad():
                torch.testing.assert_close(k_cmp[b, :done], compress(keys[b:b + 1, :n], phi, l, d)[0])
            assert k_cmp[b, done:].isnan().all()                # nothing written past the complete blocks
        lengths = new


@pytest.mark.parametrize("num_selected", [4, 3])
def test_triton_decoder_breaks_exact_ties_like_the_reference(num_selected):
    """Equal keys score every block alike: the selection's splits (several here) must keep the
    lower block indices, as the reference does; values differ, so another choice shows. With
    n = 3 each split keeps 4 (the slots), and the final merge trims them to 3."""
    config = NSAConfig(8, 4, 16, num_selected, 1, 1, 32)
    g = torch.Generator().manual_seed(3)
    B, T, Hq, H, D, capacity, lengths = 2, 1, 4, 2, 16, 320, [300, 181]
    k_cache = torch.ones(B, capacity, H, D, dtype=torch.float64)
    v_cache = torch.randn(B, capacity, H, D, generator=g, dtype=torch.float64)
    rows = num_compressed_blocks(capacity, 8, 4)
    k_cmp, v_cmp = torch.zeros(B, rows, H, D, dtype=torch.float64), torch.zeros(B, rows, H, D, dtype=torch.float64)
    for b, n in enumerate(lengths):
        c = num_compressed_blocks(n + T, 8, 4)
        k_cmp[b, :c] = compress(k_cache[b:b + 1, :n + T], None, 8, 4)[0]
        v_cmp[b, :c] = compress(v_cache[b:b + 1, :n + T], None, 8, 4)[0]
    q = torch.randn(B, T, Hq, D, generator=g, dtype=torch.float64)
    gates = [torch.zeros(B, T, Hq, dtype=torch.float64), torch.ones(B, T, Hq, dtype=torch.float64),
             torch.zeros(B, T, Hq, dtype=torch.float64)]                      # the selected branch alone
    args = (q, k_cache, v_cache, k_cmp, v_cmp, lengths, *gates, config)
    expected = sparse_attention_with_kvcache(*args, backend="torch")
    got = sparse_attention_with_kvcache(*(x.float().to(DEVICE) if isinstance(x, torch.Tensor) else x for x in args),
                                        backend="triton")
    torch.testing.assert_close(got.double().cpu(), expected, **close(torch.float32, 2e-5))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_decoding_step_without_window_equals_a_window_gated_by_zero(backend):
    """g_win=None (a kv_per_branch layer's step: its window attends its own keys) gives the step
    with a window gate of 0, through the reference and through the decoding kernels."""
    config = NSAConfig(8, 4, 16, 4, 1, 2, 32)
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g)
    B, T, Hq, H, D, capacity, lengths = 2, 2, 4, 2, 16, 90, [30, 61]
    k_cache, v_cache = r(B, capacity, H, D), r(B, capacity, H, D)
    rows = num_compressed_blocks(capacity, 8, 4)
    k_cmp, v_cmp = torch.zeros(B, rows, H, D), torch.zeros(B, rows, H, D)
    for b, n in enumerate(lengths):
        c = num_compressed_blocks(n + T, 8, 4)
        k_cmp[b, :c] = compress(k_cache[b:b + 1, :n + T], None, 8, 4)[0]
        v_cmp[b, :c] = compress(v_cache[b:b + 1, :n + T], None, 8, 4)[0]
    q, g_cmp, g_slc = r(B, T, Hq, D), torch.rand(B, T, Hq, generator=g), torch.rand(B, T, Hq, generator=g)
    device = DEVICE if backend == "triton" else "cpu"              # made on the CPU, moved: the same numbers
    args = [x.to(device) for x in (q, k_cache, v_cache, k_cmp, v_cmp)] + [lengths, g_cmp.to(device), g_slc.to(device)]
    expected = sparse_attention_with_kvcache(*args, torch.zeros_like(args[6]), config, backend=backend)
    got = sparse_attention_with_kvcache(*args, None, config, backend=backend)
    torch.testing.assert_close(got, expected, **close(torch.float32, 1e-5))


def test_lengths_is_new_tokens_former_name():
    """`lengths=` still works, with a FutureWarning, and gives new_tokens='s result."""
    torch.manual_seed(5)
    layer = SparseAttention(32, heads=4, kv_heads=2, **LAYER_GEOMETRY).double()
    x = torch.randn(2, 3, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = layer(x, cache=layer.new_cache(2, 8), new_tokens=[3, 2])
        with pytest.warns(FutureWarning, match="new_tokens=") as warned:
            got = layer(x, cache=layer.new_cache(2, 8), lengths=[3, 2])
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert warned[0].filename == __file__                   # shown at the caller's line, not in torch


def test_cache_repr_names_sizes_not_tensors():
    layer = SparseAttention(32, heads=4, kv_heads=2, num_mem_kv=1, **LAYER_GEOMETRY).eval()
    cache = layer.new_cache(2, 20)
    with torch.no_grad():
        layer(torch.randn(2, 5, 32), cache=cache, new_tokens=[5, 3])
    text = repr(cache)
    assert "tensor(" not in text and "lengths=[5, 3]" in text and "max_seq_len=20" in text and "mem_kv_len=1" in text


@pytest.mark.parametrize("kwargs", [dict(), dict(kv_per_branch=True, num_mem_kv=1)], ids=["shared", "kv-per-branch"])
def test_a_step_appending_to_every_row_makes_no_tensor_from_host_lists(monkeypatch, kwargs):
    """On a GPU a tensor made from a Python list is a blocking copy (the host waits for the GPU's
    queue to drain). Once the cache's device lengths exist, a decoding step in which every row
    takes all T tokens makes none, on the decoding kernels; its outputs stay the layer's."""
    torch.manual_seed(7)
    layer = triton_layer(**kwargs)
    x = torch.randn(2, 44, 32).to(DEVICE)
    with torch.no_grad():
        expected = layer(x)
        cache = layer.new_cache(2, 44)
        outputs = [layer(x[:, :40], cache=cache, new_tokens=[40, 38])[:, :38]]  # ragged: row 1 takes 38
        outputs.append(layer(x[:, 38:40], cache=cache, new_tokens=[0, 2]))
        made, real = [], torch.tensor
        monkeypatch.setattr(torch, "tensor", lambda *args, **kw: made.append(args) or real(*args, **kw))
        steps = [layer(x[:, i:i + 1], cache=cache) for i in range(40, 44)]
        monkeypatch.setattr(torch, "tensor", real)
    assert made == [] and cache.lengths == [44, 44]
    torch.testing.assert_close(torch.cat(steps, 1), expected[:, 40:], **close(torch.float32, 2e-5))
    torch.testing.assert_close(outputs[1][1], expected[1, 38:40], **close(torch.float32, 2e-5))


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("phi", ["mlp", "mean", "callable"])
def test_triton_cache_writes_equal_pytorch_ones(phi, paged):
    """The decoding kernels' own cache writes (Triton's interpreter on the CPU) against the
    PyTorch ones: appends at each row's length, compressed blocks after steps that complete none,
    one or several, rows of different lengths, memory rows, Dqk != Dv, int32 lengths; three caches
    (the kernels take two at a time: the third alone). phi: the paper's MLP (compress_mlp_kernel),
    mean pooling (taken by the write kernel) or a callable of the caller's (gathered for PyTorch).
    Paged: caches in a pool of pages of 8 tokens (chapter 13's "Pages"), NaN where no token was
    written; the table's columns past what each row holds name no page (10**6): neither writer
    may read them. Rows adding different counts are appended row by row there. Five kv heads:
    the paged mean takes a block in tiles of 8 positions (`mean_positions`), more than one."""
    from nsa.cache import append_tokens, compress_new_blocks
    from nsa.kernels.cache import append_tokens_triton, compress_new_blocks_triton
    torch.manual_seed(9)
    B, N, H, dims, l, d, mem = 2, 70, 5, (16, 8, 32), 16, 4, 1       # 5 heads: the paged mean in two tiles of 8
    if paged:
        P, used = 8, [-(-n // 8) for n in (22, 50)]                 # the pages each row's tokens come to need
        order = torch.randperm(sum(used)).tolist()
        table = torch.full((B, 10), 10**6, dtype=torch.int32)
        table[0, :used[0]], table[1, :used[1]] = torch.tensor(order[:used[0]]), torch.tensor(order[used[0]:])
        table = table.to(DEVICE)
        caches = [torch.full((sum(used), P, H, D), float("nan"), device=DEVICE) for D in dims]
        cmp_caches = [torch.full((sum(used), P // d, H, D), float("nan"), device=DEVICE) for D in dims]
    else:
        table = None
        caches = [torch.randn(B, N, H, D).to(DEVICE) for D in dims]
        cmp_caches = [torch.full((B, mem + num_compressed_blocks(N, l, d), H, D), float("nan"), device=DEVICE)
                      for D in dims]
    maximum = lambda blocks: blocks.amax(dim=3)                              # noqa: E731  a phi of one's own
    phis = [{"mlp": CompressionMLP(D, l), "mean": None, "callable": maximum}[phi] for D in dims]
    phis = [x.to(DEVICE) if isinstance(x, torch.nn.Module) else x for x in phis]
    mine = [x.clone() for x in caches], [x.clone() for x in cmp_caches]
    lengths = torch.tensor([3, 0], dtype=torch.int32, device=DEVICE)
    for counts in ([1, 1], [13, 2], [0, 17], [5, 30]):
        new = lengths + torch.tensor(counts, dtype=torch.int32, device=DEVICE)
        tokens = [torch.randn(B, max(counts), H, D).to(DEVICE) for D in dims]
        with torch.no_grad():
            for writes, (kv, cmp) in (((append_tokens, compress_new_blocks), (caches, cmp_caches)),
                                      ((append_tokens_triton, compress_new_blocks_triton), mine)):
                if min(counts) == max(counts):            # appends: every row the same count
                    assert torch.equal(writes[0](kv, tokens, lengths, table), new)     # and the lengths after
                elif paged:                               # (contiguous rows hold random tokens already)
                    for b in range(B):
                        writes[0](kv, [x[b:b + 1, :counts[b]] for x in tokens], lengths[b:b + 1], table[b:b + 1])
                writes[1](kv, cmp, phis, lengths, new, max(counts), l, d, mem, table)
        for got, expected in zip([*mine[0], *mine[1]], [*caches, *cmp_caches]):
            torch.testing.assert_close(got, expected, equal_nan=True)
        lengths = new


def test_triton_cache_writes_take_non_contiguous_caches():
    """A cache that is a view into a larger buffer is written by the PyTorch functions instead."""
    from nsa.kernels.cache import append_tokens_triton
    buffer = torch.zeros(2, 10, 4, 8, device=DEVICE)
    cache = buffer[:, :, 1:3]                              # not contiguous
    new = torch.randn(2, 2, 2, 8, device=DEVICE)
    append_tokens_triton([cache], [new], torch.tensor([3, 5], device=DEVICE))
    assert torch.equal(buffer[0, 3:5, 1:3], new[0]) and torch.equal(buffer[1, 5:7, 1:3], new[1])
    assert buffer[:, :, 0].abs().sum() == 0 and buffer[:, :, 3].abs().sum() == 0


def test_triton_compress_takes_non_contiguous_caches():
    """Compressed caches that are views into larger buffers are written by the PyTorch function."""
    from nsa.cache import compress_new_blocks
    from nsa.kernels.cache import compress_new_blocks_triton
    torch.manual_seed(10)
    keys = torch.randn(1, 40, 2, 8).to(DEVICE)
    buffers = [torch.zeros(1, 9, 4, 8, device=DEVICE) for _ in range(2)]
    views, plain = [b[:, :, 1:3] for b in buffers], torch.zeros(1, 9, 2, 8, device=DEVICE)  # views: not contiguous
    lengths, new = torch.tensor([0], device=DEVICE), torch.tensor([40], device=DEVICE)
    compress_new_blocks_triton([keys], [views[0]], [None], lengths, new, 40, 8, 4)
    compress_new_blocks([keys], [plain], [None], lengths, new, 40, 8, 4)
    assert torch.equal(views[0], plain) and buffers[0][:, :, 0].abs().sum() == 0


def window_step_inputs(dtype=torch.float64, seed=11):
    """A step of T = 2 new tokens over caches of rows at different lengths, whose window has keys
    and values of its own (a kv_per_branch model's): (positional args, keyword args, lengths)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    B, T, Hq, H, Dqk, Dv, capacity, lengths = 2, 2, 4, 2, 16, 8, 90, [30, 61]
    caches = [torch.zeros(B, capacity, H, D, dtype=dtype) for D in (Dqk, Dv, Dqk, Dv)]
    for cache in caches:
        for b, n in enumerate(lengths):
            cache[b, :n] = r(n, H, cache.shape[3])
    rows = num_compressed_blocks(capacity, 8, 4)
    k_cmp, v_cmp = torch.zeros(B, rows, H, Dqk, dtype=dtype), torch.zeros(B, rows, H, Dv, dtype=dtype)
    for b, n in enumerate(lengths):
        c = num_compressed_blocks(n, 8, 4)
        k_cmp[b, :c], v_cmp[b, :c] = (compress(x[b:b + 1, :n], None, 8, 4)[0] for x in caches[:2])
    q, gates = r(B, T, Hq, Dqk), [torch.rand(B, T, Hq, generator=g, dtype=dtype) for _ in range(3)]
    k, v, k_win, v_win = (r(B, T, H, D) for D in (Dqk, Dv, Dqk, Dv))
    args = (q, caches[0], caches[1], k_cmp, v_cmp, lengths, *gates, NSAConfig(8, 4, 16, 4, 1, 2, 24))
    return args, dict(k=k, v=v, k_win_cache=caches[2], v_win_cache=caches[3], k_win=k_win, v_win=v_win), lengths


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_window_caches_give_the_window_keys_of_its_own(backend):
    """k_win_cache, v_win_cache (kv_per_branch): the step equals the fused branches without a
    window plus the gated window over each row's own window keys, as the layer computes them;
    every new key lands in its cache; the decoding kernels (Triton's interpreter) agree."""
    from nsa import sliding_window_attention
    args, kwargs, lengths = window_step_inputs()
    if backend == "triton":
        args = tuple(x.float().to(DEVICE) if isinstance(x, torch.Tensor) else x for x in args)
        kwargs = {name: x.float().to(DEVICE) for name, x in kwargs.items()}
    q, k_cache, v_cache, k_cmp, v_cmp, _, g_cmp, g_slc, g_win, config = args
    got = sparse_attention_with_kvcache(*args, backend=backend, **kwargs)
    T = q.shape[1]
    for b, n in enumerate(lengths):
        for name, cache in (("k", k_cache), ("v", v_cache), ("k_win", kwargs["k_win_cache"]),
                            ("v_win", kwargs["v_win_cache"])):
            assert torch.equal(cache[b, n:n + T], kwargs[name][b])
        visible = num_compressed_blocks(n + T, 8, 4)
        fused = native_sparse_attention(q[b:b + 1], k_cache[b:b + 1, :n + T], v_cache[b:b + 1, :n + T],
                                        k_cmp[b:b + 1, :visible], v_cmp[b:b + 1, :visible], g_cmp[b:b + 1],
                                        g_slc[b:b + 1], None, config, backend="torch")
        window = sliding_window_attention(q[b:b + 1], kwargs["k_win_cache"][b:b + 1, :n + T],
                                          kwargs["v_win_cache"][b:b + 1, :n + T], config.window_size)
        expected = fused + g_win[b:b + 1, ..., None] * window
        tolerance = dict(rtol=1e-12, atol=1e-12) if backend == "torch" else close(torch.float32, 2e-5)
        torch.testing.assert_close(got[b:b + 1], expected, **tolerance)


WINDOW_MISUSE = [
    ("one window cache", dict(v_win_cache=None), ValueError, "k_win_cache and v_win_cache together"),
    ("new window keys, no caches", dict(k_win_cache=None, v_win_cache=None), ValueError, "pass them with k_win_cache"),
    ("no window gate", dict(g_win=None), ValueError, "g_win is None"),
    ("new keys without window keys", dict(k_win=None, v_win=None), ValueError, "k, v, k_win and v_win together"),
    ("window keys, no new keys", dict(k=None, v=None), ValueError, "k, v, k_win and v_win together"),
    ("cache of another shape", "short", ValueError, "k_win_cache has shape"),
    ("cache of another dtype", "float", TypeError, "k_win_cache.dtype is torch.float32 but k_cache.dtype"),
    ("the same cache as the keys", "alias", ValueError, "k_win_cache shares its memory with k_cache"),
    ("phi of another block size", dict(phi_k=CompressionMLP(16, 16)), ValueError, "phi_k maps blocks of 16 tokens"),
    ("phi of another output", dict(phi_v=CompressionMLP(8, 8, out_dim=4)), ValueError, "phi_v maps .* to dim 4"),
    ("phi of another dtype", "phi float", TypeError,
     r"k_cache is torch.float64 but the CompressionMLP's parameters are torch.float32; convert k_cache to "
     r"torch.float32 or the CompressionMLP with phi_k.to\(torch.float64\)$"),
]


@pytest.mark.parametrize("case", WINDOW_MISUSE, ids=[c[0] for c in WINDOW_MISUSE])
def test_window_caches_misused_are_refused_and_nothing_changes(case):
    _, change, error, match = case
    args, kwargs, _ = window_step_inputs()
    args = list(args)
    if change == "short":
        kwargs["k_win_cache"] = kwargs["k_win_cache"][:, :-1]
    elif change == "float":
        kwargs["k_win_cache"] = kwargs["k_win_cache"].float()
    elif change == "alias":
        kwargs["k_win_cache"] = args[1]
    elif change == "phi float":
        pass
    elif "g_win" in change:
        args[8] = None
    else:
        kwargs.update(change)
    kwargs = {name: x.double() if isinstance(x, torch.nn.Module) else x for name, x in kwargs.items()}
    if change == "phi float":
        kwargs["phi_k"] = CompressionMLP(8, 8)                                  # float32, the caches float64
    tensors = [x for x in (*args[1:5], *kwargs.values()) if isinstance(x, torch.Tensor)]
    before = [x.clone() for x in tensors]
    with pytest.raises(error, match=match):
        sparse_attention_with_kvcache(*args, backend="torch", **kwargs)
    assert all(torch.equal(x, y) for x, y in zip(tensors, before))


def test_compress_mlp_kernel_equals_the_mlp(monkeypatch):
    """`compress_mlp_kernel` (Triton's interpreter) computes `CompressionMLP` from the cache: odd
    head, hidden and output sizes (padded tiles, a partial last share of hidden units), more
    candidate rows than one program takes, rows of different lengths, and steps that complete
    nothing write nothing; two phis of the same sizes in one launch, two that differ in their
    output size only in a launch each, a fifth alone; a phi of another kind keeps PyTorch's (the
    kernel declines it)."""
    from nsa.cache import compress_new_blocks
    from nsa.kernels import cache as writes
    from nsa.kernels.cache import compress_new_blocks_triton, mlp_weights
    kernel, launches = writes.compress_mlp_kernel, []

    class Counted:                                # each launch's caches (the grid's third axis)
        def __getitem__(self, grid):
            launches.append(grid[2])
            return kernel[grid]

    monkeypatch.setattr(writes, "compress_mlp_kernel", Counted())
    torch.manual_seed(12)
    B, N, H, D, l, d, mem = 3, 90, 3, 24, 8, 4, 2
    phis = [CompressionMLP(D, l, hidden_dim=40, out_dim=out) for out in (20, 20, 24, 20)] + [CompressionMLP(D, l)]
    caches = [torch.randn(B, N, H, D) for _ in phis]
    phis, caches = [phi.to(DEVICE) for phi in phis], [x.to(DEVICE) for x in caches]    # made on the CPU, moved
    rows = mem + num_compressed_blocks(N, l, d)
    cmp_caches = [torch.full((B, rows, H, phi.mlp[2].out_features), float("nan"), device=DEVICE) for phi in phis]
    mine = [x.clone() for x in cmp_caches]
    assert all(mlp_weights(phi, cache, cmp, l) is not None for phi, cache, cmp in zip(phis, caches, cmp_caches))
    declined = [CompressionMLP(D, l).double(), torch.nn.Identity(), CompressionMLP(D, 2 * l),  # dtype, kind, l,
                CompressionMLP(D, l, out_dim=8), CompressionMLP(16, l)]                        # output, head dim
    assert all(mlp_weights(phi.to(DEVICE), caches[4], cmp_caches[4], l) is None for phi in declined)
    lengths = torch.tensor([0, 3, 11], dtype=torch.int32, device=DEVICE)
    for counts in ([70, 70, 70], [1, 1, 1], [2, 0, 9]):          # 3 x 18 x 3 = 162 candidate rows first
        new = lengths + torch.tensor(counts, dtype=torch.int32, device=DEVICE)
        with torch.no_grad():
            compress_new_blocks(caches, cmp_caches, phis, lengths, new, max(counts), l, d, mem)
            launches.clear()
            compress_new_blocks_triton(caches, mine, phis, lengths, new, max(counts), l, d, mem)
        assert launches == [2, 1, 1, 1]            # phis 0 and 1 together; 2 and 3 (outputs 24, 20) apart; 4
        for got, expected in zip(mine, cmp_caches):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, equal_nan=True)
        lengths = new


def test_a_decoder_of_the_older_contract_still_decodes(monkeypatch):
    """A decoder registered before window caches existed (no window_caches argument) is called
    without one for a step whose window reads the shared caches."""
    from nsa import backends
    calls = []

    def decoder(q, k_cache, v_cache, k_cmp_cache, v_cmp_cache, seqlens, g_cmp, g_slc, g_win, config, scale, mem):
        calls.append(q.shape)
        return q.new_zeros(*q.shape[:3], v_cache.shape[-1])

    monkeypatch.setitem(backends._decoders, "triton", backends.Backend("triton", decoder, lambda *args: None))
    args, kwargs, _ = window_step_inputs(torch.float32)
    kwargs = {name: kwargs[name] for name in ("k", "v")}
    out = sparse_attention_with_kvcache(*args, backend="triton", **kwargs)
    assert calls == [args[0].shape] and out.abs().sum() == 0


def _saved_layer_and_cache(**options):
    torch.manual_seed(0)
    layer = SparseAttention(32, heads=4, kv_heads=2, compress_block_size=8, compress_stride=4, select_block_size=16,
                            num_selected_blocks=3, window_size=12, **options).double()
    cache = layer.new_cache(2, 48)
    with torch.no_grad():
        layer(torch.randn(2, 29, 32, dtype=torch.float64), cache=cache, new_tokens=[29, 17])
    return layer, cache


@pytest.mark.parametrize("options", [dict(), dict(num_mem_kv=2, kv_per_branch=True), dict(compress_mlp=False)],
                         ids=["mlp", "memory, kv per branch", "mean"])
def test_a_saved_cache_loads_into_a_new_one_and_decodes_the_same(options):
    """torch.save of a cache's state_dict (rows of different lengths), torch.load (weights only) into
    a new cache of the same layer: the next steps equal those of the cache saved, and of its deep copy."""
    import copy
    import io

    layer, cache = _saved_layer_and_cache(**options)
    buffer = io.BytesIO()
    torch.save(cache.state_dict(), buffer)
    buffer.seek(0)
    loaded = layer.new_cache(2, 48).load_state_dict(torch.load(buffer, weights_only=True))
    copied = copy.deepcopy(cache)
    assert loaded.lengths == copied.lengths == cache.lengths == [29, 17]
    with torch.no_grad():
        for T in (1, 3, 1):
            x = torch.randn(2, T, 32, dtype=torch.float64)
            expected = layer(x, cache=cache)
            assert torch.equal(layer(x, cache=loaded), expected) and torch.equal(layer(x, cache=copied), expected)
    assert copied.k_cmp.data_ptr() != cache.k_cmp.data_ptr() and copied.owner() is layer
    grad = {**cache.state_dict(), "k_cmp": cache.k_cmp.clone().requires_grad_()}   # a state's tensor with grad
    assert not layer.new_cache(2, 48).load_state_dict(grad).k_cmp.requires_grad


@pytest.mark.parametrize("options", [dict(), dict(num_mem_kv=2, kv_per_branch=True), dict(compress_mlp=False)],
                         ids=["mlp", "memory, kv per branch", "mean"])
def test_a_state_goes_only_into_a_cache_of_the_weights_it_came_from(options):
    """A state keeps a fingerprint of the weights the cache's tensors came from: a layer with other
    weights (another init, or its key projection trained on) refuses it and its cache stays empty;
    a change the cache does not depend on (the queries' projection) does not; a state saved without
    the fingerprint still loads."""
    layer, cache = _saved_layer_and_cache(**options)
    state = cache.state_dict()
    assert state["weights"].dtype == torch.float64 and state["weights"].device.type == "cpu"
    torch.manual_seed(1)
    other = SparseAttention(32, heads=4, kv_heads=2, compress_block_size=8, compress_stride=4, select_block_size=16,
                            num_selected_blocks=3, window_size=12, **options).double()
    with torch.no_grad():
        trained = copy.deepcopy(layer)
        next(iter(trained.to_k.values())).weight.add_(1e-3)
        queries_only = copy.deepcopy(layer)
        queries_only.to_q.weight.add_(1e-3)
    for refusing in (other, trained):
        target = refusing.new_cache(2, 48)
        with pytest.raises(ValueError, match="saved from a layer whose key or value projections"):
            target.load_state_dict(state)
        assert target.lengths == [0, 0] and not target.k_cmp.any()
    assert queries_only.new_cache(2, 48).load_state_dict(state).lengths == [29, 17]
    older = {name: value for name, value in state.items() if name != "weights"}
    assert other.new_cache(2, 48).load_state_dict(older).lengths == [29, 17]


def test_a_cache_is_not_pickled_and_bad_states_change_nothing():
    import copy
    import pickle

    layer, cache = _saved_layer_and_cache(num_mem_kv=2)
    with pytest.raises(TypeError, match=r"not pickled .* save cache.state_dict\(\)"):
        pickle.dumps(cache)
    with pytest.raises(TypeError, match=r"shallow copy .* copy.deepcopy\(cache\) copies one"):
        copy.copy(cache)
    target = layer.new_cache(2, 48)
    good = cache.state_dict()
    bad = {
        "not a dict": ([1, 2], ValueError, "state must be a dict with the keys"),
        "a key missing": ({k: v for k, v in good.items() if k != "lengths"}, ValueError, "with the keys"),
        "other branches": ({**good, "keys": {"cmp": good["keys"]["shared"]}}, ValueError, r"state\['keys'\] must hold"),
        "another max_seq_len": ({**good, "k_cmp": good["k_cmp"][:, :-1]}, ValueError,
                                r"state\['k_cmp'\] has shape .* make the cache with the batch size"),
        "another dtype": ({**good, "v_cmp": good["v_cmp"].float()}, TypeError,
                          r"state\['v_cmp'\] is torch.float32 but this cache is torch.float64"),
        "other memory rows": ({**good, "mem_kv_len": 0}, ValueError, r"state\['mem_kv_len'\] is 0"),
        "a row too long": ({**good, "lengths": [49, 3]}, ValueError, "at most 48 tokens a row"),
        "lengths of three rows": ({**good, "lengths": [1, 2, 3]}, ValueError, r"state\['lengths'\]"),
        "not a tensor": ({**good, "values": {"shared": [0.0]}}, TypeError, "must be a torch.Tensor, got list"),
        "a meta tensor, last": ({**good, "v_cmp": good["v_cmp"].to("meta")}, ValueError,
                                r"state\['v_cmp'\] is on the meta device"),
        "memory rows, shapes apart": ({**good, "mem_kv_len": 0, "k_cmp": good["k_cmp"][:, 2:]}, ValueError,
                                      r"state\['mem_kv_len'\] is 0 but this cache's layer has 2 memory rows"),
        "memory rows not an int": ({**good, "mem_kv_len": 2.0}, TypeError, r"state\['mem_kv_len'\] must be an int"),
        "an extra branch": ({**good, "keys": {**good["keys"], "win": good["keys"]["shared"]}}, ValueError,
                            r"got \['shared', 'win'\]"),
        "a key not a string": ({**good, 1: 1}, ValueError, "with the keys"),
        "weights of another shape": ({**good, "weights": good["weights"][:1]}, ValueError,
                                     r"state\['weights'\] must be a tensor of shape"),
        "other weights, last": ({**good, "weights": good["weights"] * 1.01}, ValueError,
                                "saved from a layer whose key or value projections, phi or memory rows differ"),
    }
    before = [x.clone() for x in (*target.keys.values(), *target.values.values(), target.k_cmp, target.v_cmp)]
    for what, (state, error, match) in bad.items():
        with pytest.raises(error, match=match):
            target.load_state_dict(state)
        after = (*target.keys.values(), *target.values.values(), target.k_cmp, target.v_cmp)
        assert target.lengths == [0, 0] and all(torch.equal(x, y) for x, y in zip(before, after)), what
