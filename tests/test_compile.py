"""torch.compile(fullgraph=True) on a model with SparseAttention: no graph break, same numbers.

The torch backend traces into one graph (no host reads on its path); the Triton backend is
`torch.library` custom operators with fake implementations (NSA's forward and backward, and the
window's for a layer with kv_per_branch), opaque to the compiler (on the CPU their kernels run in
Triton's interpreter). A decoding step through a cache is not traced (a graph break): a compiled
model decodes without recompiling at every token."""

import pytest
import torch

import nsa
from nsa import NSAConfig, SparseAttention
from nsa.geometry import num_compressed_blocks
from nsa.device import DEVICE       # the Triton backend's tensors: the GPU, else the CPU (interpreter)

SMALL = dict(compress_block_size=8, compress_stride=4, select_block_size=16, num_selected_blocks=3,
             window_size=8)


def _model(backend, dtype=torch.float32, kv_per_branch=False):
    torch.manual_seed(0)
    layer = SparseAttention(32, heads=4, kv_heads=2, backend=backend, kv_per_branch=kv_per_branch, **SMALL)
    return torch.nn.Sequential(torch.nn.Linear(32, 32), layer, torch.nn.Linear(32, 32)).to(dtype)


@pytest.mark.parametrize("backend, kv_per_branch", [("torch", False), ("triton", False), ("triton", True)])
def test_fullgraph_compile_matches_eager_forward_and_backward(backend, kv_per_branch):
    device = DEVICE if backend == "triton" else torch.device("cpu")
    model = _model(backend, kv_per_branch=kv_per_branch).to(device)   # kv_per_branch: the window's operator too
    x = torch.randn(2, 37, 32).to(device).requires_grad_()
    eager = model(x)
    (grad_eager,) = torch.autograd.grad(eager.sum(), x)
    import torch._inductor.config as inductor_config  # here, not at the top: it imports triton after nsa

    compiled_model = torch.compile(model, fullgraph=True, backend="aot_eager" if backend == "triton" else "inductor")
    # Inductor's scalar C++ (no SIMD): the same graph and the same lowering, without the vector headers
    # that each of its ~40 C++ kernels parses; a cold compile takes 24 s instead of 69 s on 2 cores.
    with inductor_config.patch({"cpp.vec_isa_ok": False}):
        out = compiled_model(x)                                 # compiles the forward graph
        (grad,) = torch.autograd.grad(out.sum(), x)             # and, on first use, the backward's
    torch.testing.assert_close(out, eager, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(grad, grad_eager, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("packed", [False, True], ids=["batched", "packed"])
def test_window_operator_passes_opcheck(packed):
    """The window's custom operator (a layer's kv_per_branch window on the Triton backend): its
    fake implementation, schema and autograd registration as torch.library.opcheck tests them."""
    g = torch.Generator().manual_seed(2)
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE).requires_grad_()
    q, k, v = (r(1, 21, 4, 16), r(1, 21, 2, 16), r(1, 21, 2, 8)) if packed else (r(2, 11, 4, 16), r(2, 13, 2, 16),
                                                                               r(2, 13, 2, 8))
    cu = torch.tensor([0, 6, 21], dtype=torch.int32, device=DEVICE) if packed else None
    torch.library.opcheck(torch.ops.nsa.window_attention_forward,
                          (q, k, v, 8, True, 0.25, cu, cu, [15, 15] if packed else []))


def test_nsa_operator_without_window_passes_opcheck():
    """The fused operator with g_win None (the window left out, a kv_per_branch layer's call): its
    optional gate through the schema, the fake implementation and the autograd registration."""
    g = torch.Generator().manual_seed(4)
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE).requires_grad_()
    B, N, Hq, H, D = 1, 30, 4, 2, 16
    Nc = (N - 8) // 4 + 1
    gates = [torch.rand(B, N, Hq, generator=g).to(DEVICE).requires_grad_() for _ in range(2)]
    torch.library.opcheck(torch.ops.nsa.sparse_attention_forward,
                          (r(B, N, Hq, D), r(B, N, H, D), r(B, N, H, D), r(B, Nc, H, D), r(B, Nc, H, D), *gates,
                           None, 8, 4, 16, 3, 1, 2, 8, True, 0.25, 0, None, None, None, []))


@pytest.mark.parametrize("docs", [(10, 50), (15, 25), (6, 8)], ids=["selected", "every-block", "window-is-selected"])
@pytest.mark.parametrize("Hq, H", [(4, 2), (8, 2), (16, 1)])   # plans: reverse index, tiles, none
def test_triton_ops_have_fake_implementations(Hq, H, docs):
    """The operators' fake implementations give the shapes the real ones do (what tracing needs),
    for each plan of the selected branch, and where no sequence holds more than n = 3 blocks of 16
    keys (top-n takes them all: no selection, no plan), and none longer than the window of 8 (the
    window is the selected band: no window outputs)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fields = (8, 4, 16, 3, 1, 2, 8, True)
    N = sum(docs)
    def inputs():
        g = torch.Generator().manual_seed(1)
        r = lambda *s: torch.randn(*s, generator=g).to(DEVICE)
        B, D = 1, 16
        Nc = (N - 8) // 4 + 1
        return (r(B, N, Hq, D), r(B, N, H, D), r(B, N, H, D), r(B, Nc, H, D), r(B, Nc, H, D),
                *(torch.rand(B, N, Hq, generator=g).to(DEVICE) for _ in range(3)))
    real = torch.ops.nsa.sparse_attention_forward(*inputs(), *fields, 0.25, 0, None, None, None, [])
    with FakeTensorMode() as mode:
        fake = torch.ops.nsa.sparse_attention_forward(*(mode.from_tensor(x) for x in inputs()), *fields, 0.25, 0,
                                                      None, None, None, [])
    assert [tuple(x.shape) for x in fake] == [tuple(x.shape) for x in real]
    assert [x.dtype for x in fake] == [x.dtype for x in real]
    # -- packed: the two documents, each its own compressed and selection blocks --
    rows = [num_compressed_blocks(n, 8, 4) for n in docs]
    cu, cu_cmp = (torch.tensor([0, a, a + b], dtype=torch.int32, device=DEVICE) for a, b in (docs, rows))
    sizes = [max(docs), max(docs), max(rows), sum(-(-n // 16) for n in docs)]
    packed = [x[:, :sum(rows)] if i in (3, 4) else x for i, x in enumerate(inputs())]
    real = torch.ops.nsa.sparse_attention_forward(*packed, *fields, 0.25, 0, cu, cu, cu_cmp, sizes)
    with FakeTensorMode() as mode:
        fake = torch.ops.nsa.sparse_attention_forward(*(mode.from_tensor(x) for x in packed), *fields, 0.25, 0,
                                                      *(mode.from_tensor(x) for x in (cu, cu, cu_cmp)), sizes)
    assert [tuple(x.shape) for x in fake] == [tuple(x.shape) for x in real]
    assert real[7].shape == ((0,) if max(docs) <= 3 * 16 else (1, N, H, 3))     # the block indices
    assert real[5].shape == ((0,) if max(docs) <= 8 else (1, N, Hq, 16))        # the window's output


def test_a_compiled_model_decodes_without_recompiling():
    """A compiled model decoding through a cache: the cached step is not traced (its checks read
    the cache's host lengths, new at every step), so the model compiles once, not once a token,
    and gives the eager model's outputs."""
    from torch._dynamo.testing import CompileCounter

    torch.manual_seed(0)
    layer = SparseAttention(32, heads=4, kv_heads=2, backend="torch", **SMALL).eval()
    mlp = torch.nn.Linear(32, 32)

    def step(x, cache):
        return mlp(layer(mlp(x), cache=cache))

    counter = CompileCounter()
    compiled = torch.compile(step, backend=counter)
    caches = [layer.new_cache(2, 64) for _ in range(2)]
    x = torch.randn(2, 21, 32)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, caches[0]), step(x, caches[1]))
        for token in range(6):
            x = torch.randn(2, 1, 32)
            torch.testing.assert_close(compiled(x, caches[0]), step(x, caches[1]))
            if token == 0:
                frames = counter.frame_count        # the prefill's shapes and the first step's
    assert counter.frame_count == frames, f"{counter.frame_count - frames} recompiles in 5 steps"
    assert caches[0].lengths == caches[1].lengths == [27, 27]


def test_importing_nsa_and_decoding_eagerly_leave_the_compiler_unloaded():
    """The cached step's graph break costs nothing outside torch.compile: `import nsa` and an eager
    decoding step do not import torch._dynamo (about 2 s on a CPU)."""
    import subprocess
    import sys

    code = ("import sys, torch, nsa; layer = nsa.SparseAttention(32, heads=4, kv_heads=2, backend='torch', "
            "compress_block_size=8, compress_stride=4, select_block_size=16, num_selected_blocks=3, window_size=8)"
            ".eval(); cache = layer.new_cache(1, 8)\n"
            "with torch.no_grad(): layer(torch.randn(1, 3, 32), cache=cache)\n"
            "print('torch._dynamo' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False", done.stdout
