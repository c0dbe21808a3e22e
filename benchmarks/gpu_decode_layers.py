"""A stack of `SparseAttention` layers decoding with their caches, eagerly, as a model serves (GPU).

    python benchmarks/gpu_decode_layers.py [--layers 8] [--contexts 16k,64k] [--heads 64/4,32/8]
        [--batch 1] [--steps 32] [--out DIR] [--build LABEL] [--dense] [--kv-per-branch] [--by-kernel]

For each context and head shape: `--layers` layers (bf16, model width 2048, heads of 128, the
paper's geometry, the "auto" backend) each get a cache, are prefilled to the context, then take
`--steps` decoding steps of one token per row, the output of one layer the input of the next
(`y = layer(x, cache=cache)` under `torch.no_grad()`, nothing else in between). Per shape: the
wall time per token when the host only waits at the end (what eager serving gets: the host may
queue layer after layer ahead of the GPU wherever nothing makes it wait), the same with a
`torch.cuda.synchronize()` after every layer (the host never ahead), how many times one step of
the stack made the host wait for the GPU (`torch.cuda.set_sync_debug_mode("warn")`: each
blocking copy or read-back warns once), and the stack's step replayed from one CUDA graph
(`nsa.DecodeGraph`, where this build has it): its time per token, and whether four replays gave
exactly the outputs of four eager steps from the same caches (rolled back with `truncate_`);
and, under `torch.profiler`, how many kernels (and copies) one eager step of the stack runs on
the GPU and their device time: a replay costs at least that, plus a launch gap per kernel
(`--by-kernel` prints them by name: how many a step, and their device time).
Equal first two numbers and waits > 0 mean the host cannot run ahead; the gap between them is
what a step without waits gains. `--dense` times, after each NSA stack, a dense stack of the
same projections over a KV cache of exactly the context (`DenseDecodeLayer`: SDPA with GQA, the
cost of a dense decoding kernel). `--kv-per-branch`: layers whose window has keys and values of
its own (label such rows with `--build`). Rows go to DIR/decode_layers_<gpu>.csv under `--build`
(default: "this build"; the dense rows under "dense baseline"), replacing only rows of the same
build, context, batch and heads.
`--tiny` runs small sizes on the CPU (Triton's interpreter): a check of the script only.
"""

import argparse
import csv
import itertools
import shlex
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import nsa  # noqa: E402
from nsa.bench import parse_heads, parse_lengths  # noqa: E402
from nsa.device import gpu_tag  # noqa: E402

COLUMNS = ["build", "context", "batch", "heads", "layers", "ms_per_token", "ms_per_token_synced",
           "waits_per_step", "ms_per_token_graph", "graph_equals_eager", "kernels_per_step", "kernel_ms_per_step"]


class DenseDecodeLayer(torch.nn.Module):
    """The dense baseline's layer: the same query, key, value and output projections (GQA; NSA's
    gate projection has no counterpart here), then SDPA over a KV cache of exactly
    `context` rows, the step's key and value written into its last row — the cost of a dense
    decoding kernel that reads each row's cached keys and no more (as flash-attn's
    `flash_attn_with_kvcache` does with `cache_seqlens`; PyTorch has none), not a decoder that
    grows its context."""

    def __init__(self, width, heads_q, heads_kv, dim_head, batch, context, device, dtype):
        super().__init__()
        self.heads_q, self.heads_kv, self.dim_head = heads_q, heads_kv, dim_head
        linear = lambda n_in, n_out: torch.nn.Linear(n_in, n_out, bias=False, device=device, dtype=dtype)
        self.to_q, self.to_out = linear(width, heads_q * dim_head), linear(heads_q * dim_head, width)
        self.to_k, self.to_v = linear(width, heads_kv * dim_head), linear(width, heads_kv * dim_head)
        self.k = torch.randn(batch, heads_kv, context, dim_head, device=device, dtype=dtype)
        self.v = torch.randn(batch, heads_kv, context, dim_head, device=device, dtype=dtype)
        self.rows = torch.arange(batch, device=device)
        self.last = torch.full((batch,), context - 1, device=device)

    def forward(self, x):                               # x: (B, 1, width)
        B = x.shape[0]
        heads = lambda y, h: y.view(B, 1, h, self.dim_head).transpose(1, 2)
        q = heads(self.to_q(x), self.heads_q)
        self.k[self.rows, :, self.last] = heads(self.to_k(x), self.heads_kv)[:, :, 0]
        self.v[self.rows, :, self.last] = heads(self.to_v(x), self.heads_kv)[:, :, 0]
        o = torch.nn.functional.scaled_dot_product_attention(q, self.k, self.v, enable_gqa=True)
        return self.to_out(o.transpose(1, 2).reshape(B, 1, -1))


def decode_stack(context, batch, heads_q, heads_kv, layers, steps, tiny, dense=False, kv_per_branch=False,
                 by_kernel=None):
    """(ms per token, ms per token synchronised after every layer, host waits per step, ms per
    token replayed from a CUDA graph, whether replays equal eager steps, kernels per step, their
    device ms); the graph's two None without a GPU or without `nsa.DecodeGraph`, the kernels'
    two None without a GPU. dense: the dense baseline's stack (`DenseDecodeLayer`) instead;
    kv_per_branch: the layers' option of that name; by_kernel: a dict that receives, on a GPU, one
    eager step's kernels by name, (how many, device µs)."""
    by_kernel = {} if by_kernel is None else by_kernel
    cuda = torch.cuda.is_available() and not tiny
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    width, dim_head = (64, 16) if tiny else (2048, 128)
    geometry = dict(compress_block_size=8, compress_stride=4, select_block_size=16, num_selected_blocks=4,
                    window_size=32, backend="triton") if tiny else {}     # tiny: the kernels, interpreted
    torch.manual_seed(0)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if dense:
        stack = [DenseDecodeLayer(width, heads_q, heads_kv, dim_head, batch, context, device, dtype)
                 for _ in range(layers)]
        caches = []
    else:
        stack = [nsa.SparseAttention(width, heads=heads_q, kv_heads=heads_kv, dim_head=dim_head,
                                     kv_per_branch=kv_per_branch, **geometry).to(device, dtype).eval()
                 for _ in range(layers)]
        caches = [layer.new_cache(batch, context + 3 * steps + 8) for layer in stack]

    def step(x, synced=False):
        for i, layer in enumerate(stack):
            x = layer(x) if dense else layer(x, cache=caches[i])
            if synced:
                sync()
        return x

    with torch.no_grad():
        if not dense:                                       # prefill in chunks: each layer's output feeds the next
            prompt = torch.randn(batch, context, width, device=device, dtype=dtype)
            for layer, cache in zip(stack, caches):
                prompt = torch.cat([layer(prompt[:, i:i + 8192], cache=cache) for i in range(0, context, 8192)], 1)
            del prompt
        x = torch.randn(batch, 1, width, device=device, dtype=dtype)
        step(x)                                             # warm-up: compiles, first launches
        waits = None
        if cuda:                                            # count the step's host waits
            torch.cuda.set_sync_debug_mode("warn")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                step(x)
            torch.cuda.set_sync_debug_mode("default")
            waits = sum("synchroniz" in str(w.message) for w in caught)
        times = []
        for synced in (False, True):
            sync()
            start = time.perf_counter()
            for _ in range(steps):
                x = step(x, synced)
            sync()
            times.append((time.perf_counter() - start) * 1e3 / steps)
        graph_ms = equal = kernels = kernel_ms = None
        if cuda:                                            # one eager step's kernels, on the GPU's clock
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
                step(x)
                sync()
            ran = [e for e in profile.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            kernels, kernel_ms = len(ran), sum(e.time_range.elapsed_us() for e in ran) / 1e3
            for e in ran:
                count, us = by_kernel.get(e.name, (0, 0.0))
                by_kernel[e.name] = (count + 1, us + e.time_range.elapsed_us())
        if cuda and (dense or hasattr(nsa, "DecodeGraph")):  # the stack's step from one graph
            xs = [torch.randn(batch, 1, width, device=device, dtype=dtype) for _ in range(4)]
            kept = [list(cache.lengths) for cache in caches]
            eager = [step(y).clone() for y in xs]
            for cache, lengths in zip(caches, kept):
                cache.truncate_(lengths)
            if dense:                                       # (its step overwrites one row: no lengths to keep)
                static = xs[0].clone()
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    step(static)
                torch.cuda.current_stream().wait_stream(side)
                captured = torch.cuda.CUDAGraph()
                with torch.cuda.graph(captured):
                    static_out = step(static)

                def graph(y):
                    static.copy_(y)
                    captured.replay()
                    return static_out
            else:
                graph = nsa.DecodeGraph(step, caches, xs[0])
            equal = all(torch.equal(graph(y), out) for y, out in zip(xs, eager))
            sync()
            start = time.perf_counter()
            for _ in range(steps):
                x = graph(x)
            sync()
            graph_ms = (time.perf_counter() - start) * 1e3 / steps
    return times[0], times[1], waits, graph_ms, equal, kernels, kernel_ms


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--contexts", default="16k,64k")
    parser.add_argument("--heads", default="64/4,32/8")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None, help="folder for decode_layers_<gpu>.csv")
    parser.add_argument("--build", default="this build", help="the label of this run's rows")
    parser.add_argument("--dense", action="store_true",
                        help="also the dense baseline's stack (rows under build 'dense baseline')")
    parser.add_argument("--kv-per-branch", action="store_true",
                        help="layers with kv_per_branch=True (the window's own keys and values)")
    parser.add_argument("--by-kernel", action="store_true", help="print each step's kernels by name and time")
    parser.add_argument("--tiny", action="store_true", help="small sizes on the CPU: a check of the script")
    args = parser.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        print("gpu_decode_layers.py needs a CUDA GPU (or --tiny)")
        return 2
    contexts = [9] if args.tiny else parse_lengths(args.contexts)       # tiny: one compressed block
    heads = [(4, 2)] if args.tiny else parse_heads(args.heads)
    layers, steps = (2, 1) if args.tiny else (args.layers, args.steps)
    rows = []
    stacks = (False, True) if args.dense else (False,)                # NSA, then the dense baseline
    for context, (heads_q, heads_kv), dense in itertools.product(contexts, heads, stacks):
        by_kernel = {}
        eager, synced, waits, graph_ms, equal, kernels, kernel_ms = decode_stack(
            context, args.batch, heads_q, heads_kv, layers, steps, args.tiny, dense, args.kv_per_branch, by_kernel)
        build = "dense baseline" if dense else args.build
        rows.append({"build": build, "context": context, "batch": args.batch, "heads": f"{heads_q}/{heads_kv}",
                     "layers": layers, "ms_per_token": f"{eager:.3f}", "ms_per_token_synced": f"{synced:.3f}",
                     "waits_per_step": "" if waits is None else waits,
                     "ms_per_token_graph": "" if graph_ms is None else f"{graph_ms:.3f}",
                     "graph_equals_eager": "" if equal is None else int(equal),
                     "kernels_per_step": "" if kernels is None else kernels,
                     "kernel_ms_per_step": "" if kernel_ms is None else f"{kernel_ms:.3f}"})
        print(f"{build}: {context:>7} tokens, {heads_q}/{heads_kv} heads, {layers} layers, batch {args.batch}: "
              f"{eager:8.3f} ms a token, {synced:8.3f} synchronised after every layer, "
              f"host waits per step: {'-' if waits is None else waits}"
              + ("" if graph_ms is None else f"; {graph_ms:8.3f} ms a token from a CUDA graph, replays "
                 f"{'equal to' if equal else 'DIFFERENT from'} eager steps")
              + ("" if kernels is None else f"; {kernels} kernels a step, {kernel_ms:.3f} ms on the GPU"),
              flush=True)
        if args.by_kernel and by_kernel:
            for name, (count, us) in sorted(by_kernel.items(), key=lambda item: -item[1][1]):
                print(f"    {count:>5} x {us / count:7.2f} us = {us:8.1f} us  {name[:100]}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"decode_layers_{gpu_tag()}.csv"
        comments, kept = [], []
        command = f"python benchmarks/gpu_decode_layers.py {shlex.join(sys.argv[1:])}; torch {torch.__version__}"
        new = {(r["build"], str(r["context"]), str(r["batch"]), r["heads"]) for r in rows}
        if path.exists():                                   # other rows (builds, batches) and commands stay
            lines = path.read_text().splitlines()
            comments = [line for line in lines if line.startswith("#") and line != f"# {command}"]
            kept = [r for r in csv.DictReader(line for line in lines if not line.startswith("#"))
                    if (r["build"], r["context"], r["batch"], r["heads"]) not in new]
        with path.open("w", newline="") as f:
            f.write("".join(line + "\n" for line in comments))
            f.write(f"# {command}\n")
            writer = csv.DictWriter(f, COLUMNS)
            writer.writeheader()
            writer.writerows(kept + rows)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
