"""Does Triton's automatic warp specialisation make an attention loop faster on Hopper?

    python benchmarks/gpu_warp_specialise.py [--keys 4096]      # on a GPU: check, then time
    python benchmarks/gpu_warp_specialise.py --offline          # no GPU: compile for sm_90, report
        [--variants 'desc WS m128 w4 s2,ptr m256 w8 s2']         # some of the variants, by name

A toy forward loop shaped like NSA's compressed band at 64/4 heads and 64k tokens (chapter 9):
per kv head (4), 65536 x 16 query rows against `--keys` rows of keys, d = 128, bf16, no mask,
online softmax in base 2. The same loop three ways: keys loaded through pointers (as the book's
kernels load them), through tensor descriptors (TMA), and through tensor descriptors in a
`tl.range(..., warp_specialize=True)` loop, which asks Triton to split the loop into a producer
(the loads) and consumers (the products and the softmax), FlashAttention-3's arrangement, on
several tiles each. Every launch is checked against a float32 reference on its first 4096 rows
per kv head, then timed (`triton.testing.do_bench`, median), beside SDPA's flash and cuDNN
backends on the same problem. `--offline` compiles the variants for `sm_90` on a machine without
a GPU and says which ones Triton actually partitioned (a `ttg.warp_specialize` op in the
compiled IR) and with how many warps: a loop through pointers is not partitioned.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

D, GROUP_ROWS, HEADS_KV = 128, 65536 * 16, 4          # head dim, query rows per kv head, kv heads


@triton.jit
def attn_ptr(Q, K, V, O, NQ, NK, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    pid, z = tl.program_id(0), tl.program_id(1)
    rows = z.to(tl.int64) * NQ + pid * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D)
    q = tl.load(Q + rows[:, None] * D + d[None, :])
    m = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for start in range(0, NK, BLOCK_N):
        cols = z.to(tl.int64) * NK + start + tl.arange(0, BLOCK_N)
        k = tl.load(K + cols[:, None] * D + d[None, :])
        v = tl.load(V + cols[:, None] * D + d[None, :])
        s = tl.dot(q, tl.trans(k))
        m2 = tl.maximum(m, tl.max(s, 1))
        p = tl.exp2(s - m2[:, None])
        a = tl.exp2(m - m2)
        l = l * a + tl.sum(p, 1)
        acc = acc * a[:, None] + tl.dot(p.to(tl.bfloat16), v)
        m = m2
    tl.store(O + rows[:, None] * D + d[None, :], (acc / l[:, None]).to(tl.bfloat16))


@triton.jit
def attn_desc(Q, K, V, O, NQ, NK, Z, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
              WS: tl.constexpr):
    pid, z = tl.program_id(0), tl.program_id(1)
    qd = tl.make_tensor_descriptor(Q, shape=[Z * NQ, D], strides=[D, 1], block_shape=[BLOCK_M, D])
    kd = tl.make_tensor_descriptor(K, shape=[Z * NK, D], strides=[D, 1], block_shape=[BLOCK_N, D])
    vd = tl.make_tensor_descriptor(V, shape=[Z * NK, D], strides=[D, 1], block_shape=[BLOCK_N, D])
    od = tl.make_tensor_descriptor(O, shape=[Z * NQ, D], strides=[D, 1], block_shape=[BLOCK_M, D])
    q = qd.load([z * NQ + pid * BLOCK_M, 0])
    m = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for start in tl.range(0, NK, BLOCK_N, warp_specialize=WS):
        k = kd.load([z * NK + start, 0])
        v = vd.load([z * NK + start, 0])
        s = tl.dot(q, tl.trans(k))
        m2 = tl.maximum(m, tl.max(s, 1))
        p = tl.exp2(s - m2[:, None])
        a = tl.exp2(m - m2)
        l = l * a + tl.sum(p, 1)
        acc = acc * a[:, None] + tl.dot(p.to(tl.bfloat16), v)
        m = m2
    od.store([z * NQ + pid * BLOCK_M, 0], (acc / l[:, None]).to(tl.bfloat16))


# (loads, warp-specialised, query rows per program, warps, stages); 64 keys per step throughout
VARIANTS = [("ptr", False, 256, 8, 2), ("ptr", False, 128, 8, 2), ("ptr", False, 128, 4, 3)] + [
    ("desc", ws, rows, warps, stages) for ws in (False, True)
    for rows, warps, stages in ((256, 8, 2), (128, 8, 2), (128, 4, 2), (128, 4, 3), (256, 4, 2))]


def name(loads, ws, rows, warps, stages):
    return f"{loads}{' WS' if ws else ''} m{rows} w{warps} s{stages}"


def launch(variant, q, k, v, o, num_keys):
    loads, ws, rows, warps, stages = variant
    grid = (GROUP_ROWS // rows, HEADS_KV)
    if loads == "ptr":
        return attn_ptr[grid](q, k, v, o, GROUP_ROWS, num_keys, BLOCK_M=rows, BLOCK_N=64, D=D, num_warps=warps,
                              num_stages=stages)
    return attn_desc[grid](q, k, v, o, GROUP_ROWS, num_keys, HEADS_KV, BLOCK_M=rows, BLOCK_N=64, D=D, WS=ws,
                           num_warps=warps, num_stages=stages)


def offline(variants):
    """Compile each variant for sm_90 without a GPU: (name, partitioned, warps, registers, stack)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from offline_compile import compile_launch, resource_usage

    t = torch.empty(4096, D, dtype=torch.bfloat16)
    report = []
    for loads, ws, rows, warps, stages in variants:
        kernel, args = (attn_ptr, (t, t, t, t, 4096, 4096))              # Q, K, V, O, NQ, NK
        meta = dict(BLOCK_M=rows, BLOCK_N=64, D=D, num_warps=warps, num_stages=stages)
        if loads == "desc":
            kernel, args, meta["WS"] = attn_desc, args + (1,), ws          # ..., Z: one kv head
        compiled = compile_launch(kernel, args, meta)
        usage = resource_usage(compiled)
        partitioned = any("ttg.warp_specialize" in line for line in compiled.asm["ttgir"].splitlines())
        report.append((name(loads, ws, rows, warps, stages), partitioned, compiled.metadata.num_warps,
                       int(usage["REG"]), int(usage["STACK"])))
        print(f"{report[-1][0]:22s} partitioned {str(partitioned):5s} warps {report[-1][2]:3d} "
              f"registers {report[-1][3]:4d} stack {report[-1][4]:4d}", flush=True)
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=4096, help="key rows per kv head (the compressed keys of 64k)")
    parser.add_argument("--offline", action="store_true", help="compile for sm_90 without a GPU and report")
    parser.add_argument("--variants", help="comma-separated names (as printed): only these")
    args = parser.parse_args()
    print(f"triton {triton.__version__}, torch {torch.__version__}")
    if args.offline:       # the timed variants, warp-specialised ones with 8 warps (not partitioned) but one
        variants = [v for v in VARIANTS if not (v[1] and v[3] == 8)] + [("desc", True, 128, 8, 2)]
        offline([v for v in variants if args.variants is None or name(*v) in args.variants.split(",")])
        return
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    print(torch.cuda.get_device_name())
    torch.manual_seed(0)
    NK = args.keys
    q = (torch.randn(HEADS_KV * GROUP_ROWS, D, device="cuda") * D ** -0.5 * 1.4427).bfloat16()   # log2(e) folded in
    k = torch.randn(HEADS_KV * NK, D, device="cuda").bfloat16()
    v = torch.randn(HEADS_KV * NK, D, device="cuda").bfloat16()
    flops = 4 * HEADS_KV * GROUP_ROWS * NK * D

    def reference(z):                       # the first 4096 rows of kv head z, float32, natural log
        s = (q[z * GROUP_ROWS:z * GROUP_ROWS + 4096].float() @ k[z * NK:(z + 1) * NK].float().T) * 0.6931471805599453
        return torch.softmax(s, -1) @ v[z * NK:(z + 1) * NK].float()

    for variant in VARIANTS:
        o = torch.empty_like(q)
        try:
            t0 = time.time()
            launch(variant, q, k, v, o, NK)
            torch.cuda.synchronize()
            compile_s = time.time() - t0
            err = max(((o[z * GROUP_ROWS:z * GROUP_ROWS + 4096].float() - reference(z)).abs().max()
                       / reference(z).abs().max()).item() for z in range(HEADS_KV))
            ms = triton.testing.do_bench(lambda: launch(variant, q, k, v, o, NK), warmup=50, rep=300)
            print(f"{name(*variant):24s} {ms:8.3f} ms {flops / ms / 1e9:6.0f} TFLOP/s err {err:.2e} "
                  f"compile {compile_s:.1f}s", flush=True)
        except Exception as e:                                          # a variant that does not compile
            print(f"{name(*variant):24s} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    qs, ks, vs = (x.view(1, HEADS_KV, -1, D) for x in (q, k, v))
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        with sdpa_kernel(backend):
            sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, scale=1.0)
            ms = triton.testing.do_bench(sdpa, warmup=20, rep=200)
        print(f"sdpa {backend.name:19s} {ms:8.3f} ms {flops / ms / 1e9:6.0f} TFLOP/s", flush=True)


if __name__ == "__main__":
    main()
