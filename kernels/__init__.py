"""Triton kernels of the book (chapters 7-10 and 13), installed as `nsa.kernels`.

Hand-written glue. Import it as `nsa.kernels`, never as a top-level `kernels`.

Under Triton's CPU interpreter `tl.dot` is numpy's matrix product, and numpy's BLAS rounds an
element according to where it sits in the output (two dot products of equal vectors may differ in
the last bit), whereas a GPU's tensor-core instructions compute every element of a tile by the
same steps. The selection kernel's exact ties (chapter 9) rest on the GPU's behaviour, so on the
interpreter `tl.dot` of floating-point tiles here adds each element's products in float64 with
`np.einsum` (one loop, the same for every element) and rounds once to the accumulator's dtype.

The interpreter also patches triton.language anew at every call of a `@triton.jit` helper inside
a kernel; here it is patched once per launch (below), which takes a third off the interpreted
runs of the tests and chapters (tests/test_interpreter.py checks the language is restored).

The interpreter computes an overflow check for every int32 add, sub and mul and then drops it
(Triton asserts only in its debug mode): pure cost, about two fifths of an interpreted decoding
step's time. It is off here. And its map from a Triton dtype to NumPy's, rebuilt at every call
(several per interpreted operation), is kept here after each type's first call.

And Triton 3.6's interpreter turns a kernel's scalar (a NumPy array of shape (1,) there) into a
Python int, for a loop's bounds, with `int(array)`, which NumPy 2 refuses for arrays of one
dimension: every kernel whose loop bounds are computed failed. Triton 3.7 squeezes the array
first; on 3.6 its `__index__` is installed here.
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

    # Triton's interpreter patches triton.language for a kernel's launch (restoring it when the
    # launch ends) and again at every call of a @triton.jit helper inside it: an inspect.getmembers
    # of the language's modules, about 2 ms, in every program, for every helper call. Here the
    # launch patches once: a helper whose module sees only language modules patched already (ours
    # see triton.language; Triton's own, tl.sum or tl.zeros, also triton.language.core) is not
    # patched again, and what a helper patches first is restored with the launch.
    import triton.language as _tl

    _patch_lang = _interpreter._patch_lang
    _launch = []        # (language modules patched, their scopes) of the launch in progress

    class _LaunchScope:
        """The launch's patches, undone when the launch ends (the launch restores this scope)."""

        def restore(self):
            _, scopes = _launch.pop()
            for scope in reversed(scopes):
                scope.restore()

    def _patch_lang_once_per_launch(fn):
        langs = {id(value) for value in fn.__globals__.values() if value is _tl or value is _tl.core}
        if _launch and langs <= _launch[0][0]:
            return _interpreter._LangPatchScope()             # a helper: patched already
        scope = _patch_lang(fn)
        if _launch:                                           # a helper that sees another module
            _launch[0][0].update(langs)
            _launch[0][1].append(scope)
            return _interpreter._LangPatchScope()
        _launch.append((langs, [scope]))                      # a launch
        return _LaunchScope()

    _interpreter._patch_lang = _patch_lang_once_per_launch

    # The interpreter's overflow check of int32 add, sub and mul: the result in int64 compared with
    # int32's bounds, eight more interpreted operations each, and then dropped (device_assert does
    # nothing outside debug mode). Off: the same results without the cost.
    import dataclasses as _dataclasses

    _interpreter.interpreter_builder.options = _dataclasses.replace(_interpreter.interpreter_builder.options,
                                                                     sanitize_overflow=False)

    # Triton 3.6: a scalar's `__index__` as 3.7 has it (int of the squeezed array), installed after
    # the interpreter's own whenever it patches the language's tensor class.
    import re as _re
    import triton as _triton

    _patch_lang_tensor = _interpreter._patch_lang_tensor

    def _patch_lang_tensor_with_squeezed_index(tensor, scope):
        _patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    if tuple(int(part) for part in _re.findall(r"\d+", _triton.__version__)[:2]) < (3, 7):
        _interpreter._patch_lang_tensor = _patch_lang_tensor_with_squeezed_index

    # The interpreter maps a Triton dtype to NumPy's by building a dict of nineteen dtypes at every
    # call (hashing each; 41 us a call under cProfile), several times per interpreted operation:
    # a twelfth of a profiled paged-cache test. Here the answer is kept for each scalar type after
    # its first call (a block's is its element's).
    _np_dtype = _interpreter._get_np_dtype
    _np_dtypes = {}

    def _np_dtype_kept(tt_dtype):
        scalar = tt_dtype.element_ty if isinstance(tt_dtype, _tl.block_type) else tt_dtype
        try:
            return _np_dtypes[scalar.name]          # pointer types have no hash; every type a name
        except KeyError:
            return _np_dtypes.setdefault(scalar.name, _np_dtype(scalar))

    _interpreter._get_np_dtype = _np_dtype_kept
