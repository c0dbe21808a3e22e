"""Chapters 4-5: sliding window, native_sparse_attention and SparseAttention.

The torch backend is checked against tests/nsa_reference.py, a naive float64 per-query loop
written from DESIGN.md independently of the chapters' code."""

import importlib.util
import re

import pytest
import torch
from torch.func import functional_call

import nsa
from nsa import NSAConfig, SparseAttention, native_sparse_attention, sliding_window_attention
from nsa.compression import CompressionMLP, compress
from nsa.device import DEVICE
from nsa.sparse_attention import dense_sparse_attention
from nsa_reference import naive_nsa
from tolerance import close

PAPER = NSAConfig()                                                          # 32/16/64, n=16, w=512
SMALL = NSAConfig(8, 4, 16, 4, 1, 2, 32)                                     # 8/4/16, n=4, w=32
ODD = NSAConfig(12, 4, 8, 3, 0, 1, 20)                                       # l' < l, no initial block
PAPER_FEW = NSAConfig(32, 16, 64, 4, 1, 2, 128)                              # top-k active at N = 1000
NONCAUSAL = NSAConfig(8, 4, 16, 3, 1, 1, 12, causal=False)
WORST = {"rel": 0.0}


def problem(B, Nq, Nk, Hq, H, Dqk, Dv, config, mem=0, dtype=torch.float32, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)
    q, k, v = r(B, Nq, Hq, Dqk), r(B, Nk, H, Dqk), r(B, Nk, H, Dv)
    l, d = config.compress_block_size, config.compress_stride
    k_cmp = torch.cat([r(B, mem, H, Dqk), compress(k, None, l, d)], 1)
    v_cmp = torch.cat([r(B, mem, H, Dv), compress(v, None, l, d)], 1)
    gates = [torch.rand(B, Nq, Hq, generator=g, dtype=torch.float64).to(dtype) for _ in range(3)]
    tensors = [q, k, v, k_cmp, v_cmp, *gates]
    if requires_grad:
        tensors = [t.detach().requires_grad_() for t in tensors]
    return tensors


CASES = [  # B, Nq, Nk, Hq, H, Dqk, Dv, config, mem
    (2, 1, 1, 2, 1, 16, 8, SMALL, 0),
    (1, 1, 1, 8, 1, 8, 8, PAPER, 0),
    (2, 17, 17, 4, 4, 16, 16, SMALL, 0),
    (2, 17, 17, 8, 1, 16, 8, PAPER, 0),
    (1, 5, 7, 4, 2, 8, 8, SMALL, 2),                 # shorter than one compression block, memory
    (2, 100, 100, 4, 2, 16, 24, SMALL, 0),
    (1, 37, 100, 8, 1, 8, 4, ODD, 0),                # Nq < Nk
    (2, 100, 100, 2, 1, 16, 8, PAPER, 0),
    (1, 257, 257, 4, 1, 16, 8, SMALL, 0),
    (2, 60, 257, 8, 2, 8, 16, SMALL, 3),
    (1, 257, 257, 2, 2, 16, 16, PAPER, 0),
    (1, 64, 257, 4, 4, 8, 8, NONCAUSAL, 2),
    (2, 33, 257, 8, 4, 16, 8, NONCAUSAL, 0),
    (1, 1000, 1000, 2, 1, 16, 8, PAPER_FEW, 0),      # 1000: few heads
    (1, 1000, 1000, 2, 2, 8, 8, SMALL, 0),
    (1, 64, 1500, 2, 1, 16, 16, PAPER, 0),           # the paper's geometry with top-k active
]


def relative_error(out, ref):
    return ((out.double() - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-Nq{c[1]}-Nk{c[2]}-Hq{c[3]}-H{c[4]}-{c[7].compress_block_size}/{c[7].compress_stride}/{c[7].select_block_size}-n{c[7].num_selected_blocks}-w{c[7].window_size}-{'causal' if c[7].causal else 'bidir'}-mem{c[8]}")
def test_torch_backend_matches_naive_reference(case):
    *shape, config, mem = case
    args = problem(*shape, config, mem)
    out = native_sparse_attention(*args, config, backend="torch", mem_kv_len=mem)
    ref, _ = naive_nsa(*args, config, None, mem)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    err = relative_error(out, ref)
    WORST["rel"] = max(WORST["rel"], err)
    print(f"relative error {err:.2e} (worst so far {WORST['rel']:.2e})")
    assert err <= 1e-4, err


@pytest.mark.parametrize("case", [CASES[5], CASES[9], CASES[12]], ids=["small", "memory", "noncausal"])
def test_dense_formulation_and_scale_match_naive_reference(case):
    *shape, config, mem = case
    args = problem(*shape, config, mem, dtype=torch.float64)
    ref, _ = naive_nsa(*args, config, 0.37, mem)
    torch.testing.assert_close(dense_sparse_attention(*args, config, 0.37, mem_kv_len=mem), ref)
    torch.testing.assert_close(native_sparse_attention(*args, config, 0.37, "torch", mem_kv_len=mem), ref)


@pytest.mark.parametrize("causal", [True, False])
def test_sliding_window_matches_naive_reference(causal):
    config = NSAConfig(8, 4, 16, 4, 1, 2, 9, causal=causal)
    args = problem(2, 40, 101, 4, 2, 8, 4, config, dtype=torch.float64)
    _, parts = naive_nsa(*args, config)
    out = sliding_window_attention(*args[:3], 9, causal=causal)
    torch.testing.assert_close(out, parts["o_win"])


def test_gradcheck_through_phi_branches_and_gates():
    config = NSAConfig(4, 2, 4, 2, 1, 1, 4)          # 5 selection blocks at N = 20: top-2 is active
    torch.manual_seed(0)
    B, N, Hq, H, D = 1, 20, 2, 1, 3
    phi = CompressionMLP(D, 4, hidden_dim=5).double()
    params = {name: p.detach().clone().requires_grad_() for name, p in phi.named_parameters()}
    names = list(params)
    q, k, v = (torch.randn(B, N, h, D, dtype=torch.float64, requires_grad=True) for h in (Hq, H, H))
    gate_logits = torch.randn(3, B, N, Hq, dtype=torch.float64, requires_grad=True)

    def f(q, k, v, gate_logits, *phi_params):
        run_phi = lambda blocks: functional_call(phi, dict(zip(names, phi_params)), (blocks,))
        k_cmp, v_cmp = compress(k, run_phi, 4, 2), compress(v, run_phi, 4, 2)
        g_cmp, g_slc, g_win = torch.sigmoid(gate_logits)
        return native_sparse_attention(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, config, backend="torch")

    inputs = (q, k, v, gate_logits, *params.values())
    assert torch.autograd.gradcheck(f, inputs, fast_mode=True)
    # every input, phi's parameters included, gets a gradient
    grads = torch.autograd.grad(f(*inputs).square().sum(), inputs)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_gradcheck_with_memory_non_causal_and_sliding_window():
    config = NSAConfig(4, 2, 4, 2, 1, 1, 3, causal=False)
    q, k, v, k_cmp, v_cmp, *gates = problem(1, 9, 14, 4, 2, 3, 2, config, mem=2, dtype=torch.float64,
                                             requires_grad=True)
    fn = lambda *a: native_sparse_attention(*a, config, backend="torch", mem_kv_len=2)
    assert torch.autograd.gradcheck(fn, (q, k, v, k_cmp, v_cmp, *gates), fast_mode=True)
    for causal in (True, False):
        assert torch.autograd.gradcheck(lambda q, k, v: sliding_window_attention(q, k, v, 4, causal=causal),
                                        (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N", [1, 5, 100])            # 5 < l = 8: no compressed block at all
def test_half_precision_large_logits_short_sequences_are_finite(dtype, N):
    args = problem(2, N, N, 4, 2, 16, 16, SMALL, dtype=torch.float32)
    args[0] = args[0] * 40                                                   # logits in the hundreds
    args = [a.to(dtype).requires_grad_() for a in args]
    out = native_sparse_attention(*args, SMALL, backend="torch")
    assert out.dtype == dtype and out.isfinite().all()
    out.float().square().sum().backward()
    assert all(a.grad is not None and a.grad.isfinite().all() for a in args)


@pytest.mark.parametrize("N", [1, 7])
def test_tiny_sequences_match_reference_and_have_finite_gradients(N):
    args = problem(1, N, N, 2, 1, 8, 8, PAPER, requires_grad=True)
    out = native_sparse_attention(*args, PAPER, backend="torch")
    torch.testing.assert_close(out.double(), naive_nsa(*args, PAPER)[0], atol=1e-5, rtol=1e-4)
    out.sum().backward()
    assert all(a.grad.isfinite().all() for a in args)
    assert (args[3].shape[1] == 0) and (args[5].grad == 0).all()             # no compressed block: no say


@pytest.mark.parametrize("backend,module", [("flex", "nsa.flex"), ("triton", "nsa.kernels.nsa")])
def test_other_backends_match_naive_reference(backend, module):
    """One small case per backend (the kernels run in Triton's interpreter on the CPU: slow; on a
    GPU, compiled, with float32 dots in TF32). The naive reference runs on the CPU."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not there yet")
    config = NSAConfig(16, 8, 32, 3, 1, 1, 16)
    args = problem(2, 37, 130, 4, 1, 32, 16, config, mem=2)
    device = DEVICE if backend == "triton" else "cpu"
    out = native_sparse_attention(*(x.to(device) for x in args), config, backend=backend, mem_kv_len=2)
    assert relative_error(out.cpu(), naive_nsa(*args, config, None, 2)[0]) <= close(torch.float32, 1e-4)["rtol"]


def test_auto_backend_on_cpu_is_torch():
    args = problem(1, 30, 30, 2, 1, 8, 8, SMALL)
    torch.testing.assert_close(native_sparse_attention(*args, SMALL),
                               native_sparse_attention(*args, SMALL, backend="torch"))


def test_a_backend_that_could_not_register_says_why(monkeypatch):
    """As on a machine without Triton: `nsa/__init__.py` records the import error with
    backend_unavailable, available_backends reports it, and naming the backend raises ImportError
    with it; "auto" runs "torch"."""
    monkeypatch.setattr(nsa.backends, "_registry", {k: v for k, v in nsa.backends._registry.items() if k != "triton"})
    monkeypatch.setattr(nsa.backends, "_unavailable", dict(nsa.backends._unavailable))
    nsa.backend_unavailable("triton", "Triton kernels could not be imported (no module named 'triton')")
    assert nsa.available_backends()["triton"] == "Triton kernels could not be imported (no module named 'triton')"
    args = problem(1, 30, 30, 2, 1, 8, 8, SMALL)
    with pytest.raises(ImportError, match=r"backend='triton' is not available: Triton kernels could not be imported"):
        native_sparse_attention(*args, SMALL, backend="triton")
    torch.testing.assert_close(native_sparse_attention(*args, SMALL),
                               native_sparse_attention(*args, SMALL, backend="torch"))


def test_available_backends_names_every_backend():
    available = nsa.backends.available_backends()
    assert set(available) == set(nsa.backends.BACKENDS) - {"auto"}
    assert available["torch"] is None and available["flex"] is None
    assert all(reason is None or isinstance(reason, str) for reason in available.values())


# ---------------------------------------------------------------- the module

def test_module_equals_its_parts_on_the_naive_reference():
    torch.manual_seed(0)
    for options in (dict(), dict(num_mem_kv=3), dict(kv_per_branch=True), dict(causal=False, num_mem_kv=1)):
        config_args = dict(compress_block_size=8, compress_stride=4, select_block_size=16,
                           num_selected_blocks=3, window_size=12)
        layer = SparseAttention(24, 4, None, 0.0, None, kv_heads=2, dim_head=8, dim_head_v=5,
                                **config_args, **options).double()
        q, kv = torch.randn(2, 21, 24, dtype=torch.float64), torch.randn(2, 40, 24, dtype=torch.float64)
        out = layer(q, kv)
        heads = lambda x, h: x.view(*x.shape[:2], h, -1)
        branch = (lambda b: b) if layer.kv_per_branch else (lambda b: "shared")
        keys = {b: heads(layer.to_k[b](kv), 2) for b in layer.to_k}
        values = {b: heads(layer.to_v[b](kv), 2) for b in layer.to_v}
        k_cmp = compress(keys[branch("cmp")], layer.phi_k, 8, 4)
        v_cmp = compress(values[branch("cmp")], layer.phi_v, 8, 4)
        mem = layer.num_mem_kv
        if mem:
            k_cmp = torch.cat([layer.mem_k.expand(2, -1, -1, -1), k_cmp], 1)
            v_cmp = torch.cat([layer.mem_v.expand(2, -1, -1, -1), v_cmp], 1)
        gates = torch.sigmoid(layer.to_gates(q)).view(2, 21, 4, 3)
        g_cmp, g_slc, g_win = gates.unbind(-1)
        queries = heads(layer.to_q(q), 4)
        if layer.kv_per_branch:
            o, _ = naive_nsa(queries, keys["slc"], values["slc"], k_cmp, v_cmp, g_cmp, g_slc,
                             torch.zeros_like(g_win), layer.config, 8 ** -0.5, mem)
            _, parts = naive_nsa(queries, keys["win"], values["win"], k_cmp, v_cmp, g_cmp, g_slc, g_win,
                                 layer.config, 8 ** -0.5, mem)
            o = o + g_win[..., None] * parts["o_win"]
        else:
            o, _ = naive_nsa(queries, keys["shared"], values["shared"], k_cmp, v_cmp, g_cmp, g_slc,
                             g_win, layer.config, 8 ** -0.5, mem)
        torch.testing.assert_close(out, layer.to_out(o.flatten(-2)), msg=str(options))


def test_module_padding_mask_hides_padded_keys_in_every_branch():
    torch.manual_seed(1)
    layer = SparseAttention(16, 2, kv_heads=1, compress_block_size=8, compress_stride=4,
                            select_block_size=16, num_selected_blocks=3, window_size=10,
                            kv_per_branch=True, num_mem_kv=1).double()
    x = torch.randn(2, 45, 16, dtype=torch.float64)
    keep = torch.ones(2, 45, dtype=torch.bool)
    keep[0, 30:] = False                                                     # right padding
    keep[1, :6] = False                                                      # left padding
    out = layer(x, mask=keep)
    noisy = x.clone()
    noisy[~keep] = 1e3 * torch.randn(int((~keep).sum()), 16, dtype=torch.float64)
    again = layer(noisy, mask=keep)
    torch.testing.assert_close(out[0, :30], again[0, :30])
    torch.testing.assert_close(out[1, 6:], again[1, 6:])
    torch.testing.assert_close(out[0, :30], layer(x[:1, :30])[0])            # right padding = shorter input
    assert out.isfinite().all() and again.isfinite().all()
    # the constructor's mask is the default of forward's
    layer.mask = keep
    torch.testing.assert_close(layer(x), out)


def test_dense_key_padding_mask_hides_keys_in_place():
    """dense_sparse_attention's key_padding_mask: padded keys (and every compressed block holding
    one) are invisible in every branch, the other keys keep their positions. Noise in the padded
    keys and values changes no output; with padding only at a row's end, the row's real queries get
    what the row alone gets."""
    config = NSAConfig(8, 4, 16, 3, 1, 1, 12)
    q, k, v, k_cmp, v_cmp, *gates = problem(2, 70, 70, 4, 2, 8, 8, config, mem=1, dtype=torch.float64)
    keep = torch.ones(2, 70, dtype=torch.bool)
    keep[0, 23:41] = False                                                   # a hole in the middle
    keep[1, 52:] = False                                                     # right padding
    out = dense_sparse_attention(q, k, v, k_cmp, v_cmp, *gates, config, mem_kv_len=1, key_padding_mask=keep)
    noisy_k, noisy_v = k.clone(), v.clone()
    noisy_k[~keep], noisy_v[~keep] = 100 * torch.randn_like(k[~keep]), 100 * torch.randn_like(v[~keep])
    memory = (k_cmp[:, :1], v_cmp[:, :1])
    noisy_cmp = [torch.cat([m, compress(x, None, 8, 4)], 1) for m, x in zip(memory, (noisy_k, noisy_v))]
    again = dense_sparse_attention(q, noisy_k, noisy_v, *noisy_cmp, *gates, config, mem_kv_len=1,
                                   key_padding_mask=keep)
    torch.testing.assert_close(again, out, rtol=1e-12, atol=1e-12)
    row = [x[1:, :52] for x in (q, k, v)]
    row_cmp = [torch.cat([m[1:], compress(x, None, 8, 4)], 1) for m, x in zip(memory, row[1:])]
    alone = dense_sparse_attention(*row, *row_cmp, *(g[1:, :52] for g in gates), config, mem_kv_len=1)
    torch.testing.assert_close(out[1, :52], alone[0], rtol=1e-12, atol=1e-12)


def test_module_repr_says_how_it_was_built():
    layer = SparseAttention(32, 4, kv_heads=2, window_size=64, num_mem_kv=1)
    head = repr(layer).splitlines()[1]
    assert head.startswith("  dim=32, heads=4, kv_heads=2, dim_head=8, dim_head_v=8, kv_per_branch=False, num_mem_kv=1")
    assert "window_size=64" in head and "(phi_k): CompressionMLP(\n    head_dim=8, block_size=32" in repr(layer)


def test_module_decoding_dropout_and_paper_head_sizes():
    torch.manual_seed(2)
    layer = SparseAttention(32, 4, None, 0.5, kv_heads=1, compress_block_size=8, compress_stride=4,
                            select_block_size=16, num_selected_blocks=4, window_size=16)
    x = torch.randn(1, 70, 32)
    layer.eval()
    torch.testing.assert_close(layer(x[:, -3:], x), layer(x)[:, -3:])         # decoding = last rows
    layer.train()
    assert not torch.allclose(layer(x), layer(x))                            # dropout is on
    big = SparseAttention(128, 4, kv_heads=2, dim_head=192, dim_head_v=128, compress_block_size=8,
                          compress_stride=4, select_block_size=16, num_selected_blocks=4, window_size=16)
    assert big(torch.randn(2, 33, 128)).shape == (2, 33, 128)
    assert big.to_q.out_features == 4 * 192 and big.to_out.in_features == 4 * 128


def test_module_backend_flag_reaches_the_function(monkeypatch):
    calls = []
    real = nsa.sparse_attention.select_backend
    monkeypatch.setattr(nsa.sparse_attention, "select_backend",
                        lambda name, *args: calls.append(name) or real("torch", *args))
    layer = SparseAttention(16, 2, backend="flex", compress_block_size=8, compress_stride=4,
                            select_block_size=16, num_selected_blocks=3, window_size=8)
    layer(torch.randn(1, 20, 16))
    assert calls == ["flex"]
    keep = torch.ones(1, 20, dtype=torch.bool)
    keep[0, 15:] = False                       # a padded batch runs as packed sequences, on any backend
    layer(torch.randn(1, 20, 16), mask=keep)
    assert calls == ["flex", "flex"]


# ---------------------------------------------------------------- bad input

def _args():
    return problem(1, 12, 20, 4, 2, 8, 6, SMALL)


def _replace(index, value):
    def call():
        args = _args()
        args[index] = value(args[index]) if callable(value) else value
        return native_sparse_attention(*args, SMALL)
    return call


def _module(**kwargs):
    return lambda: SparseAttention(**{"dim": 16, "heads": 2, **kwargs})


def _forward(*inputs, **kwargs):
    return lambda: SparseAttention(16, 2, compress_block_size=8, compress_stride=4, select_block_size=16,
                                   num_selected_blocks=3, window_size=8, **kwargs)(*inputs)


BAD = [
    # sliding_window_attention
    ("window_size", lambda: sliding_window_attention(*_args()[:3], 0), ValueError),
    ("window_size", lambda: sliding_window_attention(*_args()[:3], 2.5), TypeError),
    ("window_size", lambda: sliding_window_attention(*_args()[:3], True), TypeError),
    ("causal", lambda: sliding_window_attention(*_args()[:3], 4, causal="yes"), TypeError),
    ("scale", lambda: sliding_window_attention(*_args()[:3], 4, -1.0), ValueError),
    ("q", lambda: sliding_window_attention(_args()[0][0], *_args()[1:3]), ValueError),
    ("k", lambda: sliding_window_attention(_args()[0], _args()[1].double(), _args()[2]), TypeError),
    # native_sparse_attention
    ("q", _replace(0, lambda q: q.numpy()), TypeError),
    ("v", _replace(2, lambda v: v[:, :-1]), ValueError),
    ("k_cmp", _replace(3, lambda x: x[:, 1:]), ValueError),
    ("k_cmp", _replace(3, lambda x: x.double()), TypeError),
    ("k_cmp", _replace(3, lambda x: x.tolist()), TypeError),
    ("v_cmp", _replace(4, lambda x: x[..., :3]), ValueError),
    ("v_cmp", _replace(4, lambda x: x[0]), ValueError),
    ("g_cmp", _replace(5, lambda g: g[..., :2]), ValueError),
    ("g_slc", _replace(6, lambda g: g[None]), ValueError),
    ("g_win", _replace(7, lambda g: g.double()), TypeError),
    ("g_win", _replace(7, lambda g: g.tolist()), TypeError),
    ("g_cmp", _replace(5, None), TypeError),              # only the window (g_win None) may be left out
    ("config", lambda: native_sparse_attention(*_args(), {"window_size": 8}), TypeError),
    ("backend", lambda: native_sparse_attention(*_args(), SMALL, backend="cuda"), ValueError),
    ("backend", lambda: native_sparse_attention(*_args(), SMALL, backend=None), ValueError),
    ("mem_kv_len", lambda: native_sparse_attention(*_args(), SMALL, mem_kv_len=-1), ValueError),
    ("mem_kv_len", lambda: native_sparse_attention(*_args(), SMALL, mem_kv_len=1.0), TypeError),
    ("k_cmp", lambda: native_sparse_attention(*_args(), SMALL, mem_kv_len=2), ValueError),
    ("scale", lambda: native_sparse_attention(*_args(), SMALL, scale="big"), TypeError),
    ("key_padding_mask", lambda: dense_sparse_attention(*_args(), SMALL, key_padding_mask=torch.ones(1, 19, dtype=torch.bool)), ValueError),
    # SparseAttention
    ("dim", _module(dim=0), ValueError),
    ("heads", _module(heads=2.0), TypeError),
    ("kv_heads", _module(kv_heads=3), ValueError),
    ("dim", _module(dim=15), ValueError),
    ("dim_head", _module(dim_head=-4), ValueError),
    ("dropout", _module(dropout=1.5), ValueError),
    ("dropout", _module(dropout="0.1"), TypeError),
    ("qk_scale", _module(qk_scale=0.0), ValueError),
    ("mask", _module(mask=torch.ones(2, 3)), TypeError),
    ("kv_per_branch", _module(kv_per_branch=1), TypeError),
    ("compress_mlp", _module(compress_mlp=None), TypeError),
    ("num_mem_kv", _module(num_mem_kv=-2), ValueError),
    ("backend", _module(backend="fast"), ValueError),
    ("compress_stride", _module(compress_stride=64), ValueError),
    ("num_selected_blocks", _module(num_selected_blocks=2, num_initial_blocks=1, num_local_blocks=2), ValueError),
    ("q", _forward(torch.randn(2, 5, 8)), ValueError),
    ("q", _forward(torch.randn(2, 5)), ValueError),
    ("k", _forward(torch.randn(2, 5, 16), torch.randn(3, 9, 16)), ValueError),
    ("q", _forward(torch.randn(2, 9, 16), torch.randn(2, 5, 16)), ValueError),
    ("mask", lambda: SparseAttention(16, 2)(torch.randn(2, 5, 16), mask=torch.ones(2, 6, dtype=torch.bool)), ValueError),
    ("mask", lambda: SparseAttention(16, 2)(torch.randn(2, 5, 16), mask=torch.ones(2, 5)), TypeError),
]


@pytest.mark.parametrize("name,call,error", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_names_the_argument(name, call, error):
    with pytest.raises(error) as info:
        call()
    word = rf"(^|[ (,.`']){re.escape(name)}($|[ .,:;=)`'\[])"          # the name as a word, not inside one
    assert re.search(word, str(info.value)), str(info.value)
