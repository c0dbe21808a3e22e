"""Chapter 8: the selected-attention Triton kernels against chapter 1's dense reference.

Runs in Triton's interpreter on a CPU (fp32 and fp16; tiny shapes), or on a GPU when there is one.
"""

import pytest
import torch

import nsa  # first: switches Triton to its interpreter on a machine without CUDA
from nsa import attention, block_selection_mask
from nsa.device import DEVICE
from nsa.kernels import selected
from nsa.kernels.selected import (MERGE_ROWS, key_block_centric, merge_partials_kernel,
                                  prepare_block_indices, prepare_query_tiles, query_tiles, reverse_block_index,
                                  selected_attention_bwd, selected_attention_fwd, selected_attention_triton,
                                  selected_by_block_bwd, selected_by_block_fwd)
from tolerance import close


def random_indices(gen, B, Nq, Nk, H, n, block_size, empty=0.2):
    """Random block indices in [-1, num_blocks): repeats, -1 and (causal) future blocks mixed in."""
    num_blocks = -(-Nk // block_size)
    indices = torch.randint(-1, num_blocks, (B, Nq, H, n), generator=gen, device=DEVICE)
    own = (torch.arange(Nk - Nq, Nk, device=DEVICE) // block_size)[None, :, None]
    indices[..., 0] = own                       # most queries see at least their own block
    indices[torch.rand(indices.shape, generator=gen, device=DEVICE) < empty] = -1
    return indices


def reference(q, k, v, indices, block_size, scale, causal):
    mask = block_selection_mask(indices, block_size, k.shape[1], causal=causal)
    return attention(q, k, v, mask, scale=scale, return_lse=True)


def run_case(B, Nq, Nk, Hq, H, Dqk, Dv, n, block_size, causal=True, dtype=torch.float32,
             grads=True, scale=None, seed=0, queries_per_tile=None, shared=0.0):
    gen = torch.Generator(DEVICE).manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=gen, device=DEVICE, dtype=dtype)
    q, k, v, do = make(B, Nq, Hq, Dqk), make(B, Nk, H, Dqk), make(B, Nk, H, Dv), make(B, Nq, Hq, Dv)
    indices = random_indices(gen, B, Nq, Nk, H, n, block_size)
    if shared:  # each query copies a fraction of its slots from the query before it
        copy = torch.rand(indices[:, 1:].shape, generator=gen, device=DEVICE) < shared
        indices[:, 1:] = torch.where(copy, indices[:, :-1], indices[:, 1:])
    q, k, v = (x.requires_grad_(grads) for x in (q, k, v))
    o, lse = selected_attention_triton(q, k, v, indices, block_size, scale, causal=causal,
                                       return_lse=True, queries_per_tile=queries_per_tile)
    q64, k64, v64 = (x.detach().double().requires_grad_(grads) for x in (q, k, v))
    o_ref, lse_ref = reference(q64, k64, v64, indices, block_size, scale, causal)
    tol = close(dtype, 2e-4) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(o, o_ref.to(dtype), **tol)
    torch.testing.assert_close(lse, lse_ref.float(), **tol)
    if grads:
        got = torch.autograd.grad(o, (q, k, v), do)
        want = torch.autograd.grad(o_ref, (q64, k64, v64), do.double())
        for name, g, w in zip("qkv", got, want):
            assert torch.isfinite(g).all(), f"d{name} has non-finite values"
            torch.testing.assert_close(g, w.to(dtype), **tol, msg=lambda m: f"d{name}: {m}")


# B, Nq, Nk, Hq, H, Dqk, Dv, n, block_size
SHAPES = [
    (1, 1, 1, 1, 1, 16, 16, 1, 16),          # one token
    (2, 17, 17, 2, 1, 16, 16, 2, 16),        # group 2, ragged last block
    (1, 1, 70, 4, 1, 32, 16, 3, 16),         # decoding: one query after 69 keys, Dqk != Dv
    (1, 23, 77, 8, 1, 16, 16, 2, 32),        # group 8, Nq < Nk, blocks of 32
    (1, 40, 40, 16, 1, 16, 16, 2, 16),       # group 16
    (1, 9, 50, 6, 2, 48, 24, 3, 16),         # group 3, head dims padded (48 -> 64, 24 -> 32)
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_forward_and_gradients_fp32(shape, causal):
    run_case(*shape, causal=causal)


@pytest.mark.parametrize("queries_per_tile", [1, 2, 4, 16])
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3], SHAPES[5]], ids=str)
def test_tiles_of_queries_sharing_blocks(shape, queries_per_tile):
    run_case(*shape, queries_per_tile=queries_per_tile, shared=0.6, seed=queries_per_tile)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_key_block_centric_design_at_every_group(shape, causal):
    """Chapter 8b's launchers (two-pass forward, gather kernel with atomic dq) against the dense
    reference at groups 1, 2, 3, 4, 8 and 16 (the entry point uses them for small groups only)."""
    B, Nq, Nk, Hq, H, Dqk, Dv, n, block_size = shape
    gen = torch.Generator(DEVICE).manual_seed(Nq + Hq)
    make = lambda *s: torch.randn(*s, generator=gen, device=DEVICE)
    q, k, v, do = make(B, Nq, Hq, Dqk), make(B, Nk, H, Dqk), make(B, Nk, H, Dv), make(B, Nq, Hq, Dv)
    indices = random_indices(gen, B, Nq, Nk, H, n, block_size)
    prepared = prepare_block_indices(indices, block_size, Nk, causal)
    o, lse, index = selected_by_block_fwd(q, k, v, prepared, block_size, 0.3, causal)
    grads = selected_by_block_bwd(do, q, k, v, o, lse, prepared, block_size, 0.3, causal, index=index)
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    o_ref, lse_ref = reference(q64, k64, v64, indices, block_size, 0.3, causal)
    grads_ref = torch.autograd.grad(o_ref, (q64, k64, v64), do.double())
    for name, x, ref in zip(("o", "lse", "dq", "dk", "dv"), (o, lse, *grads), (o_ref, lse_ref, *grads_ref)):
        torch.testing.assert_close(x, ref.float(), **close(torch.float32, 2e-4), msg=lambda m: f"{name}: {m}")


def test_merge_reads_only_the_slots_that_hold_a_block():
    """Chapter 8b's merge weighs a row's slots by their lse and never reads a slot whose block is
    -1 (the forward never writes it, and the buffer is not filled): NaN there changes nothing, a
    row with no block gets 0 and -inf."""
    gen = torch.Generator(DEVICE).manual_seed(3)
    B, Nq, Hq, H, n, Dv = 1, 5, 4, 2, 3, 16
    block_indices = torch.tensor([[0, 1, 2], [0, -1, 2], [-1, -1, -1], [1, -1, -1], [0, 1, 2]],
                                 dtype=torch.int32, device=DEVICE)[None, :, None].expand(B, Nq, H, n).contiguous()
    part_o = torch.randn(B, Nq, Hq, n, Dv, generator=gen, device=DEVICE)
    part_lse = torch.randn(B, Nq, Hq, n, generator=gen, device=DEVICE) * 3       # base 2
    empty = (block_indices < 0).repeat_interleave(Hq // H, dim=2)                  # (B, Nq, Hq, n)
    part_o[empty], part_lse[empty] = float("nan"), float("nan")
    o = torch.empty(B, Nq, Hq, Dv, device=DEVICE)
    lse = torch.empty(B, Nq, Hq, device=DEVICE)
    merge_partials_kernel[(-(-B * Nq * Hq // MERGE_ROWS),)](
        part_o, part_lse, block_indices, o, lse, B * Nq * Hq, HEADS_Q=Hq, GROUP=Hq // H, NUM_SLOTS=n,
        SLOTS=4, DIM_V=Dv, BLOCK_DV=Dv, BLOCK_ROWS=MERGE_ROWS)
    weight = torch.where(empty, 0.0, torch.exp2(torch.nan_to_num(part_lse, nan=0.0)))  # each slot's softmax mass
    total = weight.sum(-1)
    want_o = (weight[..., None] * torch.nan_to_num(part_o, nan=0.0)).sum(-2) / total.clamp_min(1e-30)[..., None]
    want_lse = torch.where(total > 0, torch.log(total), float("-inf"))
    torch.testing.assert_close(o, want_o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)
    assert (o[0, 2] == 0).all() and (lse[0, 2] == float("-inf")).all()       # the query with no block


@pytest.mark.parametrize("Hq, H", [(2, 2), (6, 3), (8, 1)])
def test_key_block_centric_gated_backward_equals_query_centric(Hq, H):
    """NSA's fused backward (chapter 10): gate scaling, the gate's gradient and dq added into a
    buffer give the same results in both designs."""
    gen = torch.Generator(DEVICE).manual_seed(Hq)
    make = lambda *s: torch.randn(*s, generator=gen, device=DEVICE)
    q, k, v, do = make(1, 29, Hq, 16), make(1, 29, H, 16), make(1, 29, H, 16), make(1, 29, Hq, 16)
    gate = torch.rand(1, 29, Hq, generator=gen, device=DEVICE)
    prepared = prepare_block_indices(random_indices(gen, 1, 29, 29, H, 3, 16), 16, 29, True)
    Q, tiles = query_tiles(prepared, Hq // H)
    o, lse = selected_attention_fwd(q, k, v, prepared, 16, 0.25, True, Q, tiles)
    results = []
    for backward in (lambda **kw: selected_attention_bwd(do, q, k, v, o, lse, prepared, 16, 0.25, True, Q, tiles, **kw),
                     lambda **kw: selected_by_block_bwd(do, q, k, v, o, lse, prepared, 16, 0.25, True, **kw)):
        d_gate, dq = torch.empty_like(gate), torch.ones_like(q)
        results.append((*backward(gate=gate, d_gate=d_gate, dq=dq), d_gate, dq))
    for name, a, b in zip(("dq returned", "dk", "dv", "d_gate", "dq buffer"), *results):
        torch.testing.assert_close(a, b, **close(torch.float32, 2e-4), msg=lambda m: f"{name}: {m}")


def test_design_by_group_size():
    assert all(key_block_centric(G, N) for G in (1, 2, 3, 4) for N in (1, 4096, 65536))
    assert key_block_centric(8, 8192) and not key_block_centric(8, 8191)
    assert not any(key_block_centric(16, N) for N in (1, 65536))


@pytest.mark.parametrize("Hq,H", [(4, 2), (8, 1)], ids=["key-block-centric", "query-centric"])
def test_backward_under_deterministic_algorithms_adds_in_chunk_order(Hq, H, monkeypatch):
    """torch.use_deterministic_algorithms(True): the gather kernel's chunks of a block add dk, dv in
    chunk order (ORDERED; blocks here span several chunks) and the key-block-centric design stores
    dq in slots instead of adding it atomically, one launch per kv head here (DQ_SLOT_BYTES made
    small); the gradients equal the default ones, and on a GPU two runs give the same bits."""
    gathers = []
    launch = selected.launch_fitting
    monkeypatch.setattr(selected, "DQ_SLOT_BYTES", 1)           # the slots of one kv head per launch
    monkeypatch.setattr(selected, "launch_fitting", lambda kernel, grid, args, meta, *a, **kw: (
        gathers.append((meta["ORDERED"], meta["ATOMIC_DQ"], meta["DQ_SLOTS"], args[21:23], args[7]))
        if kernel is selected.selected_attention_backward_dkdv_kernel else None) or launch(kernel, grid, args, meta,
                                                                                             *a, **kw))
    gen = torch.Generator(DEVICE).manual_seed(4)
    q, k, v = (torch.randn(1, 37, heads, 16, generator=gen, device=DEVICE) for heads in (Hq, H, H))
    indices = random_indices(gen, 1, 37, 37, H, 3, 16)
    runs = []
    for deterministic in (False, True, True) if DEVICE.type == "cuda" else (False, True):   # a GPU: twice
        torch.use_deterministic_algorithms(deterministic)
        try:
            inputs = [x.clone().requires_grad_() for x in (q, k, v)]
            o = selected_attention_triton(*inputs, indices, 16)
            runs.append(torch.autograd.grad(o.square().sum(), inputs))
        finally:
            torch.use_deterministic_algorithms(False)
    by_block = Hq // H == 2
    heads = [(0, 1), (1, 1)] if by_block else [(0, 1)]         # (first kv head, kv heads) of each launch
    assert [g[:4] for g in gathers] == [(False, by_block, False, (0, H))] + [
        (True, False, by_block, launch) for _ in runs[1:] for launch in heads]
    if DEVICE.type != "cuda":                         # chunks of 8 entries: a block's chunks wait on each other
        chunk_block = gathers[-1][4]                  # (B*H, U) (a GPU's chunks of 1024 hold a block whole here)
        assert ((chunk_block[:, 1:] == chunk_block[:, :-1]) & (chunk_block[:, 1:] >= 0)).any()
    for default, reproducible in zip(runs[0], runs[1]):
        torch.testing.assert_close(reproducible, default, atol=1e-5, rtol=1e-5)
    if DEVICE.type == "cuda":                          # the two reproducible runs: the same bits
        assert all(torch.equal(a, b) for a, b in zip(runs[1], runs[2]))


@pytest.mark.skipif(DEVICE.type != "cuda", reason="the order of a GPU's atomics; the interpreter runs programs in turn")
@pytest.mark.parametrize("Hq,H", [(8, 4), (32, 2)], ids=["key-block-centric", "query-centric"])
def test_reproducible_backward_repeats_bit_for_bit_where_blocks_span_chunks(Hq, H):
    """On a GPU, at 5000 tokens (every query keeps block 0, which spans five chunks of 1024 entries,
    and popular blocks span several): under torch.use_deterministic_algorithms(True) two runs of
    the backward give the same bits, close to the default's gradients."""
    gen = torch.Generator(DEVICE).manual_seed(6)
    N, n, block_size = 5000, 16, 64
    q, k, v = (torch.randn(1, N, heads, 64, generator=gen, device=DEVICE, dtype=torch.bfloat16) for heads in (Hq, H, H))
    indices = random_indices(gen, 1, N, N, H, n, block_size)
    indices[..., 0] = 0                                       # every query keeps block 0
    runs = []
    for deterministic in (False, True, True):
        torch.use_deterministic_algorithms(deterministic)
        try:
            inputs = [x.clone().requires_grad_() for x in (q, k, v)]
            o = selected_attention_triton(*inputs, indices, block_size)
            runs.append(torch.autograd.grad(o.float().square().sum(), inputs))
        finally:
            torch.use_deterministic_algorithms(False)
    for default, reproducible in zip(runs[0], runs[1]):
        torch.testing.assert_close(reproducible, default, **close(torch.bfloat16, 1e-2))
    assert all(torch.equal(a, b) for a, b in zip(runs[1], runs[2]))


def test_tiles_noncausal_fp16():
    run_case(1, 30, 45, 8, 2, 32, 16, 3, 16, causal=False, dtype=torch.float16, queries_per_tile=4,
             shared=0.5)
    run_case(1, 30, 45, 8, 2, 32, 16, 3, 16, queries_per_tile=2, shared=0.5)


def test_prepare_query_tiles_against_brute_force():
    gen = torch.Generator().manual_seed(2)
    B, Nq, H, n, Q = 2, 11, 3, 4, 4
    prepared = prepare_block_indices(torch.randint(-1, 6, (B, Nq, H, n), generator=gen).to(DEVICE), 16, 96)
    blocks, members, counts = (x.cpu() for x in prepare_query_tiles(prepared, Q))     # a kernel on DEVICE
    prepared = prepared.cpu()                                                        # read back once
    assert blocks.shape == members.shape == (B, 3, H, Q * n) and counts.shape == (B, 3, H)
    for b in range(B):
        for tile in range(3):
            for h in range(H):
                want = {}
                for j in range(Q):
                    if tile * Q + j < Nq:
                        for block in prepared[b, tile * Q + j, h].tolist():
                            if block >= 0:
                                want[block] = want.get(block, 0) | (1 << j)
                c = counts[b, tile, h].item()
                assert c == len(want)
                assert blocks[b, tile, h, :c].tolist() == sorted(want)
                assert all(x == -1 for x in blocks[b, tile, h, c:].tolist())
                assert members[b, tile, h, :c].tolist() == [want[x] for x in sorted(want)]


@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3]], ids=str)
def test_fp16(shape):
    run_case(*shape, dtype=torch.float16)


def test_custom_scale_and_noncontiguous_inputs():
    gen = torch.Generator(DEVICE).manual_seed(3)
    q = torch.randn(1, 4, 20, 16, generator=gen, device=DEVICE).transpose(1, 2)   # (1, 20, 4, 16) strided
    k, v = torch.randn(2, 1, 20, 2, 16, generator=gen, device=DEVICE)
    indices = random_indices(gen, 1, 20, 20, 2, 2, 16)
    o = selected_attention_triton(q, k, v, indices, 16, 0.3)
    o_ref, _ = reference(q.double(), k.double(), v.double(), indices, 16, 0.3, True)
    torch.testing.assert_close(o, o_ref.float(), **close(torch.float32, 2e-4))


def test_query_with_no_keys_gives_zero_and_no_nan():
    q, k, v = (torch.randn(1, 5, 2, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    indices = torch.full((1, 5, 2, 2), -1, dtype=torch.int64, device=DEVICE)
    indices[0, 3:, 0, 0] = 0
    o, lse = selected_attention_triton(q, k, v, indices, 16, return_lse=True)
    assert torch.all(o[0, :3] == 0) and torch.all(lse[0, :3] == float("-inf"))
    assert torch.all(lse[0, 3:, 0] > float("-inf"))
    o.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


def test_repeated_and_out_of_range_slots_count_once():
    gen = torch.Generator(DEVICE).manual_seed(5)
    q, k, v = (torch.randn(1, 33, 1, 16, generator=gen, device=DEVICE) for _ in range(3))
    clean = torch.zeros(1, 33, 1, 1, dtype=torch.int32, device=DEVICE)
    repeats = torch.tensor([0, 0, -1, 0], dtype=torch.int32, device=DEVICE).expand(1, 33, 1, 4)
    torch.testing.assert_close(selected_attention_triton(q, k, v, repeats, 16),
                               selected_attention_triton(q, k, v, clean, 16))
    messy = torch.tensor([0, 0, 7, -3, 0], dtype=torch.int32, device=DEVICE).expand(1, 33, 1, 5)
    with pytest.raises(ValueError, match=r"\[-1, 2\]"):
        selected_attention_triton(q, k, v, messy, 16)
    torch.testing.assert_close(selected_attention_triton(q, k, v, messy, 16, check_indices=False),
                               selected_attention_triton(q, k, v, clean, 16))


def test_prepare_block_indices():
    indices = torch.tensor([[[[2, 0, 0, -1, 9]]], [[[1, 3, 3, 2, 0]]]], dtype=torch.int64)  # (2, 1, 1, 5)
    prepared = prepare_block_indices(indices, block_size=16, seq_len_k=48, causal=True)  # t = 47: blocks 0-2
    assert prepared.dtype == torch.int32
    assert prepared[0, 0, 0].tolist() == [0, 2, -1, -1, -1]      # kept blocks first, ascending: -1s last
    assert prepared[1, 0, 0].tolist() == [0, 1, 2, -1, -1]


def test_reverse_block_index_against_brute_force():
    gen = torch.Generator().manual_seed(0)
    B, Nq, H, n, num_blocks, chunk = 2, 30, 3, 4, 5, 4
    indices = torch.randint(-1, num_blocks, (B, Nq, H, n), generator=gen, dtype=torch.int32)
    entries, (chunk_block, begin, end) = reverse_block_index(indices, num_blocks, chunk)
    for b in range(B):
        for h in range(H):
            got = {j: [] for j in range(num_blocks)}
            row = chunk_block[b * H + h]
            for u in range(row.shape[0]):
                if row[u] >= 0:
                    assert 0 < end[b * H + h, u] - begin[b * H + h, u] <= chunk
                    got[row[u].item()] += entries[begin[b * H + h, u]:end[b * H + h, u]].tolist()
            for j in range(num_blocks):     # entries i * n + slot, in (query, slot) order
                want = [i * n + s for i in range(Nq) for s in range(n) if indices[b, i, h, s] == j]
                assert got[j] == want, (b, h, j)


@pytest.mark.parametrize("bad, error, words", [
    (dict(block_size=24), ValueError, "power of two"),
    (dict(block_size=8), ValueError, "power of two"),
    (dict(block_size=0), ValueError, "block_size"),
    (dict(indices=torch.zeros(1, 5, 1, 2)), TypeError, "integer"),
    (dict(indices=torch.zeros(1, 4, 1, 2, dtype=torch.int32)), ValueError, "shape"),
    (dict(indices=torch.zeros(1, 5, 1, 0, dtype=torch.int32)), ValueError, "n = 0"),
    (dict(dtype=torch.float64), TypeError, "float16"),
    (dict(heads_q=129), ValueError, "group size"),
    (dict(dim=320), ValueError, "256"),
    (dict(causal=1), TypeError, "causal"),
    (dict(queries_per_tile=3), ValueError, "queries_per_tile"),
    (dict(queries_per_tile=32), ValueError, "queries_per_tile"),
    (dict(queries_per_tile=True), ValueError, "queries_per_tile"),
], ids=lambda x: str(x)[:40] if isinstance(x, dict) else None)
def test_errors_before_launch(bad, error, words):
    dtype, heads_q, dim = bad.get("dtype", torch.float32), bad.get("heads_q", 2), bad.get("dim", 16)
    q = torch.randn(1, 5, heads_q, dim, dtype=dtype, device=DEVICE)
    k, v = (torch.randn(1, 5, 1, dim, dtype=dtype, device=DEVICE) for _ in range(2))
    indices = bad.get("indices", torch.zeros(1, 5, 1, 2, dtype=torch.int32)).to(DEVICE)
    with pytest.raises(error, match=words):
        selected_attention_triton(q, k, v, indices, bad.get("block_size", 16),
                                  causal=bad.get("causal", True), queries_per_tile=bad.get("queries_per_tile"))


@pytest.mark.skipif(DEVICE.type != "cpu", reason="bf16 is refused only in the interpreter")
def test_bf16_refused_in_interpreter():
    q, k, v = (torch.randn(1, 5, 1, 16, dtype=torch.bfloat16) for _ in range(3))
    with pytest.raises(TypeError, match="bfloat16"):
        selected_attention_triton(q, k, v, torch.zeros(1, 5, 1, 1, dtype=torch.int32), 16)


def test_matches_torch_reference_branch():
    gen = torch.Generator(DEVICE).manual_seed(11)
    q = torch.randn(1, 37, 4, 16, generator=gen, device=DEVICE)
    k, v = (torch.randn(1, 37, 2, 16, generator=gen, device=DEVICE) for _ in range(2))
    indices = random_indices(gen, 1, 37, 37, 2, 3, 16)
    for causal in (True, False):
        want = nsa.selected_attention(q.double(), k.double(), v.double(), indices, 16, causal=causal)
        got = selected_attention_triton(q, k, v, indices, 16, causal=causal)
        torch.testing.assert_close(got, want.float(), **close(torch.float32, 2e-4))
