"""Chapter 10's sliding-window kernel (kernels/band.py) against the PyTorch reference (chapter 4).

Runs in Triton's interpreter on a CPU (float32 and float16) at small odd shapes."""

import pytest
import torch

import nsa  # noqa: F401  (switches on the interpreter without CUDA, before triton is imported)
from nsa.device import DEVICE
from nsa.kernels.band import sliding_window_attention_triton
from nsa.window import sliding_window_attention
from tolerance import TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,Nq,Nk,Hq,H,Dqk,Dv,w,causal", [
    (1, 77, 77, 1, 1, 16, 16, 32, True),      # MHA, odd length, several windows
    (2, 45, 100, 8, 2, 32, 16, 17, True),     # group 4, Nq < Nk, odd window, Dqk != Dv
    (1, 40, 40, 6, 2, 16, 16, 64, True),      # group 3 (padded to 4), window longer than N
    (1, 25, 50, 16, 1, 16, 16, 8, True),      # group 16
    (1, 60, 90, 4, 2, 16, 16, 20, False),     # non-causal
    (1, 1, 33, 2, 1, 16, 16, 32, True),       # one query (decoding)
])
def test_window_matches_reference(dtype, B, Nq, Nk, Hq, H, Dqk, Dv, w, causal):
    g = torch.Generator().manual_seed(Nq * 7 + Nk)
    make = lambda *shape: torch.randn(*shape, generator=g).to(DEVICE, dtype).requires_grad_()
    q, k, v = make(B, Nq, Hq, Dqk), make(B, Nk, H, Dqk), make(B, Nk, H, Dv)
    o = sliding_window_attention_triton(q, k, v, w, causal=causal)
    assert o.dtype == dtype and o.shape == (B, Nq, Hq, Dv)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    ref = [x.detach().float().requires_grad_() for x in (q, k, v)]
    o_ref = sliding_window_attention(*ref, w, causal=causal)
    grads_ref = torch.autograd.grad(o_ref, ref, do.float())
    torch.testing.assert_close(o.float(), o_ref, **TOL[dtype])
    for grad, grad_ref in zip(grads, grads_ref):
        torch.testing.assert_close(grad.float(), grad_ref, **TOL[dtype])


def test_window_limits_are_checked_before_launch():
    q = torch.randn(1, 8, 2, 16, device=DEVICE)
    k = v = torch.randn(1, 8, 1, 16, device=DEVICE)
    with pytest.raises(ValueError, match="window_size"):
        sliding_window_attention_triton(q, k, v, 0)
    with pytest.raises(TypeError, match="causal"):
        sliding_window_attention_triton(q, k, v, 4, causal=1)
    with pytest.raises(TypeError, match="float64|float16"):
        sliding_window_attention_triton(q.double(), k.double(), v.double(), 4)
    with pytest.raises(ValueError, match="head dim"):
        big = torch.randn(1, 8, 1, 512, device=DEVICE)
        sliding_window_attention_triton(big, big, big, 4)
