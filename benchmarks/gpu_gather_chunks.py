"""What deterministic key and value gradients would cost the selected branch (GPU).

    python benchmarks/gpu_gather_chunks.py [--heads 64/4,32/8,32/32] [--seq-len 64k] [--tiny]

Chapter 8's gather kernel computes a key block's `dk, dv` from the queries that chose it, cut
into chunks of at most 1024 (query, slot) entries; chunks of one block add their sums with float
atomics, in whatever order they finish, so `dk, dv` may differ in their last bits from run to run.
With one chunk per block (the chunk as long as the longest list) each block has one writer, which
adds into zeros: the same bits every run, and the longest list (block 0, chosen by every query)
one program's work. For each head shape, at `--seq-len` tokens, bf16, d = 128, the paper's
geometry and the selections NSA's own kernels pick on `nsa.bench`'s inputs: the gather kernel
alone, both ways (triton.testing.do_bench, median); how many of dk's and dv's elements differ
between two runs of each; and the largest difference between the two (relative to the largest
entry). `--tiny` runs a small problem in Triton's CPU interpreter (a check of the script: its
programs run one after the other, so every run there is the same).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from nsa.bench import make_inputs, parse_heads, parse_lengths, selection_of  # noqa: E402
from nsa.geometry import num_selection_blocks  # noqa: E402
from nsa.kernels.selected import (gather_chunk, prepare_block_indices, query_tiles, reverse_block_index,  # noqa: E402
                                  selected_attention_dkdv, selected_attention_fwd)


def gather(q, k, v, do, lse, delta, prepared, block_size, scale, chunk):
    """The gather kernel's (dk, dv) with the reverse index cut into chunks of `chunk` entries."""
    index = reverse_block_index(prepared, num_selection_blocks(k.shape[1], block_size), chunk)
    return selected_attention_dkdv(q, k, v, do, lse, delta, prepared, block_size, scale, True, index=index)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", default="64/4,32/8,32/32")
    parser.add_argument("--seq-len", default="64k")
    parser.add_argument("--tiny", action="store_true", help="a small problem in the CPU interpreter")
    args = parser.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        print("gpu_gather_chunks.py needs a CUDA GPU (or --tiny)")
        return 2
    device, dtype = ("cpu", torch.float32) if args.tiny else ("cuda", torch.bfloat16)
    N = 100 if args.tiny else parse_lengths(args.seq_len)[0]
    dim = 32 if args.tiny else 128
    print(f"{N} tokens, d = {dim}, {dtype}, " + (torch.cuda.get_device_name() if device == "cuda" else "interpreter"))
    print(f"{'heads':>6} {'chunked ms':>11} {'one per block ms':>17} {'differ, chunked':>16} {'differ, one':>12} "
          f"{'max diff':>9}")
    for heads_q, heads_kv in parse_heads(args.heads):
        tensors, config = make_inputs(N, heads_q, heads_kv, dim, dtype, device)
        q, k, v, k_cmp, v_cmp = (t.detach() for t in tensors[:5])
        scale, block_size = dim ** -0.5, config.select_block_size
        _, indices = selection_of(q, k_cmp, v_cmp, N, config, scale)
        prepared = prepare_block_indices(indices, block_size, N)
        Q, tiles = query_tiles(prepared, heads_q // heads_kv)
        o, lse = selected_attention_fwd(q, k, v, prepared, block_size, scale, True, Q, tiles)
        do = torch.randn_like(o)
        delta = (o.float() * do.float()).sum(-1)
        chunks = {"chunked": gather_chunk(q.is_cuda), "one": N * prepared.shape[-1]}   # one: a kv head's every entry
        runs = {name: [gather(q, k, v, do, lse, delta, prepared, block_size, scale, chunk) for _ in range(2)]
                for name, chunk in chunks.items()}
        differ = {name: sum((a != b).sum().item() for a, b in zip(*pair)) for name, pair in runs.items()}
        worst = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(runs["chunked"][0], runs["one"][0]))
        ms = {}
        if not args.tiny:
            from triton.testing import do_bench
            for name, chunk in chunks.items():                     # the index built once, outside the timing
                index = reverse_block_index(prepared, num_selection_blocks(N, block_size), chunk)
                ms[name] = do_bench(lambda: selected_attention_dkdv(q, k, v, do, lse, delta, prepared, block_size,
                                                                    scale, True, index=index))
        cell = lambda name: f"{ms[name]:.2f}" if name in ms else "-"
        print(f"{heads_q:>3}/{heads_kv:<2} {cell('chunked'):>11} {cell('one'):>17} {differ['chunked']:>16} "
              f"{differ['one']:>12} {worst:9.1e}", flush=True)
        assert differ["one"] == 0 and worst < (1e-5 if args.tiny else 1e-2), (differ, worst)
    return 0


if __name__ == "__main__":
    sys.exit(main())
