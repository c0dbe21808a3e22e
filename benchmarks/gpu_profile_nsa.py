"""Per-kernel GPU time of one `nsa_triton` forward + backward at 64k (torch.profiler; mean of 5
after 3 warm-up steps), paper geometry, bf16, 64/4 and 32/8 heads. Run from the repository root
with `nsa` importable:

    python benchmarks/gpu_profile_nsa.py

Kernels of the same name are added (the compressed and window branches share the band kernels).
The output of one H100 run is book/data/profile_fwd_bwd_h100.txt (chapter 11).
"""
import collections
import torch

from nsa import native_sparse_attention
from nsa.bench import make_inputs

def profile(N, Hq, H):
    (q, k, v, k_cmp, v_cmp, gc, gs, gw), config = make_inputs(N, Hq, H, 128)
    ts = [q, k, v, k_cmp, v_cmp, gc, gs, gw]
    def step():
        for t in ts: t.grad = None
        o = native_sparse_attention(q, k, v, k_cmp, v_cmp, gc, gs, gw, config, backend="triton")
        o.backward(torch.ones_like(o))
    for _ in range(3): step()
    torch.cuda.synchronize()
    from torch.profiler import profile as prof, ProfilerActivity
    with prof(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(5): step()
        torch.cuda.synchronize()
    agg = collections.defaultdict(float); cnt = collections.Counter()
    for e in p.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            agg[e.name] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            cnt[e.name] += 1
    total = sum(agg.values()) / 5 / 1000
    print(f"== {N} {Hq}/{H}: kernel time per fwd+bwd {total:.2f} ms")
    for name, us in sorted(agg.items(), key=lambda x: -x[1])[:14]:
        print(f"  {us / 5 / 1000:8.3f} ms  x{cnt[name] // 5}  {name[:90]}")

for N, Hq, H in ((65536, 64, 4), (65536, 32, 8)):
    profile(N, Hq, H)

