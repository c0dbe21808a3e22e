"""How close a Triton kernel's float32 or float16 result must be, where the tests run.

Under Triton's CPU interpreter (TRITON_INTERPRET=1, the CPU CI) a float32 `tl.dot` is a float32
product computed by NumPy on the CPU, so the kernel tests hold
float32 results to 1e-4 or so of a float64 reference, and to 2e-5 of the same computation done
another way (a decoding step against the whole sequence).

On a GPU Triton runs a float32 `tl.dot` as TF32: the tensor cores read 10 of each factor's 23
mantissa bits (the low 13 are dropped, not rounded), up to 1e-3 relative error per factor, in
Q K^T as in P V and in every product of the backward. On O(1) outputs and gradients that gives
absolute errors of a few 1e-3 (an H100: 2.6e-3 on a selected-attention output, 3.9e-3 on a
gated dq; TF32 simulated on other random inputs: 6e-3 on gradients summed over 16 query heads);
two TF32 computations of the same result differ by as much when they round different factors.
float16 tiles multiply exactly on both, but P is rounded to float16 before P @ V and the GPU sums
in another order (with an approximate exp2), so float16 checks get a floor there too. bfloat16 is
not run by the interpreter; its checks keep what the tests say.

The rule, `close(dtype, atol, rtol=None)`: the test's own tolerance under the interpreter,
unchanged (the CPU CI stays as strict as it was); on a GPU, the larger of it and the GPU's floor:
1e-2 absolute and relative for float32, 5e-3 for float16 (never tighter than the interpreter's).
`gpu=` gives a check's own GPU tolerance instead of the floor: a gradient that the test scales up
(of `out.square().sum()`), or a GPU tolerance the test had before this module.
"""

import torch

from nsa.device import DEVICE, INTERPRET

# True where Triton compiles the kernels for a GPU (float32 dots in TF32); False in the interpreter.
GPU = DEVICE.type == "cuda" and not INTERPRET

GPU_FLOOR = {torch.float32: 1e-2, torch.float16: 5e-3}


def close(dtype, atol, rtol=None, gpu=None):
    """`dict(atol=..., rtol=...)` for `torch.testing.assert_close` of a kernel's `dtype` result:
    atol and rtol (rtol defaults to atol) under the interpreter; on a GPU each raised to `gpu`,
    or else to the dtype's floor in GPU_FLOOR (other dtypes: as given)."""
    rtol = atol if rtol is None else rtol
    if not GPU:
        return dict(atol=atol, rtol=rtol)
    floor = GPU_FLOOR.get(dtype, 0.0) if gpu is None else gpu
    return dict(atol=max(atol, floor), rtol=max(rtol, floor))


# The kernel files' checks against a reference (test_kernels_compressed, test_kernels_window,
# test_triton_backend): float32 2e-4 under the interpreter, 3e-2 on a GPU; float16 3e-2 on both.
TOL = {torch.float32: close(torch.float32, 2e-4, gpu=3e-2), torch.float16: close(torch.float16, 3e-2)}
