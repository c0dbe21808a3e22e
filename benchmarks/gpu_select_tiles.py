"""Launch sweep of the fused selection kernel (chapter 9's `select_blocks_kernel`) on a GPU.

    PYTHONUNBUFFERED=1 python benchmarks/gpu_select_tiles.py [--seq-len 64k] [--heads 32/32,32/8,64/4]
        [--warps 4,8] [--stages 2,3] [--positions 16,32,64,128] [--steps 16,32]

For each head configuration: random bf16 q and compressed keys (mean pooling of random keys, the
paper's geometry, d = 128), the compressed branch's lse, then `select_blocks_kernel` launched with
each (positions per program BLOCK_M, selection blocks per step BLOCK_S, warps, stages) of the
sweep. Every variant's block indices must equal the default launch's (`select_blocks_triton`);
each is timed with triton.testing.do_bench (median). Prints one line per variant. `--tiny`: 200
tokens, 4/2 heads, float32, one variant, in Triton's interpreter on the CPU, untimed: checks that
the script's hand-written launch still matches the kernel (a failing launch is an error there).
"""

import argparse
import itertools
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from nsa import NSAConfig, compress  # noqa: E402
from nsa.bench import parse_heads, parse_lengths, selection_of  # noqa: E402
from nsa.kernels import selection  # noqa: E402
from nsa.kernels.common import LOG2E, head_dim_block  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=lambda text: parse_lengths(text)[0], default=65536)
    parser.add_argument("--heads", type=parse_heads, default=parse_heads("32/32,32/8,64/4"))
    parser.add_argument("--warps", default="4,8", help="warp counts to sweep, comma-separated")
    parser.add_argument("--stages", default="2,3", help="pipeline stages to sweep, comma-separated")
    parser.add_argument("--positions", default="16,32,64,128", help="positions per program to sweep")
    parser.add_argument("--steps", default="16,32", help="selection blocks per step to sweep")
    parser.add_argument("--tiny", action="store_true", help="the CPU check described above")
    args = parser.parse_args()
    if args.tiny:
        args.seq_len, args.heads, args.positions, args.steps, args.warps, args.stages = (
            200, parse_heads("4/2"), "16", "16", "4", "2")
    device, dtype = ("cpu", torch.float32) if args.tiny else ("cuda", torch.bfloat16)
    timed = (lambda fn: float("nan")) if args.tiny else (
        lambda fn: do_bench(fn, warmup=20, rep=100, return_mode="median"))
    N = args.seq_len
    config, D = NSAConfig(), 128
    l, d, l_sel, n = (config.compress_block_size, config.compress_stride, config.select_block_size,
                      config.num_selected_blocks)
    scale = D ** -0.5
    print(f"{'CPU interpreter' if args.tiny else torch.cuda.get_device_name()}, triton {triton.__version__}, N = {N}")
    different = 0
    for Hq, H in args.heads:
        G = Hq // H
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(1, N, Hq, D, device=device, dtype=dtype, generator=g)
        k = torch.randn(1, N, H, D, device=device, dtype=dtype, generator=g)
        v = torch.randn(1, N, H, D, device=device, dtype=dtype, generator=g)
        k_cmp = compress(k, block_size=l, stride=d).contiguous()
        v_cmp = compress(v, block_size=l, stride=d).contiguous()
        lse, want = selection_of(q, k_cmp, v_cmp, N, config, scale)
        default_ms = timed(lambda: selection.select_blocks_triton(q, k_cmp, lse, N, config, scale))
        print(f"== {Hq}/{H}: select_blocks_triton as shipped {default_ms:8.2f} ms")
        gpad = triton.next_power_of_2(G)
        num_cmp, num_sel = k_cmp.shape[1], triton.cdiv(N, l_sel)
        sweep = (tuple(int(x) for x in text.split(",")) for text in (args.positions, args.steps, args.warps, args.stages))
        for positions, step, warps, stages in itertools.product(*sweep):
            rows = positions * gpad
            if rows < 16 or rows > 512:
                continue
            out = torch.empty(1, N, H, n, device=device, dtype=torch.int32)
            held = selection.held_heads(G, positions, head_dim_block(D), q.element_size())
            meta = dict(HEADS_Q=Hq, GROUP=G, HELD=held, DIM_QK=D, BLOCK_DQK=head_dim_block(D),
                        CMP_BLOCK=l, CMP_STRIDE=d, SEL_BLOCK=l_sel, NUM_SELECT=n,
                        SLOTS=triton.next_power_of_2(n), NUM_INITIAL=config.num_initial_blocks,
                        NUM_LOCAL=config.num_local_blocks, CAUSAL=True, BLOCK_M=positions, BLOCK_S=step,
                        PACKED=False, FIRST_IN_LOOP=gpad > 1)

            def launch():
                selection.select_blocks_kernel[(triton.cdiv(N, positions), 1, H)](
                    q, k_cmp, lse, out, None, None, None, scale * LOG2E.value, N, N, 0, num_cmp, num_sel, **meta,
                    num_warps=warps, num_stages=stages)
            try:
                launch()
                if not args.tiny:
                    torch.cuda.synchronize()
            except Exception as error:                       # noqa: BLE001 - a variant that does not fit
                if args.tiny:                                # there, the launch itself is under test
                    raise
                print(f"  positions {positions:3d} step {step:2d} warps {warps} stages {stages}: "
                      f"{type(error).__name__}: {str(error)[:80]}")
                continue
            same = torch.equal(out, want)
            different += not same
            ms = timed(launch)
            print(f"  positions {positions:3d} (rows {rows:3d}) step {step:2d} warps {warps} stages {stages}: "
                  f"{ms:8.2f} ms  {'same' if same else 'DIFFERENT'}")
        del q, k, v, k_cmp, v_cmp, lse, want
        if not args.tiny:
            torch.cuda.empty_cache()
    return 1 if different else 0


if __name__ == "__main__":
    sys.exit(main())
