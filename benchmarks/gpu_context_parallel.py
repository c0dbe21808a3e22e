"""Context parallelism on GPUs (chapter 14): the sharded layer checked against one GPU, then timed.

    torchrun --nproc-per-node P benchmarks/gpu_context_parallel.py [--out book/data] [--quick]

1. Correctness, NCCL: `nsa.testing.compare_with_single_process` on every rank's GPU: the
   layer on its shard with `cp_group` against the layer on the whole sequence on the same GPU
   (outputs, input gradients, parameter gradients summed over the ranks), float32 and bf16, on
   the Triton kernels; even shards, uneven shards (one shorter than a compression block) and
   packed documents that cross the shards. Differences relative to each tensor's largest entry;
   float32 must agree to 1e-3, bf16 is printed.
2. Time (`--quick` skips it): forward + backward of `SparseAttention` (64 query heads, 4 kv heads
   of 128, model dim 2560, the paper's NSA sizes, bf16) on N tokens sharded over the P ranks, the
   all-gather of one layer's keys alone, and the peak memory of a GPU. Rank 0 prints a table and,
   if the float32 checks passed, writes `cp_<gpu>_p<P>.csv` (its first line: the command, the GPU,
   torch and Triton, the date).

One process checks the code path (a group of one) and times the one-GPU baseline; the scaling
is the same command with P > 1 on a machine with several GPUs. Without CUDA the checks run on
CPU processes with gloo (slow: Triton's interpreter) and nothing is timed.
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent      # the checkout: its nsa, without an install
sys.path.insert(0, str(ROOT))

import torch
import torch.distributed as dist

import nsa
from nsa.device import gpu_tag
from nsa.distributed import gather_sequence, split_evenly
from nsa.testing import compare_with_single_process, join_torchrun, write_run

SMALL = dict(dim=256, heads=8, kv_heads=2, dim_head=64, compress_block_size=32, compress_stride=16,
             select_block_size=64, num_selected_blocks=4, window_size=128)
PAPER = dict(dim=2560, heads=64, kv_heads=4, dim_head=128)
COLUMNS = ["gpu", "ranks", "tokens", "pass", "ms", "peak_gib"]


def check(group, world, device):
    """Every case on this rank; rank 0 prints the worst over the ranks. False if float32 fails."""
    n = 1500 * world + 37                                            # not a multiple of any block
    uneven = [20] + split_evenly(n - 20, world - 1) if world > 1 else [n]
    documents = torch.tensor([0, 700, 717, n - 400, n], dtype=torch.int32, device=device)
    cases = {"even": (split_evenly(n, world), None), "uneven": (uneven, None),
             "packed": (split_evenly(n, world), documents)}
    ok = True
    for dtype in (torch.float32, torch.bfloat16):
        for name, (lengths, cu) in cases.items():
            errors = compare_with_single_process(group, SMALL, lengths, 1, cu, dtype=dtype, device=device)
            worst = torch.tensor(list(errors.values()), device=device)
            dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=group)
            if dtype == torch.float32:
                ok &= bool((worst < 1e-3).all())
            if dist.get_rank(group) == 0:
                print(f"check {str(dtype):15} {name:7} " + " ".join(f"{k} {v:.1e}" for k, v in zip(errors, worst.tolist())))
    return ok


def timed(fn, repeats=10):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def time_layer(group, world, device, tokens):
    """(pass, ms, peak GiB) rows for N = tokens sharded over the ranks."""
    rank = dist.get_rank(group)
    torch.manual_seed(0)
    layer = nsa.SparseAttention(**PAPER).to(device, torch.bfloat16)
    lengths = split_evenly(tokens, world)
    x = torch.randn(1, lengths[rank], PAPER["dim"], device=device, dtype=torch.bfloat16, requires_grad=True)
    keys = torch.randn(1, lengths[rank], PAPER["kv_heads"], 128, device=device, dtype=torch.bfloat16)

    def step():
        layer(x, cp_group=group).sum().backward()

    rows = []
    passes = (("all-gather k", lambda: gather_sequence(keys, group, lengths).clone()),  # clone: waits
              ("forward", lambda: layer(x, cp_group=group)), ("forward+backward", step))
    for name, fn in passes:
        torch.cuda.reset_peak_memory_stats(device)
        dist.barrier(group)
        ms = timed(fn)
        rows.append((name, ms, torch.cuda.max_memory_allocated(device) / 2**30))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for cp_<gpu>_p<P>.csv (rank 0 writes it)")
    parser.add_argument("--quick", action="store_true", help="correctness only")
    parser.add_argument("--tokens", type=int, nargs="+", default=[32768, 65536, 131072])
    args = parser.parse_args()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)      # before the runs: a missing folder must not lose them
    device = join_torchrun()                     # without CUDA: a dry run of the checks on CPUs (the interpreter)
    group, world, rank = dist.group.WORLD, dist.get_world_size(), dist.get_rank()
    ok = check(group, world, device)
    if not args.quick and device.type == "cuda":
        gpu = gpu_tag(device)
        table = []
        for tokens in args.tokens:
            for name, ms, peak in time_layer(group, world, device, tokens):
                worst = torch.tensor([ms, peak], device=device)
                dist.all_reduce(worst, op=dist.ReduceOp.MAX)
                table.append(dict(zip(COLUMNS, (gpu, world, tokens, name, *worst.tolist()))))
        if rank == 0:
            for row in table:
                print(f"time {row['tokens']:>7} tokens on {world} GPU(s) {row['pass']:17} {row['ms']:8.2f} ms "
                      f"{row['peak_gib']:6.1f} GiB peak (slowest rank)")
            if args.out and not ok:
                print("not written: a float32 check failed")
            elif args.out:
                path = args.out / f"cp_{gpu}_p{world}.csv"
                write_run(path, COLUMNS, table, f"torchrun --nproc-per-node {world} benchmarks/gpu_context_parallel.py "
                          f"--out {args.out}", torch.cuda.get_device_name(device),
                          "the float32 checks passed (1e-3)")
                print(f"wrote {path}")
    dist.destroy_process_group()
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
