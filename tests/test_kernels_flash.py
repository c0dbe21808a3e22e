"""Chapter 7: the flash-attention primer kernel against chapter 1's dense attention.

Runs in Triton's interpreter on a CPU (fp32 and fp16; tiny shapes), or on a GPU when there is one.
"""

import pytest
import torch

import nsa  # first: switches Triton to its interpreter on a machine without CUDA
from nsa import attention, causal_mask
from nsa.device import DEVICE
from nsa.kernels.flash import flash_attention
from tolerance import close

SHAPES = [  # B, Nq, Nk, Hq, H, Dqk, Dv
    (1, 1, 1, 1, 1, 16, 16),
    (2, 17, 17, 4, 2, 16, 16),
    (1, 1, 100, 2, 1, 32, 16),       # decoding
    (1, 45, 70, 3, 1, 24, 40),       # group 3, padded head dims, Nq < Nk
    (1, 33, 33, 16, 1, 16, 16),      # group 16
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_matches_dense_attention(shape, dtype, causal):
    B, Nq, Nk, Hq, H, Dqk, Dv = shape
    gen = torch.Generator(DEVICE).manual_seed(Nq + Nk)
    make = lambda *s: torch.randn(*s, generator=gen, device=DEVICE, dtype=dtype)
    q, k, v = make(B, Nq, Hq, Dqk), make(B, Nk, H, Dqk), make(B, Nk, H, Dv)
    o, lse = flash_attention(q, k, v, scale=0.2, causal=causal, return_lse=True)
    mask = causal_mask(Nq, Nk, DEVICE) if causal else None
    o_ref, lse_ref = attention(q.double(), k.double(), v.double(), mask, scale=0.2, return_lse=True)
    tol = close(dtype, 1e-4) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(o, o_ref.to(dtype), **tol)
    torch.testing.assert_close(lse, lse_ref.float(), **tol)


def test_errors_before_launch():
    q = torch.randn(1, 4, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="forward-only"):
        flash_attention(q.requires_grad_(), q, q)
    with pytest.raises(TypeError, match="float16"):
        flash_attention(*(torch.randn(1, 4, 1, 16, dtype=torch.float64, device=DEVICE),) * 3)
    with pytest.raises(ValueError, match="256"):
        flash_attention(*(torch.randn(1, 4, 1, 512, device=DEVICE),) * 3)
    with pytest.raises(TypeError, match="causal"):
        flash_attention(*(torch.randn(1, 4, 1, 16, device=DEVICE),) * 3, causal="yes")


class _FakeKernel:
    """Stands in for a Triton kernel on a GPU with `capacity` bytes of shared memory: a launch
    needs BLOCK_M * BLOCK_N * stages bytes."""
    __name__ = "fake_kernel"

    def __init__(self, capacity):
        self.capacity, self.launches = capacity, []

    def __getitem__(self, grid):
        def launch(*args, num_warps, num_stages, **tiles):
            from triton.runtime.errors import OutOfResources
            need = tiles["BLOCK_M"] * tiles["BLOCK_N"] * num_stages
            self.launches.append((grid, dict(tiles), num_stages))
            if need > self.capacity:
                raise OutOfResources(need, self.capacity, "shared memory")
        return launch


def test_launch_fitting_shrinks_stages_then_tiles_and_remembers():
    from nsa.kernels.common import launch_fitting
    kernel = _FakeKernel(capacity=64 * 32 * 1)
    x = torch.zeros(1)
    used = launch_fitting(kernel, lambda t: (100 // t["BLOCK_M"],), (x,), dict(BLOCK_M=64, BLOCK_N=64),
                          num_warps=4, num_stages=3, shrink=(("BLOCK_N", 16), ("BLOCK_M", 16)))
    assert used == dict(BLOCK_M=64, BLOCK_N=32)
    assert [stages for _, _, stages in kernel.launches] == [3, 2, 1, 1]      # stages first, then BLOCK_N
    assert kernel.launches[-1][0] == (1,)                                    # the grid follows the tiles
    kernel.launches.clear()                                                  # a second call: straight to the fit
    launch_fitting(kernel, lambda t: (1,), (x,), dict(BLOCK_M=64, BLOCK_N=64), num_warps=4, num_stages=3,
                   shrink=(("BLOCK_N", 16), ("BLOCK_M", 16)))
    assert len(kernel.launches) == 1


def test_launch_fitting_says_when_nothing_fits():
    from nsa.kernels.common import launch_fitting
    with pytest.raises(ValueError, match="fake_kernel: even the smallest tiles"):
        launch_fitting(_FakeKernel(capacity=10), lambda t: (1,), (torch.zeros(1),), dict(BLOCK_M=32, BLOCK_N=32),
                       num_warps=4, num_stages=2, shrink=(("BLOCK_N", 16),))
