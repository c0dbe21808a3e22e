"""Which length argument's specialisation pays, kernel by kernel (GPU; chapter 7, appendix).

    PYTHONUNBUFFERED=1 python benchmarks/gpu_specialisation.py [--seq-len 64k]

Chapter 7 marks the kernels' length arguments `do_not_specialize` so that a new sequence length
compiles nothing, except where an argument's specialisation was measured to pay: chapter 9's
selection keeps seq_len_q and seq_len_k, chapter 8's forward and dq kernels keep seq_len_k
(book/data/specialisation_args_h100.csv, this script's output). For the selection and chapter 8's
forward, dq and dk/dv kernels it times the shipped kernel, the kernel re-jitted from its Python
function with every length argument specialised, then with one length argument unspecialised at
a time, then all of them (and all with `do_not_specialize_on_alignment`, which keeps the `== 1`
specialisation); each variant is put in place of the shipped kernel in its module, and the
kernel's launcher is timed (triton.testing.do_bench, median) at the paper's geometry,
bf16, d = 128, with the selections of random inputs: the selection at 32/32, 32/8 and 64/4, the
query-centric forward and backward at 32/8 and 64/4, the gather kernel (dk, dv) at 64/4 and, with
its atomic dq, at 32/32. Each variant's result must equal the shipped kernel's (indices exactly,
outputs within bf16 rounding). Prints one line per (kernel, heads, variant). `--tiny` runs the
same in Triton's CPU interpreter on 50 tokens in float32 (one timed call, no do_bench): a check
of the script only (each kernel once, without the one-argument variants).
"""

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

import nsa  # noqa: E402,F401
from nsa import NSAConfig, compress  # noqa: E402
from nsa.bench import parse_lengths, make_inputs, selection_of  # noqa: E402
from nsa.kernels import selected as sel  # noqa: E402
from nsa.kernels import selection  # noqa: E402

KERNELS = {   # kernel name -> (module, its length arguments)
    "select_blocks_kernel": (selection, ["seq_len_q", "seq_len_k", "mem_kv_len", "num_cmp", "num_sel"]),
    "selected_attention_forward_kernel": (sel, ["seq_len_q", "seq_len_k", "num_tiles", "num_entries"]),
    "selected_attention_backward_dq_kernel": (sel, ["seq_len_q", "seq_len_k", "num_tiles", "num_entries"]),
    "selected_attention_backward_dkdv_kernel": (sel, ["seq_len_q", "seq_len_k", "num_programs"]),
}


def variants(name, one_by_one=True):
    """(label, kernel) pairs: the shipped kernel, then re-jitted ones."""
    module, lengths = KERNELS[name]
    shipped = getattr(module, name)
    out = [("shipped", shipped), ("all specialised", triton.jit(shipped.fn))]
    if one_by_one:
        out += [(f"{arg} unspecialised", triton.jit(do_not_specialize=[arg])(shipped.fn)) for arg in lengths]
    out.append(("all unspecialised", triton.jit(do_not_specialize=lengths)(shipped.fn)))
    out.append(("all: no alignment only", triton.jit(do_not_specialize_on_alignment=lengths)(shipped.fn)))
    return out


def problem(N, heads_q, heads_kv, tiny=False):
    """bf16 q, k, v, dO and the selection NSA makes for them, prepared for the selected kernels
    (tiny: float32 on the CPU, d = 16, a small geometry)."""
    if tiny:
        config, dim = NSAConfig(16, 8, 16, 4, 1, 1, 32), 16
        q, k, v = (torch.randn(1, N, h, dim) for h in (heads_q, heads_kv, heads_kv))
        k_cmp, v_cmp = (compress(x, block_size=16, stride=8).contiguous() for x in (k, v))
    else:
        (q, k, v, k_cmp, v_cmp, *_), config = make_inputs(N, heads_q, heads_kv, 128)
        q, k, v, k_cmp, v_cmp = (t.detach() for t in (q, k, v, k_cmp, v_cmp))
        dim = 128
    scale = dim ** -0.5
    lse, indices = selection_of(q, k_cmp, v_cmp, N, config, scale)
    prepared = sel.prepare_block_indices(indices, config.select_block_size, N, True)
    do = torch.randn_like(q)
    return dict(q=q, k=k, v=v, k_cmp=k_cmp, lse_cmp=lse, config=config, scale=scale, indices=prepared, do=do)


def shipped_forward(p):
    """The query tiles and the shipped forward's o and lse on problem p: what the launchers of the
    forward, dq and dk/dv kernels start from, the same for every variant of them."""
    q, k, v, config, scale, indices = (p[x] for x in ("q", "k", "v", "config", "scale", "indices"))
    Q, tiles = sel.query_tiles(indices, q.shape[2] // k.shape[2])
    o, lse = sel.selected_attention_fwd(q, k, v, indices, config.select_block_size, scale, True, Q, tiles)
    return dict(Q=Q, tiles=tiles, o=o, lse=lse)


def launcher(name, p):
    """A closure running the launcher that uses kernel `name`, returning what to compare. p: a
    problem, holding `shipped_forward(p)` too for any kernel but the selection."""
    q, k, v, config, scale, indices, do = (p[x] for x in ("q", "k", "v", "config", "scale", "indices", "do"))
    l_sel, N = config.select_block_size, q.shape[1]
    G = q.shape[2] // k.shape[2]
    if name == "select_blocks_kernel":
        return lambda: (selection.select_blocks_triton(q, p["k_cmp"], p["lse_cmp"], N, config, scale),)
    Q, tiles, o, lse = (p[x] for x in ("Q", "tiles", "o", "lse"))
    if name == "selected_attention_forward_kernel":
        return lambda: sel.selected_attention_fwd(q, k, v, indices, l_sel, scale, True, Q, tiles)
    if name == "selected_attention_backward_dq_kernel":
        return lambda: sel.selected_attention_bwd(do, q, k, v, o, lse, indices, l_sel, scale, True, Q, tiles)
    delta = (o.float() * do.float()).sum(-1)
    by_block = sel.key_block_centric(G, q.shape[0] * q.shape[1])
    dq = torch.zeros(q.shape, device=q.device, dtype=torch.float32) if by_block else None
    return lambda: sel.selected_attention_dkdv(q, k, v, do, lse, delta, indices, l_sel, scale, True, dq=dq)


CASES = [("select_blocks_kernel", (32, 32)), ("select_blocks_kernel", (32, 8)), ("select_blocks_kernel", (64, 4)),
         ("selected_attention_forward_kernel", (64, 4)), ("selected_attention_forward_kernel", (32, 8)),
         ("selected_attention_backward_dq_kernel", (64, 4)), ("selected_attention_backward_dq_kernel", (32, 8)),
         ("selected_attention_backward_dkdv_kernel", (64, 4)), ("selected_attention_backward_dkdv_kernel", (32, 32))]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=lambda text: parse_lengths(text)[0], default=65536)
    parser.add_argument("--tiny", action="store_true", help="the CPU interpreter, small sizes: checks the script")
    args = parser.parse_args()
    N = 50 if args.tiny else args.seq_len
    where = "CPU interpreter" if args.tiny else torch.cuda.get_device_name()
    print(f"{where}, torch {torch.__version__}, triton {triton.__version__}, N = {N}")
    cases = CASES if not args.tiny else [(name, (2, 2) if "dkdv" in name or "select_blocks" in name else (4, 1))
                                         for name in KERNELS]
    problems = {}
    for name, heads in cases:
        if heads not in problems:
            problems.clear()
            if not args.tiny:
                torch.cuda.empty_cache()
            problems[heads] = problem(N, *heads, tiny=args.tiny)
        p = problems[heads]
        if name != "select_blocks_kernel" and "o" not in p:      # once per problem, by the shipped kernels
            p.update(shipped_forward(p))
        module = KERNELS[name][0]
        shipped = getattr(module, name)
        want = None
        try:
            for label, kernel in variants(name, one_by_one=not args.tiny):
                setattr(module, name, kernel)
                run = launcher(name, p)
                start = time.perf_counter()
                got = [t for t in run() if t is not None]
                first_call_ms = (time.perf_counter() - start) * 1e3     # --tiny's time: no second call
                if want is None:
                    want = [t.clone() for t in got]
                    same = True
                else:
                    same = all(torch.equal(a, b) if a.dtype == torch.int32 else
                               torch.allclose(a.float(), b.float(), rtol=2e-2, atol=2e-2) for a, b in zip(got, want))
                ms = first_call_ms if args.tiny else do_bench(run, warmup=20, rep=100, return_mode="median")
                print(f"{name:40s} {heads[0]}/{heads[1]:<3d} {label:28s} {ms:8.2f} ms  "
                      f"{'same' if same else 'DIFFERENT'}", flush=True)
        finally:
            setattr(module, name, shipped)


if __name__ == "__main__":
    main()
