"""A whole decoding step with its cache writes, over contiguous and over paged caches (GPU).

`python benchmarks/gpu_paged_step.py --out DIR`: for each context, batch and head shape, one new
token per row through `nsa.sparse_attention_with_kvcache` with its keys and values (appended,
and the compressed blocks they complete computed with the paper's MLP phi, or with `--phi mean`
mean pooling), bf16, the paper's geometry. Three layouts of the same caches: contiguous
(B, capacity, H, D), and pages of 64 and of 16 tokens in a pool in random order, through a
block table (chapter 13, "Pages"). Each step is captured in a CUDA graph; before timing, the
eager steps of the three layouts are compared (outputs within bf16 rounding of each other, every
row's new keys where its table puts them) and each replay with its eager step (equal). The row's
position is such that the step completes a compressed block (the costlier step; one in 16 while
decoding). Timed with `triton.testing.do_bench` (median of replays), written to
DIR/paged_step_<gpu>.csv (with mean pooling paged_step_mean_<gpu>.csv) only if every check
passed. With `--kernels`, each replay's device kernels are printed too (torch.profiler,
averaged over 20 replays): where a layout's extra time goes.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))     # the checkout's nsa, without an install

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from nsa import CompressionMLP, NSAConfig, compress, sparse_attention_with_kvcache  # noqa: E402
from nsa.bench import parse_heads, parse_lengths  # noqa: E402
from nsa.bench_decode import graphed, paged  # noqa: E402
from nsa.cache import cache_index  # noqa: E402
from nsa.device import gpu_tag  # noqa: E402
from nsa.testing import write_run  # noqa: E402

COLUMNS = ["layout", "context", "batch", "heads_q", "heads_kv", "us"]


def steps(context, batch, heads_q, heads_kv, head_dim=128, page_sizes=(64, 16), phi="mlp"):
    """The step's inputs and a function per layout that takes it (appending at position context - 1);
    phi: "mlp" (the paper's `CompressionMLP`) or "mean" (mean pooling)."""
    config, dtype, device = NSAConfig(), torch.bfloat16, "cuda"
    g = torch.Generator(device=device).manual_seed(context + batch)
    randn = lambda *shape: torch.randn(*shape, generator=g, device=device, dtype=dtype)   # noqa: E731
    k_cache, v_cache = randn(batch, context, heads_kv, head_dim), randn(batch, context, heads_kv, head_dim)
    phis = [CompressionMLP(head_dim, config.compress_block_size).to(device, dtype) if phi == "mlp" else None
            for _ in range(2)]
    with torch.no_grad():
        k_cmp, v_cmp = (compress(x, f, config.compress_block_size, config.compress_stride).contiguous()
                        for f, x in zip(phis, (k_cache, v_cache)))
    q, k, v = (randn(batch, 1, heads, head_dim) for heads in (heads_q, heads_kv, heads_kv))
    gates = [torch.sigmoid(randn(batch, 1, heads_q)) for _ in range(3)]
    lengths = torch.full((batch,), context - 1, device=device, dtype=torch.int32)    # the new token: the last
    layouts = {"contiguous": ((k_cache, v_cache, k_cmp, v_cmp), None)}
    for page_size in page_sizes:
        layouts[f"pages of {page_size}"] = paged((k_cache, v_cache, k_cmp, v_cmp), page_size, config, page_size)
    makers = {}
    for name, (caches, table) in layouts.items():
        def step(caches=caches, table=table):
            return sparse_attention_with_kvcache(q, *caches, lengths, *gates, config, k=k, v=v, phi_k=phis[0],
                                                 phi_v=phis[1], backend="triton", block_table=table)
        makers[name] = (step, caches, table)
    return makers, k, lengths


def kernel_times(replay, repeats: int = 20) -> dict:
    """{kernel name: µs per replay} of a graph's replays, averaged over `repeats`, in launch order."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            replay()
        torch.cuda.synchronize()
    times = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            times[event.name] = times.get(event.name, 0.0) + event.time_range.elapsed_us() / repeats
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=parse_lengths, default=parse_lengths("64k,128k"))
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--heads", type=parse_heads, default=parse_heads("64/4,32/8"))
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--kernels", action="store_true", help="print each replay's device kernels")
    parser.add_argument("--phi", choices=("mlp", "mean"), default="mlp", help="the compression of new blocks")
    args = parser.parse_args(argv)
    rows, worst = [], 0.0
    for heads_q, heads_kv in args.heads:
        for batch in map(int, args.batches.split(",")):
            for context in args.contexts:
                makers, k_new, lengths = steps(context, batch, heads_q, heads_kv, phi=args.phi)
                with torch.no_grad():
                    outputs = {}
                    for name, (step, caches, table) in makers.items():
                        eager = step()
                        position = lengths[:, None].long()                   # the new keys, where they belong
                        at = cache_index(caches[0], position, table)
                        assert torch.equal(caches[0][at], k_new), name
                        replay, out = graphed(step)
                        replay()
                        torch.cuda.synchronize()
                        assert torch.equal(out, eager), f"{name}: graph replay differs from the eager step"
                        outputs[name] = eager
                        us = do_bench(replay, warmup=50, rep=300, return_mode="median") * 1e3
                        rows.append(dict(layout=name, context=context, batch=batch, heads_q=heads_q,
                                         heads_kv=heads_kv, us=f"{us:.2f}"))
                        if args.kernels:
                            kernels = kernel_times(replay)
                            print(f"{name}, {context} tokens, batch {batch}, {heads_q}/{heads_kv}: {us:.1f} µs, "
                                  f"kernels {sum(kernels.values()):.1f} µs")
                            for kernel, kernel_us in kernels.items():
                                print(f"  {kernel_us:8.2f} µs  {kernel[:90]}")
                    base = outputs["contiguous"].float()
                    for name, out in outputs.items():
                        err = ((out.float() - base).abs().max() / base.abs().max()).item()
                        worst = max(worst, err)
                        assert err < 1e-2, f"{name} vs contiguous: relative difference {err:.2e}"
                del makers
                torch.cuda.empty_cache()
    gpu = torch.cuda.get_device_name()
    path = args.out / f"paged_step{'' if args.phi == 'mlp' else '_mean'}_{gpu_tag()}.csv"
    command = "python benchmarks/gpu_paged_step.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_run(path, COLUMNS, rows, command, gpu, f"paged steps vs contiguous within {worst:.1e} relative, new keys "
              "in place, replays equal to eager")
    print(f"wrote {path}")
    layouts = dict.fromkeys(r["layout"] for r in rows)
    print(f"{'context':>8}{'batch':>6}{'heads':>7}" + "".join(f"{name:>17}" for name in layouts))
    shapes = dict.fromkeys((r["context"], r["batch"], r["heads_q"], r["heads_kv"]) for r in rows)
    for shape in shapes:
        times = [r["us"] for r in rows if (r["context"], r["batch"], r["heads_q"], r["heads_kv"]) == shape]
        print(f"{shape[0]:>8}{shape[1]:>6}{f'{shape[2]}/{shape[3]}':>7}" + "".join(f"{t:>14} us" for t in times))
    return 0


if __name__ == "__main__":
    sys.exit(main())
