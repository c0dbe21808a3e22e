"""Chapter 5, packed sequences: cu_seqlens through compress, the window, native_sparse_attention
and SparseAttention, and a key padding mask run as packed sequences.

Packed must equal each sequence alone (outputs and gradients), on the torch backend in float64
and on the Triton kernels under the interpreter in float32."""

import itertools

import pytest
import torch

from nsa import NSAConfig, SparseAttention, compress, native_sparse_attention, sliding_window_attention
from nsa.compression import CompressionMLP
from nsa.device import DEVICE
from nsa.varlen import compressed_cu_seqlens, pack, token_packing, unpack
from tolerance import close

CONFIG = NSAConfig(8, 4, 16, 3, 1, 1, 24)          # l = 8, d = 4, l' = 16, n = 3, w = 24


def cumulative(lengths, device="cpu"):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)


def bounds(cu):
    return list(zip(cu[:-1].tolist(), cu[1:].tolist()))


def packed_problem(lengths, Hq, H, Dqk, Dv, mem, dtype, seed=0, query_lengths=None, device="cpu"):
    """Packed q, k, v, compressed k/v (each sequence's memory rows, then its mean-pooled blocks),
    gates; query_lengths: each sequence's last queries only (a chunk of a prefill). Made on the
    CPU (the same numbers everywhere), then moved to `device`, cu_seqlens too."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)
    cu_k = cumulative(lengths)
    total = int(cu_k[-1])
    k, v = r(1, total, H, Dqk), r(1, total, H, Dv)
    k_cmp = torch.cat([torch.cat([r(1, mem, H, Dqk), compress(k[:, s:e], None, 8, 4)], 1) for s, e in bounds(cu_k)], 1)
    v_cmp = torch.cat([torch.cat([r(1, mem, H, Dv), compress(v[:, s:e], None, 8, 4)], 1) for s, e in bounds(cu_k)], 1)
    query_lengths = lengths if query_lengths is None else query_lengths
    cu_q = cumulative(query_lengths)
    q = r(1, int(cu_q[-1]), Hq, Dqk)
    gates = [torch.rand(1, int(cu_q[-1]), Hq, generator=g, dtype=torch.float64).to(dtype) for _ in range(3)]
    return [x.to(device) for x in (q, k, v, k_cmp, v_cmp, *gates)], cu_q.to(device), cu_k.to(device)


PACKINGS = [  # lengths, query lengths (None = all), Hq, H, Dqk, Dv, mem
    ([1, 17, 5, 100, 70], None, 4, 2, 16, 8, 2),    # 1 token, < l, no multiple of l'
    ([64, 33], None, 2, 2, 8, 8, 0),
    ([0, 40, 0, 9], None, 4, 1, 8, 16, 1),          # empty sequences
    ([50, 3, 77], [7, 3, 1], 4, 2, 16, 8, 0),       # chunked prefill: the last queries of each
]


@pytest.mark.parametrize("case", PACKINGS, ids=["mixed", "two", "empty-sequences", "chunked"])
def test_packed_equals_each_sequence_alone_torch_float64(case):
    lengths, query_lengths, Hq, H, Dqk, Dv, mem = case
    inputs, cu_q, cu_k = packed_problem(lengths, Hq, H, Dqk, Dv, mem, torch.float64, query_lengths=query_lengths)
    inputs = [x.requires_grad_() for x in inputs]
    packed_args = dict(cu_seqlens=cu_k) if query_lengths is None else dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    out = native_sparse_attention(*inputs, CONFIG, mem_kv_len=mem, backend="torch", **packed_args)
    grads = torch.autograd.grad(out.square().sum(), inputs)
    cu_cmp = compressed_cu_seqlens(cu_k, 8, 4, mem)
    for (q0, q1), (k0, k1), (c0, c1) in zip(bounds(cu_q), bounds(cu_k), bounds(cu_cmp)):
        q, k, v, k_cmp, v_cmp, *gates = inputs
        alone = [q[:, q0:q1], k[:, k0:k1], v[:, k0:k1], k_cmp[:, c0:c1], v_cmp[:, c0:c1],
                 *(g[:, q0:q1] for g in gates)]
        o = native_sparse_attention(*alone, CONFIG, mem_kv_len=mem, backend="torch")
        torch.testing.assert_close(out[:, q0:q1], o, rtol=1e-12, atol=1e-12)
        if o.numel():
            expected = torch.autograd.grad(o.square().sum(), alone, allow_unused=True)
            at = [slice(q0, q1), slice(k0, k1), slice(k0, k1), slice(c0, c1), slice(c0, c1)] + [slice(q0, q1)] * 3
            for grad, want, where in zip(grads, expected, at):
                want = torch.zeros_like(grad[:, where]) if want is None else want
                torch.testing.assert_close(grad[:, where], want, rtol=1e-12, atol=1e-12)


TRITON_PACKINGS = [  # lengths, query lengths, Hq, H, mem, causal: groups 1, 2, 3, 4, 16
    ([1, 17, 5, 70], None, 4, 2, 1, True),
    ([40, 3, 33], None, 2, 2, 0, True),
    ([0, 70, 0, 9], None, 3, 1, 2, True),              # empty sequences
    ([50, 3, 77], [7, 3, 20], 4, 1, 0, True),          # chunked prefill
    ([20, 90], [20, 13], 16, 1, 1, True),
    ([30, 61], None, 4, 4, 1, False),
    ([30, 45], None, 4, 4, 1, False),                 # no sequence over n = 3 blocks: each block taken
    ([1, 17, 24, 5], None, 4, 2, 1, True),             # none longer than the window either: one band
]


@pytest.mark.parametrize("case", TRITON_PACKINGS, ids=["g2", "g1-every-block", "g3-empty", "g4-chunked", "g16",
                                                       "noncausal", "noncausal-every-block", "window-is-selected"])
def test_packed_on_the_triton_kernels_equals_the_reference(case, monkeypatch):
    """One launch of each kernel for all the sequences (chapter 10), equal to the float64
    reference of each sequence, outputs and gradients; where no sequence holds more than n blocks,
    the selected branch is a third band launch (every block taken, no selection), and where none
    is longer than the window either, the window is that band, not launched again."""
    import nsa.kernels.nsa as triton_nsa
    lengths, query_lengths, Hq, H, mem, causal = case
    config = NSAConfig(8, 4, 16, 3, 1, 1, 24, causal=causal)
    inputs, cu_q, cu_k = packed_problem(lengths, Hq, H, 16, 16, mem, torch.float32, seed=3,
                                        query_lengths=query_lengths, device=DEVICE)
    packed_args = dict(cu_seqlens=cu_k) if query_lengths is None else dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    band_launches = []
    launch = triton_nsa.band_attention_forward
    monkeypatch.setattr(triton_nsa, "band_attention_forward", lambda *a: band_launches.append(1) or launch(*a))
    inputs = [x.requires_grad_() for x in inputs]
    out = native_sparse_attention(*inputs, config, mem_kv_len=mem, backend="triton", **packed_args)
    every_block = max(lengths) <= config.num_selected_blocks * config.select_block_size
    window = not (every_block and max(lengths) <= config.window_size)
    assert len(band_launches) == 1 + every_block + window   # the compressed branch, the window: once each
    grads = torch.autograd.grad(out.square().sum(), inputs)
    ref_inputs = [x.detach().double().requires_grad_() for x in inputs]
    ref = native_sparse_attention(*ref_inputs, config, mem_kv_len=mem, backend="torch", **packed_args)
    ref_grads = torch.autograd.grad(ref.square().sum(), ref_inputs)
    torch.testing.assert_close(out.double(), ref, **close(torch.float32, 1e-4))
    for grad, want in zip(grads, ref_grads):   # of out.square().sum(): O(10), the output's error scaled up
        torch.testing.assert_close(grad.double(), want, **close(torch.float32, 1e-3, gpu=3e-2))


@pytest.mark.parametrize("mlp", [False, True], ids=["mean", "mlp"])
def test_compress_and_window_take_packed_sequences(mlp):
    torch.manual_seed(4)
    lengths = [3, 8, 29, 0, 16]
    cu = cumulative(lengths)
    x = torch.randn(1, int(cu[-1]), 2, 8, dtype=torch.float64, requires_grad=True)
    phi = CompressionMLP(8, 8).double() if mlp else None
    packed = compress(x, phi, 8, 4, cu_seqlens=cu)
    alone = [compress(x[:, s:e], phi, 8, 4) for s, e in bounds(cu)]
    torch.testing.assert_close(packed, torch.cat(alone, 1))
    assert compressed_cu_seqlens(cu, 8, 4).tolist() == [0, 0, 1, 7, 7, 10]
    assert compressed_cu_seqlens(cu, 8, 4, mem_kv_len=2).tolist() == [0, 2, 5, 13, 15, 20]
    (grad,) = torch.autograd.grad(packed.square().sum(), x)
    (want,) = torch.autograd.grad(torch.cat(alone, 1).square().sum(), x)
    torch.testing.assert_close(grad, want)
    q = torch.randn(1, int(cu[-1]), 4, 8, dtype=torch.float64)
    window = sliding_window_attention(q, x, x, 5, cu_seqlens=cu)
    torch.testing.assert_close(window, torch.cat([sliding_window_attention(q[:, s:e], x[:, s:e], x[:, s:e], 5)
                                                  for s, e in bounds(cu)], 1))


LAYERS = [dict(), dict(num_mem_kv=2, kv_per_branch=True), dict(compress_mlp=False, dim_head_v=4)]
GEOMETRY = dict(compress_block_size=8, compress_stride=4, select_block_size=16, num_selected_blocks=3,
                window_size=24, backend="torch")


@pytest.mark.parametrize("options", LAYERS, ids=["plain", "memory-kv-per-branch", "mean-dv"])
def test_layer_packed_and_padded_equal_each_row_alone(options):
    torch.manual_seed(5)
    layer = SparseAttention(32, heads=4, kv_heads=2, **GEOMETRY, **options).double()
    lengths = [1, 17, 40, 6]
    cu = cumulative(lengths)
    x = torch.randn(1, int(cu[-1]), 32, dtype=torch.float64, requires_grad=True)
    out = layer(x, cu_seqlens=cu)
    alone = torch.cat([layer(x[:, s:e]) for s, e in bounds(cu)], 1)
    torch.testing.assert_close(out, alone)
    params = [x, *layer.parameters()]
    for grad, want in zip(torch.autograd.grad(out.square().sum(), params),
                          torch.autograd.grad(alone.square().sum(), params)):
        torch.testing.assert_close(grad, want)
    # a padded batch: right padding, left padding and a hole; padded queries give 0
    rows = torch.randn(3, 40, 32, dtype=torch.float64)
    keep = torch.ones(3, 40, dtype=torch.bool)
    keep[0, 25:], keep[1, :9], keep[2, 10:14] = False, False, False
    with torch.no_grad():
        padded = layer(rows, mask=keep)
        for b in range(3):
            torch.testing.assert_close(padded[b][keep[b]], layer(rows[b:b + 1, keep[b]])[0])
            assert torch.all(padded[b][~keep[b]] == 0)
        # a mask that keeps everything is the layer without one (one batched call)
        torch.testing.assert_close(layer(rows, mask=torch.ones(3, 40, dtype=torch.bool)), layer(rows))
        # fewer queries than keys (the last 12), and keys from another input
        memory = torch.randn(3, 40, 32, dtype=torch.float64)
        some = layer(rows[:, -12:], memory, mask=keep)
        for b in range(3):
            kept_q = keep[b, -12:]
            want = layer(rows[b:b + 1, -12:][:, kept_q], memory[b:b + 1, keep[b]])[0]
            torch.testing.assert_close(some[b][kept_q], want)


def test_pack_and_unpack_are_inverse():
    x = torch.randn(3, 7, 5)
    keep = torch.rand(3, 7) > 0.4
    keep[1] = False                                     # a row without tokens: an empty sequence
    packing = token_packing(keep, x.device)
    packed = pack(x, packing)
    assert packed.shape == (1, int(keep.sum()), 5) and packing.cu_seqlens.dtype == torch.int32
    offsets = [0, *itertools.accumulate(keep.sum(1).tolist())]
    assert packing.cu_seqlens.tolist() == offsets and packing.bounds == list(zip(offsets[:-1], offsets[1:]))
    torch.testing.assert_close(packed[0], x[keep])
    torch.testing.assert_close(unpack(packed, packing), x * keep[..., None])


def _bad_calls():
    inputs, _, cu = packed_problem([10, 20], 2, 1, 8, 8, 0, torch.float32)
    call = lambda **kw: native_sparse_attention(*inputs, CONFIG, **kw)
    layer = SparseAttention(16, 2, **GEOMETRY)
    x = torch.randn(1, 30, 16)
    return [
        ("int64", lambda: call(cu_seqlens=cu.long()), TypeError, "int32"),
        ("not from 0", lambda: call(cu_seqlens=cu + 1), ValueError, "start at 0"),
        ("decreasing", lambda: call(cu_seqlens=torch.tensor([0, 20, 10, 30], dtype=torch.int32)), ValueError,
         "non-decreasing"),
        ("total", lambda: call(cu_seqlens=cu[:-1]), ValueError, "hold 30 tokens"),
        ("2-d", lambda: call(cu_seqlens=cu[None]), ValueError, "num_seqs"),
        ("strided", lambda: call(cu_seqlens=torch.stack([cu, cu], 1)[:, 0]), ValueError, "contiguous"),
        ("device", lambda: call(cu_seqlens=cu.to("meta")), ValueError, "meta"),
        ("both", lambda: call(cu_seqlens=cu, cu_seqlens_q=cu), ValueError, "not both"),
        ("q without k", lambda: call(cu_seqlens_q=cu), ValueError, "together"),
        ("more queries", lambda: call(cu_seqlens_q=torch.tensor([0, 12, 30], dtype=torch.int32),
                                      cu_seqlens_k=cu), ValueError, "sequence 0 has 12 queries"),
        ("count", lambda: call(cu_seqlens_q=torch.tensor([0, 30], dtype=torch.int32), cu_seqlens_k=cu),
         ValueError, "1 sequences"),
        ("batch", lambda: native_sparse_attention(*(torch.cat([t, t]) for t in inputs), CONFIG, cu_seqlens=cu),
         ValueError, r"\(1, total"),
        ("layer k", lambda: layer(x, x, cu_seqlens=torch.tensor([0, 30], dtype=torch.int32)), ValueError,
         "self-attention"),
        ("layer cu", lambda: layer(x, cu_seqlens=torch.tensor([0, 31], dtype=torch.int32)), ValueError,
         "hold 30 tokens"),
        ("layer mask", lambda: SparseAttention(16, 2, mask=torch.ones(1, 30, dtype=torch.bool), **GEOMETRY)(
            x, cu_seqlens=torch.tensor([0, 30], dtype=torch.int32)), ValueError, "self.mask"),
        ("config", lambda: native_sparse_attention(*inputs, None, cu_seqlens=cu), TypeError, "NSAConfig"),
        ("stride 0", lambda: compressed_cu_seqlens(cu, 16, 0), ValueError, "stride"),
        ("stride > block", lambda: compressed_cu_seqlens(cu, 8, 16), ValueError, "stride"),
        ("block float", lambda: compressed_cu_seqlens(cu, 16.0, 8), TypeError, "block_size"),
        ("meta", lambda: compressed_cu_seqlens(cu.to("meta"), 16, 8), ValueError, "meta device"),
    ]


@pytest.mark.parametrize("index", range(20))
def test_bad_cu_seqlens_name_the_argument(index):
    name, call, error, words = _bad_calls()[index]
    with pytest.raises(error, match=words):
        call()


def test_a_padding_mask_of_another_rank_or_dtype_is_refused():
    layer = SparseAttention(32, heads=4, kv_heads=2, backend="torch")
    x = torch.randn(2, 40, 32)
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \(batch, seq_len_k\).*"
                                         r"got shape \(2, 1, 40\)"):
        layer(x, mask=torch.ones(2, 1, 40, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        layer(x, mask=torch.ones(2, 40))


def test_a_packed_problem_refused_names_the_first_sequence_it_checked():
    """The packed call checks the first sequence's slices (the others differ only in length): the
    message says so, beside the slice's shapes."""
    inputs, _, cu_k = packed_problem([5, 9, 20], 2, 1, 8, 8, 0, torch.float64)
    inputs[5] = inputs[5][..., :1]                                # g_cmp with one head of two
    with pytest.raises(ValueError, match=r"g_cmp has shape \(1, 5, 1\).*\(checked on the first packed sequence, "
                                         r"queries 0\.\.4: the shapes are its slices of the packed tensors\)"):
        native_sparse_attention(*inputs, CONFIG, backend="torch", cu_seqlens=cu_k)


@pytest.mark.parametrize("index, name", [(2, "v"), (3, "k_cmp"), (4, "v_cmp"), (6, "g_slc")])
def test_packed_tensors_of_other_lengths_are_rejected(index, name):
    inputs, _, cu_k = packed_problem([5, 9, 20], 2, 1, 8, 8, 0, torch.float64)
    inputs[index] = inputs[index][:, :-1]                        # one token (row) short
    with pytest.raises(ValueError, match=name):
        native_sparse_attention(*inputs, CONFIG, backend="torch", cu_seqlens=cu_k)


def test_layer_with_a_padding_mask_on_the_triton_kernels_equals_each_row_alone():
    """A key padding mask runs as packed sequences: on the Triton backend, one launch per kernel
    for all rows (chapter 10), equal to each row's unpadded tokens alone."""
    torch.manual_seed(6)
    layer = SparseAttention(32, heads=4, kv_heads=2, **{**GEOMETRY, "backend": "triton"}, num_mem_kv=1).to(DEVICE)
    rows = torch.randn(3, 40, 32).to(DEVICE)
    keep = torch.ones(3, 40, dtype=torch.bool, device=DEVICE)
    keep[0, 25:], keep[1, :9], keep[2, 10:14] = False, False, False
    with torch.no_grad():
        padded = layer(rows, mask=keep)
        for b in range(3):
            torch.testing.assert_close(padded[b][keep[b]], layer(rows[b:b + 1, keep[b]])[0],
                                       **close(torch.float32, 1e-5, 1e-4))
            assert torch.all(padded[b][~keep[b]] == 0)


@pytest.mark.parametrize("packed", [False, True], ids=["batched", "packed"])
def test_layer_kv_per_branch_window_on_the_triton_kernels_equals_torch(packed):
    """A layer with kv_per_branch runs its own window through the backend's window (chapter 10's
    band kernel, a custom op): the same outputs and gradients as the reference layer, batched and
    packed (one launch for all sequences)."""
    torch.manual_seed(7)
    layers = {backend: SparseAttention(32, heads=4, kv_heads=2, **{**GEOMETRY, "backend": backend},
                                       kv_per_branch=True, num_mem_kv=1).to(DEVICE) for backend in ("torch", "triton")}
    layers["triton"].load_state_dict(layers["torch"].state_dict())
    lengths = [5, 17, 40]
    x = (torch.randn(1, sum(lengths), 32) if packed else torch.randn(2, 37, 32)).to(DEVICE)
    call = dict(cu_seqlens=cumulative(lengths, DEVICE)) if packed else {}
    results = {}
    for backend, layer in layers.items():
        xi = x.clone().requires_grad_()
        out = layer(xi, **call)
        grads = torch.autograd.grad(out.square().sum(), (xi, *layer.parameters()))
        results[backend] = (out, *grads)
    for name, a, b in zip(["out", "dx", *(n for n, _ in layers["torch"].named_parameters())], *results.values()):
        torch.testing.assert_close(b, a, **close(torch.float32, 2e-5, 2e-4), msg=lambda m: f"{name}: {m}")


def test_packed_call_reads_cu_seqlens_back_once(monkeypatch):
    """cu_seqlens is read back to the host once per call (once per tensor with cu_seqlens_q and
    cu_seqlens_k): each read waits for the GPU."""
    import nsa.varlen
    reads = []
    check = nsa.varlen.check_cu_seqlens
    monkeypatch.setattr(nsa.varlen, "check_cu_seqlens", lambda *a, **kw: reads.append(1) or check(*a, **kw))
    inputs, cu_q, cu_k = packed_problem([5, 9, 20], 2, 1, 8, 8, 1, torch.float64)
    native_sparse_attention(*inputs, CONFIG, mem_kv_len=1, backend="torch", cu_seqlens=cu_k)
    assert len(reads) == 1
    inputs, cu_q, cu_k = packed_problem([5, 9, 20], 2, 1, 8, 8, 0, torch.float64, query_lengths=[2, 9, 1])
    native_sparse_attention(*inputs, CONFIG, backend="torch", cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    assert len(reads) == 3


@pytest.mark.parametrize("num_mem_kv, kv_per_branch", [(0, False), (2, False), (1, True)])
def test_layer_reads_cu_seqlens_back_once_and_a_mask_never(monkeypatch, num_mem_kv, kv_per_branch):
    """The layer reads cu_seqlens back once per call, for the compression and the operator alike;
    with a key padding mask it reads the mask once and builds the packing on the host (no
    cu_seqlens read at all). Same outputs as each sequence alone."""
    import nsa.varlen
    reads = []
    check = nsa.varlen.check_cu_seqlens
    monkeypatch.setattr(nsa.varlen, "check_cu_seqlens", lambda *a, **kw: reads.append(1) or check(*a, **kw))
    torch.manual_seed(0)
    layer = SparseAttention(32, heads=4, kv_heads=2, compress_block_size=CONFIG.compress_block_size,
                            compress_stride=CONFIG.compress_stride, select_block_size=CONFIG.select_block_size,
                            num_selected_blocks=CONFIG.num_selected_blocks, window_size=CONFIG.window_size,
                            num_mem_kv=num_mem_kv, kv_per_branch=kv_per_branch, backend="torch").double()
    lengths = [5, 17, 40]
    x = torch.randn(1, sum(lengths), 32, dtype=torch.float64)
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    out = layer(x, cu_seqlens=cu)
    assert len(reads) == 1
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        torch.testing.assert_close(out[:, s:e], layer(x[:, s:e]))
    padded = torch.zeros(3, 40, 32, dtype=torch.float64)
    keep = torch.zeros(3, 40, dtype=torch.bool)
    for b, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        padded[b, :e - s], keep[b, :e - s] = x[0, s:e], True
    reads.clear()
    out = layer(padded, mask=keep)
    assert not reads
    for b, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        torch.testing.assert_close(out[b, :e - s], layer(x[:, s:e])[0])
