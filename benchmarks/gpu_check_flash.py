"""GPU check and timing of chapter 7's flash-attention primer (nsa.kernels.flash).

Not collected by pytest; a GPU user runs it from the repository root:

    PYTHONUNBUFFERED=1 python benchmarks/gpu_check_flash.py [--out DIR]

Checks fp16 and bf16 against float64 dense attention, forward only (the primer has no autograd):
o and lse, all rows up to 4k, 192 spot-checked rows (the first 64, 64 at random, the last 64) at
16k and 64k, printing relative errors; then times the primer beside SDPA (flash backend), causal,
at 4k, 16k and 64k, and writes flash_primer_<gpu>.csv to --out (default book/data).
"""

import argparse
import csv
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import nsa  # noqa: E402

try:  # an uninstalled checkout: kernels/ is importable as nsa.kernels once nsa's path has ROOT
    import nsa.kernels  # noqa: F401
except ImportError:
    nsa.__path__.append(str(ROOT))
from nsa import attention, causal_mask  # noqa: E402
from nsa.device import gpu_tag  # noqa: E402
from nsa.kernels.flash import flash_attention  # noqa: E402

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

DEV = torch.device("cuda")


def rel(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def check():
    print(f"{'dtype':9s} {'N':>6s} {'Hq/H':>6s} {'Dqk/Dv':>8s} {'rows':>6s} {'o':>9s} {'lse':>9s}")
    worst = 0.0
    for dtype in (torch.bfloat16, torch.float16):
        for N, Hq, H, Dqk, Dv in [(1000, 8, 2, 128, 128), (4096, 4, 4, 192, 128),
                                  (16384, 16, 1, 64, 64), (65536, 64, 4, 128, 128)]:
            try:
                gen = torch.Generator(DEV).manual_seed(N)
                q = torch.randn(1, N, Hq, Dqk, device=DEV, generator=gen).to(dtype)
                k = torch.randn(1, N, H, Dqk, device=DEV, generator=gen).to(dtype)
                v = torch.randn(1, N, H, Dv, device=DEV, generator=gen).to(dtype)
                with torch.no_grad():
                    o, lse = flash_attention(q, k, v, return_lse=True)
                rows = torch.arange(N, device=DEV) if N <= 4096 else torch.cat([
                    torch.arange(64, device=DEV), torch.randint(0, N, (64,), device=DEV, generator=gen),
                    torch.arange(N - 64, N, device=DEV)])
                # reference rows: queries `rows` against all keys, float64, causal (end-aligned, Nq = Nk)
                mask = causal_mask(N, N, DEV)[rows]
                o_ref, lse_ref = attention(q[:, rows].double(), k.double(), v.double(), mask, return_lse=True)
                errs = rel(o[:, rows], o_ref), rel(lse[:, rows], lse_ref)
                worst = max(worst, *errs)
                print(f"{str(dtype)[6:]:9s} {N:6d} {Hq:3d}/{H:<2d} {Dqk:4d}/{Dv:<3d} {len(rows):6d} "
                      f"{errs[0]:9.2e} {errs[1]:9.2e}")
            except Exception:
                traceback.print_exc()
                worst = float("inf")
    print(f"flash primer worst relative error {worst:.2e} ({'PASS' if worst < 1e-2 else 'FAIL'} against 1e-2)")


def timing(out):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    rows = []
    Hq, H, D = 64, 4, 128
    for N in (4096, 16384, 65536):
        try:
            q = torch.randn(1, N, Hq, D, device=DEV, dtype=torch.bfloat16)
            k, v = (torch.randn(1, N, H, D, device=DEV, dtype=torch.bfloat16) for _ in range(2))
            with torch.no_grad():
                ours = do_bench(lambda: flash_attention(q, k, v), return_mode="median")
                qt = q.transpose(1, 2).contiguous()
                kt = k.repeat_interleave(Hq // H, 2).transpose(1, 2).contiguous()
                vt = v.repeat_interleave(Hq // H, 2).transpose(1, 2).contiguous()
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    sdpa = do_bench(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True),
                                    return_mode="median")
            rows.append((N, ours, sdpa))
            print(f"N = {N:6d}: flash primer {ours:9.3f} ms, sdpa_flash {sdpa:9.3f} ms, ratio {ours / sdpa:.2f}")
            del q, k, v, qt, kt, vt
            torch.cuda.empty_cache()
        except Exception:
            traceback.print_exc()
    with (out / f"flash_primer_{gpu_tag()}.csv").open("w", newline="") as f:
        f.write(f"# python benchmarks/gpu_check_flash.py; torch {torch.__version__}, triton {triton.__version__}, "
                f"{torch.cuda.get_device_name()}; bf16, 64 query / 4 kv heads, d = 128, causal, fwd, "
                "do_bench median ms\n")
        w = csv.writer(f)
        w.writerow(["seq_len", "flash_primer_ms", "sdpa_flash_ms"])
        for N, ours, sdpa in rows:
            w.writerow([N, f"{ours:.4f}", f"{sdpa:.4f}"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "book" / "data"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}")
    check()
    timing(out)
