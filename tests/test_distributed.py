"""Context parallelism and the layer in distributed training, on CPU with gloo (chapter 14).

Spawned processes are slow to start (each imports torch and nsa), so each test spawns one group
and runs many checks in it; every rank computes the single-process result itself and compares
its own shard with it.
"""

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.multiprocessing as mp
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

import nsa
from nsa import CompressionMLP, NSAConfig, SparseAttention
from nsa.distributed import (context_parallel_sparse_attention, finish_gather, gather_sequence, local_problem,
                             shard_bounds, split_evenly, start_gather)
from nsa.testing import compare_with_single_process

LAYER = dict(dim=16, heads=4, kv_heads=2, dim_head=8, compress_block_size=8, compress_stride=4,
             select_block_size=16, num_selected_blocks=3, window_size=16)


def _init(rank, world, store):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=90))


def _layer(seed=0, **overrides):
    torch.manual_seed(seed)
    return SparseAttention(**{**LAYER, **overrides}).double()


def _check_layer(group, lengths, batch=2, cu_seqlens=None, seed=0, **overrides):
    """layer(x_shard, cp_group=group) against layer(x): outputs, input and parameter gradients."""
    rank, (s, e) = dist.get_rank(group), shard_bounds(lengths)[dist.get_rank(group)]
    layer = _layer(seed, **overrides)
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, sum(lengths), LAYER["dim"], dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(x.shape, dtype=torch.float64, generator=generator)
    packed = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
    y = layer(x, **packed)
    (y * weight).sum().backward()
    expected = {name: p.grad.clone() for name, p in layer.named_parameters()}
    layer.zero_grad()
    x_shard = x.detach()[:, s:e].clone().requires_grad_()
    y_shard = layer(x_shard, cp_group=group, **packed)
    torch.testing.assert_close(y_shard, y.detach()[:, s:e])
    (y_shard * weight[:, s:e]).sum().backward()
    torch.testing.assert_close(x_shard.grad, x.grad[:, s:e])
    for name, p in layer.named_parameters():               # each rank holds part of the gradient: sum
        dist.all_reduce(p.grad, group=group)
        torch.testing.assert_close(p.grad, expected[name], msg=lambda m: f"{name}: {m}")


def _check_functional(group, lengths, dtype, backend, cu_seqlens=None, seed=0, phi=False, given_lengths=False):
    """context_parallel_sparse_attention against native_sparse_attention on the whole sequence; with
    `phi`, the MLP phi_k, phi_v (their gradients summed over the ranks); with `given_lengths`, the
    shard lengths passed instead of gathered."""
    rank, (s, e) = dist.get_rank(group), shard_bounds(lengths)[dist.get_rank(group)]
    config = NSAConfig(8, 4, 16, 3, 1, 1, 16)
    generator = torch.Generator().manual_seed(seed)
    N, B = sum(lengths), 1
    q, k, v = (torch.randn(B, N, h, 16, generator=generator, dtype=dtype) for h in (4, 2, 2))
    gates = [torch.rand(B, N, 4, generator=generator, dtype=dtype) for _ in range(3)]
    weight = torch.randn(B, N, 4, 16, generator=generator, dtype=dtype)
    torch.manual_seed(seed)                                              # the same phi on every rank
    phis = [CompressionMLP(16, 8).to(dtype) for _ in range(2)] if phi else [None, None]
    leaves = [t.requires_grad_() for t in (q, k, v, *gates)]
    packed = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
    k_cmp, v_cmp = (nsa.compress(t, p, 8, 4, **packed) for t, p in zip((k, v), phis))
    o = nsa.native_sparse_attention(q, k, v, k_cmp, v_cmp, *gates, config, backend=backend, **packed)
    (o * weight).sum().backward()
    params = [p for m in phis if m is not None for p in m.parameters()]
    full_grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    shards = [t.detach()[:, s:e].clone().requires_grad_() for t in leaves]
    o_shard = context_parallel_sparse_attention(*shards, config, backend=backend, group=group, phi_k=phis[0],
                                                phi_v=phis[1], shard_lengths=list(lengths) if given_lengths else None,
                                                **packed)
    tolerance = {} if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(o_shard, o.detach()[:, s:e], **tolerance)
    (o_shard * weight[:, s:e]).sum().backward()
    for name, full, shard in zip(("q", "k", "v", "g_cmp", "g_slc", "g_win"), leaves, shards):
        torch.testing.assert_close(shard.grad, full.grad[:, s:e], **tolerance, msg=lambda m: f"{name}: {m}")
    for p, full in zip(params, full_grads):                      # each rank's part of the sum
        summed = p.grad.clone()
        dist.all_reduce(summed, group=group)
        torch.testing.assert_close(summed, full, **tolerance)


def _check_errors(group):
    """Bad arguments, the same on every rank, raise on every rank: those of the call's shape before
    any message, a rank's own checks of its tensors after the small gather of facts (which tells
    every rank that one refused); the group stays usable."""
    layer = _layer()
    x = torch.randn(1, 8, LAYER["dim"], dtype=torch.float64)
    with pytest.raises(TypeError, match="cp_group"):
        layer(x, cp_group="world")
    with pytest.raises(ValueError, match="with cp_group"):
        layer(x, x, cp_group=group)
    with pytest.raises(ValueError, match="shard_lengths"):
        gather_sequence(x, group, [8])
    with pytest.raises(TypeError, match="cu_seqlens"):
        layer(x, cp_group=group, cu_seqlens=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="batch must be 1"):
        layer(torch.cat([x, x]), cp_group=group, cu_seqlens=torch.tensor([0, 8], dtype=torch.int32))
    masked = _layer(mask=torch.ones(1, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="key padding mask"):
        masked(x, cp_group=group)
    q, k, v = torch.randn(1, 8, 4, 16), torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16)
    gates = [torch.rand(1, 8, 4) for _ in range(3)]
    with pytest.raises(ValueError, match="g_slc"):
        context_parallel_sparse_attention(q, k, v, gates[0], gates[1][:, :4], gates[2], group=group)
    with pytest.raises(ValueError, match="shards of the same tokens"):
        context_parallel_sparse_attention(q, k[:, :4], v, *gates, group=group)
    with pytest.raises(TypeError, match="config"):
        context_parallel_sparse_attention(q, k, v, *gates, config={"window_size": 16}, group=group)
    with pytest.raises(ValueError, match="not a multiple"):
        context_parallel_sparse_attention(q[:, :, :3], k, v, *(g[..., :3] for g in gates), group=group)
    with pytest.raises(TypeError, match="q must be a floating-point"):
        context_parallel_sparse_attention(q.long(), k.long(), v.long(), *gates, group=group)
    with pytest.raises(ValueError, match="scale"):
        context_parallel_sparse_attention(q, k, v, *gates, scale=float("nan"), group=group)
    with pytest.raises(ValueError, match="backend"):
        context_parallel_sparse_attention(q, k, v, *gates, backend="cuda", group=group)
    with pytest.raises(TypeError, match="group"):
        context_parallel_sparse_attention(q, k, v, *gates, group=None)
    with pytest.raises(ValueError, match="causal is False, but context parallelism needs causal"):          # keys after the shard: refused
        _layer(causal=False)(x, cp_group=group)
    with pytest.raises(ValueError, match="causal is False, but context parallelism needs causal"):
        context_parallel_sparse_attention(q, k, v, *gates, config=NSAConfig(causal=False), group=group)


class Block(torch.nn.Module):
    """The layer with activation checkpointing: its activations are recomputed in the backward
    (with the all-gathers of a context-parallel forward)."""

    def __init__(self, layer):
        super().__init__()
        self.attn = layer

    def forward(self, x, cp_group=None):
        return checkpoint(self.attn, x, use_reentrant=False, cp_group=cp_group)


def _single_step(x, weight, seed, lr=0.1):
    """The single-process reference: a layer's gradients and parameters after one SGD step."""
    layer = _layer(seed)
    (layer(x) * weight).sum().backward()
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    torch.optim.SGD(layer.parameters(), lr=lr).step()
    return grads, dict(layer.named_parameters())


def _check_ddp(group, seed=11):
    """DDP, data parallel: rank r trains on row r of the batch; the gradients and the step equal
    one process's on the whole batch (DDP averages, so the ranks' losses are the batch's mean)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(world, 37, LAYER["dim"], dtype=torch.float64, generator=generator)
    weight = torch.randn(x.shape, dtype=torch.float64, generator=generator)
    grads, params = _single_step(x, weight / world, seed)
    model = DDP(Block(_layer(seed)), process_group=group)
    (model(x[rank:rank + 1]) * weight[rank:rank + 1]).sum().backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    for name, p in model.module.attn.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], msg=lambda m: f"DDP grad {name}: {m}")
        torch.testing.assert_close(p.detach(), params[name].detach(), msg=lambda m: f"DDP step {name}: {m}")


def _check_fsdp(group, seed=13):
    """FSDP2 with context parallelism over the same ranks: parameters sharded, the sequence sharded,
    activation checkpointing. FSDP averages the gradients over the ranks; a rank's loss is the sum
    over its tokens, times the number of ranks, so the mean is the whole sequence's gradient."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    generator = torch.Generator().manual_seed(seed)
    lengths = split_evenly(70, world)
    s, e = shard_bounds(lengths)[rank]
    x = torch.randn(2, sum(lengths), LAYER["dim"], dtype=torch.float64, generator=generator)
    weight = torch.randn(x.shape, dtype=torch.float64, generator=generator)
    grads, params = _single_step(x, weight, seed)
    model = Block(_layer(seed))
    fully_shard(model, mesh=DeviceMesh.from_group(group, "cpu"))
    (model(x[:, s:e], cp_group=group) * weight[:, s:e] * world).sum().backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    for name, p in model.attn.named_parameters():
        torch.testing.assert_close(p.grad.full_tensor(), grads[name], msg=lambda m: f"FSDP grad {name}: {m}")
        torch.testing.assert_close(p.detach().full_tensor(), params[name].detach(),
                                   msg=lambda m: f"FSDP step {name}: {m}")


def _check_data_and_context(seed=19):
    """Four ranks as 2 data-parallel replicas x 2 context-parallel ranks: replica i trains on row i
    of the batch, its sequence sharded over a pair of ranks; FSDP2 shards the parameters over all
    four. FSDP averages over four ranks and the batch loss is the mean over two rows, so a rank's
    loss counts twice (the number of context-parallel ranks)."""
    rank = dist.get_rank()
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]          # every rank makes every group
    replica, cp_group = rank // 2, pairs[rank // 2]
    generator = torch.Generator().manual_seed(seed)
    lengths = [30, 23]
    s, e = shard_bounds(lengths)[rank % 2]
    x = torch.randn(2, sum(lengths), LAYER["dim"], dtype=torch.float64, generator=generator)
    weight = torch.randn(x.shape, dtype=torch.float64, generator=generator)
    grads, params = _single_step(x, weight / 2, seed)
    model = Block(_layer(seed))
    fully_shard(model, mesh=DeviceMesh.from_group(dist.group.WORLD, "cpu"))
    row = slice(replica, replica + 1)
    (model(x[row, s:e], cp_group=cp_group) * weight[row, s:e] * 2).sum().backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    for name, p in model.attn.named_parameters():
        torch.testing.assert_close(p.grad.full_tensor(), grads[name], msg=lambda m: f"2-D grad {name}: {m}")
        torch.testing.assert_close(p.detach().full_tensor(), params[name].detach(),
                                   msg=lambda m: f"2-D step {name}: {m}")


def _check_fsdp_bf16(group, seed=17):
    """FSDP2's bf16 policy with context parallelism: parameters, activations and the gathered keys
    in bf16, gradients reduced in float32. Against float32, the sharded layer errs no more than
    one process running the layer in bf16 does."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    generator = torch.Generator().manual_seed(seed)
    lengths = split_evenly(70, world)
    s, e = shard_bounds(lengths)[rank]
    x = torch.randn(1, sum(lengths), LAYER["dim"], generator=generator)
    weight = torch.randn(x.shape, generator=generator)
    grads, outputs = {}, {}
    for dtype in (torch.float32, torch.bfloat16):                     # one process, each precision
        layer = _layer(seed).to(dtype)
        y = layer(x.to(dtype)).float()
        (y * weight).sum().backward()
        grads[dtype] = {name: p.grad.float() for name, p in layer.named_parameters()}
        outputs[dtype] = y.detach()
    model = _layer(seed).float()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    fully_shard(model, mesh=DeviceMesh.from_group(group, "cpu"), mp_policy=policy)
    y_shard = model(x[:, s:e], cp_group=group)
    assert y_shard.dtype == torch.bfloat16
    (y_shard.float() * weight[:, s:e] * world).sum().backward()
    error = lambda a, b: (a - b).norm().item()  # noqa: E731
    exact = outputs[torch.float32][:, s:e]
    assert error(y_shard.float(), exact) <= 1.5 * error(outputs[torch.bfloat16][:, s:e], exact) + 1e-6
    for name, p in model.named_parameters():
        assert p.grad.dtype == torch.float32
        exact = grads[torch.float32][name]
        assert error(p.grad.full_tensor(), exact) <= 1.5 * error(grads[torch.bfloat16][name], exact) + 1e-6, name


def _layer_worker(rank, world, store):
    _init(rank, world, store)
    group = dist.group.WORLD
    _check_errors(group)
    N = 75                                                  # not a multiple of l, d, l' or the ranks
    _check_layer(group, split_evenly(N, world))
    _check_layer(group, [5, 70] if world == 2 else [3, 30, 2, 40])       # shards shorter than l = 8
    _check_layer(group, split_evenly(N, world), kv_per_branch=True, num_mem_kv=2, seed=3)
    cu = torch.tensor([0, 20, 23, 61, N], dtype=torch.int32)            # packed: sequences cross shards
    _check_layer(group, split_evenly(N, world), batch=1, cu_seqlens=cu, seed=5)
    _check_layer(group, [30, 45] if world == 2 else [10, 4, 50, 11], batch=1, cu_seqlens=cu, seed=6)
    # -- the gather returns at once (the layer projects the queries while it runs) --
    gathered = start_gather(torch.randn(1, 7, 2, 4), group, [7] * world)
    assert isinstance(gathered, funcol.AsyncCollectiveTensor) and gathered.shape == (1, 7 * world, 2, 4)
    _check_functional(group, split_evenly(N, world), torch.float64, "torch")
    _check_functional(group, split_evenly(N, world), torch.float64, "torch", cu_seqlens=cu)
    _check_functional(group, [5, 70] if world == 2 else [3, 30, 2, 40], torch.float64, "torch", phi=True,
                      given_lengths=True, seed=2)
    _check_functional(group, split_evenly(N, world), torch.float64, "torch", cu_seqlens=cu, phi=True, seed=4)
    if nsa.device.INTERPRET:     # the kernels on these CPU tensors (a GPU's run: benchmarks/gpu_context_parallel.py)
        _check_functional(group, split_evenly(40, world), torch.float32, "triton")   # the interpreter: small
    _check_ddp(group)
    _check_fsdp(group)
    if world == 2:
        _check_fsdp_bf16(group)
    if world == 4:
        _check_data_and_context()
    # -- a group of one process: the plain result --
    singles = [dist.new_group([r]) for r in range(world)]
    _check_layer(singles[rank], [33], seed=7)
    with pytest.raises(ValueError, match=f"does not contain this rank \\({rank}\\)"):   # another rank's group
        _layer()(torch.randn(1, 8, LAYER["dim"], dtype=torch.float64), cp_group=singles[(rank + 1) % world])
    _check_shards_that_differ(group)
    with pytest.raises(ValueError, match=f"shard_lengths must be {world} positive ints"):   # before any collective
        compare_with_single_process(group, LAYER, [8] * (world + 1))
    if world == 2:
        _check_flex_forward(group)
    dist.destroy_process_group()


def _check_shards_that_differ(group):
    """A rank whose shard differs from the others' in anything but its token count: the same
    ValueError on every rank, from the small gather of the shards' facts (before the keys' gather,
    whose sizes would not match: gloo aborts the process), and the group still usable after."""
    rank, layer = dist.get_rank(group), _layer()
    x = torch.randn(1, 8, LAYER["dim"], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"rank 0's is \(1, n, 16\) in torch.float64, rank 1's \(2, n, 16\) in"):
        layer(torch.cat([x, x]) if rank == 1 else x, cp_group=group)
    with pytest.raises(ValueError, match=r"rank 1's \(1, n, 16\) in torch.float32; they may differ only"):
        (layer.float()(x.float(), cp_group=group) if rank == 1 else layer(x, cp_group=group))
    layer = _layer()
    total = 8 * dist.get_world_size(group)
    cu = torch.tensor([0, 3 + (rank == 1), total], dtype=torch.int32)       # the same total, other sequences
    with pytest.raises(ValueError, match="cu_seqlens differs between ranks 0 and 1"):
        layer(x, cp_group=group, cu_seqlens=cu)
    with pytest.raises(ValueError, match="cu_seqlens is given on rank 0 but not on rank 1"):
        layer(x, cp_group=group, cu_seqlens=None if rank == 1 else cu)
    q, k, v = torch.randn(1, 8, 4, 16), torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16)
    gates = [torch.rand(1, 8, 4) for _ in range(3)]
    if rank == 1:                                                            # other kv heads, the same q
        k, v = k[:, :, :1], v[:, :, :1]
    with pytest.raises(ValueError, match=r"are \(1, n, 4, 16\) in torch.float32, but their k or v differ in size"):
        context_parallel_sparse_attention(q, k, v, *gates, group=group)
    # -- one rank's arguments fail its own checks: it raises its error, the others one that names it --
    refused = "rank 1's own checks refused its arguments"
    with pytest.raises(TypeError if rank == 1 else ValueError, match="q is torch.float32" if rank == 1 else refused):
        layer(x.float() if rank == 1 else x, cp_group=group)
    with pytest.raises(TypeError if rank == 1 else ValueError,
                       match="q must be a torch.Tensor" if rank == 1 else refused):
        layer(x.tolist() if rank == 1 else x, cp_group=group)
    cu = torch.tensor([0, 3, 8 * dist.get_world_size(group)], dtype=torch.int64 if rank == 1 else torch.int32)
    with pytest.raises(TypeError if rank == 1 else ValueError, match="cu_seqlens" if rank == 1 else refused):
        layer(x, cp_group=group, cu_seqlens=cu)
    q, k, v = torch.randn(1, 8, 4, 16), torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16)
    gates = [torch.rand(1, 8, 4) for _ in range(3)]
    with pytest.raises(ValueError, match="g_slc" if rank == 1 else refused):
        context_parallel_sparse_attention(q, k, v, gates[0], gates[1][:, :4] if rank == 1 else gates[1], gates[2],
                                          group=group)
    # -- the same shards, other settings: the first that differs, named on every rank --
    k, v = torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="settings: window_size is 16 on rank 0 and 8 on rank 1; every rank runs"):
        (_layer(window_size=8) if rank == 1 else _layer())(x, cp_group=group)
    with pytest.raises(ValueError, match="phi_k is 'CompressionMLP' on rank 0 and 'mean pooling' on rank 1"):
        (_layer(compress_mlp=False) if rank == 1 else _layer())(x, cp_group=group)
    with pytest.raises(ValueError, match="scale is 0.25 on rank 0 and 0.5 on rank 1"):
        context_parallel_sparse_attention(q, k, v, *gates, scale=0.5 if rank == 1 else None, group=group)
    with pytest.raises(ValueError, match="num_selected_blocks is 16 on rank 0 and 4 on rank 1"):
        config = NSAConfig(num_selected_blocks=4) if rank == 1 else NSAConfig()
        context_parallel_sparse_attention(q, k, v, *gates, config, group=group)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, shard_len" if rank == 1 else refused):
        gather_sequence(torch.zeros(8) if rank == 1 else torch.zeros(1, 8, 2), group)      # a rank's 1-D x
    with pytest.raises(ValueError, match=r"rank 0's is \(1, n, 2\) in torch.int64, rank 1's \(1, n, 2\) in torch.int32"):
        gather_sequence(torch.zeros(1, 8, 2, dtype=torch.int32 if rank == 1 else torch.int64), group)
    # -- the gathered keys: a plain tensor, whatever the lengths (FlexAttention's compile needs one) --
    for lengths in ([8] * dist.get_world_size(group), [8] + [5] * (dist.get_world_size(group) - 1)):
        shard = torch.randn(1, lengths[rank], 2, 4)
        whole = finish_gather(start_gather(shard, group, lengths), lengths)
        assert type(whole) is torch.Tensor and whole.shape == (1, sum(lengths), 2, 4)
        torch.testing.assert_close(whole[:, shard_bounds(lengths)[rank][0]:][:, :lengths[rank]], shard)
        assert torch.equal(finish_gather(start_gather(shard, group, lengths), lengths, sum(lengths) - 1, 3),
                           whole[:, 3:-1])
    _check_layer(group, [8] * dist.get_world_size(group), seed=9)           # the group goes on


def _check_flex_forward(group):
    """backend="flex" (forward only on the CPU) with shards of equal length: the gathered keys
    reach FlexAttention's compiled function as plain tensors (a view of the pending gather made
    its compile fail)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    layer = _layer(backend="flex")
    x = torch.randn(1, 16 * world, LAYER["dim"], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y, y_shard = layer(x), layer(x[:, 16 * rank:16 * (rank + 1)], cp_group=group)
    torch.testing.assert_close(y_shard, y[:, 16 * rank:16 * (rank + 1)])


def test_shard_geometry():
    assert split_evenly(75, 4) == [19, 19, 19, 18] and split_evenly(3, 4) == [1, 1, 1, 0]
    assert shard_bounds([5, 70]) == [(0, 5), (5, 75)]
    cu = torch.tensor([0, 20, 23, 61, 96], dtype=torch.int32)
    key_start, cu_q, cu_k = local_problem(shard_bounds([23, 17, 30, 26]), 2, cu)  # queries [40, 70)
    assert key_start == 23 and cu_q.tolist() == [0, 21, 30] and cu_k.tolist() == [0, 38, 47]
    assert local_problem(shard_bounds([23, 17, 30, 26]), 3) == (0, None, None)


def test_arguments_need_an_initialised_group():
    layer = _layer()
    with pytest.raises(ValueError, match="init_process_group"):
        layer(torch.randn(1, 8, LAYER["dim"], dtype=torch.float64), cp_group="world")
    with pytest.raises(ValueError, match="world_size"):
        split_evenly(10, 0)


def _spawn(worker, world, tmp_path):
    mp.spawn(worker, args=(world, str(tmp_path / "store")), nprocs=world, join=True)


@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_equals_single_process(world, tmp_path):
    _spawn(_layer_worker, world, tmp_path)
