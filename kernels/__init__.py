"""Triton kernels of the book (chapters 7-10), installed as `nsa.kernels`.

Hand-written glue. Import it as `nsa.kernels`, never as a top-level `kernels`.

Under Triton's CPU interpreter `tl.dot` is numpy's matrix product, and numpy's BLAS rounds an
element according to where it sits in the output (two dot products of equal vectors may differ in
the last bit), whereas a GPU's tensor-core instructions compute every element of a tile by the
same steps. The selection kernel's exact ties (chapter 9) rest on the GPU's behaviour, so on the
interpreter `tl.dot` of floating-point tiles here adds each element's products in float64 with
`np.einsum` (one loop, the same for every element) and rounds once to the accumulator's dtype.
"""

import nsa.device  # noqa: F401  (sets TRITON_INTERPRET on a machine without CUDA, before triton)

if nsa.device.INTERPRET:
    import numpy as np
    from triton.runtime import interpreter as _interpreter

    _numpy_dot = _interpreter.InterpreterBuilder.create_dot

    def _dot_in_float64(self, a, b, d, *precision):
        """`tl.dot` on the interpreter: every element summed alike (bf16 and fp8, stored as raw
        bits, keep numpy's matmul)."""
        if not a.data.dtype.kind == b.data.dtype.kind == d.data.dtype.kind == "f":
            return _numpy_dot(self, a, b, d, *precision)
        product = np.einsum("...ik,...kj->...ij", a.data.astype(np.float64), b.data.astype(np.float64))
        return _interpreter.TensorHandle(product.astype(d.data.dtype) + d.data, d.dtype.scalar)

    _interpreter.InterpreterBuilder.create_dot = _dot_in_float64
