"""What `g_win=None` saves: NSA's fused Triton operator with the window left out against a window
gated by 0 (what a layer with kv_per_branch called before), on a GPU.

    python benchmarks/gpu_window_left_out.py

For 16389 tokens with 32/8 heads and 64k tokens with 32/8 and 64/4 heads (bf16, d = 128, the
paper's geometry, batch 1): the largest relative difference between the two, output and the
seven other inputs' gradients, then the forward and forward + backward times
(triton.testing.do_bench, median). Prints one line per shape.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from nsa import NSAConfig, native_sparse_attention  # noqa: E402
from nsa.geometry import num_compressed_blocks  # noqa: E402


def main():
    argparse.ArgumentParser(description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()   # --help, no options
    if not torch.cuda.is_available():
        sys.exit("gpu_window_left_out.py needs a CUDA GPU")
    dev, bf = "cuda", torch.bfloat16
    for N, Hq, H in ((16389, 32, 8), (65536, 32, 8), (65536, 64, 4)):
        g = torch.Generator(dev).manual_seed(N)
        r = lambda *s: torch.randn(*s, device=dev, dtype=bf, generator=g)  # noqa: E731
        rows = num_compressed_blocks(N, 32, 16)
        q, k, v, kc, vc = r(1, N, Hq, 128), r(1, N, H, 128), r(1, N, H, 128), r(1, rows, H, 128), r(1, rows, H, 128)
        gc, gs = (torch.rand(1, N, Hq, device=dev, generator=g).to(bf) for _ in range(2))
        inputs = [x.requires_grad_() for x in (q, k, v, kc, vc, gc, gs)]
        do, zero = r(1, N, Hq, 128), torch.zeros_like(gc)
        run = lambda g_win: native_sparse_attention(*inputs, g_win, NSAConfig(), backend="triton")  # noqa: E731
        a, b = run(zero), run(None)
        ga, gb = torch.autograd.grad(a, inputs, do), torch.autograd.grad(b, inputs, do)
        err = max(((x.float() - y.float()).norm() / y.float().norm().clamp_min(1e-30)).item()
                  for x, y in zip((b, *gb), (a, *ga)))
        t = {}
        for name, g_win in (("zero gate", zero), ("None", None)):
            with torch.no_grad():
                t[name, "fwd"] = do_bench(lambda: run(g_win))
            t[name, "fwd_bwd"] = do_bench(lambda: torch.autograd.grad(run(g_win), inputs, do))
        print(f"{N} {Hq}/{H}: None vs zero gate, worst relative difference {err:.2e}; "
              + ", ".join(f"{p}: {t['zero gate', p]:.2f} -> {t['None', p]:.2f} ms" for p in ("fwd", "fwd_bwd")),
              flush=True)


if __name__ == "__main__":
    main()
