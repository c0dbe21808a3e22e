"""What the launches of a decoding step cost by themselves: the step's own four grids and warp
counts, each launch an empty Triton kernel, captured in a CUDA graph and replayed.

    python benchmarks/gpu_launch_gaps.py [--contexts 64k] [--batches 1,16] [--heads 64/4,32/8]

For each shape (chapter 13's step, `nsa.bench_decode.make_step`): the step's graph replay, the
replay of its four launches with empty kernels (same grids, same warps: what a graph of four
launches costs when the kernels do nothing), and of the first launch alone; medians of
`triton.testing.do_bench`. The step's replay minus its kernels' device time
(`benchmarks/gpu_decode_profile.py`) is the time between kernels; this says how much of it the
launches alone take. Needs a CUDA GPU.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from nsa.bench import parse_heads, parse_lengths  # noqa: E402
from nsa.bench_decode import _parse_batches, graphed, make_step  # noqa: E402
from offline_compile import recorded  # noqa: E402  (benchmarks/, this script's folder)


@triton.jit
def empty_kernel(X):
    """Does nothing: its launch is all it costs."""
    tl.program_id(0)


def step_launches(step):
    """The (kernel name, grid, warps) of each launch the step makes, recorded instead of made."""
    from nsa.kernels import decode

    names = [n for n in vars(decode) if n.startswith("decode_") and n.endswith("_kernel")]
    grids = []
    with recorded(decode, names, grids=grids) as launches:
        step()
    return [(kernel.fn.__name__, grid, meta.get("num_warps", 4)) for (kernel, _, meta), grid in zip(launches, grids)]


def replay_us(fn):
    replay, _ = graphed(fn)
    return triton.testing.do_bench(replay, return_mode="median") * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=parse_lengths, default=parse_lengths("64k"))
    parser.add_argument("--batches", type=_parse_batches, default=_parse_batches("1,16"))
    parser.add_argument("--heads", type=parse_heads, default=parse_heads("64/4,32/8"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/gpu_launch_gaps.py needs a CUDA GPU")
        return 2
    x = torch.zeros(1, device="cuda")
    for (heads_q, heads_kv) in args.heads:
        for batch in args.batches:
            for context in args.contexts:
                step = make_step(context, batch, heads_q, heads_kv, 128)[0]
                launches = step_launches(step)

                def empty(launches=launches):
                    for _, grid, warps in launches:
                        empty_kernel[grid](x, num_warps=warps)
                    return x

                with torch.no_grad():
                    step_us = replay_us(step)
                empty_us, first_us = replay_us(empty), replay_us(lambda: empty(launches[:1]))
                grids = ", ".join(f"{name} {grid} x {warps} warps" for name, grid, warps in launches)
                print(f"{context // 1024}k tokens, batch {batch}, heads {heads_q}/{heads_kv}: step {step_us:.1f} us, "
                      f"its {len(launches)} launches empty {empty_us:.1f} us, the first alone {first_us:.1f} us "
                      f"({grids})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
