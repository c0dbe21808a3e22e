"""Tensor parallelism on GPUs (chapter 14): the split layer checked against the whole layer, then timed.

    torchrun --nproc-per-node P benchmarks/gpu_tensor_parallel.py [--out book/data] [--quick] [--tokens N ...]

1. Correctness, NCCL: `nsa.testing.compare_tensor_parallel` on every rank's GPU: a
   `TensorParallelSparseAttention` split from a layer against that whole layer on the same GPU
   (outputs, input gradients, this rank's parameter gradients, a decoding run through caches),
   float32 and bf16, on the Triton kernels; GQA, packed documents with memory rows, separate keys
   and values per branch. Differences relative to each tensor's largest entry; float32 must agree
   to 1e-3 (TF32 products), bf16 is printed. Then the split layer's decoding step captured in a
   CUDA graph (`nsa.DecodeGraph`, the all-reduce inside) and replayed, against the whole layer's
   eager steps (float32, 1e-3).
2. Time (`--quick` skips it): forward + backward, and one decoding step after a prefill (eager,
   and replayed from a CUDA graph), of the paper's sizes (64 query heads, 4 kv heads of 128,
   model dim 2560, bf16) split over the P ranks, beside the whole `SparseAttention` on one GPU in
   the same run: the median of 20 calls timed by CUDA events, the same count on every rank.
   Rank 0 prints a table and, if every float32 check passed, writes `tp_<gpu>_p<P>.csv` (its
   first line: the command, the GPU, torch and Triton, the date and the checks' worst values).

With P = 1 DTensor skips the collectives: the run checks the code path and times the split
layer's host work (its DTensor conversions), not communication; the scaling is the same command
with P > 1 (P must divide 4). Without CUDA the checks run on CPU processes with gloo (Triton's
interpreter, float32 only) and nothing is timed.
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
from nsa.tensor_parallel import TensorParallelSparseAttention
from nsa.testing import compare_tensor_parallel, join_torchrun, largest_relative_difference, write_run

SMALL = dict(dim=256, heads=8, kv_heads=4, dim_head=64, compress_block_size=32, compress_stride=16,
             select_block_size=64, num_selected_blocks=4, window_size=128, backend="triton")
PAPER = dict(dim=2560, heads=64, kv_heads=4, dim_head=128, backend="triton")
COLUMNS = ["gpu", "ranks", "tokens", "layer", "pass", "ms"]


def check(group, device):
    """Every case on this rank; rank 0 prints the worst over the ranks -> (ok: every float32 check
    passed, {what: worst value} for the data file's first line)."""
    ends = [700, 717, 1500] if device.type == "cuda" else [20, 23, 45]     # the interpreter: small
    documents = torch.tensor([0, *ends], dtype=torch.int32, device=device)
    variants = {"GQA": SMALL, "packed, memory rows": {**SMALL, "num_mem_kv": 2, "cu_seqlens": documents},
                "kv per branch": {**SMALL, "kv_per_branch": True}}
    ok, worst_of = True, {}
    for dtype in (torch.float32, torch.bfloat16) if device.type == "cuda" else (torch.float32,):
        for name, errors in compare_tensor_parallel(group, variants, dtype=dtype, device=device).items():
            worst = torch.tensor(list(errors.values()), device=device)
            dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=group)
            if dtype == torch.float32:
                ok &= bool((worst < 1e-3).all())
            worst_of[str(dtype).removeprefix("torch.")] = max(worst_of.get(str(dtype).removeprefix("torch."), 0.0),
                                                              worst.max().item())
            if dist.get_rank(group) == 0:
                shown = " ".join(f"{k} {v:.1e}" for k, v in zip(errors, worst.tolist()))
                print(f"check {str(dtype):15} {name:20} {shown}")
    if device.type == "cuda":
        worst_of["CUDA-graph replay"] = check_graph(group, device)
        ok &= worst_of["CUDA-graph replay"] < 1e-3
    return ok, worst_of


def check_graph(group, device, steps=5):
    """The split layer's decoding step captured in a CUDA graph (`nsa.DecodeGraph`; with P > 1 its
    all-reduce inside) and replayed, against the whole layer's eager steps, float32 -> the worst
    relative difference over the ranks."""
    torch.manual_seed(0)
    whole = nsa.SparseAttention(**SMALL).to(device).eval()
    part = TensorParallelSparseAttention.from_layer(whole, group)
    generator = torch.Generator(device).manual_seed(1)
    tokens = torch.randn(2, 300 + steps, SMALL["dim"], device=device, generator=generator)
    caches = [whole.new_cache(2, 400), part.new_cache(2, 400)]
    worst = 0.0
    with torch.no_grad():
        for layer, cache in zip((whole, part), caches):
            layer(tokens[:, :300], cache=cache)                           # the prefill, eagerly
        graph = nsa.DecodeGraph(lambda t: part(t, cache=caches[1]), caches[1], tokens[:, 300:301])
        for i in range(300, 300 + steps):
            eager = whole(tokens[:, i:i + 1], cache=caches[0])
            worst = max(worst, largest_relative_difference([(graph(tokens[:, i:i + 1]), eager)]))
    worst = torch.tensor([worst], device=device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=group)
    if dist.get_rank(group) == 0:
        print(f"check split layer's CUDA-graph replay ({steps} steps, float32) against the whole layer: "
              f"{worst.item():.1e}")
    return worst.item()


def median_ms(fn, group, repeats=20):
    """The median of `repeats` timed calls of fn after 3 untimed ones, the same count on every rank
    (a call holds collectives: a count of each rank's own, as do_bench takes, could leave one rank
    waiting in a collective that no other joins)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        dist.barrier(group)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def time_layers(group, device, tokens):
    """(layer, pass, ms) rows at `tokens` tokens: the whole layer on this GPU, then the split one."""
    torch.manual_seed(0)
    whole = nsa.SparseAttention(**PAPER).to(device, torch.bfloat16)
    layers = {"whole, one GPU": whole, "split": TensorParallelSparseAttention.from_layer(whole, group)}
    x = torch.randn(1, tokens, PAPER["dim"], device=device, dtype=torch.bfloat16, requires_grad=True)
    token = torch.randn(1, 1, PAPER["dim"], device=device, dtype=torch.bfloat16)
    rows = []
    for name, layer in layers.items():
        with torch.no_grad():
            cache = layer.new_cache(1, tokens + 128)                     # room for the timed steps
            layer(x.detach(), cache=cache)                               # the prefill

        def decode():
            with torch.no_grad():
                layer(token, cache=cache)
        dist.barrier(group)
        rows += [(name, "forward+backward", median_ms(lambda: layer(x).sum().backward(), group)),
                 (name, "decoding step", median_ms(decode, group))]
        with torch.no_grad():
            graph = nsa.DecodeGraph(lambda t: layer(t, cache=cache), cache, token)
            rows.append((name, "decoding step, CUDA graph", median_ms(lambda: graph(token), group)))
        del cache, graph
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for tp_<gpu>_p<P>.csv (rank 0 writes it)")
    parser.add_argument("--quick", action="store_true", help="correctness only")
    parser.add_argument("--tokens", type=int, nargs="+", default=[16384, 65536],
                        help="sequence lengths to time (default 16384 65536)")
    args = parser.parse_args()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)      # before the runs: a missing folder must not lose them
    device = join_torchrun()                     # without CUDA: a dry run of the checks on CPUs (the interpreter)
    group, world, rank = dist.group.WORLD, dist.get_world_size(), dist.get_rank()
    ok, worst_of = check(group, device)
    if not args.quick and device.type == "cuda":
        gpu, table = gpu_tag(device), []
        for tokens in args.tokens:
            for layer, name, ms in time_layers(group, device, tokens):
                worst = torch.tensor([ms], device=device)
                dist.all_reduce(worst, op=dist.ReduceOp.MAX)
                table.append(dict(zip(COLUMNS, (gpu, world, tokens, layer, name, worst.item()))))
        if rank == 0:
            for row in table:
                print(f"time {row['tokens']:>6} tokens, {row['layer']:15} on {world} GPU(s): {row['pass']:17} "
                      f"{row['ms']:9.3f} ms (slowest rank)")
            if args.out and not ok:
                print("not written: a float32 check failed")
            elif args.out:
                path = args.out / f"tp_{gpu}_p{world}.csv"
                checks = ", ".join(f"{name} {value:.1e}" for name, value in worst_of.items())
                write_run(path, COLUMNS, table, f"torchrun --nproc-per-node {world} benchmarks/gpu_tensor_parallel.py "
                          f"--out {args.out}", torch.cuda.get_device_name(device),
                          f"worst relative differences, split against whole: {checks}")
                print(f"wrote {path}")
    dist.destroy_process_group()
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
