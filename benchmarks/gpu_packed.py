"""Packed sequences on a GPU: checked, then timed beside one sequence and a dense document mask.

    python benchmarks/gpu_packed.py --out book/data          # writes packed_<gpu>.csv and .json
    python benchmarks/gpu_packed.py --tiny                   # CPU, Triton's interpreter: the check alone

Two mixes of documents packed into 64k tokens, 64/4 and 32/8 heads of 128, bf16, the paper's
geometry: `long`, long-tailed lengths (log-uniform in 1k..32k tokens, a fixed seed, the last one
cut to fit), and `short`, 128 documents of 512 tokens (where launches, not arithmetic, cost).

1. Correctness: NSA's Triton backend on packed documents of 1, 17, 1000, 2048, 5000 and 20000
   tokens against the float64 reference (`backend="torch"`) on each document alone, output and
   the gradients of all eight inputs (the last 2048 queries of a longer document; bf16: <= 1e-2
   of each tensor's largest entry), printed per tensor. The reference attends the blocks the
   packed op selected (selection is a discrete choice: a bf16 near-tie broken the other way
   moves a row by more than rounding); the share of checked rows whose selection equals
   float64's own is printed per document and kept in the .json (`selection_agreement`).
2. Time (`triton.testing.do_bench`, median), forward and forward + backward, in one run:
   * `nsa_packed`   `native_sparse_attention(..., cu_seqlens=cu)` on the packed documents: one
                    launch of each kernel for all of them (chapter 10);
   * `nsa_per_sequence` the same documents one `native_sparse_attention` call each, on slices
                    of the packed tensors (the design the packed kernels replaced);
   * `nsa_single`   one sequence of the same 64k tokens (the goal: packed <= 1.1x of it);
   * `nsa_padded`   the documents padded to a (num_docs, longest) rectangle, no mask (what
                    packing saves);
   * `flex_document` FlexAttention with a causal document mask over the 64k tokens, dense
                    within each document (the dense baseline; the goal: NSA >= 5x faster);
   * `sdpa_flash`   SDPA flash, causal, on one 64k sequence (dense without the document mask,
                    an upper bound of the masked cost).
It prints a short table last.
"""

import argparse
import csv
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent      # the checkout: its nsa, without an install
sys.path.insert(0, str(ROOT))

import torch

import nsa
from nsa import NSAConfig, compress, native_sparse_attention
from nsa.device import gpu_tag

CHECK_LENGTHS = [1, 17, 1000, 2048, 5000, 20000]    # checked documents: tiny, odd, and long
COLUMNS = ["impl", "tokens", "docs", "heads_q", "heads_kv", "head_dim", "pass", "ms"]


def document_lengths(total=65536, low=1024, high=32768, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < total:
        u = torch.rand((), generator=g).item()
        lengths.append(int(math.exp(math.log(low) + u * (math.log(high) - math.log(low)))))
    lengths[-1] -= sum(lengths) - total
    return lengths


def packed_inputs(lengths, Hq, H, D, config, dtype=torch.bfloat16, device="cuda"):
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    total = int(cu[-1])
    g = torch.Generator(device=device).manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g, device=device, dtype=dtype)
    q, k, v = r(1, total, Hq, D), r(1, total, H, D), r(1, total, H, D)
    l, d = config.compress_block_size, config.compress_stride
    k_cmp, v_cmp = compress(k, None, l, d, cu_seqlens=cu), compress(v, None, l, d, cu_seqlens=cu)
    gates = [torch.sigmoid(r(1, total, Hq)) for _ in range(3)]
    return [q, k, v, k_cmp, v_cmp, *gates], cu


def relative_error(got, want, scale):
    """max |got - want| relative to `scale`, the largest entry of the whole packed tensor (a
    document's own gradient may be exactly 0 where the kernels leave rounding)."""
    if want.numel() == 0:
        return 0.0
    return ((got.double() - want).abs().max() / max(scale, 1e-30)).item()


GRADIENTS = ["dq", "dk", "dv", "dk_cmp", "dv_cmp", "dg_cmp", "dg_slc", "dg_win"]


def float64_selection(q, k_cmp, lse, seq_len_k, config):
    """The blocks float64 itself selects for the query rows `q` (the last rows of a document of
    `seq_len_k` tokens, `lse` their compressed attention's): the reference's own choice, for the
    agreement column."""
    from nsa.selection import select_blocks, selection_scores

    with torch.no_grad():
        return select_blocks(selection_scores(q, k_cmp, lse, seq_len_k, config), seq_len_k, config)


def packed_forward(inputs, packing, config):
    """The packed Triton op's forward on `packing` (an `nsa.varlen.Packing`), as
    `native_sparse_attention(..., backend="triton", cu_seqlens=cu)` runs it: its output o,
    differentiable in the eight `inputs`, the blocks it selected (`block_indices`, numbered across
    the packed documents) and the first block of each document. One forward gives both: the
    reference attends the very blocks that made o."""
    from nsa.geometry import num_selection_blocks
    from nsa.kernels.nsa import config_fields, packed_sizes_of

    outputs = torch.ops.nsa.sparse_attention_forward(
        *inputs, *config_fields(config), inputs[0].shape[-1] ** -0.5, 0, packing.cu_q, packing.cu_k,
        packing.cu_cmp, packed_sizes_of(packing, config.select_block_size))
    blocks = [num_selection_blocks(end - start, config.select_block_size) for start, end in packing.keys]
    return outputs[0], outputs[7], [sum(blocks[:i]) for i in range(len(blocks))]


def check(lengths, Hq, H, D, config, dtype=torch.bfloat16, device="cuda"):
    """Packed Triton against float64 per document, outputs and all gradients: the worst error of
    each tensor over the documents, and each document's selection agreement.

    The float64 reference attends the blocks that the packed op selected (as
    gpu_check_nsa.py does): selection is a discrete choice, and a bf16 near-tie broken the other
    way moves a row by far more than rounding. How often the choices agree with float64's own is
    the second number, per document."""
    from nsa.compression import compressed_attention
    from nsa.selection import selected_attention
    from nsa.sparse_attention import combine_branches
    from nsa.window import sliding_window_attention

    inputs, cu = packed_inputs(lengths, Hq, H, D, config, dtype, device)
    inputs = [x.requires_grad_() for x in inputs]
    l, d = config.compress_block_size, config.compress_stride
    bounds = tuple(zip(cu[:-1].tolist(), cu[1:].tolist()))
    cmp_cu = nsa.varlen.compressed_cu_seqlens(cu, l, d)
    rows_cmp = list(zip(cmp_cu[:-1].tolist(), cmp_cu[1:].tolist()))
    packing = nsa.varlen.Packing(cu, cu, cmp_cu, bounds, bounds, rows_cmp)
    out, indices, first_block = packed_forward(inputs, packing, config)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, do)
    worst = dict.fromkeys(["o", *GRADIENTS], 0.0)
    agreement = {}
    q, k, v, k_cmp, v_cmp, *gates = (x.detach().double() for x in inputs)
    for (s, e), (c0, c1), base in zip(bounds, rows_cmp, first_block):
        rows = slice(e - min(e - s, 2048), e)           # the last 2048 queries of each document
        alone = [q[:, rows], k[:, s:e], v[:, s:e], k_cmp[:, c0:c1], v_cmp[:, c0:c1], *(g[:, rows] for g in gates)]
        alone = [x.requires_grad_() for x in alone]
        chosen = indices[:, rows]
        chosen = torch.where(chosen >= 0, chosen - base, -1)    # the document's own block numbers
        q_, k_, v_, kc_, vc_, g_cmp, g_slc, g_win = alone
        o_cmp, lse = compressed_attention(q_, kc_, vc_, l, d, seq_len_k=e - s)
        o_slc = selected_attention(q_, k_, v_, chosen, config.select_block_size)
        o_win = sliding_window_attention(q_, k_, v_, config.window_size)
        ref = combine_branches(o_cmp, o_slc, o_win, g_cmp, g_slc, g_win)
        worst["o"] = max(worst["o"], relative_error(out[:, rows], ref, out.abs().max().item()))
        ref_grads = torch.autograd.grad(ref, alone, do[:, rows].double())
        # the queries' and gates' gradients of these rows; keys get gradients from all queries,
        # so they are compared only where every query is checked (documents up to 2048 tokens)
        compared = [(0, rows), (5, rows), (6, rows), (7, rows)]
        if e - s <= 2048:
            compared += [(1, slice(s, e)), (2, slice(s, e)), (3, slice(c0, c1)), (4, slice(c0, c1))]
        for i, at in compared:
            error = relative_error(grads[i][:, at], ref_grads[i], grads[i].abs().max().item())
            worst[GRADIENTS[i]] = max(worst[GRADIENTS[i]], error)
        own = float64_selection(q_.detach(), kc_.detach(), lse.detach(), e - s, config)
        agreement[e - s] = (chosen.sort(-1).values == own.sort(-1).values).all(-1).float().mean().item()
    return worst, agreement


def report(heads, by_tensor, agreement):
    """Print one head configuration's check; return its worst error."""
    worst = max(by_tensor.values())
    print(f"{heads}: worst relative error, packed Triton vs float64 per document: {worst:.2e} ("
          + ", ".join(f"{name} {error:.1e}" for name, error in by_tensor.items()) + "); rows selecting "
          "as float64 does, by document length: "
          + ", ".join(f"{length}: {share:.4f}" for length, share in agreement.items()))
    return worst


def sdpa_flash(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    return run


def timer(fn, inputs=None):
    from triton.testing import do_bench

    if inputs is None:
        def run():
            with torch.no_grad():
                fn()
    else:
        def run():
            out = fn()
            torch.autograd.grad(out, inputs, torch.ones_like(out))
    return do_bench(run, warmup=20, rep=100, return_mode="median")


def time_mix(lengths, Hq, H, D, config, flex, create_block_mask):
    """The timed rows of one document mix: every candidate, forward and forward + backward."""
    rows, total = [], sum(lengths)
    print(f"{len(lengths)} documents, {total} tokens: {lengths}")
    packed, cu = packed_inputs(lengths, Hq, H, D, config)
    single, _ = packed_inputs([total], Hq, H, D, config)
    cmp_cu = nsa.varlen.compressed_cu_seqlens(cu, config.compress_block_size, config.compress_stride)
    slices = [(slice(s, e), slice(c0, c1)) for s, e, c0, c1 in zip(cu[:-1].tolist(), cu[1:].tolist(),
                                                                  cmp_cu[:-1].tolist(), cmp_cu[1:].tolist())]

    def per_sequence():
        q, k, v, k_cmp, v_cmp, *gates = packed
        return torch.cat([native_sparse_attention(q[:, t], k[:, t], v[:, t], k_cmp[:, c], v_cmp[:, c],
                                                  *(g[:, t] for g in gates), config, backend="triton")
                          for t, c in slices], dim=1)
    longest, docs = max(lengths), len(lengths)
    padded = [torch.zeros(docs, longest, *x.shape[2:], device="cuda", dtype=x.dtype) for x in single]
    padded[3:5] = [compress(p, None, config.compress_block_size, config.compress_stride) for p in padded[1:3]]
    doc_id = torch.repeat_interleave(torch.arange(docs, device="cuda"), torch.tensor(lengths, device="cuda"))

    def document_causal(b, h, q_idx, kv_idx):
        return (doc_id[q_idx] == doc_id[kv_idx]) & (kv_idx <= q_idx)

    block_mask = create_block_mask(document_causal, None, None, total, total, device="cuda", _compile=True)
    group = Hq // H                                # dense baselines: kv heads expanded once, untimed
    q_t = single[0].detach().transpose(1, 2).contiguous()
    k_t, v_t = (x.detach().repeat_interleave(group, dim=2).transpose(1, 2).contiguous() for x in single[1:3])
    candidates = {
        "nsa_packed": (lambda: native_sparse_attention(*packed, config, backend="triton", cu_seqlens=cu), packed),
        "nsa_per_sequence": (per_sequence, packed),
        "nsa_single": (lambda: native_sparse_attention(*single, config, backend="triton"), single),
        "nsa_padded": (lambda: native_sparse_attention(*padded, config, backend="triton"), padded),
        "flex_document": (lambda: flex(q_t, k_t, v_t, block_mask=block_mask), [q_t, k_t, v_t]),
        "sdpa_flash": (sdpa_flash(q_t, k_t, v_t), [q_t, k_t, v_t]),
    }
    for name, (fn, inputs) in candidates.items():
        inputs = [x.requires_grad_() for x in inputs]
        key = [name, total, docs, Hq, H, D]
        try:
            rows.append([*key, "fwd", f"{timer(fn):.3f}"])
            rows.append([*key, "fwd_bwd", f"{timer(fn, inputs):.3f}"])
        except (torch.cuda.OutOfMemoryError, RuntimeError) as error:
            print(f"{name}: {type(error).__name__}: {str(error)[:160]}")
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="folder for packed_<gpu>.csv and .json")
    parser.add_argument("--heads", default="64/4,32/8")
    parser.add_argument("--mixes", default="long,short", help="document mixes: long, short")
    parser.add_argument("--tiny", action="store_true", help="the check alone, on the CPU (Triton's "
                        "interpreter): float16, documents of 1, 17, 100 and 161 tokens, 4/2 heads of 16")
    args = parser.parse_args(argv)
    if args.tiny:
        config = NSAConfig(16, 8, 16, 4, 1, 2, 32)
        worst = report("4/2", *check([1, 17, 100, 161], 4, 2, 16, config, torch.float16, "cpu"))
        return 0 if worst <= 1e-2 else 1
    if not torch.cuda.is_available():
        print("benchmarks/gpu_packed.py needs a CUDA GPU.")
        return 2
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    config, D = NSAConfig(), 128
    mixes = {"long": document_lengths(), "short": [512] * 128}
    rows, errors, agreements = [], {}, {}
    flex = torch.compile(flex_attention)
    for heads in args.heads.split(","):
        Hq, H = map(int, heads.split("/"))
        by_tensor, agreement = check(CHECK_LENGTHS, Hq, H, D, config)
        errors[heads] = report(heads, by_tensor, agreement)
        agreements[heads] = {str(length): share for length, share in agreement.items()}   # by document length
        assert errors[heads] <= 1e-2, errors[heads]
        for mix in args.mixes.split(","):
            rows += time_mix(mixes[mix], Hq, H, D, config, flex, create_block_mask)
    lengths = mixes["long"]
    if args.out is not None:
        gpu = gpu_tag()
        args.out.mkdir(parents=True, exist_ok=True)
        with (args.out / f"packed_{gpu}.csv").open("w", newline="") as f:
            csv.writer(f).writerows([COLUMNS, *rows])
        (args.out / f"packed_{gpu}.json").write_text(json.dumps(
            {"command": "python benchmarks/gpu_packed.py " + " ".join(sys.argv[1:] if argv is None else argv),
             "device": torch.cuda.get_device_name(), "torch": torch.__version__, "lengths": lengths,
             "worst_relative_error": errors, "selection_agreement": agreements}, indent=1) + "\n")
    print(f"{'impl':<18}{'docs':>5}{'heads':>7}{'pass':>9}{'ms':>10}")
    for name, _, docs, hq, hkv, _, p, ms in rows:
        print(f"{name:<18}{docs:>5}{f'{hq}/{hkv}':>7}{p:>9}{float(ms):>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
