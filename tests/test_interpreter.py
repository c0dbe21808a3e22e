"""What `nsa.kernels` changes in Triton's CPU interpreter (kernels/__init__.py): triton.language
patched once per launch, not again at every helper call, and restored when the launch ends; no
int32 overflow checks that Triton then drops; NumPy's dtype of a Triton dtype kept, not rebuilt at
every call; and Triton 3.6's index of a scalar, which NumPy 2 refused."""

import numpy as np
import pytest
import torch

import nsa  # noqa: F401  (switches on the interpreter without CUDA, before triton is imported)
from nsa.device import INTERPRET

pytestmark = pytest.mark.skipif(not INTERPRET, reason="Triton's interpreter only (no CUDA)")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _row_sum(X, row, N: tl.constexpr):
    x = tl.load(X + row * N + tl.arange(0, N))
    return tl.sum(x, 0)                         # Triton's own helper: its module sees triton.language.core


@triton.jit
def _row_sums_kernel(X, OUT, FAIL: tl.constexpr, N: tl.constexpr):
    row = tl.program_id(0)
    total = _row_sum(X, row, N) + tl.max(tl.zeros([N], dtype=tl.float32), 0)
    if FAIL:
        tl.static_assert(N < 0, "a launch that fails inside")
    tl.store(OUT + row, total)


def _language_state():
    """Every attribute of the modules and class the interpreter patches, by identity."""
    return {(owner.__name__, name): id(value) for owner in (tl, tl.core, tl.math, tl.tensor)
            for name, value in vars(owner).items()}


def test_launches_with_helpers_patch_once_and_restore_the_language():
    from nsa import kernels

    x = torch.randn(5, 16)
    out = torch.empty(5)
    _row_sums_kernel[(5,)](x, out, FAIL=False, N=16)
    before = _language_state()        # after a first launch: Triton's restore sets inherited attributes
    for _ in range(2):                                   # each launch patches afresh
        _row_sums_kernel[(5,)](x, out, FAIL=False, N=16)
        torch.testing.assert_close(out, x.sum(1))
        assert _language_state() == before and not kernels._launch
    with pytest.raises(Exception, match="a launch that fails inside"):
        _row_sums_kernel[(5,)](x, out, FAIL=True, N=16)
    assert _language_state() == before and not kernels._launch


def test_a_helper_is_not_patched_again(monkeypatch):
    """Inside a launch, our helper and Triton's own (tl.sum, tl.max, tl.zeros) reach Triton's patch
    twice in all: the launch's, and triton.language.core's at the first of Triton's helpers."""
    from nsa import kernels

    triton_patch, calls = kernels._patch_lang, []
    monkeypatch.setattr(kernels, "_patch_lang", lambda fn: calls.append(fn.__name__) or triton_patch(fn))
    x = torch.randn(3, 16)
    out = torch.empty(3)
    _row_sums_kernel[(3,)](x, out, FAIL=False, N=16)
    torch.testing.assert_close(out, x.sum(1))
    assert calls[0] == "_row_sums_kernel" and len(calls) == 2, calls


@triton.jit
def _prefix_sums_kernel(X, OUT, N: tl.constexpr):
    row = tl.program_id(0)
    total = tl.zeros([N], dtype=tl.float32)
    for i in range(row, tl.num_programs(0)):                # bounds computed in the kernel: scalars
        total += tl.load(X + i * N + tl.arange(0, N))
    tl.store(OUT + row * N + tl.arange(0, N), total)


def test_computed_loop_bounds_and_the_scalar_index_for_triton_3_6():
    """A loop over computed bounds runs (Triton 3.6's own `__index__`, int of a (1,) array, fails
    under NumPy 2); and the index that nsa.kernels installs for 3.6 takes a scalar's (1,) array and
    is undone with the interpreter's other patches."""
    from triton.runtime import interpreter

    from nsa import kernels

    x = torch.randn(4, 16)
    out = torch.empty(4, 16)
    _prefix_sums_kernel[(4,)](x, out, N=16)
    torch.testing.assert_close(out, x.flip(0).cumsum(0).flip(0))

    class Tensor:                                               # the language's tensor class, patched
        def __init__(self, data):
            self.handle = interpreter.TensorHandle(data, tl.int32)

    scope = interpreter._LangPatchScope()
    kernels._patch_lang_tensor_with_squeezed_index(Tensor, scope)
    assert list(range(Tensor(np.array([1], dtype=np.int32)), Tensor(np.array([4], dtype=np.int32)))) == [1, 2, 3]
    scope.restore()
    assert not hasattr(Tensor, "__index__")


@triton.jit
def _int32_product_kernel(X, OUT, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(OUT + offs, tl.load(X + offs) * 65536)


def test_int32_arithmetic_makes_no_overflow_checks(monkeypatch):
    """The interpreter's overflow check of int32 arithmetic (its product in int64 compared with
    int32's bounds, then dropped: Triton asserts only in debug mode) is off: an int32 product casts
    nothing to int64, and past 2**31 it wraps, as on a GPU."""
    from triton.runtime import interpreter

    casts = []
    create_int_cast = interpreter.InterpreterBuilder.create_int_cast
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_int_cast",
                        lambda self, *args: casts.append(args) or create_int_cast(self, *args))
    x = torch.tensor([1, 32767, 32768, -32769], dtype=torch.int32)
    out = torch.empty_like(x)
    _int32_product_kernel[(1,)](x, out, N=4)
    assert out.tolist() == [65536, 2147418112, -2147483648, 2147418112] and casts == []


def test_numpy_dtypes_are_kept_and_equal_the_interpreters(monkeypatch):
    """The kept map answers as the interpreter's own for scalars, pointers and blocks of both, and
    asks the interpreter once for each scalar type."""
    from triton.runtime import interpreter

    from nsa import kernels

    assert interpreter._get_np_dtype is kernels._np_dtype_kept
    interpreter_np_dtype, asked = kernels._np_dtype, []
    monkeypatch.setattr(kernels, "_np_dtypes", {})
    monkeypatch.setattr(kernels, "_np_dtype", lambda t: asked.append(t.name) or interpreter_np_dtype(t))
    scalars = [tl.int1, tl.int8, tl.uint8, tl.int16, tl.int32, tl.uint32, tl.int64, tl.float16, tl.bfloat16,
               tl.float32, tl.float64, tl.float8e5]
    types = scalars + [tl.pointer_type(t) for t in scalars]
    types += [tl.block_type(t, [4, 16]) for t in types]
    for _ in range(2):
        for t in types:
            assert kernels._np_dtype_kept(t) == interpreter_np_dtype(t), t
    assert sorted(asked) == sorted(t.name for t in types[:2 * len(scalars)])
