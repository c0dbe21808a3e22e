"""`python -m nsa.bench`: time NSA's Triton backend beside dense attention and fla's NSA (GPU).

Hand-written CLI glue (chapter 11 explains and plots what it measures). For each sequence length
and head configuration it times, with `triton.testing.do_bench` (median), the forward pass and
forward + backward of:

* `nsa_triton`  the whole NSA op (compressed attention, importance + top-n, selected, window,
                gating; not the projections nor phi), paper geometry l=32, d=16, l'=64, n=16,
                w=512; plus one row per branch (`nsa_triton/<branch>`) for the breakdown;
* `sdpa_flash`, `sdpa_cudnn`  PyTorch SDPA, causal, each backend forced;
* `flex_window` FlexAttention with the 512-token sliding window alone (a floor for one branch);
* `fla_nsa`     fla-core 0.6.0's `parallel_nsa` (compression + top-k + selection with its own
                l = d = l' = 64, no window), when importable; it needs a power-of-two group of at least 16.

It writes CSV rows `impl,seq_len,heads_q,heads_kv,head_dim,pass,ms`, a peak-memory CSV and a
JSON of the machine (device, versions, the measured bf16 matmul ceiling, the command) beside it,
shows a progress bar, and prints a table last.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

import torch

COLUMNS = ["impl", "seq_len", "heads_q", "heads_kv", "head_dim", "pass", "ms"]
MEMORY_COLUMNS = ["impl", "seq_len", "heads_q", "heads_kv", "head_dim", "peak_gib"]


def parse_heads(text: str) -> list[tuple[int, int]]:
    """'64/4,32/8' -> [(64, 4), (32, 8)]: query heads / kv heads, the kv heads dividing the query heads."""
    pairs = []
    for item in text.split(","):
        hq, _, hkv = item.strip().partition("/")
        if not (hq.isdigit() and hkv.isdigit()) or int(hq) < 1 or int(hkv) < 1 or int(hq) % int(hkv):
            raise argparse.ArgumentTypeError(f"wants query/kv head pairs like 64/4,32/8 (the kv heads >= 1 and "
                                             f"dividing the query heads), got {item.strip()!r} in {text!r}")
        pairs.append((int(hq), int(hkv)))
    return pairs


def parse_head_dim(text: str) -> int:
    """A head dim, an int >= 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"wants a head dim, an int >= 1, got {text!r}")
    return int(text)


def parse_lengths(text: str) -> list[int]:
    lengths = []
    for item in text.split(","):
        item = item.strip().lower()
        scale = 1024 if item.endswith("k") else 1
        number = item[:-1] if item.endswith("k") else item
        if not number.isdigit() or int(number) < 1:
            raise argparse.ArgumentTypeError(f"wants lengths like 4k,8k,16384, got {text!r}")
        lengths.append(int(number) * scale)
    return lengths


def make_inputs(seq_len, heads_q, heads_kv, head_dim, dtype=torch.bfloat16, device="cuda"):
    """Random q, k, v in the book's layout, compressed k/v (mean phi) and gates; grads enabled."""
    from nsa import NSAConfig, compress

    config = NSAConfig()
    g = torch.Generator(device=device).manual_seed(seq_len)
    randn = lambda *shape: torch.randn(*shape, generator=g, device=device, dtype=dtype)
    q = randn(1, seq_len, heads_q, head_dim)
    k, v = randn(1, seq_len, heads_kv, head_dim), randn(1, seq_len, heads_kv, head_dim)
    k_cmp = compress(k, block_size=config.compress_block_size, stride=config.compress_stride)
    v_cmp = compress(v, block_size=config.compress_block_size, stride=config.compress_stride)
    gates = [torch.sigmoid(randn(1, seq_len, heads_q)) for _ in range(3)]
    tensors = [q, k, v, k_cmp.contiguous(), v_cmp.contiguous(), *gates]
    return [t.requires_grad_() for t in tensors], config


def _timer(fn, grads_of=None, grad_out=None):
    """fwd: time fn(); fwd_bwd: time fn() then backward into grads_of."""
    from triton.testing import do_bench

    if grads_of is None:
        def run():
            with torch.no_grad():
                fn()
    else:
        def run():
            for t in grads_of:
                t.grad = None
            out = fn()
            out.backward(grad_out if grad_out is not None else torch.ones_like(out))
    return do_bench(run, warmup=50, rep=200, return_mode="median")


def selection_of(q, k_cmp, v_cmp, seq_len_k, config, scale):
    """What the selected branch is timed with: the compressed branch's lse (float32, contiguous)
    and the block indices the fused selection picks with it, by the Triton kernels, no gradient."""
    from nsa.kernels.band import compressed_attention_triton
    from nsa.kernels.selection import select_blocks_triton

    with torch.no_grad():
        _, lse = compressed_attention_triton(q, k_cmp, v_cmp, config.compress_block_size, config.compress_stride,
                                             scale, seq_len_k=seq_len_k)
        lse = lse.float().contiguous()
        return lse, select_blocks_triton(q, k_cmp, lse, seq_len_k, config, scale)


def branch_impls(q, k, v, k_cmp, v_cmp, config):
    """The stages of `nsa_triton`, each timed alone (`select` has no backward: no gradient)."""
    from nsa.kernels.band import compressed_attention_triton, sliding_window_attention_triton
    from nsa.kernels.selected import selected_attention_triton
    from nsa.kernels.selection import select_blocks_triton

    l, d, l_sel, N = config.compress_block_size, config.compress_stride, config.select_block_size, k.shape[1]
    scale = q.shape[-1] ** -0.5
    lse, block_indices = selection_of(q, k_cmp, v_cmp, N, config, scale)
    return {
        "nsa_triton/compressed": (lambda: compressed_attention_triton(q, k_cmp, v_cmp, l, d, scale, seq_len_k=N)[0],
                                  [q, k_cmp, v_cmp]),
        "nsa_triton/select": (lambda: select_blocks_triton(q, k_cmp, lse, N, config, scale), None),
        "nsa_triton/selected": (lambda: selected_attention_triton(q, k, v, block_indices, l_sel, scale),
                                [q, k, v]),
        "nsa_triton/window": (lambda: sliding_window_attention_triton(q, k, v, config.window_size, scale),
                              [q, k, v]),
    }


IMPLS = ("nsa_triton", "nsa_triton/compressed", "nsa_triton/select", "nsa_triton/selected", "nsa_triton/window",
         "sdpa_flash", "sdpa_cudnn", "flex_window", "fla_nsa")


def parse_only(text: str) -> tuple[str, ...]:
    """`--only`: comma-separated names of IMPLS."""
    names = tuple(name.strip() for name in text.split(","))
    unknown = [name for name in names if name not in IMPLS]
    if unknown:
        raise argparse.ArgumentTypeError(f"--only names {', '.join(map(repr, unknown))}; known: {', '.join(IMPLS)}")
    return names


def impls(seq_len, heads_q, heads_kv, head_dim, only=IMPLS):
    """{name: (forward callable, tensors needing grads)} for the implementations named in `only` that
    are available; nothing else is built or compiled (FlexAttention's block mask is compiled only for
    `flex_window`)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from nsa import native_sparse_attention

    (q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win), config = make_inputs(seq_len, heads_q, heads_kv, head_dim)
    out = {}
    if "nsa_triton" in only:
        out["nsa_triton"] = (lambda: native_sparse_attention(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win,
                                                             config, backend="triton"),
                             [q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win])
    if any(name.startswith("nsa_triton/") for name in only):
        out.update((name, impl) for name, impl in branch_impls(q, k, v, k_cmp, v_cmp, config).items() if name in only)

    # Dense baselines see the same q and the kv heads expanded once (outside the timed region).
    group = heads_q // heads_kv
    if {"sdpa_flash", "sdpa_cudnn", "flex_window"} & set(only):
        qd = q.detach().transpose(1, 2).contiguous().requires_grad_()
    if {"sdpa_flash", "sdpa_cudnn"} & set(only):
        kd = k.detach().repeat_interleave(group, dim=2).transpose(1, 2).contiguous().requires_grad_()
        vd = v.detach().repeat_interleave(group, dim=2).transpose(1, 2).contiguous().requires_grad_()
        for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
            def sdpa(backend=backend):
                with sdpa_kernel(backend):
                    return torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, is_causal=True)
            if name in only:
                out[name] = (sdpa, [qd, kd, vd])

    if "flex_window" in only:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        window = config.window_size
        block_mask = create_block_mask(lambda b, h, i, j: (j <= i) & (j > i - window), None, None,
                                       seq_len, seq_len, device=q.device, _compile=True)
        flex = torch.compile(flex_attention)
        kf, vf = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (k, v))
        out["flex_window"] = (lambda: flex(qd, kf, vf, block_mask=block_mask, enable_gqa=True), [qd, kf, vf])

    if "fla_nsa" in only:
        try:
            from fla.ops.nsa import parallel_nsa
        except ImportError as missing:              # said once per config: a silent skip hides a broken install
            print(f"fla_nsa skipped: {type(missing).__name__}: {missing}", file=sys.stderr)
            parallel_nsa = None
        if parallel_nsa is not None and group >= 16 and group & (group - 1) == 0:
            out["fla_nsa"] = (lambda: parallel_nsa(q, k, v, g_cmp, g_slc, None, block_counts=16,
                                                   block_size=64, window_size=0),
                              [q, k, v, g_cmp, g_slc])
    return out


def save(path: Path, rows, memory_rows, info) -> None:
    """The timings CSV, with `<stem>_memory.csv` and `<stem>_meta.json` beside it."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([COLUMNS, *rows])
    with path.with_name(path.stem + "_memory.csv").open("w", newline="") as f:
        csv.writer(f).writerows([MEMORY_COLUMNS, *memory_rows])
    path.with_name(path.stem + "_meta.json").write_text(json.dumps(info, indent=1) + "\n")


def machine_info(argv) -> dict:
    """What ran the benchmark, and the bf16 matmul ceiling measured on it (8192^3, median)."""
    import triton
    from triton.testing import do_bench

    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ms = do_bench(lambda: a @ b, warmup=100, rep=500, return_mode="median")
    return {
        "command": "python -m nsa.bench " + " ".join(argv),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "matmul_bf16_tflops": round(2 * 8192**3 / ms / 1e9, 1),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nsa.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=parse_lengths, default=parse_lengths("4k,8k,16k,32k,64k,128k"))
    parser.add_argument("--heads", type=parse_heads, default=parse_heads("64/4,32/8"))
    parser.add_argument("--head-dim", type=parse_head_dim, default=128)
    parser.add_argument("--out", type=Path, default=None, help="default: book/data/bench_<gpu>.csv")
    parser.add_argument("--only", type=parse_only, default=IMPLS,
                        help=f"comma-separated implementation names, of {', '.join(IMPLS)} (default: all)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("python -m nsa.bench needs a CUDA GPU (it times Triton kernels and SDPA backends).")
        return 2
    from tqdm import tqdm

    from nsa.device import gpu_tag

    args.out = args.out or Path(f"book/data/bench_{gpu_tag()}.csv")
    info = machine_info(sys.argv[1:] if argv is None else argv)
    print(f"{info['device']}: bf16 matmul {info['matmul_bf16_tflops']} TFLOP/s")
    rows, memory_rows = [], []
    jobs = [(n, hq, hkv) for hq, hkv in args.heads for n in args.seq_lens]
    for seq_len, heads_q, heads_kv in tqdm(jobs, desc="configs"):
        try:
            candidates = impls(seq_len, heads_q, heads_kv, args.head_dim, args.only)
        except torch.cuda.OutOfMemoryError:
            tqdm.write(f"{seq_len}: out of memory building inputs, skipped")
            continue
        for name, (fn, grads_of) in candidates.items():
            key = [seq_len, heads_q, heads_kv, args.head_dim]
            try:
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                rows.append([name, *key, "fwd", f"{_timer(fn):.4f}"])
                if grads_of is not None:
                    rows.append([name, *key, "fwd_bwd", f"{_timer(fn, grads_of):.4f}"])
                peak = (torch.cuda.max_memory_allocated() - base) / 2**30
            except (torch.cuda.OutOfMemoryError, RuntimeError) as error:
                tqdm.write(f"{name} at {seq_len}: {type(error).__name__}: {str(error)[:120]}")
                torch.cuda.empty_cache()
                continue
            memory_rows.append([name, *key, f"{peak:.3f}"])
        del candidates
        torch.cuda.empty_cache()
        save(args.out, rows, memory_rows, info)   # after every config: a killed run keeps its rows

    print(f"wrote {args.out}, with _memory.csv and _meta.json beside it")
    print(f"{'impl':<24}{'N':>8}{'heads':>8}{'pass':>9}{'ms':>10}")
    for impl, n, hq, hkv, _, p, ms in rows:
        print(f"{impl:<24}{n:>8}{f'{hq}/{hkv}':>8}{p:>9}{float(ms):>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
