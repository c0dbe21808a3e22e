"""backend="triton" (kernels/nsa.py, chapter 10) against backend="torch" (chapter 5).

The whole of NSA, forward and the gradients of all eight inputs, in Triton's interpreter on a CPU
(float32 and float16) at small odd shapes; plus the limits and backend="auto"."""

import pytest
import torch

import nsa  # noqa: F401  (switches on the interpreter without CUDA, before triton is imported)
from nsa.compression import num_compressed_blocks
from nsa.config import NSAConfig
from nsa.device import DEVICE
from nsa.kernels import selected
from nsa.kernels.band import compressed_attention_triton, sliding_window_attention_triton
from nsa.kernels.selected import selected_attention_triton
from nsa.sparse_attention import native_sparse_attention
from tolerance import TOL, close

SMALL = NSAConfig(16, 8, 16, 4, 1, 2, 32)


def make_inputs(B, Nq, Nk, Hq, H, Dqk, Dv, config, mem, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g).to(DEVICE, dtype)
    rows = mem + num_compressed_blocks(Nk, config.compress_block_size, config.compress_stride)
    gates = [torch.rand(B, Nq, Hq, generator=g).to(DEVICE, dtype) for _ in range(3)]
    return [r(B, Nq, Hq, Dqk), r(B, Nk, H, Dqk), r(B, Nk, H, Dv), r(B, rows, H, Dqk), r(B, rows, H, Dv), *gates]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,Nq,Nk,Hq,H,Dqk,Dv,config,mem", [   # each with more than n blocks to choose from
    (1, 37, 37, 2, 1, 16, 16, NSAConfig(16, 8, 16, 2, 1, 0, 32), 0),        # odd length, group 2 (per key block)
    (1, 29, 29, 3, 3, 16, 16, NSAConfig(16, 8, 16, 1, 0, 0, 32), 1),        # group 1 (per key block), memory
    (2, 20, 75, 8, 2, 32, 16, NSAConfig(16, 8, 32, 2, 0, 1, 24), 2),         # batch, Nq < Nk, memory
    (1, 24, 50, 6, 2, 16, 16, NSAConfig(16, 8, 16, 3, 1, 1, 16, causal=False), 1),  # group 3, non-causal
    (1, 40, 101, 16, 1, 16, 16, SMALL, 0),      # group 16 (one query per program), 7 blocks to choose from
    (1, 33, 70, 48, 2, 16, 16, SMALL, 1),       # group 24 (padded to 32), Nq < Nk, memory
])
def test_triton_backend_matches_torch_backend(dtype, B, Nq, Nk, Hq, H, Dqk, Dv, config, mem):
    inputs = [x.requires_grad_() for x in make_inputs(B, Nq, Nk, Hq, H, Dqk, Dv, config, mem, dtype, seed=Nk)]
    o = native_sparse_attention(*inputs, config, backend="triton", mem_kv_len=mem)
    assert o.dtype == dtype and o.shape == (B, Nq, Hq, Dv)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, inputs, do)
    ref = [x.detach().float().requires_grad_() for x in inputs]
    o_ref = native_sparse_attention(*ref, config, backend="torch", mem_kv_len=mem)
    grads_ref = torch.autograd.grad(o_ref, ref, do.float())
    torch.testing.assert_close(o.float(), o_ref, **TOL[dtype])
    for grad, grad_ref in zip(grads, grads_ref):
        assert torch.isfinite(grad).all()
        torch.testing.assert_close(grad.float(), grad_ref, **TOL[dtype])


@pytest.mark.parametrize("N, Hq, H, causal", [(1, 2, 1, True), (17, 4, 2, True), (32, 4, 2, True),
                                             (20, 2, 1, False), (33, 4, 2, True), (64, 16, 1, True),
                                             (63, 3, 3, False), (65, 4, 2, True)])
def test_sequences_of_at_most_n_blocks_take_every_block_without_a_selection(monkeypatch, N, Hq, H, causal):
    """Where no sequence holds more than n blocks (n l' = 64 keys here), top-n would take every
    block a query sees: the selected branch runs as a band of n l' keys, with no selection, and
    equals the torch backend's selection and gather, outputs and gradients; from n l' + 1 keys on,
    the selection runs. Where no sequence is longer than the window (32) either, the window is
    that band: no window band runs, forward or backward, and the gates' gradients still match."""
    import nsa.kernels.nsa as triton_nsa

    config = NSAConfig(16, 8, 16, 4, 1, 2, 32, causal=causal)
    selections, windows = [], []
    launch, window = triton_nsa.select_blocks_launch, triton_nsa.window_band
    monkeypatch.setattr(triton_nsa, "select_blocks_launch", lambda *a: selections.append(1) or launch(*a))
    monkeypatch.setattr(triton_nsa, "window_band", lambda *a: windows.append(1) or window(*a))
    inputs = [x.requires_grad_() for x in make_inputs(1, N, N, Hq, H, 16, 16, config, 1, torch.float32, seed=N)]
    o = native_sparse_attention(*inputs, config, backend="triton", mem_kv_len=1)
    assert len(selections) == (N > 64)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, inputs, do)
    assert len(windows) == (0 if N <= 32 else 2)                  # the window's forward and backward
    ref = [x.detach().requires_grad_() for x in inputs]
    o_ref = native_sparse_attention(*ref, config, backend="torch", mem_kv_len=1)
    torch.testing.assert_close(o, o_ref, **TOL[torch.float32])
    for grad, grad_ref in zip(grads, torch.autograd.grad(o_ref, ref, do)):
        torch.testing.assert_close(grad, grad_ref, **TOL[torch.float32])


def test_short_sequences_have_no_nan():
    # N = 1 and N < l: no compressed block at all, only memory or nothing
    for Nk, mem in ((1, 0), (5, 1), (12, 0)):
        inputs = [x.requires_grad_() for x in make_inputs(1, Nk, Nk, 2, 1, 16, 16, SMALL, mem, torch.float32)]
        o = native_sparse_attention(*inputs, SMALL, backend="triton", mem_kv_len=mem)
        grads = torch.autograd.grad(o.sum(), inputs, allow_unused=True)
        assert torch.isfinite(o).all() and all(torch.isfinite(g).all() for g in grads if g is not None)
        o_ref = native_sparse_attention(*[x.detach() for x in inputs], SMALL, backend="torch", mem_kv_len=mem)
        torch.testing.assert_close(o.detach(), o_ref, **TOL[torch.float32])


def test_unsupported_inputs_raise_value_error_and_auto_falls_back():
    inputs = make_inputs(1, 20, 20, 2, 1, 16, 16, SMALL, 0, torch.float32)
    with pytest.raises(ValueError, match="triton: q.dtype is torch.float64"):
        native_sparse_attention(*[x.double() for x in inputs], SMALL, backend="triton")
    with pytest.raises(ValueError, match="triton: .*power of two"):
        native_sparse_attention(*inputs, NSAConfig(16, 8, 24, 4, 1, 2, 32), backend="triton")
    o = native_sparse_attention(*[x.double() for x in inputs], SMALL, backend="auto")
    assert o.dtype == torch.float64
    o_auto = native_sparse_attention(*inputs, SMALL, backend="auto")
    o_triton = native_sparse_attention(*inputs, SMALL, backend="triton")
    torch.testing.assert_close(o_auto, o_triton, **TOL[torch.float32])


def test_a_layer_the_kernels_cannot_run_is_refused_when_built():
    """Geometry, head dims and group size are known at construction: backend="triton" refuses
    there what the kernels cannot take; "auto" and "torch" build (auto falls back per call)."""
    geometry = dict(compress_block_size=24, compress_stride=8, select_block_size=48)
    for kwargs, words in [(geometry, "compress_block_size = 24; the Triton kernels need a power of two"),
                          (dict(heads=258, kv_heads=2, dim_head=8), "group size Hq // H = 129"),
                          (dict(dim_head=320), "head dim Dqk = 320")]:
        with pytest.raises(ValueError, match=f"backend='triton' cannot run this layer: .*{words}"):
            nsa.SparseAttention(68, **{"heads": 4, **kwargs}, backend="triton")
        for backend in ("auto", "torch"):
            nsa.SparseAttention(68, **{"heads": 4, **kwargs}, backend=backend)
    nsa.SparseAttention(64, heads=128, kv_heads=1, dim_head=256, backend="triton")  # at the limits


@pytest.mark.parametrize("branch", ["window", "compressed", "selected"])
def test_gated_backward_equals_backward_of_scaled_do(branch):
    """Chapter 8's GATED / ADD_TO_DQ switches: a branch's backward fed the op's dO and its gate
    adds into dq exactly what the plain backward of g * dO gives, and writes the gate's gradient
    rowsum(dO * o)."""
    from nsa.kernels.band import band_attention_backward, band_attention_forward, compressed_band, window_band
    from nsa.kernels.selected import prepare_block_indices, query_tiles, selected_attention_bwd, selected_attention_fwd

    g = torch.Generator().manual_seed(3)
    B, N, Hq, H, D = 1, 75, 4, 2, 16
    r = lambda *shape: torch.randn(*shape, generator=g).to(DEVICE)
    q, k, v, do = r(B, N, Hq, D), r(B, N, H, D), r(B, N, H, D), r(B, N, Hq, D)
    gate = torch.rand(B, N, Hq, generator=g).to(DEVICE)
    scale = D ** -0.5
    if branch == "selected":
        blocks = prepare_block_indices(torch.randint(-1, 5, (B, N, H, 3), generator=g).to(DEVICE), 16, N)
        Q, tiles = query_tiles(blocks, Hq // H)
        o, lse = selected_attention_fwd(q, k, v, blocks, 16, scale, True, Q, tiles)
        backward = lambda *a, **kw: selected_attention_bwd(a[0], q, k, v, o, lse, blocks, 16, scale, True, Q,
                                                           tiles, **kw)
    else:
        if branch == "compressed":
            k, v = k[:, :8].contiguous(), v[:, :8].contiguous()        # 8 compressed rows
        band = window_band(20, True) if branch == "window" else compressed_band(8, 16, 8, 0, True)
        o, lse = band_attention_forward(q, k, v, scale, N, band)
        backward = lambda *a, **kw: band_attention_backward(a[0], q, k, v, o, lse, scale, N, band, **kw)
    plain = backward((do * gate[..., None]).contiguous())
    dq_before, d_gate = r(B, N, Hq, D), torch.full_like(gate, float("nan"))
    gated = backward(do, gate=gate, d_gate=d_gate, dq=dq_before.clone())
    tol = close(torch.float32, 1e-4)       # on a GPU: two TF32 computations (gate in the kernel, or in dO)
    torch.testing.assert_close(d_gate, (do * o).sum(-1), **tol)
    torch.testing.assert_close(gated[0], dq_before + plain[0], **tol)
    for x, y in zip(gated[1:], plain[1:]):
        torch.testing.assert_close(x, y, **tol)


WINDOW_OF = {"torch": ("nsa.sparse_attention", "sliding_window_attention"),
             "triton": ("nsa.kernels.nsa", "window_band"), "flex": ("nsa.flex", "create_sliding_mask")}


@pytest.mark.parametrize("packed", [False, True], ids=["batched", "packed"])
@pytest.mark.parametrize("backend", ["torch", "triton", "flex"])
def test_window_left_out_equals_a_window_gated_by_zero(monkeypatch, backend, packed):
    """g_win=None leaves the sliding window out (what a layer with kv_per_branch passes: its window
    attends keys of its own): the output and the other seven inputs' gradients equal those with a
    gate of 0, and the window is not computed at all. Flex on a CPU: forward only."""
    import importlib

    B, N, cu = (1, 45, torch.tensor([0, 17, 45], dtype=torch.int32, device=DEVICE)) if packed else (2, 37, None)
    inputs = make_inputs(B, N, N, 4, 2, 16, 16, SMALL, 0, torch.float32, seed=5)
    if packed:                                  # each sequence's compressed blocks (no memory rows)
        from nsa.varlen import compressed_cu_seqlens
        rows = int(compressed_cu_seqlens(cu, 16, 8, 0)[-1])
        inputs[3], inputs[4] = inputs[3][:, :rows], inputs[4][:, :rows]
    grad = backend != "flex" or DEVICE.type == "cuda"
    inputs = [x.requires_grad_(grad) for x in inputs]
    with_zero = native_sparse_attention(*inputs[:7], torch.zeros_like(inputs[7]), SMALL, backend=backend,
                                        cu_seqlens=cu)
    do = torch.randn_like(with_zero)
    expected_grads = torch.autograd.grad(with_zero, inputs[:7], do) if grad else ()
    module, name = WINDOW_OF[backend]

    def no_window(*args, **kwargs):
        raise AssertionError("the window was computed")
    monkeypatch.setattr(importlib.import_module(module), name, no_window)
    without = native_sparse_attention(*inputs[:7], None, SMALL, backend=backend, cu_seqlens=cu)
    torch.testing.assert_close(without, with_zero, **TOL[torch.float32])
    if grad:
        for got, expected in zip(torch.autograd.grad(without, inputs[:7], do), expected_grads):
            torch.testing.assert_close(got, expected, **TOL[torch.float32])


def test_operator_backward_with_a_loss_that_leaves_o_out():
    """The fused and the window operators' saved outputs get no materialised gradient: a loss on
    one of them only (not o) sends nothing back, and a loss on o still does."""
    from nsa.kernels.nsa import config_fields

    torch.manual_seed(0)
    config = NSAConfig(compress_block_size=8, compress_stride=4, select_block_size=16, num_selected_blocks=4,
                       window_size=16)
    q = torch.randn(1, 40, 4, 16, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(1, 40, 2, 16, device=DEVICE, requires_grad=True) for _ in range(2))
    k_cmp, v_cmp = (torch.randn(1, num_compressed_blocks(40, 8, 4), 2, 16, device=DEVICE, requires_grad=True)
                    for _ in range(2))
    gates = [torch.rand(1, 40, 4, device=DEVICE, requires_grad=True) for _ in range(3)]
    run = lambda: torch.ops.nsa.sparse_attention_forward(q, k, v, k_cmp, v_cmp, *gates, *config_fields(config),
                                                         0.25, 0, None, None, None, [])
    run()[1].sum().backward()                     # the compressed branch's output, saved for the backward
    assert q.grad is None and k.grad is None
    run()[0].sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    q.grad = k.grad = v.grad = None
    window = lambda: torch.ops.nsa.window_attention_forward(q, k, v, 16, True, 0.25, None, None, [])
    window()[1].sum().backward()                  # the window operator's lse alone
    assert q.grad is None and k.grad is None
    window()[0].sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


def pack_two_sequences(inputs):
    """Make 37 tokens of `make_inputs` (memory 1, the config's l = 16, d = 8) two packed sequences
    of 12 and 25 tokens, each with its own memory row and compressed blocks: cu_seqlens."""
    rows = [1 + num_compressed_blocks(n, 16, 8) for n in (12, 25)]
    inputs[3], inputs[4] = (torch.cat([x[:, :rows[0]], x[:, :rows[1]]], 1) for x in inputs[3:5])
    return torch.tensor([0, 12, 37], dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("packed", [False, True], ids=["batched", "packed"])
def test_backward_under_deterministic_algorithms_equals_the_default(packed):
    """torch.use_deterministic_algorithms(True): the fused backward takes its reproducible path
    (chapter 8: a key block's chunks add in turn; the small groups' dq in slots), with the default
    path's gradients of all eight inputs; on a GPU two runs give the same bits."""
    config = NSAConfig(16, 8, 16, 3, 1, 1, 24)
    inputs = make_inputs(1, 37, 37, 4, 2, 16, 16, config, 1, torch.float32, seed=5)   # group 2: by key block
    cu_seqlens = pack_two_sequences(inputs) if packed else None
    runs = []
    for deterministic in (False, True, True) if DEVICE.type == "cuda" else (False, True):
        torch.use_deterministic_algorithms(deterministic)
        try:
            leaves = [x.clone().requires_grad_() for x in inputs]
            o = native_sparse_attention(*leaves, config, backend="triton", mem_kv_len=1, cu_seqlens=cu_seqlens)
            runs.append(torch.autograd.grad(o.square().sum(), leaves))
        finally:
            torch.use_deterministic_algorithms(False)
    for default, reproducible in zip(runs[0], runs[1]):
        torch.testing.assert_close(reproducible, default, atol=1e-5, rtol=1e-5)
    if DEVICE.type == "cuda":                          # the two reproducible runs: the same bits
        assert all(torch.equal(a, b) for a, b in zip(runs[1], runs[2]))


def poisoned(allocate, seen):
    """`allocate` (torch.empty, torch.empty_like or Tensor.new_empty) whose tensors come filled with
    NaN (integers: their largest value), as PyTorch's deterministic fill would; `seen` collects the
    fill flag at every call."""
    def allocate_poisoned(*args, **kwargs):
        seen.append(torch.utils.deterministic.fill_uninitialized_memory)
        x = allocate(*args, **kwargs)
        if x.dtype == torch.bool:
            return x.fill_(True)
        return x.fill_(float("nan") if x.is_floating_point() else torch.iinfo(x.dtype).max)
    return allocate_poisoned


def fused_operator(Hq, H, packed):
    """(leaves, forward) of the fused operator on 37 tokens, batched or as two packed sequences."""
    config = NSAConfig(16, 8, 16, 3, 1, 1, 24)
    inputs = make_inputs(1, 37, 37, Hq, H, 16, 16, config, 1, torch.float32, seed=11)
    cu_seqlens = pack_two_sequences(inputs) if packed else None
    return inputs, lambda *x: native_sparse_attention(*x, config, backend="triton", mem_kv_len=1, cu_seqlens=cu_seqlens)


def branch_functions(kind):
    """(leaves, forward) of one branch's autograd function on 37 tokens, 4/2 heads: the selected
    branch (key-block design) or the compressed and the window bands, summed."""
    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(1, 37, heads, 16, generator=g).to(DEVICE) for heads in (4, 2, 2))
    if kind == "selected":
        indices = torch.randint(-1, 3, (1, 37, 2, 3), generator=g).to(DEVICE, torch.int32)
        return [q, k, v], lambda *x: selected_attention_triton(*x, indices, 16)
    k_cmp, v_cmp = (torch.randn(1, num_compressed_blocks(37, 16, 8), 2, 16, generator=g).to(DEVICE) for _ in range(2))
    return [q, k, v, k_cmp, v_cmp], lambda q, k, v, k_cmp, v_cmp: (
        compressed_attention_triton(q, k_cmp, v_cmp, 16, 8)[0] + sliding_window_attention_triton(q, k, v, 24))


CASES = {"fused, by key block": lambda: fused_operator(4, 2, False),
         "fused, by key block, packed": lambda: fused_operator(4, 2, True),
         "fused, query tiles": lambda: fused_operator(8, 1, False),
         "selected branch": lambda: branch_functions("selected"),
         "compressed and window bands": lambda: branch_functions("bands")}


@pytest.mark.parametrize("case", list(CASES))
def test_kernels_write_every_buffer_they_allocate_before_reading_it(monkeypatch, case):
    """The launchers skip PyTorch's fill under torch.use_deterministic_algorithms
    (`written_before_read`, chapter 8), which is right only if their kernels never read an element
    of a buffer they allocated before writing it: with every torch.empty poisoned (NaN, or an
    integer's largest value) the output and all gradients keep the same bits. Inside the
    launchers the fill was off; after them, on again. (The selected branch's reproducible dq
    slots go one kv head per launch here.)"""
    monkeypatch.setattr(selected, "DQ_SLOT_BYTES", 1)
    inputs, forward = CASES[case]()

    def run():
        leaves = [x.clone().requires_grad_() for x in inputs]
        o = forward(*leaves)
        return (o.detach(), *torch.autograd.grad(o.square().sum(), leaves))

    torch.use_deterministic_algorithms(True)
    try:
        clean = run()
        seen = []
        with monkeypatch.context() as patch:
            for owner, name in ((torch, "empty"), (torch, "empty_like"), (torch.Tensor, "new_empty")):
                patch.setattr(owner, name, poisoned(getattr(owner, name), seen))
            dirty = run()
        assert torch.utils.deterministic.fill_uninitialized_memory
    finally:
        torch.use_deterministic_algorithms(False)
    assert seen and not any(seen)          # every buffer allocated inside a launcher, without the fill
    for a, b in zip(clean, dirty):
        assert torch.isfinite(b).all() and torch.equal(a, b)
