"""`python -m nsa.bench_decode`: time one decoding step of NSA beside SDPA's dense decode (GPU).

Hand-written CLI glue (chapter 13 explains the decoding kernels it times). For each context
length, batch size, head configuration and number of new tokens T (`--tokens`, 1 by default;
more for speculative decoding's drafts), T new tokens per row attend over a cache of that many
tokens, the new ones included (bf16, paper geometry l=32, d=16, l'=64, n=16, w=512; the attention
op of a step only: the compressed keys are already in the cache, as the step's k=None form),
timed with `triton.testing.do_bench` (median), eagerly and as the replay of a CUDA graph of the
step:

* `nsa_decode`  `nsa.sparse_attention_with_kvcache(..., backend="triton")`: the four decoding
                kernels, lengths on the GPU;
* `nsa_paged`   the same step over paged caches (with `--page-size P`: pages of P tokens in a
                pool in random order, found through a block table; chapter 13's "Pages");
* `nsa_prefill` with `--prefill`: the same step through `native_sparse_attention`'s kernels over
                each row's cached keys (chapters 8-10), what a step that the decoding kernels
                turn down runs; eager only (it reads the rows' lengths on the host);
* `sdpa_dense`  PyTorch SDPA over the whole cache, GQA (`dense_decode`: one token with
                `enable_gqa=True`, the backend PyTorch picks; several with the group's query
                heads folded into the query rows, every new token seeing every cached key).

Before timing, it checks the step against `backend="torch"` on the same inputs in float64
(relative error, bf16: <= 1e-2) and the graph's replay against the eager step (equal), and the
dense baseline's first batch row against a float64 dense attention of what it computes. It writes
CSV rows `impl,context,batch,tokens,heads_q,heads_kv,head_dim,graph,us,gbps` (gbps: the bytes
the step must read, counted as in chapter 13, over the time; for T > 1 each token's selected
blocks and window counted on its own, as the kernels read them: `step_bytes`), a JSON of the machine beside it, and prints
a table with NSA's speed-up over SDPA last.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import sys
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from nsa.bench import machine_info, parse_head_dim, parse_heads, parse_lengths

COLUMNS = ["impl", "context", "batch", "tokens", "heads_q", "heads_kv", "head_dim", "graph", "us", "gbps"]


def _parse_counts(text: str, flag: str, example: str) -> list[int]:
    if not all(item.strip().isdigit() and int(item) > 0 for item in text.split(",")):
        raise argparse.ArgumentTypeError(f"{flag} wants positive counts like {example}, got {text!r}")
    return [int(item) for item in text.split(",")]


def _parse_batches(text: str) -> list[int]:
    return _parse_counts(text, "--batches", "1,16")


def _parse_tokens(text: str) -> list[int]:
    return _parse_counts(text, "--tokens", "1,4,16")


def step_bytes(context, batch, heads_q, heads_kv, head_dim, config, itemsize=2, tokens=1) -> int:
    """Bytes a step must read (keys and values of the compressed rows, once; of the selected
    blocks and the window, once per new token — each token's own; per row and kv head) plus the
    NSA kernels' own traffic: the stored compressed scores, written and read once (float32, one
    row per new token and query head, padded to 16)."""
    from nsa.geometry import num_compressed_blocks

    compressed = num_compressed_blocks(context, config.compress_block_size, config.compress_stride)
    keys = compressed + tokens * (min(config.num_selected_blocks * config.select_block_size, context) +
                                  min(config.window_size, context))
    rows = max(16, tokens * (heads_q // heads_kv))
    return batch * heads_kv * (keys * 2 * head_dim * itemsize + 2 * rows * compressed * 4)


def dense_bytes(context, batch, heads_kv, head_dim, itemsize=2) -> int:
    return batch * heads_kv * context * 2 * head_dim * itemsize


def dense_decode(q, k, v):
    """Dense attention of T new tokens over a whole cache, q (B, Hq, T, D) over k, v (B, H, N, D),
    GQA, the cost a dense server pays for a step. One token: SDPA with `enable_gqa`. Several: the
    group's query heads folded into the query rows, (B, H, G T, D), as flash-attn's decode packs
    GQA, and every new token sees every cached key — the causal mask among the T new tokens would
    hide at most T - 1 of N keys and change no cost, while PyTorch's causal paths for T > 1 with
    GQA read the cache once per query head (at 64k tokens on an H100, 430 and 12,000 us at batch 1
    and 16, where one token takes 64 and 690)."""
    import torch.nn.functional as F

    (B, Hq, T, D), H = q.shape, k.shape[1]
    if T == 1:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    folded = q.reshape(B, H, Hq // H * T, D)                      # (B, H, G T, D): heads of a group, then tokens
    return F.scaled_dot_product_attention(folded, k, v).reshape(B, Hq, T, -1)


def dense_error(q, k, v, out) -> float:
    """`dense_decode`'s output `out` for its first batch row against float64 (every new token
    seeing every key): the relative error."""
    from nsa import attention

    ref = attention(*(x[:1].transpose(1, 2).double() for x in (q, k, v)))      # (1, T, Hq, D)
    return ((out[:1].transpose(1, 2).double() - ref).abs().max() / ref.abs().max()).item()


def reference_step(args, config):
    """`sparse_attention_with_kvcache(*args, config)` in float64 on the PyTorch backend, one batch row
    at a time: a float64 copy of the whole batch's caches need not fit beside them (at 128k tokens,
    batch 16, 32/8 heads it did not, on an 80 GB GPU). args: (q, k_cache, v_cache, k_cmp_cache,
    v_cmp_cache, cache_seqlens, g_cmp, g_slc, g_win), each with the batch first (cache_seqlens may be a
    list, g_win None)."""
    from nsa import sparse_attention_with_kvcache

    def row(x, b):                         # a tensor's or a list's row b; None stays None
        if isinstance(x, torch.Tensor):
            return x[b:b + 1].double() if x.is_floating_point() else x[b:b + 1]
        return x if x is None else x[b:b + 1]

    return torch.cat([sparse_attention_with_kvcache(*(row(x, b) for x in args), config, backend="torch")
                      for b in range(args[0].shape[0])])


def paged(caches, page_size, config, seed):
    """The step's caches (k, v, k_cmp, v_cmp), each (B, rows, H, D), copied into a pool of pages in
    random order: (pages, block_table), every row ceil(rows / page_size) pages of its own."""
    from nsa.cache import cache_index, compressed_page_shift

    k_cache, _, k_cmp, _ = caches
    (batch, context), device = k_cache.shape[:2], k_cache.device
    per_row = -(-context // page_size)
    order = torch.randperm(batch * per_row, generator=torch.Generator().manual_seed(seed)).to(device)
    table = order.view(batch, per_row).to(torch.int32)
    positions = torch.arange(context, device=device).expand(batch, context)
    rows = torch.arange(k_cmp.shape[1], device=device).expand(batch, k_cmp.shape[1])
    cmp_rows, shift = page_size // config.compress_stride, compressed_page_shift(
        config.compress_block_size, config.compress_stride, 0)
    pages = []
    for x, page_rows, at, at_shift in ((caches[0], page_size, positions, 0), (caches[1], page_size, positions, 0),
                                       (caches[2], cmp_rows, rows, shift), (caches[3], cmp_rows, rows, shift)):
        pool = x.new_zeros(batch * per_row, page_rows, *x.shape[2:])
        pool[cache_index(pool, at, table, at_shift)] = x
        pages.append(pool)
    return pages, table


class DecodeStep(NamedTuple):
    """One step's callables (each returns the step's output) and inputs, from `make_step`."""
    nsa: Callable               # the decoding kernels
    sdpa: Callable              # SDPA's dense attention over the whole cache
    reference: Callable         # backend="torch" in float64, row by row
    config: object              # the NSAConfig
    paged: Callable | None      # the decoding kernels over pages (None without page_size)
    prefill: Callable           # native_sparse_attention's kernels over each row's cached keys
    inputs: tuple               # (q, k_cache, v_cache, k_cmp_cache, v_cmp_cache, cache_seqlens, g_cmp, g_slc, g_win)
    dense_inputs: tuple         # SDPA's (q, k, v), (B, heads, tokens, D)


def make_step(context, batch, heads_q, heads_kv, head_dim, device="cuda", page_size=0, tokens=1) -> DecodeStep:
    """The inputs of one step: caches holding `context` tokens per row (the `tokens` new ones
    included), the compressed caches filled, `tokens` queries per row, and the step's callables
    (`DecodeStep`)."""
    from nsa import NSAConfig, compress, sparse_attention_with_kvcache
    from nsa.cache import attend_cached

    config, dtype = NSAConfig(), torch.bfloat16
    g = torch.Generator(device=device).manual_seed(context + batch)
    randn = lambda *shape: torch.randn(*shape, generator=g, device=device, dtype=dtype)
    k_cache, v_cache = randn(batch, context, heads_kv, head_dim), randn(batch, context, heads_kv, head_dim)
    k_cmp = compress(k_cache, block_size=config.compress_block_size, stride=config.compress_stride).contiguous()
    v_cmp = compress(v_cache, block_size=config.compress_block_size, stride=config.compress_stride).contiguous()
    q = randn(batch, tokens, heads_q, head_dim)
    gates = [torch.sigmoid(randn(batch, tokens, heads_q)) for _ in range(3)]
    cache_seqlens = torch.full((batch,), context - tokens, device=device, dtype=torch.int32)   # before the new ones
    args = (q, k_cache, v_cache, k_cmp, v_cmp, cache_seqlens, *gates, config)

    def nsa_step():
        return sparse_attention_with_kvcache(*args, backend="triton")

    nsa_paged_step = None
    if page_size:
        pages, table = paged((k_cache, v_cache, k_cmp, v_cmp), page_size, config, context + batch)

        def nsa_paged_step():
            return sparse_attention_with_kvcache(q, *pages, *args[5:], backend="triton", block_table=table)

    def prefill_step():
        return attend_cached(None, *args[:9], config, head_dim ** -0.5, 0, "triton")

    def reference():
        return reference_step(args[:9], config)

    q_t = q.transpose(1, 2).contiguous()                             # (B, Hq, T, D)
    k_t, v_t = k_cache.transpose(1, 2).contiguous(), v_cache.transpose(1, 2).contiguous()

    def sdpa_step():
        return dense_decode(q_t, k_t, v_t)

    return DecodeStep(nsa_step, sdpa_step, reference, config, nsa_paged_step, prefill_step, args[:9], (q_t, k_t, v_t))


def graphed(fn):
    """fn captured in a CUDA graph: (replay, the graph's output tensor)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()                                                     # warm up: compile, allocate
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


def sweep_constants(step: DecodeStep, values: dict):
    """Time `step` with each combination of `values` ({a constant of `nsa.kernels.decode`: the
    values to try}) set in turn: each combination's output first checked against the step's
    float64 reference (relative error <= 1e-2, else a RuntimeError naming the combination), then
    its CUDA-graph replay timed (`do_bench`, median). Yields (combination, µs, relative error);
    the constants get their own values back afterwards. For the sweeps of `benchmarks/`."""
    from triton.testing import do_bench

    from nsa.kernels import decode

    own = {name: getattr(decode, name) for name in values}
    try:
        with torch.no_grad():
            expected = step.reference()
            for combination in itertools.product(*values.values()):
                for name, value in zip(values, combination):
                    setattr(decode, name, value)
                got = step.nsa()
                err = ((got.float() - expected).abs().max() / expected.abs().max()).item()
                if not err <= 1e-2:
                    raise RuntimeError(f"{dict(zip(values, combination))}: relative error {err:.2e} against float64")
                replay, _ = graphed(step.nsa)
                yield combination, do_bench(replay, warmup=30, rep=150, return_mode="median") * 1e3, err
    finally:
        for name, value in own.items():
            setattr(decode, name, value)


def write_sweep(out: Path, script: str, columns: list, rows: list) -> None:
    """A sweep's CSV: a first line naming the script, the GPU and the software, then the rows."""
    from nsa.kernels import decode

    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        f.write(f"# python benchmarks/{script}; {torch.cuda.get_device_name()}, torch {torch.__version__}, "
                f"triton {decode.triton.__version__}; bf16, d = 128, paper geometry; graph replay, do_bench median\n")
        csv.writer(f).writerows([columns, *rows])
    print(f"wrote {out}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nsa.bench_decode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=parse_lengths, default=parse_lengths("8k,16k,32k,64k,128k,256k"))
    parser.add_argument("--batches", type=_parse_batches, default=_parse_batches("1,16"))
    parser.add_argument("--tokens", type=_parse_tokens, default=_parse_tokens("1"),
                        help="new tokens per row and step, e.g. 1,4,16 (speculative decoding's drafts)")
    parser.add_argument("--heads", type=parse_heads, default=parse_heads("64/4,32/8"))
    parser.add_argument("--head-dim", type=parse_head_dim, default=128)
    parser.add_argument("--page-size", type=int, default=0,
                        help="also time the step over paged caches of this many tokens a page (a multiple of 16)")
    parser.add_argument("--prefill", action="store_true",
                        help="also time the step through native_sparse_attention's kernels (eager)")
    parser.add_argument("--out", type=Path, default=None, help="default: book/data/decode_<gpu>.csv")
    args = parser.parse_args(argv)
    if args.page_size < 0 or args.page_size % 16:
        parser.error(f"--page-size must be a multiple of 16 (the paper's stride d) or 0, got {args.page_size}")
    from nsa.kernels.decode import decode_max_tokens

    for heads_q, heads_kv in args.heads:                 # a longer step is a prefill, which no graph captures
        if max(args.tokens) > decode_max_tokens(heads_q // heads_kv):
            parser.error(f"--tokens: the decoding kernels take at most {decode_max_tokens(heads_q // heads_kv)} "
                         f"new tokens at {heads_q}/{heads_kv} heads, got {max(args.tokens)}")
    if not torch.cuda.is_available():
        print("python -m nsa.bench_decode needs a CUDA GPU (it times Triton kernels and CUDA graphs).")
        return 2
    from triton.testing import do_bench

    from nsa.device import gpu_tag

    args.out = args.out or Path(f"book/data/decode_{gpu_tag()}.csv")
    info = machine_info(sys.argv[1:] if argv is None else argv)
    info["command"] = info["command"].replace("nsa.bench", "nsa.bench_decode", 1)
    print(f"{info['device']}: bf16 matmul {info['matmul_bf16_tflops']} TFLOP/s")
    rows, checks = [], []
    shapes = [(heads, batch, tokens, context) for heads in args.heads for batch in args.batches
              for tokens in args.tokens for context in args.contexts]
    for (heads_q, heads_kv), batch, tokens, context in shapes:
        key = [context, batch, tokens, heads_q, heads_kv, args.head_dim]
        try:
            nsa_step, sdpa_step, reference, config, nsa_paged_step, prefill_step, _, dense_inputs = make_step(
                context, batch, heads_q, heads_kv, args.head_dim, page_size=args.page_size, tokens=tokens)
            with torch.no_grad():
                # -- correct first: against the reference, and the graph against eager --
                ref = reference()
                timed = []
                for name, step in (("nsa_decode", nsa_step), ("nsa_paged", nsa_paged_step),
                                   ("nsa_prefill", prefill_step if args.prefill else None)):
                    if step is None:
                        continue
                    eager = step()
                    err = ((eager.float() - ref).abs().max() / ref.abs().max()).item()
                    if name == "nsa_prefill":                # host lengths: no graph of it
                        checks.append(([name, *key], err, None))
                        if err > 1e-2:
                            print(f"FAILED at {name} {key}: relative error {err:.2e}")
                            return 1
                        timed.append((name, step, 0))
                        continue
                    replay, out = graphed(step)
                    replay()
                    torch.cuda.synchronize()
                    same = torch.equal(out, eager)
                    checks.append(([name, *key], err, same))
                    if err > 1e-2 or not same:
                        print(f"FAILED at {name} {key}: relative error {err:.2e}, graph == eager: {same}")
                        return 1
                    timed += [(name, step, 0), (name, replay, 1)]
                err = dense_error(*dense_inputs, sdpa_step())
                checks.append((["sdpa_dense", *key], err, None))
                if err > 1e-2:
                    print(f"FAILED at sdpa_dense {key}: relative error {err:.2e}")
                    return 1
                # -- then fast: eager and graph, beside SDPA --
                sdpa_replay, _ = graphed(sdpa_step)
                need = step_bytes(context, batch, heads_q, heads_kv, args.head_dim, config, tokens=tokens)
                dense = dense_bytes(context, batch, heads_kv, args.head_dim)
                for name, fn, graph, nbytes in ([(*t, need) for t in timed] +
                                                [("sdpa_dense", sdpa_step, 0, dense),
                                                 ("sdpa_dense", sdpa_replay, 1, dense)]):
                    us = do_bench(fn, warmup=50, rep=300, return_mode="median") * 1e3
                    rows.append([name, *key, graph, f"{us:.2f}", f"{nbytes / us / 1e3:.1f}"])
        except torch.cuda.OutOfMemoryError:
            print(f"{key}: out of memory, skipped")
        torch.cuda.empty_cache()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("w", newline="") as f:
            csv.writer(f).writerows([COLUMNS, *rows])
    info["checks"] = [{"key": k, "relative_error": e, "graph_equals_eager": s} for k, e, s in checks]
    args.out.with_name(args.out.stem + "_meta.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"wrote {args.out} and {args.out.stem}_meta.json; worst relative error "
          f"{max(e for _, e, _ in checks):.2e}, every graph replay equal to eager")
    times = {(r[0], *r[1:8]): float(r[8]) for r in rows}
    print(f"{'impl':>11}{'context':>8}{'batch':>6}{'T':>4}{'heads':>7}{'graph':>6}{'nsa us':>9}{'sdpa us':>9}"
          f"{'speed-up':>9}{'nsa GB/s':>9}")
    for r in rows:
        if r[0] != "sdpa_dense":
            sdpa = times.get(("sdpa_dense", *r[1:8]))
            print(f"{r[0]:>11}{r[1]:>8}{r[2]:>6}{r[3]:>4}{f'{r[4]}/{r[5]}':>7}{r[7]:>6}{float(r[8]):>9.1f}"
                  f"{sdpa:>9.1f}{sdpa / float(r[8]):>8.2f}x{r[9]:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
