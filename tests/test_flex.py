"""Chapter 6: FlexAttention masks and the `flex` backend, against the dense masks and the references."""

import dataclasses
import warnings

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask, and_masks, create_mask

import nsa
from nsa.config import NSAConfig
from nsa.flex import (create_compress_mask, create_fine_mask, create_sliding_mask, flex_sparse_attention,
                      flex_unsupported)
from nsa.masks import (block_selection_mask, causal_mod, compressed_block_mask, compressed_mod, dense_mask,
                       selected_block_table, selected_blocks_mod, sliding_window_mask, sliding_window_mod)
from nsa_reference import naive_nsa

CPU = torch.device("cpu")


def dense(mask_mod, B, H, Nq, Nk, device="cpu"):
    """FlexAttention's own dense evaluation (vmap), checked against nsa.masks.dense_mask's (broadcast),
    on the device of the tensors the mask reads; returned on the CPU."""
    mask = create_mask(mask_mod, B, H, Nq, Nk, device=device)
    assert torch.equal(mask, dense_mask(mask_mod, Nq, Nk, batch=B, heads=H, device=device))
    return mask.cpu()


def tiles_from_tokens(token_mask, tile=128):
    """(..., Nq, Nk) bool -> (..., ceil(Nq/tile), ceil(Nk/tile)) bool: tile holds a visible pair."""
    *lead, Nq, Nk = token_mask.shape
    padded = torch.zeros(*lead, -(-Nq // tile) * tile, -(-Nk // tile) * tile, dtype=torch.bool)
    padded[..., :Nq, :Nk] = token_mask
    shape = (*lead, padded.shape[-2] // tile, tile, padded.shape[-1] // tile, tile)
    return padded.reshape(shape).any(-1).any(-2)


# ---------------------------------------------------------------- masks, by definition

@pytest.mark.parametrize("Nq, Nk, w", [(1, 1, 1), (17, 17, 5), (100, 257, 32), (257, 257, 300),
                                       (1, 300, 64), (130, 130, 129)])
def test_sliding_mask(Nq, Nk, w):
    t = torch.arange(Nk - Nq, Nk)[:, None]
    s = torch.arange(Nk)[None, :]
    causal = dense(sliding_window_mod(w, True, Nk - Nq), 1, 1, Nq, Nk)[0, 0]
    assert torch.equal(causal, sliding_window_mask(Nq, Nk, w))
    assert torch.equal(causal, (t - w < s) & (s <= t))
    both = dense(sliding_window_mod(w, False, Nk - Nq), 1, 1, Nq, Nk)[0, 0]
    assert torch.equal(both, (t - w < s) & (s < t + w))
    block_mask = create_sliding_mask(Nq, w, seq_len_k=Nk, device="cpu")
    assert isinstance(block_mask, BlockMask) and block_mask.shape == (1, 1, Nq, Nk)
    assert torch.equal(block_mask.to_dense()[0, 0].bool(), tiles_from_tokens(causal))
    token = dense(block_mask.mask_mod, 1, 1, Nq, Nk)[0, 0]
    assert torch.equal(token, causal)


@pytest.mark.parametrize("Nq, Nk, l, d, mem", [(1, 1, 1, 1, 0), (17, 17, 4, 4, 3), (100, 257, 32, 16, 0),
                                               (257, 257, 32, 16, 16), (1, 300, 32, 8, 2),
                                               (5, 20, 32, 16, 1), (200, 333, 48, 16, 5)])
def test_compress_mask(Nq, Nk, l, d, mem):
    Nc = (Nk - l) // d + 1 if Nk >= l else 0
    for causal in (True, False):
        token = dense(compressed_mod(l, d, mem, causal, Nk - Nq), 1, 1, Nq, mem + Nc)[0, 0]
        assert torch.equal(token, compressed_block_mask(Nq, Nk, l, d, mem_kv_len=mem, causal=causal))
        for i in range(Nq):                                    # DESIGN's rule, spelled out
            t = Nk - Nq + i
            for j in range(mem + Nc):
                expected = j < mem or not causal or (j - mem) * d + l - 1 <= t
                assert bool(token[i, j]) == expected
        if mem + Nc:
            block_mask = create_compress_mask(Nq, Nc, d, mem, causal, compress_block_size=l,
                                              seq_len_k=Nk, device="cpu")
            assert block_mask.shape == (1, 1, Nq, mem + Nc)
            assert torch.equal(block_mask.to_dense()[0, 0].bool(), tiles_from_tokens(token))


def test_compress_block_size_defaults_to_stride():
    a = create_compress_mask(512, 128, 4, mem_kv_len=16, device="cpu")
    token = dense(a.mask_mod, 1, 1, 512, 144)[0, 0]
    assert torch.equal(token, compressed_block_mask(512, 512, 4, 4, mem_kv_len=16))
    assert token[:, :16].all()                                 # memory: always visible


@pytest.mark.parametrize("B, Nq, Nk, H, G, l_sel, n", [(1, 1, 1, 1, 1, 4, 1), (2, 17, 17, 2, 3, 4, 3),
                                                       (1, 100, 257, 2, 2, 64, 4), (1, 257, 257, 1, 4, 32, 5),
                                                       (1, 129, 200, 1, 1, 64, 2)])
def test_fine_mask(B, Nq, Nk, H, G, l_sel, n):
    num_blocks = -(-Nk // l_sel)
    g = torch.Generator().manual_seed(Nq + Nk)
    indices = torch.randint(-1, num_blocks, (B, Nq, H, n), generator=g)   # (B, Nq, H, n), -1 = empty
    for causal in (True, False):
        expected = block_selection_mask(indices, l_sel, Nk, causal=causal).repeat_interleave(G, dim=1)
        block_mask = create_fine_mask(Nq, l_sel, causal, seq_len_k=Nk)(indices.transpose(1, 2), G)
        assert block_mask.shape == (B, H * G, Nq, Nk)
        assert torch.equal(dense(block_mask.mask_mod, B, H * G, Nq, Nk), expected)
        assert torch.equal(block_mask.to_dense().bool(), tiles_from_tokens(expected))
        mask_mod = selected_blocks_mod(selected_block_table(indices, num_blocks), l_sel, G)
        if causal:
            mask_mod = and_masks(mask_mod, causal_mod(Nk - Nq))
        assert torch.equal(dense(mask_mod, B, H * G, Nq, Nk), expected)


def test_fine_mask_accepts_int32_and_lives_on_the_indices_device():
    indices = torch.tensor([[[[0, -1]] * 70]], dtype=torch.int32)           # (1, 1, 70, 2)
    block_mask = create_fine_mask(70, 32)(indices)
    assert block_mask.kv_num_blocks.device == indices.device
    assert dense(block_mask.mask_mod, 1, 1, 70, 70)[0, 0, 69].nonzero().flatten().tolist() == list(range(32))


def test_flex_block_size_sets_the_tiles():
    """flex_block_size: the tiles FlexAttention skips or computes, here 32 for the three masks;
    which keys a query sees does not change."""
    Nq, Nk = 100, 257
    window = create_sliding_mask(Nq, 16, seq_len_k=Nk, device="cpu", flex_block_size=32)
    assert window.BLOCK_SIZE == (32, 32)
    causal = sliding_window_mask(Nq, Nk, 16)
    assert torch.equal(window.to_dense()[0, 0].bool(), tiles_from_tokens(causal, 32))
    assert torch.equal(dense(window.mask_mod, 1, 1, Nq, Nk)[0, 0], causal)
    compressed = create_compress_mask(Nq, 63, 4, 2, compress_block_size=8, seq_len_k=Nk, device="cpu",
                                      flex_block_size=32)
    assert compressed.BLOCK_SIZE == (32, 32) and compressed.to_dense().shape[-2:] == (4, 3)
    indices = torch.tensor([[[[0, 3]] * Nq]], dtype=torch.int32)                 # (1, 1, Nq, 2)
    fine = create_fine_mask(Nq, 64, seq_len_k=Nk, flex_block_size=32)(indices)
    assert fine.BLOCK_SIZE == (32, 32)
    assert torch.equal(dense(fine.mask_mod, 1, 1, Nq, Nk)[0, 0],
                       dense(create_fine_mask(Nq, 64, seq_len_k=Nk)(indices).mask_mod, 1, 1, Nq, Nk)[0, 0])


def test_default_device():
    assert create_sliding_mask(64, 8).kv_num_blocks.device.type == nsa.device.DEVICE.type


# ---------------------------------------------------------------- the seed document

def test_seed_demo_runs():
    """shared/seeds/002: the example as written, import path nsa, `.cuda()` only with a GPU."""
    from nsa import create_compress_mask, create_fine_mask, create_sliding_mask

    compress = create_compress_mask(512, 128, 4, mem_kv_len=16)
    print('compress mask:', compress)
    selected_blocks = torch.randint(0, 5, (1, 1, 1024, 2))  # select mostly first few blocks
    device_blocks = selected_blocks.cuda() if torch.cuda.is_available() else selected_blocks
    fine_block_mask = create_fine_mask(1024, 64)(device_blocks)
    print('fine:', fine_block_mask)
    sliding = create_sliding_mask(1024, 32)
    print('sliding:', sliding)
    assert compress.shape == (1, 1, 512, 144)
    assert fine_block_mask.shape == (1, 1, 1024, 1024)
    assert sliding.shape == (1, 1, 1024, 1024)
    token = dense(fine_block_mask.mask_mod, 1, 1, 1024, 1024, device_blocks.device)[0, 0]
    assert torch.equal(token, block_selection_mask(selected_blocks.transpose(1, 2), 64, 1024)[0, 0])


# ---------------------------------------------------------------- the flex backend

SMALL = NSAConfig(compress_block_size=16, compress_stride=8, select_block_size=32,
                  num_selected_blocks=4, num_initial_blocks=1, num_local_blocks=2, window_size=40)


def make_inputs(B, Nq, Nk, Hq, H, Dqk, Dv, mem, config, dtype=torch.float64):
    l, d = config.compress_block_size, config.compress_stride
    Nc = (Nk - l) // d + 1 if Nk >= l else 0
    g = torch.Generator().manual_seed(B * 1000 + Nq * 7 + Nk)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    q, k, v = r(B, Nq, Hq, Dqk), r(B, Nk, H, Dqk), r(B, Nk, H, Dv)
    k_cmp, v_cmp = r(B, mem + Nc, H, Dqk), r(B, mem + Nc, H, Dv)
    g_cmp, g_slc, g_win = torch.rand(3, B, Nq, Hq, generator=g, dtype=dtype)
    return q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win


NAIVE_CASES = [  # B, Nq, Nk, Hq, H, Dqk, Dv, mem_kv_len, causal: small, the naive reference is slow
    (1, 1, 1, 1, 1, 8, 8, 0, True), (2, 17, 17, 4, 2, 8, 4, 0, True), (1, 9, 70, 2, 1, 8, 8, 2, True),
    (1, 13, 45, 2, 2, 8, 8, 1, False),
]


@pytest.mark.parametrize("case", NAIVE_CASES, ids=str)
def test_flex_backend_matches_naive_reference(case):
    *shape, mem, causal = case
    config = dataclasses.replace(SMALL, causal=causal)
    inputs = make_inputs(*shape, mem, config)
    o = flex_sparse_attention(*inputs, config, None, mem)
    expected, _ = naive_nsa(*inputs, config, None, mem)
    torch.testing.assert_close(o, expected)


DISPATCH_CASES = [  # ..., dtype
    (1, 100, 257, 4, 1, 32, 16, 2, True, torch.float64), (1, 257, 257, 2, 2, 16, 16, 3, True, torch.float32),
    (1, 17, 100, 4, 2, 16, 16, 1, False, torch.float64), (1, 1, 300, 4, 2, 16, 16, 0, True, torch.float32),
]


@pytest.mark.parametrize("case", DISPATCH_CASES, ids=str)
def test_flex_backend_equals_torch_backend(case):
    native_sparse_attention = nsa.native_sparse_attention
    *shape, mem, causal, dtype = case
    config = dataclasses.replace(SMALL, causal=causal)
    inputs = make_inputs(*shape, mem, config, dtype)
    flex = native_sparse_attention(*inputs, config, backend="flex", mem_kv_len=mem)
    reference = native_sparse_attention(*inputs, config, backend="torch", mem_kv_len=mem)
    assert flex.dtype == dtype and flex.shape == reference.shape
    torch.testing.assert_close(flex, reference)


def test_paper_config_matches_torch_backend():
    native_sparse_attention = nsa.native_sparse_attention
    config = NSAConfig(window_size=128)                        # l=32, d=16, l'=64, n=16 (1 + 2 forced)
    inputs = make_inputs(1, 300, 1100, 4, 2, 16, 16, 1, config)
    torch.testing.assert_close(native_sparse_attention(*inputs, config, backend="flex", mem_kv_len=1),
                               native_sparse_attention(*inputs, config, backend="torch", mem_kv_len=1))


def test_cpu_backward_is_refused_clearly():
    config = SMALL
    inputs = make_inputs(1, 20, 20, 2, 1, 8, 8, 0, config)
    for position in (0, 1, 3):                                 # q, k, k_cmp
        grad_inputs = list(inputs)
        grad_inputs[position] = grad_inputs[position].clone().requires_grad_(True)
        assert "backward is not supported on CPU" in flex_unsupported(grad_inputs, None, config)
        with torch.no_grad():                                  # no autograd: allowed
            assert flex_unsupported(grad_inputs, None, config) is None
            flex_sparse_attention(*grad_inputs, config, 8 ** -0.5, 0)


def test_cpu_backward_refused_through_dispatch():
    inputs = list(make_inputs(1, 20, 20, 2, 1, 8, 8, 0, SMALL))
    inputs[0].requires_grad_(True)
    with pytest.raises(ValueError, match="flex: backward is not supported on CPU"):
        nsa.native_sparse_attention(*inputs, SMALL, backend="flex")


# ---------------------------------------------------------------- bad input

BAD_CALLS = {
    "seq_len": (lambda: create_sliding_mask(0, 8), ValueError),
    "window_size": (lambda: create_sliding_mask(64, 0), ValueError),
    "causal": (lambda: create_sliding_mask(64, 8, causal="yes"), TypeError),
    "seq_len_k": (lambda: create_sliding_mask(64, 8, seq_len_k=32), ValueError),
    "kv_seq_len": (lambda: create_compress_mask(512, 100, 4, mem_kv_len=16), ValueError),
    "compress_stride": (lambda: create_compress_mask(64, 3, 1.5), TypeError),
    "mem_kv_len": (lambda: create_compress_mask(64, 16, 4, mem_kv_len=-1), ValueError),
    "compress_block_size": (lambda: create_compress_mask(64, 3, 16, compress_block_size=8), ValueError),
    "fine_block_size": (lambda: create_fine_mask(64, 0), ValueError),
    "selected_block_indices": (lambda: create_fine_mask(64, 16)(torch.zeros(1, 1, 64, 2)), TypeError),
    "selected_block_indices ": (lambda: create_fine_mask(64, 16)(torch.full((1, 1, 64, 2), 4)), ValueError),
    "selected_block_indices  ": (lambda: create_fine_mask(64, 16)(torch.full((1, 1, 64, 2), -2)), ValueError),
    "seq_len ": (lambda: create_fine_mask(64, 16)(torch.zeros(1, 1, 32, 2, dtype=torch.long)), ValueError),
    "selected_block_indices   ": (lambda: create_fine_mask(64, 16)(torch.zeros(1, 64, 2, dtype=torch.long)),
                                  ValueError),
    "num_grouped_queries": (lambda: create_fine_mask(64, 16)(torch.zeros(1, 1, 64, 2, dtype=torch.long), 0),
                            ValueError),
}


@pytest.mark.parametrize("name", BAD_CALLS)
def test_bad_input_names_the_argument(name):
    call, error = BAD_CALLS[name]
    with pytest.raises(error, match=name.strip()):
        call()


@pytest.mark.parametrize("packed", [False, True], ids=["batched", "packed"])
def test_layer_kv_per_branch_window_through_flex_equals_torch(packed):
    """A layer with kv_per_branch on the flex backend runs its own window through FlexAttention
    (the backend's window): the same outputs as the reference layer (CPU: forward only)."""
    from nsa import SparseAttention

    torch.manual_seed(3)
    geometry = dict(compress_block_size=8, compress_stride=4, select_block_size=16, num_selected_blocks=3,
                    window_size=24, kv_per_branch=True, num_mem_kv=1)
    layers = {backend: SparseAttention(32, heads=4, kv_heads=2, backend=backend, **geometry).double()
              for backend in ("torch", "flex")}
    layers["flex"].load_state_dict(layers["torch"].state_dict())
    lengths = [5, 17, 40]
    x = torch.randn(1, sum(lengths), 32, dtype=torch.float64) if packed else torch.randn(2, 37, 32, dtype=torch.float64)
    call = dict(cu_seqlens=torch.tensor([0, 5, 22, 62], dtype=torch.int32)) if packed else {}
    with torch.no_grad():
        torch.testing.assert_close(layers["flex"](x, **call), layers["torch"](x, **call))
