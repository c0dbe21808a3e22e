"""Chapter 9's Triton kernels (kernels/band.py, kernels/selection.py) against the PyTorch reference (chapters 2-3).

Runs in Triton's interpreter on a CPU (float32 and float16) at small odd shapes; on a GPU the
same tests run the compiled kernels."""

import pytest
import torch

import nsa  # noqa: F401  (switches on the interpreter without CUDA, before triton is imported)
from nsa.compression import compressed_attention
from nsa.geometry import num_compressed_blocks
from nsa.config import NSAConfig
from nsa.device import DEVICE
from nsa.kernels.band import compressed_attention_triton
from nsa.kernels import selection
from nsa.kernels.selection import EMPTY, GONE, merge_top, select_blocks_triton
from nsa.selection import select_blocks, selection_scores
from tolerance import TOL

import triton  # noqa: E402  (after nsa: the interpreter switch)
import triton.language as tl  # noqa: E402


def make(B, Nq, Nk, Hq, H, Dqk, Dv, l, d, mem, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    Nc = num_compressed_blocks(Nk, l, d)
    r = lambda *shape: torch.randn(*shape, generator=g).to(DEVICE, dtype)
    return r(B, Nq, Hq, Dqk), r(B, mem + Nc, H, Dqk), r(B, mem + Nc, H, Dv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,Nq,Nk,Hq,H,Dqk,Dv,l,d,mem,causal", [
    (1, 37, 37, 1, 1, 16, 16, 16, 8, 0, True),      # MHA, odd length
    (2, 45, 90, 6, 3, 32, 16, 16, 8, 2, True),      # group 2, Nq < Nk, memory, Dqk != Dv
    (1, 33, 33, 12, 4, 16, 32, 32, 16, 1, True),    # group 3 (padded to 4)
    (1, 21, 40, 16, 1, 16, 16, 16, 8, 0, True),     # group 16
    (1, 30, 50, 4, 2, 16, 16, 16, 8, 1, False),     # non-causal
    (1, 12, 12, 2, 1, 16, 16, 16, 8, 0, True),      # Nk < l: no compressed block, nothing to see
])
def test_compressed_attention_matches_reference(dtype, B, Nq, Nk, Hq, H, Dqk, Dv, l, d, mem, causal):
    q, k_cmp, v_cmp = (x.requires_grad_() for x in make(B, Nq, Nk, Hq, H, Dqk, Dv, l, d, mem, dtype))
    o, lse = compressed_attention_triton(q, k_cmp, v_cmp, l, d, causal=causal, mem_kv_len=mem, seq_len_k=Nk)
    assert o.dtype == dtype and lse.dtype == torch.float32 and o.shape == (B, Nq, Hq, Dv)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k_cmp, v_cmp), do)
    ref = [x.detach().float().requires_grad_() for x in (q, k_cmp, v_cmp)]
    o_ref, lse_ref = compressed_attention(*ref, l, d, causal=causal, mem_kv_len=mem, seq_len_k=Nk)
    grads_ref = torch.autograd.grad(o_ref, ref, do.float())
    torch.testing.assert_close(o.float(), o_ref, **TOL[dtype])
    torch.testing.assert_close(lse, lse_ref, **TOL[dtype])
    for grad, grad_ref in zip(grads, grads_ref):
        assert torch.isfinite(grad).all()
        torch.testing.assert_close(grad.float(), grad_ref, **TOL[dtype])


def test_query_that_sees_nothing_gets_zero_and_minus_inf():
    q, k_cmp, v_cmp = make(1, 20, 20, 2, 1, 16, 16, 16, 8, 0, torch.float32)
    o, lse = compressed_attention_triton(q, k_cmp, v_cmp, 16, 8)
    assert torch.isfinite(o).all()
    assert (o[:, :15] == 0).all() and (lse[:, :15] == float("-inf")).all()   # t < l - 1 = 15
    assert torch.isfinite(lse[:, 15:]).all()


CONFIGS = [
    NSAConfig(16, 8, 16, 4, 1, 2, 32),
    NSAConfig(16, 8, 32, 5, 2, 1, 32),              # n not a power of two, l' = 4 d
    NSAConfig(32, 16, 32, 3, 0, 0, 32),             # no forced blocks
    NSAConfig(16, 8, 16, 20, 1, 2, 32),             # n larger than the blocks there are
    NSAConfig(16, 8, 16, 4, 1, 2, 32, causal=False),
    NSAConfig(16, 16, 16, 4, 1, 1, 32),             # l = d = l': one compressed block per block, no spill
    NSAConfig(32, 8, 32, 4, 1, 2, 32),              # l = l' = 4 d: three places spill into the next block
]


@pytest.mark.parametrize("config", CONFIGS, ids=range(len(CONFIGS)))
@pytest.mark.parametrize("dtype,B,Nq,Nk,Hq,H,D,mem", [(torch.float32, 1, 97, 97, 4, 2, 16, 0),
                                                      (torch.float16, 2, 50, 151, 3, 1, 32, 2)])
def test_fused_selection_equals_reference(dtype, config, B, Nq, Nk, Hq, H, D, mem):
    if DEVICE.type == "cuda" and dtype == torch.float32:
        pytest.skip("float32 q.k runs as tf32 on a GPU: near-ties may rank differently (fp16 is exact)")
    l, d = config.compress_block_size, config.compress_stride
    q, k_cmp, v_cmp = make(B, Nq, Nk, Hq, H, D, D, l, d, mem, dtype, seed=Nq)
    _, lse = compressed_attention_triton(q, k_cmp, v_cmp, l, d, causal=config.causal,
                                         mem_kv_len=mem, seq_len_k=Nk)
    chosen = select_blocks_triton(q, k_cmp, lse, Nk, config, mem_kv_len=mem)
    scores = selection_scores(q.float(), k_cmp.float(), lse, Nk, config, mem_kv_len=mem)
    expected = select_blocks(scores, Nk, config)
    assert chosen.dtype == torch.int32 and chosen.shape == expected.shape
    assert torch.equal(chosen, expected)


@pytest.mark.parametrize("heads_kv", [2, 1], ids=["group 1: first step before the loop", "group 2: in the loop"])
@pytest.mark.parametrize("n, causal", [(8, True), (16, True), (16, False)])
def test_fused_selection_first_step_is_the_top(n, causal, heads_kv):
    # n = 16, the step's blocks: the kernel takes the first step's candidates as its running top;
    # n = 8: they are merged into an empty top; then the later steps; 300 keys = 19 blocks. The last
    # 64 queries (positions 236-299): causal ones see 15 to 19 blocks, within the first step and past it
    config = NSAConfig(16, 8, 16, n, 1, 2, 32, causal=causal)
    q, k_cmp, v_cmp = make(1, 64, 300, 2, heads_kv, 16, 16, 16, 8, 0, torch.float16, seed=n)
    _, lse = compressed_attention_triton(q, k_cmp, v_cmp, 16, 8, causal=causal, seq_len_k=300)
    chosen = select_blocks_triton(q, k_cmp, lse, 300, config)
    expected = select_blocks(selection_scores(q.float(), k_cmp.float(), lse, 300, config), 300, config)
    assert torch.equal(chosen, expected)


@pytest.mark.parametrize("n", [16, 5])
def test_fused_selection_long_step_at_group_16(n):
    # groups of 16 walk 32 selection blocks per step (the first merged into an empty top, as n is
    # not the step's blocks); 700 keys = 44 blocks: a full step and a partial one. The last 200
    # queries (positions 500-699) see 32 to 44 blocks: the first step alone, and both
    config = NSAConfig(16, 8, 16, n, 1, 2, 32)
    q, k_cmp, v_cmp = make(1, 200, 700, 16, 1, 16, 16, 16, 8, 0, torch.float16, seed=n)
    _, lse = compressed_attention_triton(q, k_cmp, v_cmp, 16, 8, seq_len_k=700)
    chosen = select_blocks_triton(q, k_cmp, lse, 700, config)
    expected = select_blocks(selection_scores(q.float(), k_cmp.float(), lse, 700, config), 700, config)
    assert torch.equal(chosen, expected)


@pytest.mark.parametrize("held_bytes, causal", [(16 * 16 * 2, True), (3 * 16 * 16 * 2, False)],
                         ids=["one head held", "three held"])
def test_fused_selection_reads_the_heads_it_does_not_hold(monkeypatch, held_bytes, causal):
    # a group larger than the q tiles a program holds (HELD_Q_BYTES; 32 heads at d = 128 in bf16 on
    # a GPU) reads the other heads' q and lse again at every step: the same blocks as holding all
    # 6 heads (16 positions of d = 16 in fp16: 512 bytes a head)
    monkeypatch.setattr(selection, "HELD_Q_BYTES", held_bytes)
    assert selection.held_heads(6, 16, 16, 2) == held_bytes // 512 < 6
    config = NSAConfig(16, 8, 16, 5, 1, 2, 32, causal=causal)
    q, k_cmp, v_cmp = make(1, 40, 333, 6, 1, 16, 16, 16, 8, 1, torch.float16, seed=held_bytes)
    _, lse = compressed_attention_triton(q, k_cmp, v_cmp, 16, 8, causal=causal, mem_kv_len=1, seq_len_k=333)
    chosen = select_blocks_triton(q, k_cmp, lse, 333, config, mem_kv_len=1)
    scores = selection_scores(q.float(), k_cmp.float(), lse, 333, config, mem_kv_len=1)
    assert torch.equal(chosen, select_blocks(scores, 333, config))


def test_held_heads_fit_the_shared_memory_the_group_32_build_measured():
    assert selection.held_heads(32, 16, 128, 2) == 32 and selection.held_heads(64, 16, 128, 2) == 32
    assert selection.held_heads(16, 16, 128, 4) == 16 and selection.held_heads(16, 16, 256, 4) == 8
    assert selection.held_heads(1, 128, 256, 4) == 1 and selection.held_heads(4, 64, 64, 2) == 4


@triton.jit
def _merge_top_kernel(TOP, CAND, OUT, M: tl.constexpr, SLOTS: tl.constexpr, C: tl.constexpr):
    rows = tl.arange(0, M)[:, None]
    top = tl.load(TOP + rows * SLOTS + tl.arange(0, SLOTS)[None, :])
    cand = tl.load(CAND + rows * C + tl.arange(0, C)[None, :])
    tl.store(OUT + rows * SLOTS + tl.arange(0, SLOTS)[None, :], merge_top(top, cand, GONE))


@pytest.mark.parametrize("num_select, slots, C", [(16, 16, 256), (5, 8, 64), (4, 4, 4)])
def test_merge_top_takes_the_best_of_many_candidates(num_select, slots, C):
    # many candidates at once (more than the top has slots): the rounds are capped at the slots,
    # and the result is still the best n of the top and the candidates together
    g = torch.Generator().manual_seed(C)
    M = 4
    cand = torch.randint(0, 1 << 40, (M, C), generator=g, dtype=torch.int64)
    cand[:, ::3] = GONE.value                                          # some may not enter
    top = torch.where(torch.arange(slots) < num_select, EMPTY.value - torch.arange(slots), 2**63 - 1)
    top = top.expand(M, slots).clone()
    top[1, 0] = 1 << 41                                                # a kept key that stays
    out = torch.empty_like(top, device=DEVICE)
    _merge_top_kernel[(1,)](top.to(DEVICE), cand.to(DEVICE), out, M=M, SLOTS=slots, C=C)
    out = out.cpu()
    for row in range(M):
        real = torch.cat([top[row, :num_select], cand[row][cand[row] != GONE.value]])
        expected = real.sort(descending=True).values[:num_select]
        assert torch.equal(out[row, :num_select].sort(descending=True).values, expected)
        assert (out[row, num_select:] == 2**63 - 1).all()


def test_ties_go_to_the_lower_block_index():
    # all-zero queries: every visible compressed block gets the same probability, so many
    # selection blocks tie exactly; the reference's stable rule must be reproduced
    config = NSAConfig(16, 8, 16, 4, 1, 1, 32)
    q, k_cmp, v_cmp = make(1, 80, 80, 2, 1, 16, 16, 16, 8, 0, torch.float16)
    q = torch.zeros_like(q)
    _, lse = compressed_attention_triton(q, k_cmp, v_cmp, 16, 8)
    chosen = select_blocks_triton(q, k_cmp, lse, 80, config)
    expected = select_blocks(selection_scores(q.float(), k_cmp.float(), lse, 80, config), 80, config)
    assert torch.equal(chosen, expected)


def test_limits_are_checked_before_launch():
    q, k_cmp, v_cmp = make(1, 20, 20, 2, 1, 16, 16, 16, 8, 0, torch.float32)
    with pytest.raises(TypeError, match="bfloat16|float64"):
        compressed_attention_triton(q.double(), k_cmp.double(), v_cmp.double(), 16, 8)
    q32, k32, v32 = make(1, 20, 20, 129, 1, 16, 16, 16, 8, 0, torch.float32)
    with pytest.raises(ValueError, match="group size"):
        compressed_attention_triton(q32, k32, v32, 16, 8)
    _, lse = compressed_attention_triton(q, k_cmp, v_cmp, 16, 8)
    with pytest.raises(ValueError, match="power of two"):
        select_blocks_triton(q, k_cmp, lse, 20, NSAConfig(16, 8, 24, 4, 1, 2, 32))
    with pytest.raises(ValueError, match="lse"):
        select_blocks_triton(q, k_cmp, lse[:, :3], 20, NSAConfig(16, 8, 16, 4, 1, 2, 32))
    with pytest.raises(ValueError, match="compress_block_size = 32 > select_block_size = 16"):
        select_blocks_triton(q, k_cmp, lse, 20, NSAConfig(32, 8, 16, 4, 1, 2, 32))
    with pytest.raises(TypeError, match="NSAConfig"):
        select_blocks_triton(q, k_cmp, lse, 20, dict(select_block_size=16))
    with pytest.raises(ValueError, match="num_selected_blocks = 1025"):
        select_blocks_triton(q, k_cmp, lse, 20, NSAConfig(16, 8, 16, 1025, 1, 2, 32))
