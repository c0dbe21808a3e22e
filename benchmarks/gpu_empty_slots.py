"""What empty (-1) slots cost the one-query selected kernels, and the op where queries have them.

    python benchmarks/gpu_empty_slots.py --build counted [--out FILE.csv]   # one build (this checkout's)

Run it from each build's checkout in turn, on one GPU, to compare builds (book/data/
selected_empty_slots_h100.csv: two or three builds alternating). bf16, d = 128, do_bench median ms:

* `slots`: `selected_attention_triton` at 64k tokens, 64/4 heads (group 16: one query per program),
  each query's blocks own - 3j: 16 blocks; 4 blocks and 12 empty slots; the same 4 in a list of 4.
  The outputs of the last two must be equal.
* `op`: `native_sparse_attention(backend="triton")`, the paper's geometry, 64/4 and 32/8 heads:
  128 packed documents of 512 tokens, gpu_packed.py's 9 documents of 1.4k-22.9k, one 4096-token
  sequence, one 65536-token sequence (`--op-cases` picks some: "4096 single,65536 single").
"""

import argparse
import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent      # the checkout: its nsa, without an install
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch
import triton

from gpu_packed import document_lengths, packed_inputs, timer
from nsa import NSAConfig, native_sparse_attention
from nsa.kernels.selected import selected_attention_triton


def slot_rows():
    """The `slots` experiment: (case, fwd ms, fwd+bwd ms) rows."""
    B, N, Hq, H, D, l = 1, 65536, 64, 4, 128, 64
    g = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(B, N, h, D, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
               for h in (Hq, H, H))
    do = torch.randn(B, N, Hq, D, device="cuda", dtype=torch.bfloat16, generator=g)
    own = (torch.arange(N, device="cuda") // l)[None, :, None, None]

    def blocks(n):                              # n distinct blocks at or before the query's own, or -1
        index = own - 3 * torch.arange(n, device="cuda")[None, None, None, :]
        return torch.where(index >= 0, index, -1).expand(B, N, H, n).int().contiguous()

    four = blocks(4)
    cases = {"16 blocks": blocks(16), "4 blocks + 12 empty": torch.cat([four, torch.full_like(blocks(12), -1)], -1),
             "4 blocks of 4": four}
    outputs, rows = {}, []
    for case, index in cases.items():
        run = lambda: selected_attention_triton(q, k, v, index, l, check_indices=False)  # noqa: E731
        outputs[case] = run().detach()

        def forward_backward():
            run().backward(do)
        rows.append(("slots", "64/4", case, triton.testing.do_bench(run),
                     triton.testing.do_bench(forward_backward, grad_to_none=[q, k, v])))
    assert torch.equal(outputs["4 blocks + 12 empty"], outputs["4 blocks of 4"]), "empty slots changed the output"
    return rows


OP_CASES = {"128 x 512 packed": [512] * 128, "9 packed": document_lengths(), "4096 single": [4096],
            "65536 single": [65536]}


def op_rows(cases=tuple(OP_CASES)):
    """The `op` experiment: NSA's forward and forward + backward where queries have empty slots
    (packed documents, the first n l' tokens of a sequence) and, at 64k, where almost none have."""
    config, rows = NSAConfig(), []
    for heads in ("64/4", "32/8"):
        Hq, H = map(int, heads.split("/"))
        for case in cases:
            lengths = OP_CASES[case]
            inputs, cu = packed_inputs(lengths, Hq, H, 128, config)
            cu = cu if len(lengths) > 1 else None
            run = lambda: native_sparse_attention(*inputs, config, backend="triton", cu_seqlens=cu)  # noqa: E731
            rows.append(("op", heads, case, timer(run), timer(run, [x.requires_grad_() for x in inputs])))
            del inputs
            torch.cuda.empty_cache()
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", required=True, help="the label of this checkout's rows")
    parser.add_argument("--out", type=Path, default=None, help="a CSV the rows are added to")
    parser.add_argument("--op-cases", type=lambda text: text.split(","), default=list(OP_CASES),
                        help=f"comma-separated cases of the op experiment, of: {', '.join(OP_CASES)} (default: all)")
    args = parser.parse_args()
    unknown = [case for case in args.op_cases if case not in OP_CASES]
    if unknown:
        parser.error(f"--op-cases: unknown {unknown}; known: {list(OP_CASES)}")
    rows = [(args.build, *row) for row in slot_rows() + op_rows(args.op_cases)]
    for build, experiment, heads, case, fwd, fwd_bwd in rows:
        print(f"{build:12s} {experiment:6s} {heads:5s} {case:20s} {fwd:8.3f} {fwd_bwd:8.3f}")
    if args.out is not None:
        new = not args.out.exists()
        with args.out.open("a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["build", "experiment", "heads", "case", "fwd_ms", "fwd_bwd_ms"])
            writer.writerows([(*row[:4], f"{row[4]:.3f}", f"{row[5]:.3f}") for row in rows])


if __name__ == "__main__":
    main()
