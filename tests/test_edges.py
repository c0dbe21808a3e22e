"""Every backend agrees at the edges (issue 16): exact ties, empty problems, NaN, sizes larger
than the sequence, argument checks, no host sync; and a property-based test that draws
configurations, lengths and ties and compares every backend (torch and flex in float32 on the CPU,
triton on the GPU if there is one, else in the interpreter) with the float64 reference."""

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nsa  # first: switches on the interpreter without CUDA, before triton is imported
import nsa.kernels
from nsa.compression import compress, compressed_attention
from nsa.config import NSAConfig
from nsa.device import DEVICE
from nsa.geometry import num_compressed_blocks, overlap_weights
from nsa.kernels.band import compressed_attention_triton
from nsa.kernels.selection import select_blocks_triton
from nsa.layer import SparseAttention
from nsa.selection import (dot_in_order, eq9_by_place, select_blocks, selected_attention,
                           selection_scores)
from nsa.sparse_attention import native_sparse_attention
from tolerance import close

BACKENDS = ("torch", "flex", "triton")
F64 = torch.float64
TOL = close(torch.float32, 2e-4)      # float32 backends against the float64 reference (TF32 on a GPU)
TIES = NSAConfig(16, 8, 16, 4, 1, 1, 16)


def make_inputs(B, Nq, Nk, Hq, H, Dqk, Dv, config, mem=0, seed=0, ties="none"):
    """The eight tensors of native_sparse_attention in float64. ties: "none" (random), "equal"
    (every compressed key equal) or "periodic" (compressed key c = pattern[c % (l'/d)]: every
    selection block's compressed keys equal place by place)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=F64)
    num_cmp = num_compressed_blocks(Nk, config.compress_block_size, config.compress_stride)
    period = {"none": num_cmp, "equal": 1,
              "periodic": config.select_block_size // config.compress_stride}[ties]
    pattern = r(B, max(period, 1), H, Dqk)
    places = torch.arange(num_cmp) % max(period, 1)
    k_cmp = torch.cat([r(B, mem, H, Dqk), pattern[:, places]], dim=1)
    gates = [torch.rand(B, Nq, Hq, generator=g, dtype=F64) for _ in range(3)]
    return [r(B, Nq, Hq, Dqk), r(B, Nk, H, Dqk), r(B, Nk, H, Dv), k_cmp,
            r(B, mem + num_cmp, H, Dv), *gates]


def where(backend):
    """Where a backend computes here: triton on the GPU if there is one (else in the interpreter, on
    CPU tensors), the others on the CPU."""
    return DEVICE if backend == "triton" else torch.device("cpu")


def run(backend, inputs, config, mem=0, dtype=torch.float32):
    with torch.no_grad():        # flex has no CPU backward
        return native_sparse_attention(*[x.to(where(backend), dtype) for x in inputs], config, backend=backend,
                                       mem_kv_len=mem).cpu()


# -- 1. exact ties ------------------------------------------------------------------------------

def issue_tie_example(seed, dtype):
    """Issue 16's case: every key equal, Nk = 94, one query, 2 query heads on 1 kv head."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 1, 2, 16, generator=g, dtype=F64)
    k = torch.randn(1, 1, 1, 16, generator=g, dtype=F64).expand(1, 94, 1, 16)
    return q.to(dtype), compress(k.to(dtype), None, 16, 8)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_equal_keys_tie_exactly_and_go_to_the_lower_blocks(dtype):
    for seed in range(30):
        q, k_cmp = issue_tie_example(seed, dtype)
        _, lse = compressed_attention(q, k_cmp, k_cmp, 16, 8, seq_len_k=94)
        scores = selection_scores(q, k_cmp, lse, 94, TIES)
        assert (scores[0, 0, 0, 1:5] == scores[0, 0, 0, 1]).all(), seed
        assert select_blocks(scores, 94, TIES)[0, 0, 0].tolist() == [0, 1, 2, 5], seed


def test_equal_keys_select_the_same_blocks_in_the_triton_kernel():
    for seed in (0, 1, 2, 18, 19, 25, 27):        # 2, 18, 19, 25, 27 chose [0, 1, 4, 5] before
        q, k_cmp = (x.to(DEVICE) for x in issue_tie_example(seed, torch.float32))
        _, lse = compressed_attention_triton(q, k_cmp, k_cmp, 16, 8, seq_len_k=94)
        assert select_blocks_triton(q, k_cmp, lse, 94, TIES)[0, 0, 0].tolist() == [0, 1, 2, 5], seed


@pytest.mark.parametrize("seed", [2, 18])        # two of the seeds on which triton chose [0, 1, 4, 5]
def test_equal_keys_give_the_same_output_on_every_backend(seed):
    inputs = make_inputs(1, 1, 94, 2, 1, 16, 16, TIES, seed=seed, ties="equal")
    reference = run("torch", inputs, TIES, dtype=F64)
    for backend in BACKENDS:
        torch.testing.assert_close(run(backend, inputs, TIES).double(), reference, **TOL,
                                   msg=lambda m: f"{backend}: {m}")


@pytest.mark.parametrize("config,Nq,Nk,Hq,H,mem", [
    (NSAConfig(16, 8, 16, 5, 1, 1, 16), 40, 300, 3, 1, 0),     # 19 blocks: two steps of the kernel; group 3
    (NSAConfig(32, 16, 64, 6, 0, 1, 16), 20, 700, 2, 2, 1),    # the paper's places (2, 2, 2, 1), memory
    (NSAConfig(16, 8, 32, 4, 1, 0, 16, causal=False), 20, 200, 4, 2, 2),
])
def test_periodic_keys_tie_place_by_place_on_the_triton_kernel(config, Nq, Nk, Hq, H, mem):
    q, _, _, k_cmp, v_cmp, *_ = make_inputs(1, Nq, Nk, Hq, H, 16, 16, config, mem, ties="periodic")
    q, k_cmp, v_cmp = q.float(), k_cmp.float(), v_cmp.float()
    on_device = [x.to(DEVICE) for x in (q, k_cmp, v_cmp)]
    _, lse = compressed_attention_triton(*on_device, config.compress_block_size, config.compress_stride,
                                         causal=config.causal, mem_kv_len=mem, seq_len_k=Nk)
    chosen = select_blocks_triton(*on_device[:2], lse, Nk, config, mem_kv_len=mem).cpu()
    lse = lse.cpu()
    scores = selection_scores(q, k_cmp, lse, Nk, config, mem_kv_len=mem)
    assert torch.equal(chosen, select_blocks(scores, Nk, config))
    scores64 = selection_scores(q.double(), k_cmp.double(), lse, Nk, config, mem_kv_len=mem)
    assert torch.equal(chosen, select_blocks(scores64, Nk, config))


def test_scores_by_place_equal_the_overlap_product_and_ignore_position():
    for N, (l, d, l_sel) in [(320, (32, 16, 64)), (257, (16, 8, 16)), (300, (64, 16, 32)), (40, (16, 8, 1 << 40))]:
        p = torch.rand(2, 3, num_compressed_blocks(N, l, d), dtype=F64)
        torch.testing.assert_close(eq9_by_place(p, N, l, d, l_sel), p @ overlap_weights(N, l, d, l_sel, dtype=F64))
    q = torch.randn(5, 3, 1, 32)
    s = dot_in_order(q, torch.randn(32).expand(1, 1, 300, 32))
    assert (s == s[..., :1]).all()


# -- 2. empty problems and zero sizes -----------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,Nq,Nk,Dv", [(0, 20, 20, 16), (1, 0, 20, 16), (1, 0, 0, 16), (1, 20, 20, 0)])
def test_empty_problems_give_empty_outputs(backend, B, Nq, Nk, Dv):
    inputs = [x.to(where(backend), torch.float32).requires_grad_(backend != "flex")
              for x in make_inputs(B, Nq, Nk, 2, 1, 16, Dv, TIES)]
    o = native_sparse_attention(*inputs, TIES, backend=backend)
    assert o.shape == (B, Nq, 2, Dv) and o.dtype == torch.float32
    if backend != "flex":
        grads = torch.autograd.grad(o.sum(), inputs)
        assert all(torch.equal(grad, torch.zeros_like(x)) for grad, x in zip(grads, inputs))


def test_branches_and_layer_take_empty_problems():
    q, k, v = torch.randn(1, 0, 2, 8), torch.randn(1, 0, 1, 8), torch.randn(1, 0, 1, 8)
    assert nsa.sliding_window_attention(q, k, v, 16).shape == (1, 0, 2, 8)
    assert selected_attention(q, k, v, torch.zeros(1, 0, 1, 4, dtype=torch.int32), 16).shape == (1, 0, 2, 8)
    layer = SparseAttention(32, heads=2, kv_heads=1, compress_block_size=16, compress_stride=8,
                            select_block_size=16, num_selected_blocks=4, window_size=16)
    for shape in ((0, 40, 32), (2, 0, 32)):
        assert layer(torch.randn(*shape)).shape == shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Hq,H,Dqk,message", [(0, 1, 16, "at least one head"), (0, 0, 16, "at least one head"),
                                              (2, 1, 0, "dim_qk >= 1")])
def test_zero_heads_or_dim_qk_raise_value_error(backend, Hq, H, Dqk, message):
    inputs = [x.to(where(backend), torch.float32)
              for x in make_inputs(1, 20, 20, max(Hq, 1), max(H, 1), max(Dqk, 1), 16, TIES)]
    inputs[0], inputs[1] = inputs[0][:, :, :Hq, :Dqk], inputs[1][:, :, :H, :Dqk]
    inputs[2], inputs[3], inputs[4] = inputs[2][:, :, :H], inputs[3][:, :, :H, :Dqk], inputs[4][:, :, :H]
    inputs[5:] = [g[..., :Hq] for g in inputs[5:]]
    with pytest.raises(ValueError, match=message):
        native_sparse_attention(*inputs, TIES, backend=backend)


# -- 3. NaN in, NaN out -------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")   # the interpreter's max of a NaN row
@pytest.mark.parametrize("where", ["q", "k", "k_cmp", "g_slc"])
def test_nan_reaches_the_same_outputs_on_every_backend(where):
    inputs = make_inputs(1, 40, 40, 2, 1, 16, 16, TIES, seed=3)
    index, at = {"q": (0, (0, 20, 1)), "k": (1, (0, 20)), "k_cmp": (3, (0, 2)), "g_slc": (6, (0, 25, 0))}[where]
    inputs[index][at] = float("nan")
    reference = run("torch", inputs, TIES, dtype=F64)
    read = reference.isnan()
    assert read.any() and not read.all()
    for backend in BACKENDS:
        o = run(backend, inputs, TIES).double()
        assert torch.equal(o.isnan(), read), backend
        torch.testing.assert_close(o[~read], reference[~read], **TOL)


def test_nan_scores_are_never_selected():
    scores = torch.tensor([[[[1.0, float("nan"), 3.0, 2.0, float("nan"), 0.5]]]])
    assert select_blocks(scores, 94, TIES)[0, 0, 0].tolist() == [0, 2, 3, 5]     # 0 and 5 forced
    q, k_cmp = (x.to(DEVICE) for x in issue_tie_example(0, torch.float32))
    k_cmp = k_cmp.clone()
    k_cmp[0, 3] = float("nan")
    _, lse = compressed_attention_triton(q, k_cmp, k_cmp, 16, 8, seq_len_k=94)
    assert lse.isnan().all()                                      # NaN in, NaN out: not "saw no key"
    assert select_blocks_triton(q, k_cmp, lse, 94, TIES)[0, 0, 0].tolist() == [0, 5, -1, -1]


# -- 4. sizes larger than the sequence ----------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "flex"])           # triton: l' <= 256 (its limit)
def test_oversized_blocks_cost_what_the_sequence_costs(backend):
    huge = NSAConfig(16, 8, 1 << 40, 4, 1, 1, 1 << 40)          # l' = w = 2**40 keys, 40 of them exist
    inputs = make_inputs(1, 40, 40, 2, 1, 8, 8, huge)
    torch.testing.assert_close(run(backend, inputs, huge), run(backend, inputs, NSAConfig(16, 8, 64, 4, 1, 1, 64)))
    q, k, v = inputs[:3]
    block_zero = torch.zeros(1, 40, 1, 1, dtype=torch.int32)
    torch.testing.assert_close(selected_attention(q, k, v, block_zero, 1 << 40), selected_attention(q, k, v, block_zero, 64))


# -- 5. argument checks -------------------------------------------------------------------------

def test_compress_rejects_a_stride_larger_than_the_block():
    with pytest.raises(ValueError, match=r"stride \(16\) must be <= block_size \(8\)"):
        compress(torch.randn(1, 40, 1, 8), None, block_size=8, stride=16)


def test_layer_names_an_input_whose_dtype_or_device_differs_from_its_parameters():
    layer = SparseAttention(32, heads=2, kv_heads=1, compress_block_size=16, compress_stride=8,
                            select_block_size=16, num_selected_blocks=4, window_size=16)
    x = torch.randn(1, 40, 32)
    with pytest.raises(TypeError, match=r"q is torch.float64 but the layer's parameters are torch.float32; convert q "
                                        r"to torch.float32 or the layer with layer.to\(torch.float64\)$"):
        layer(x.double())                                       # float64: torch.autocast would not help
    with pytest.raises(TypeError, match=r"q is torch.bfloat16 .* torch.float32; .*, or run under torch.autocast$"):
        layer(x.bfloat16())
    with pytest.raises(TypeError, match=r"k is torch.float64 .*; convert k to torch.float32 or the layer with"):
        layer(x, x.double(), x)                                 # the fix it names first works: k.float()
    assert layer(x, x.double().float(), x).shape == x.shape
    with pytest.raises(ValueError, match=r"q is on meta but the layer.s parameters are on cpu; move q to cpu "
                                         r"or the layer with layer.to\(\"meta\"\)$"):
        layer(torch.empty(1, 40, 32, device="meta"))
    with torch.autocast("cpu", dtype=torch.bfloat16):           # autocast casts for F.linear: allowed
        layer.to(torch.bfloat16)(x)
        # but not float64, on either side: autocast leaves it as it is, and F.linear would fail
        with pytest.raises(TypeError, match=r"q is torch.float64 .* torch.bfloat16; .*layer.to\(torch.float64\)$"):
            layer(x.double())                                   # no advice to run under the autocast it runs under
        with pytest.raises(TypeError, match=r"q is torch.float32 but the layer's parameters are torch.float64"):
            layer.double()(x)
        assert layer(x.double()).dtype == torch.float64              # float64 on both sides: no cast


def test_a_layer_is_not_advised_into_a_dtype_its_backend_cannot_compute_in():
    layer = SparseAttention(32, heads=2, kv_heads=1, compress_block_size=16, compress_stride=8, select_block_size=16,
                            num_selected_blocks=4, window_size=16, backend="triton")
    x = torch.randn(1, 40, 32)
    with pytest.raises(TypeError, match=r"q is torch.float64 but the layer's parameters are torch.float32; convert q "
                                        r"to torch.float32 \(the layer computes in torch.float16, torch.bfloat16, "
                                        r"torch.float32 only\)$"):
        layer(x.double())                                       # the Triton kernels take no float64
    with pytest.raises(TypeError, match=r"q is torch.float16 .*; convert q to torch.float32 or the layer with "
                                        r"layer.to\(torch.float16\), or run under torch.autocast$"):
        layer(x.half())                                         # float16 they take: both fixes stand
    assert nsa.backends.backend_dtypes("torch") is None and nsa.backends.backend_dtypes("auto") is None


def test_a_cached_layer_is_advised_into_a_new_cache_along_with_its_dtype():
    layer = SparseAttention(32, heads=2, kv_heads=1, compress_block_size=16, compress_stride=8, select_block_size=16,
                            num_selected_blocks=4, window_size=16)
    cache = layer.new_cache(1, 40)
    x = torch.randn(1, 3, 32, dtype=torch.float64)
    with torch.no_grad():
        with pytest.raises(TypeError, match=r"q is torch.float64 but the layer's parameters are torch.float32; "
                                            r"convert q to torch.float32 or the layer with layer.to\(torch.float64\) "
                                            r"and a cache of that dtype \(layer.new_cache\(..., "
                                            r"dtype=torch.float64\)\)$"):
            layer(x, cache=cache)
        assert cache.lengths == [0]                             # nothing written
        assert layer(x.float(), cache=cache).shape == (1, 3, 32)              # the first fix
        layer.double()                                          # the second: the layer and a cache of its dtype
        assert layer(x, cache=layer.new_cache(1, 40, dtype=torch.float64)).dtype == torch.float64


def test_meta_tensors_run_on_the_torch_backend():
    meta = [x.float().to("meta") for x in make_inputs(1, 20, 40, 2, 1, 16, 8, TIES)]
    o = native_sparse_attention(*meta, TIES, backend="torch")
    assert o.device.type == "meta" and o.shape == (1, 20, 2, 8)
    indices = torch.zeros(1, 20, 1, 4, dtype=torch.int32, device="meta")
    assert selected_attention(*meta[:3], indices, 16).shape == (1, 20, 2, 8)     # check_indices=True
    for backend in ("flex", "triton"):
        with pytest.raises(ValueError, match=f"{backend}: .*meta"):
            native_sparse_attention(*meta, TIES, backend=backend)


# -- 6. no host synchronisation -----------------------------------------------------------------

READ_BACK = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__")
PACKAGE = (str(Path(nsa.__file__).parent), str(Path(nsa.kernels.__file__).parent))


@pytest.fixture
def reads_back(monkeypatch):
    """The Tensor methods that read a value back to the host, as the package calls them (not
    PyTorch's own machinery, e.g. FlexAttention's tracing when it recompiles)."""
    calls = []

    def spy(name, method):
        def read_back(self, *args, **kwargs):
            if sys._getframe(1).f_code.co_filename.startswith(PACKAGE):
                calls.append(name)
            return method(self, *args, **kwargs)
        return read_back

    for name in READ_BACK:
        monkeypatch.setattr(torch.Tensor, name, spy(name, getattr(torch.Tensor, name)))
    return calls


@pytest.mark.parametrize("backend", BACKENDS)
def test_nsa_reads_no_value_back_to_the_host(backend, reads_back):
    run(backend, make_inputs(1, 20, 60, 2, 1, 16, 16, TIES), TIES)
    assert reads_back == []


def test_index_range_check_reads_back_only_when_asked(reads_back):
    q, k, v = make_inputs(1, 20, 40, 2, 1, 8, 8, TIES)[:3]
    indices = torch.full((1, 20, 1, 2), 5, dtype=torch.int32)       # block 5 of 40 keys in blocks of 16
    selected_attention(q, k, v, indices, 16, check_indices=False)
    assert reads_back == []
    with pytest.raises(ValueError, match=r"block_indices must be in \[-1, 2\]"):
        selected_attention(q, k, v, indices, 16)
    assert "item" in reads_back


# -- all of it at once: every backend against the float64 reference ---------------------------

@st.composite
def problems(draw):
    d = draw(st.sampled_from([8, 16]))
    l = d * draw(st.sampled_from([2, 1]))
    l_sel = draw(st.sampled_from([s for s in (16, 32) if s >= l]))
    n = draw(st.integers(1, 5))
    initial = draw(st.integers(0, min(1, n)))
    local = draw(st.integers(0, min(2, n - initial)))
    window = draw(st.sampled_from([16, 1, 40, 1 << 30]))
    config = NSAConfig(l, d, l_sel, n, initial, local, window, draw(st.booleans()))
    H, G = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2, 3]))
    Nk = draw(st.integers(1, 90))                     # never empty: test_empty_problems_give_empty_outputs
    Nq = draw(st.integers(1, min(Nk, 16)))
    sizes = (draw(st.sampled_from([1, 2])), Nq, Nk, H * G, H, draw(st.sampled_from([16, 8])),
             draw(st.sampled_from([16, 8])))
    # equal compressed keys make equal probabilities at every place, whose sums are exact ties
    # only while a block has at most two places; periodic keys tie place by place at any l'/d
    ties = draw(st.sampled_from(["periodic", "none"] + (["equal"] if l_sel // d <= 2 else [])))
    return config, sizes, draw(st.integers(0, 2)), ties, draw(st.integers(0, 2**16))


@settings(max_examples=16, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_every_backend_agrees_with_the_float64_reference(problem):
    config, sizes, mem, ties, seed = problem
    inputs = make_inputs(*sizes, config, mem, seed, ties)
    reference = run("torch", inputs, config, mem, dtype=F64)
    assert reference.numel() > 0
    assert reference.shape == (sizes[0], sizes[1], sizes[3], sizes[6]) and not reference.isnan().any()
    for backend in BACKENDS:
        o = run(backend, inputs, config, mem)
        assert o.shape == reference.shape and o.dtype == torch.float32
        torch.testing.assert_close(o.double(), reference, **TOL, msg=lambda m: f"{backend}: {m}")


def test_a_key_padding_mask_on_another_device_is_named():
    layer = SparseAttention(32, heads=2, kv_heads=1, compress_block_size=16, compress_stride=8,
                            select_block_size=16, num_selected_blocks=4, window_size=16)
    x, mask = torch.randn(1, 40, 32), torch.ones(1, 40, dtype=torch.bool)
    with pytest.raises(ValueError, match="mask is on meta but the inputs are on cpu"):
        layer(x, mask=mask.to("meta"))                     # (read back to the host: no values there)
    meta = layer.to("meta")                                # a mask on the CPU serves inputs anywhere
    assert meta(x.to("meta"), mask=mask).device.type == "meta"
    q, k, v, k_cmp, v_cmp, *gates = make_inputs(1, 20, 40, 2, 1, 16, 8, TIES)
    with pytest.raises(ValueError, match="key_padding_mask is on meta but the inputs are on cpu"):
        nsa.sparse_attention.dense_sparse_attention(q, k, v, k_cmp, v_cmp, *gates, TIES,
                                                    key_padding_mask=mask.to("meta"))


def test_compress_names_a_phi_of_another_dtype_or_device():
    phi, x = nsa.CompressionMLP(8, 16), torch.randn(1, 40, 2, 8)
    with pytest.raises(TypeError, match="blocks is torch.float64 but the CompressionMLP's parameters are torch.float32"):
        compress(x.double(), phi, 16, 8)
    with pytest.raises(ValueError, match=r"blocks is on meta but the CompressionMLP's parameters are on cpu; .*phi.to"):
        compress(x.to("meta"), phi, 16, 8)
    with pytest.raises(TypeError, match="blocks must be a floating-point tensor, got dtype torch.int64"):
        phi(torch.ones(1, 2, 2, 16, 8, dtype=torch.long))
    with torch.autocast("cpu", dtype=torch.bfloat16):      # autocast computes both in bf16: allowed
        assert compress(x.bfloat16(), phi, 16, 8).dtype == torch.bfloat16

    class Casting(torch.nn.Module):                         # a phi of one's own casts as it likes
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(16 * 8, 8)

        def forward(self, blocks):
            return self.linear(blocks.float().flatten(-2)).to(blocks.dtype)

    assert compress(x.bfloat16(), Casting(), 16, 8).dtype == torch.bfloat16
    assert compress(x.double(), torch.nn.Flatten(-2), 16, 8).shape == (1, 4, 2, 128)   # no parameters


def test_padding_the_layer_leaves_out_may_hold_nan():
    """The layer's key padding mask packs each row's tokens: what the padding holds is never read,
    NaN included (the functional ops read whole tiles, so their docstring asks for finite padding)."""
    layer = SparseAttention(32, heads=2, kv_heads=1, compress_block_size=16, compress_stride=8,
                            select_block_size=16, num_selected_blocks=4, window_size=16)
    x, keep = torch.randn(2, 70, 32), torch.ones(2, 70, dtype=torch.bool)
    keep[0, 50:] = keep[1, :9] = False                      # right and left padding
    nan = torch.where(keep[..., None], x, float("nan"))
    y = layer(nan, mask=keep)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, layer(torch.where(keep[..., None], x, 0.0), mask=keep))
    y.sum().backward()                                      # and no NaN in any parameter's gradient
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)
