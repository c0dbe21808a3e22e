"""GPU check of the Triton NSA backend (chapters 8-10): accuracy against float64, then speed at 64k.

One command on a machine with a CUDA GPU (H100 in the book):

    python benchmarks/gpu_check_nsa.py --out book/data

1. Accuracy. bf16 inputs through `backend="triton"`, forward and backward, against the
   float64 PyTorch reference (chapters 2-5) at N = 1k ... 64k. The float64 reference is exact
   only for small N, so at long N it checks *chunks* of query rows: the upstream gradient dO is
   zero outside the chunks, and by causality the rows [a, a + R) of an N-token problem are the
   last R queries of the problem truncated to a + R keys, which the reference computes in
   float64 (its key gradients are added over chunks). The reference uses the Triton kernel's
   block selection (selection is a discrete choice; near-ties in bf16 can choose differently),
   and the agreement of the selections with float64's own choice is reported separately.
   Relative error = ||x - x_ref|| / ||x_ref|| over the checked rows (all rows of the key
   gradients). Goal: < 1e-2 everywhere.
2. Speed. Median time (triton.testing.do_bench) at N = 64k of the whole op, forward and
   forward+backward, in the paper's geometry (B = 1, 64 query / 4 kv heads, d = 128,
   l = 32, d = 16, l' = 64, n = 16, w = 512), its branches, and torch SDPA with the flash
   backend (causal, 64 heads; k, v expanded to 64 heads) in the same run.

Writes nsa_triton_errors_<gpu>.csv and nsa_triton_timing_<gpu>.csv into --out; prints a table last.
--deterministic runs the Triton forward and backward under torch.use_deterministic_algorithms(True)
(their reproducible path, chapter 8) and names the errors file nsa_triton_errors_<gpu>_deterministic.csv.
"""

import argparse
import csv
import math
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import nsa  # noqa: E402,F401  (a plain checkout too: nsa finds kernels/ beside it)
from gpu_deterministic import deterministic_algorithms  # noqa: E402  (this folder is sys.path[0])
from nsa.compression import compressed_attention  # noqa: E402
from nsa.config import NSAConfig  # noqa: E402
from nsa.device import gpu_tag  # noqa: E402
from nsa.geometry import num_compressed_blocks  # noqa: E402
from nsa.selection import select_blocks, selected_attention, selection_scores  # noqa: E402
from nsa.sparse_attention import combine_branches, native_sparse_attention  # noqa: E402
from nsa.window import sliding_window_attention  # noqa: E402

NAMES = ("q", "k", "v", "k_cmp", "v_cmp", "g_cmp", "g_slc", "g_win")
DEVICE = "cuda"       # --tiny runs the script's logic on the CPU (interpreter), to debug it
DETERMINISTIC = False  # --deterministic: the Triton op under torch.use_deterministic_algorithms(True)


def make_inputs(B, Nq, Nk, Hq, H, Dqk, Dv, config, mem, dtype, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, device=DEVICE, dtype=torch.float32).to(dtype)
    rows = mem + num_compressed_blocks(Nk, config.compress_block_size, config.compress_stride)
    gates = [torch.rand(B, Nq, Hq, generator=g, device=DEVICE).to(dtype) for _ in range(3)]
    return [r(B, Nq, Hq, Dqk), r(B, Nk, H, Dqk), r(B, Nk, H, Dv), r(B, rows, H, Dqk), r(B, rows, H, Dv), *gates]


def reference_chunk(inputs, a, R, Nq, Nk, config, mem, scale, block_indices):
    """float64 NSA of query rows [a, a+R) (of Nq queries over Nk keys) and its autograd inputs."""
    q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win = inputs
    l, d, l_sel = config.compress_block_size, config.compress_stride, config.select_block_size
    end = Nk - Nq + a + R                      # keys visible to these rows (causal)
    rows = mem + num_compressed_blocks(end, l, d)
    f64 = lambda x: x.detach().double().requires_grad_()
    parts = [f64(q[:, a:a + R]), f64(k[:, :end]), f64(v[:, :end]), f64(k_cmp[:, :rows]),
             f64(v_cmp[:, :rows]), f64(g_cmp[:, a:a + R]), f64(g_slc[:, a:a + R]), f64(g_win[:, a:a + R])]
    q_, k_, v_, kc_, vc_, gc_, gs_, gw_ = parts
    o_cmp, lse = compressed_attention(q_, kc_, vc_, l, d, scale, causal=True, mem_kv_len=mem, seq_len_k=end)
    o_slc = selected_attention(q_, k_, v_, block_indices[:, a:a + R], l_sel, scale, causal=True)
    o_win = sliding_window_attention(q_, k_, v_, config.window_size, scale, causal=True)
    o = combine_branches(o_cmp, o_slc, o_win, gc_, gs_, gw_)
    with torch.no_grad():
        own = select_blocks(selection_scores(q_, kc_, lse, end, config, scale, mem_kv_len=mem), end, config)
    return o, parts, dict(o_cmp=o_cmp, lse=lse, o_slc=o_slc, o_win=o_win), own


def rel(x, ref):
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def check_accuracy(label, B, Nq, Nk, Hq, H, Dqk, Dv, config, mem, chunks, dtype):
    """One problem: rows per chunk (a, R), disjoint and within the Nq queries (the reference's key
    gradients are summed over the chunks); returns rows for the errors CSV."""
    spans = sorted(chunks)
    if any(a < 0 or R < 1 or a + R > Nq for a, R in spans) or any(a1 + R1 > a2 for (a1, R1), (a2, _) in
                                                                  zip(spans, spans[1:])):
        raise ValueError(f"{label}: chunks {chunks} must be disjoint runs of rows within the {Nq} queries")
    from nsa.kernels.band import compressed_attention_triton, sliding_window_attention_triton
    from nsa.kernels.selected import selected_attention_triton
    from nsa.kernels.selection import select_blocks_triton

    inputs = [x.requires_grad_() for x in make_inputs(B, Nq, Nk, Hq, H, Dqk, Dv, config, mem, dtype, seed=Nk)]
    scale = Dqk ** -0.5
    l, d, l_sel = config.compress_block_size, config.compress_stride, config.select_block_size
    with deterministic_algorithms(DETERMINISTIC):
        o = native_sparse_attention(*inputs, config, scale, backend="triton", mem_kv_len=mem)
    # the branches and the selection, forward only, for per-branch errors
    q, k, v, k_cmp, v_cmp = inputs[:5]
    with torch.no_grad():
        o_cmp, lse = compressed_attention_triton(q, k_cmp, v_cmp, l, d, scale, mem_kv_len=mem, seq_len_k=Nk)
        block_indices = select_blocks_triton(q, k_cmp, lse, Nk, config, scale, mem_kv_len=mem)
        o_slc = selected_attention_triton(q, k, v, block_indices, l_sel, scale)
        o_win = sliding_window_attention_triton(q, k, v, config.window_size, scale)
    # upstream gradient: random on the checked rows, zero elsewhere
    do = torch.zeros_like(o)
    for a, R in chunks:
        do[:, a:a + R] = torch.randn_like(o[:, a:a + R])
    with deterministic_algorithms(DETERMINISTIC):
        grads = torch.autograd.grad(o, inputs, do)
    # float64 reference, chunk by chunk; key gradients summed over chunks
    ref_full = [torch.zeros_like(x, dtype=torch.float64) for x in inputs]
    got, want = {name: [] for name in ("o", "o_cmp", "lse", "o_slc", "o_win")}, {name: [] for name in ("o", "o_cmp", "lse", "o_slc", "o_win")}
    same_rows, common, total = 0, 0, 0
    for a, R in chunks:
        o_ref, parts, branches, own = reference_chunk(inputs, a, R, Nq, Nk, config, mem, scale, block_indices)
        g_ref = torch.autograd.grad(o_ref, parts, do[:, a:a + R].double())
        for full, part, name in zip(ref_full, g_ref, NAMES):
            if name in ("q", "g_cmp", "g_slc", "g_win"):
                full[:, a:a + R] += part
            else:
                full[:, :part.shape[1]] += part
        for name, mine, theirs in (("o", o, o_ref), ("o_cmp", o_cmp, branches["o_cmp"]), ("lse", lse, branches["lse"]),
                                   ("o_slc", o_slc, branches["o_slc"]), ("o_win", o_win, branches["o_win"])):
            mine = mine[:, a:a + R].detach()
            if name == "lse":   # rows that see nothing have -inf in both
                finite = torch.isfinite(theirs)
                assert torch.equal(finite, torch.isfinite(mine)), "lse: -inf rows differ"
                mine, theirs = mine[finite], theirs[finite]
            got[name].append(mine.reshape(-1))
            want[name].append(theirs.detach().reshape(-1))
        chosen = block_indices[:, a:a + R]
        same_rows += (chosen == own).all(-1).sum().item()
        mine_sets = torch.zeros(*chosen.shape[:3], -(-Nk // l_sel) + 1, dtype=torch.bool, device=DEVICE)
        ref_sets = torch.zeros_like(mine_sets)
        mine_sets.scatter_(-1, chosen.long().clamp(min=-1) % mine_sets.shape[-1], True)
        ref_sets.scatter_(-1, own.long() % mine_sets.shape[-1], True)
        mine_sets[..., -1] = ref_sets[..., -1] = False          # the -1 slots
        common += (mine_sets & ref_sets).sum().item()
        total += ref_sets.sum().item()
    results = []
    for name in got:
        results.append((name, rel(torch.cat(got[name]), torch.cat(want[name]))))
    row_mask = torch.zeros(Nq, dtype=torch.bool, device=DEVICE)
    for a, R in chunks:
        row_mask[a:a + R] = True
    for name, grad, ref in zip(NAMES, grads, ref_full):
        if name in ("q", "g_cmp", "g_slc", "g_win"):
            grad, ref = grad[:, row_mask], ref[:, row_mask]
        assert torch.isfinite(grad).all(), f"d{name} has NaN/inf"
        results.append((f"d{name}", rel(grad, ref)))
    rows_checked = int(row_mask.sum().item())
    out = []
    for name, err in results:
        out.append(dict(case=label, seq_len=Nk, seq_len_q=Nq, heads_q=Hq, heads_kv=H, dim_qk=Dqk, dim_v=Dv,
                        mem_kv_len=mem, rows_checked=rows_checked, tensor=name, rel_error=f"{err:.3e}"))
    out.append(dict(case=label, seq_len=Nk, seq_len_q=Nq, heads_q=Hq, heads_kv=H, dim_qk=Dqk, dim_v=Dv,
                    mem_kv_len=mem, rows_checked=rows_checked, tensor="selection_rows_identical",
                    rel_error=f"{same_rows / max(1, B * rows_checked * H):.4f}"))
    out.append(dict(case=label, seq_len=Nk, seq_len_q=Nq, heads_q=Hq, heads_kv=H, dim_qk=Dqk, dim_v=Dv,
                    mem_kv_len=mem, rows_checked=rows_checked, tensor="selection_blocks_in_common",
                    rel_error=f"{common / max(1, total):.4f}"))
    worst = max(err for _, err in results)
    print(f"{label:28s} N={Nk:6d} rows={rows_checked:6d} worst rel err {worst:.2e} "
          f"({max(results, key=lambda r: r[1])[0]}); selection identical rows "
          f"{same_rows / max(1, B * rows_checked * H):.4f}, blocks in common {common / max(1, total):.4f}", flush=True)
    return out


def bench(fn, warmup=100, rep=400):
    import triton
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def timing(N=65536, B=1, Hq=64, H=4, D=128):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from nsa.kernels.band import compressed_attention_triton, sliding_window_attention_triton
    from nsa.kernels.selected import selected_attention_triton
    from nsa.kernels.selection import select_blocks_triton

    config = NSAConfig()
    l, d, l_sel = config.compress_block_size, config.compress_stride, config.select_block_size
    inputs = [x.requires_grad_() for x in make_inputs(B, N, N, Hq, H, D, D, config, 0, torch.bfloat16, seed=1)]
    q, k, v, k_cmp, v_cmp = inputs[:5]
    scale = D ** -0.5
    rows = []

    def add(impl, pass_, ms):
        rows.append(dict(impl=impl, seq_len=N, heads_q=Hq, heads_kv=H, head_dim=D, **{"pass": pass_}, ms=f"{ms:.3f}"))
        print(f"  {impl:24s} {pass_:8s} {ms:9.3f} ms", flush=True)

    fwd = lambda: native_sparse_attention(*inputs, config, scale, backend="triton")
    with torch.no_grad():
        add("nsa_triton", "fwd", bench(fwd))
    o = fwd()
    do = torch.randn_like(o)
    add("nsa_triton", "fwd_bwd", bench(lambda: torch.autograd.grad(fwd(), inputs, do)))
    with torch.no_grad():
        o_cmp, lse = compressed_attention_triton(q, k_cmp, v_cmp, l, d, scale, seq_len_k=N)
        idx = select_blocks_triton(q, k_cmp, lse, N, config, scale)
        add("branch_compressed", "fwd", bench(lambda: compressed_attention_triton(q, k_cmp, v_cmp, l, d, scale, seq_len_k=N)))
        add("branch_select_topn", "fwd", bench(lambda: select_blocks_triton(q, k_cmp, lse, N, config, scale)))
        add("branch_selected", "fwd", bench(lambda: selected_attention_triton(q, k, v, idx, l_sel, scale)))
        add("branch_window", "fwd", bench(lambda: sliding_window_attention_triton(q, k, v, config.window_size, scale)))
    for name, fn in (("branch_compressed", lambda: compressed_attention_triton(q, k_cmp, v_cmp, l, d, scale, seq_len_k=N)[0]),
                     ("branch_selected", lambda: selected_attention_triton(q, k, v, idx, l_sel, scale)),
                     ("branch_window", lambda: sliding_window_attention_triton(q, k, v, config.window_size, scale))):
        out = fn()
        grad_out = torch.randn_like(out)
        add(name, "fwd_bwd", bench(lambda: torch.autograd.grad(fn(), (q, k, v, k_cmp, v_cmp), grad_out, allow_unused=True)))
    del o, do
    # dense flash attention, 64 heads (k, v expanded), causal
    qd = q.detach().transpose(1, 2).contiguous().requires_grad_()
    kd = k.detach().repeat_interleave(Hq // H, dim=2).transpose(1, 2).contiguous().requires_grad_()
    vd = v.detach().repeat_interleave(Hq // H, dim=2).transpose(1, 2).contiguous().requires_grad_()
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, is_causal=True)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        with torch.no_grad():
            add("sdpa_flash", "fwd", bench(sdpa, warmup=50, rep=200))
        dod = torch.randn_like(sdpa())
        add("sdpa_flash", "fwd_bwd", bench(lambda: torch.autograd.grad(sdpa(), (qd, kd, vd), dod), warmup=50, rep=200))
    torch.cuda.synchronize()
    print(f"  peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
    del qd, kd, vd, dod
    torch.cuda.empty_cache()
    profile_kernels(fwd, inputs, do=torch.randn_like(fwd()))
    return rows


def profile_kernels(fwd, inputs, do, out_dir=None):
    """Per-kernel GPU time of one forward + backward of the whole op (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    torch.autograd.grad(fwd(), inputs, do)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        torch.autograd.grad(fwd(), inputs, do)
        torch.cuda.synchronize()
    events = prof.key_averages()
    def device_us(e):
        for name in ("self_device_time_total", "self_cuda_time_total", "device_time_total", "cuda_time_total"):
            if hasattr(e, name):
                return getattr(e, name)
        return 0.0
    ranked = sorted(events, key=device_us, reverse=True)
    total = sum(device_us(e) for e in events)
    print(f"  profile of one fwd+bwd: {total / 1e3:.1f} ms of GPU kernels", flush=True)
    for e in ranked[:18]:
        print(f"    {device_us(e) / 1e3:8.2f} ms  x{e.count:<3d} {e.key[:90]}", flush=True)


def write_csv(path, rows):
    if rows:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "book" / "data"), help="folder for the CSV files")
    parser.add_argument("--max-len", type=int, default=65536)
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes on the CPU: checks the script only")
    parser.add_argument("--limits", action="store_true",
                        help="accuracy only, short problems over dtypes x head dims x groups: every launch "
                             "configuration within the documented limits must run")
    parser.add_argument("--quick", action="store_true",
                        help="accuracy only, eight problems (1k-64k, groups 1-16): a check after a kernel change")
    parser.add_argument("--deterministic", action="store_true",
                        help="the Triton op under torch.use_deterministic_algorithms(True)")
    args = parser.parse_args()
    global DEVICE, DETERMINISTIC
    DETERMINISTIC = args.deterministic
    import triton
    if args.tiny:
        DEVICE, gpu, dtype = "cpu", "tiny_cpu", torch.float16
        args.skip_timing = True
        tiny = NSAConfig(16, 8, 16, 4, 1, 2, 32)
        problems = [("tiny", 1, 70, 70, 4, 1, 16, 16, tiny, 0, [(0, 70)]),
                    ("tiny chunks", 1, 60, 80, 6, 2, 32, 16, tiny, 1, [(0, 16), (28, 16), (44, 16)])]
    else:
        if not torch.cuda.is_available():
            sys.exit("gpu_check_nsa.py needs a CUDA GPU (or --tiny)")
        name = torch.cuda.get_device_name()
        gpu, dtype = gpu_tag(), torch.bfloat16
        print(f"{name}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
        paper = NSAConfig()
        R = 256
        problems = [  # label, B, Nq, Nk, Hq, H, Dqk, Dv, config, mem, chunks
            ("paper 16/1 d128", 1, 1024, 1024, 16, 1, 128, 128, paper, 0, [(0, 1024)]),
            ("group 4, 192/128, batch 2", 2, 2048, 2048, 8, 2, 192, 128, paper, 1, [(0, 512), (1536, 512)]),
            ("Nq<Nk group 2, d64", 1, 1000, 3000, 4, 2, 64, 64, paper, 0, [(0, 1000)]),
            ("paper 16/1 d128", 1, 4096, 4096, 16, 1, 128, 128, paper, 0, [(a, 1024) for a in range(0, 4096, 1024)]),
        ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.quick and not args.tiny:
        args.skip_timing = True
        problems = problems[:3] + [("paper 16/1 d128", 1, 16384, 16384, 16, 1, 128, 128, paper, 0,
                                    [(0, R), (8192 - R // 2, R), (16384 - R, R)]),
                                   ("paper 64/4 d128", 1, 65536, 65536, 64, 4, 128, 128, paper, 0,
                                    [(65536 - R // 2, R // 2)]),
                                   ("group 1, 8/8 d128", 1, 16384, 16384, 8, 8, 128, 128, paper, 0,
                                    [(0, R), (16384 - R, R)]),
                                   ("group 4, 32/8 d128", 1, 16389, 16389, 32, 8, 128, 128, paper, 0,
                                    [(0, R), (16389 - R, R)]),
                                   ("group 8, 32/4 d128", 1, 16389, 16389, 32, 4, 128, 128, paper, 0,
                                    [(0, R), (16389 - R, R)])]
    if args.limits and not args.tiny:
        args.skip_timing = True
        problems = []
        for dt in (torch.float16, torch.bfloat16, torch.float32):
            for Dqk, Dv in ((64, 64), (128, 128), (192, 128), (256, 256)):
                for Hq, H in ((16, 1), (8, 2), (2, 2)):
                    name = f"{str(dt)[6:]} {Hq}/{H} {Dqk}/{Dv}"
                    problems.append((name, 1, 333, 333, Hq, H, Dqk, Dv, paper, 0, [(0, 333)], dt))
    for N in ((16384, 65536) if not (args.tiny or args.quick or args.limits) else ()):
        if N <= args.max_len:
            chunks = [(0, R), (N // 2 - R // 2, R), (N - R, R)]
            problems.append(("paper 16/1 d128", 1, N, N, 16, 1, 128, 128, paper, 0, chunks))
            problems.append(("paper 64/4 d128", 1, N, N, 64, 4, 128, 128, paper, 0, [(N - R // 2, R // 2)]))
    errors, failures = [], []
    print("== accuracy: bf16 triton vs float64 reference ==", flush=True)
    for label, *problem in problems:
        start = time.time()
        if len(problem) == 10:                     # the problem names no dtype: the run's
            problem.append(dtype)
        try:
            errors += check_accuracy(label, *problem)
        except Exception:                          # keep going: report every problem
            failures.append(label)
            traceback.print_exc()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        print(f"    ({time.time() - start:.1f} s)", flush=True)
        write_csv(out / f"nsa_triton_errors_{gpu}{'_deterministic' if DETERMINISTIC else ''}.csv", errors)
    timings = []
    if not args.skip_timing:
        print("== timing at 64k, paper geometry, bf16 ==", flush=True)
        try:
            timings = timing()
        except Exception:
            failures.append("timing")
            traceback.print_exc()
        write_csv(out / f"nsa_triton_timing_{gpu}.csv", timings)
    print("\n== summary ==")
    worst = {}
    for row in errors:
        if not row["tensor"].startswith("selection"):
            key = (row["case"], row["seq_len"])
            worst[key] = max(worst.get(key, 0.0), float(row["rel_error"]))
    print(f"{'case':28s} {'N':>6s} {'worst rel err':>14s}")
    for (case, N), err in worst.items():
        print(f"{case:28s} {N:6d} {err:14.2e} {'ok' if err < 1e-2 else 'ABOVE 1e-2'}")
    ms = {(r["impl"], r["pass"]): float(r["ms"]) for r in timings}
    if ms:
        print(f"\n{'impl (N=64k, 64/4 heads, d=128)':34s} {'fwd ms':>9s} {'fwd+bwd ms':>11s}")
        for impl in dict.fromkeys(r["impl"] for r in timings):
            f, fb = ms.get((impl, "fwd"), math.nan), ms.get((impl, "fwd_bwd"), math.nan)
            print(f"{impl:34s} {f:9.2f} {fb:11.2f}")
        if ("sdpa_flash", "fwd") in ms and ("nsa_triton", "fwd") in ms:
            print(f"speed-up over sdpa_flash: fwd {ms['sdpa_flash', 'fwd'] / ms['nsa_triton', 'fwd']:.2f}x, "
                  f"fwd+bwd {ms['sdpa_flash', 'fwd_bwd'] / ms['nsa_triton', 'fwd_bwd']:.2f}x")
    if failures:
        print("FAILED:", ", ".join(failures))
        sys.exit(1)


if __name__ == "__main__":
    main()
