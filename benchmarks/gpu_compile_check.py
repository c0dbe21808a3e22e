"""torch.compile(fullgraph=True) with the Triton backend of NSA (GPU).

    python benchmarks/gpu_compile_check.py

1. The op: `native_sparse_attention(..., backend="triton")` inside a compiled function
   (fullgraph=True: any graph break is an error) against eager on the same bf16 inputs, output
   and the gradients of all eight inputs. The compiled graph calls the same custom operators,
   so the two agree to the last bit except where the selected branch's dk, dv add chunks
   atomically (run-to-run rounding).
2. A transformer block (RMSNorm, `nsa.SparseAttention`, a feed-forward) at 16k tokens, bf16:
   compiled with fullgraph=True and eager, the median time of one training step of each
   (triton.testing.do_bench). Their outputs differ by the fused norms' rounding, which can flip
   a near-tie of the top-n selection on random weights, so they are timed, not compared.
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent      # the checkout: its nsa, without an install
sys.path.insert(0, str(ROOT))

import torch

import nsa
from nsa import NSAConfig, SparseAttention, compress, native_sparse_attention


class Block(torch.nn.Module):
    def __init__(self, dim=1024, heads=16, kv_heads=4):
        super().__init__()
        self.norm1, self.norm2 = torch.nn.RMSNorm(dim), torch.nn.RMSNorm(dim)
        self.attention = SparseAttention(dim, heads, kv_heads=kv_heads, backend="triton")
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def op_check(N=16384, Hq=64, H=4, D=128):
    config = NSAConfig()
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g, dtype=torch.bfloat16)
    k, v = r(1, N, H, D), r(1, N, H, D)
    inputs = [r(1, N, Hq, D), k, v, compress(k).contiguous(), compress(v).contiguous(),
              *(torch.sigmoid(r(1, N, Hq)) for _ in range(3))]
    inputs = [x.requires_grad_() for x in inputs]
    do = r(1, N, Hq, D)

    def nsa_op(*tensors):
        return native_sparse_attention(*tensors, config, backend="triton")

    compiled = torch.compile(nsa_op, fullgraph=True)
    results = []
    for fn in (nsa_op, compiled):
        o = fn(*inputs)
        results.append([o.detach(), *torch.autograd.grad(o, inputs, do)])
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()
    names = ("o", "dq", "dk", "dv", "dk_cmp", "dv_cmp", "dg_cmp", "dg_slc", "dg_win")
    diffs = {name: rel(a, b) for name, a, b in zip(names, results[1], results[0])}
    print(f"op, fullgraph compiled vs eager at {N} tokens, {Hq}/{H} heads: "
          + ", ".join(f"{n} {d:.1e}" for n, d in diffs.items()))
    return max(diffs.values())


def block_timing():
    from triton.testing import do_bench

    torch.manual_seed(0)
    model = Block().cuda().to(torch.bfloat16)
    x = torch.randn(1, 16384, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True)

    def step(m):
        x.grad = None
        for p in m.parameters():
            p.grad = None
        m(x).float().square().mean().backward()

    step(compiled)                                   # compiles the forward and the backward
    eager_ms = do_bench(lambda: step(model), warmup=25, rep=100, return_mode="median")
    compiled_ms = do_bench(lambda: step(compiled), warmup=25, rep=100, return_mode="median")
    print(f"block training step at 16k tokens, dim 1024, 16/4 heads: eager {eager_ms:.2f} ms, "
          f"compiled (fullgraph) {compiled_ms:.2f} ms")


def main():
    argparse.ArgumentParser(description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()   # --help, no options
    if not torch.cuda.is_available():
        sys.exit("gpu_compile_check.py needs a CUDA GPU")
    worst = op_check()
    block_timing()
    assert worst < 1e-2, worst
    print(f"worst relative difference {worst:.1e}: ok")


if __name__ == "__main__":
    main()
