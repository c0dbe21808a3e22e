"""Tensor parallelism (chapter 14's `TensorParallelSparseAttention`), in CPU processes joined by gloo.

Spawned processes are slow to start, so each test spawns one group and runs several checks in
it; every rank computes the whole layer's results itself and compares its own with them.
"""

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

import nsa
import nsa.training
from nsa import SparseAttention
from nsa.device import DEVICE
from nsa.tensor_parallel import TensorParallelSparseAttention, head_axis_of
from nsa.testing import compare_tensor_and_context_parallel, compare_tensor_parallel

LAYER = dict(dim=32, heads=8, kv_heads=4, compress_block_size=8, compress_stride=4, select_block_size=16,
             num_selected_blocks=3, window_size=16)
PACKED = torch.tensor([0, 20, 23, 45], dtype=torch.int32)


def _init(rank, world, store):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=90))


def _spawn(worker, world, tmp_path):
    mp.spawn(worker, args=(world, str(tmp_path / "store")), nprocs=world, join=True)


def _equality_worker(rank, world, store, variants, dtype, tolerance):
    _init(rank, world, store)
    try:
        for name, errors in compare_tensor_parallel(dist.group.WORLD, variants, dtype=dtype).items():
            assert max(errors.values()) < tolerance, (name, errors)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_split_layer_equals_the_whole_layer(tmp_path):
    """Outputs, the input's and every parameter's gradients, and decoding through caches, in float64
    on the torch backend; four ranks, each holding one kv head and its 2 query heads."""
    mask = torch.ones(2, 45, dtype=torch.bool)
    mask[1, 38:] = False                                  # row 1 right-padded: packed inside the layer
    variants = {"GQA": LAYER,
                "key padding mask": {**LAYER, "mask": mask},
                "cross-attention, 45 queries on 60 keys": {**LAYER, "seq_len_k": 60},
                "kv per branch, memory rows": {**LAYER, "kv_per_branch": True, "num_mem_kv": 2},
                "packed, mean pooling, MHA": {**LAYER, "kv_heads": 8, "compress_mlp": False, "cu_seqlens": PACKED},
                "packed, memory rows, dim_head_v": {**LAYER, "dim_head_v": 6, "num_mem_kv": 1, "cu_seqlens": PACKED}}
    mp.spawn(_equality_worker, args=(4, str(tmp_path / "store"), variants, torch.float64, 1e-12), nprocs=4)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the Triton kernels on CPU tensors: Triton's interpreter")
def test_split_layer_on_the_triton_kernels(tmp_path):
    """The same on the Triton kernels (the interpreter, float32): two ranks of 4 query heads on 2 kv
    heads, packed sequences with memory rows. The decoding run's prefill is 14 tokens, not 30 (the
    interpreter's time): its steps still complete a compressed block at 15 and start a selection
    block at 16."""
    variants = {"triton, packed": {**LAYER, "backend": "triton", "num_mem_kv": 1, "cu_seqlens": PACKED,
                                   "prompt": 14}}
    mp.spawn(_equality_worker, args=(2, str(tmp_path / "store"), variants, torch.float32, 1e-5), nprocs=2)


def _gathered(x, group):
    every = [torch.zeros_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, x.contiguous(), group=group)
    return every


def _constructor_worker(rank, world, store):
    _init(rank, world, store)
    try:
        group = dist.group.WORLD
        # -- one seed on every rank: the parts of the layer one process draws with that seed --
        torch.manual_seed(0)
        layer = TensorParallelSparseAttention(**LAYER, num_mem_kv=2, group=group).double()
        torch.manual_seed(0)
        whole = SparseAttention(**LAYER, num_mem_kv=2).double()
        assert (layer.heads, layer.kv_heads, layer.dim_head) == (8 // world, 4 // world, 4)
        expected = layer.split_state_dict(whole.state_dict())
        for name, t in layer.state_dict().items():
            torch.testing.assert_close(t, expected[name], rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
        slices = _gathered(layer.to_q.weight.detach(), group)
        assert not torch.equal(slices[0], slices[1])                         # each rank its own heads
        with pytest.raises(ValueError, match="'to_q.bias' is not in this layer's state_dict"):
            layer.split_state_dict({"to_q.bias": torch.zeros(32)})
        with pytest.raises(ValueError, match=r"^to_k.shared.weight has shape \(8, 32\)"):
            layer.split_state_dict({"to_k.shared.weight": torch.zeros(8, 32)})       # kv_heads 2's, not 4's
        gathered = layer.whole_state_dict()                                  # back to one layer
        assert gathered.keys() == whole.state_dict().keys()
        assert all(torch.equal(gathered[n], t) for n, t in whole.state_dict().items())
        x = torch.randn(2, 40, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(layer(x), whole(x))
        assert f"rank {rank} of {world}" in repr(layer)
        # -- a seed per rank: other draws, but the same MLPs everywhere (broadcast from rank 0) --
        torch.manual_seed(rank)
        layer = TensorParallelSparseAttention(**LAYER, group=group)
        phi = torch.cat([p.detach().flatten() for m in (layer.phi_k, layer.phi_v) for p in m.parameters()])
        assert all(torch.equal(other, phi) for other in _gathered(phi, group))
        # -- from_layer keeps the layer's dtypes, requires_grad and mode --
        whole.eval().mem_k.requires_grad_(False)
        part = TensorParallelSparseAttention.from_layer(whole, group)
        assert not part.training and not part.mem_k.requires_grad and part.to_q.weight.dtype == torch.float64
        # -- errors: the same on every rank, or one rank's own, told to the others --
        with pytest.raises(ValueError, match=rf"^heads \({world + 1}\) must be a multiple of the group's {world}"):
            TensorParallelSparseAttention(**{**LAYER, "heads": world + 1, "kv_heads": 1, "dim_head": 4}, group=group)
        with pytest.raises(ValueError, match="^dropout must be 0"):
            TensorParallelSparseAttention(**LAYER, dropout=0.1, group=group)
        with pytest.raises(ValueError, match="window_size is 16 on rank 0 and 8 on rank 1"):
            TensorParallelSparseAttention(**{**LAYER, "window_size": 8 if rank == 1 else 16}, group=group)
        last = rank == world - 1
        expected = r"^kv_heads \(3\)" if last else rf"^rank {world - 1}'s own checks refused"
        with pytest.raises(ValueError, match=expected):
            TensorParallelSparseAttention(**{**LAYER, **({"heads": 12, "kv_heads": 3, "dim_head": 4} if last else {})},
                                          group=group)
        expected = (TypeError, "^layer must be a SparseAttention") if last else (ValueError, "own checks refused")
        with pytest.raises(expected[0], match=expected[1]):
            TensorParallelSparseAttention.from_layer(layer if last else whole, group)
        with pytest.raises(ValueError, match=r"cp_group shares ranks \[0, 1(, 2, 3)?\] with the layer's group"):
            layer(x.float(), cp_group=group)                                 # the heads' own group
        with pytest.raises(TypeError, match="group must be a torch.distributed ProcessGroup"):
            TensorParallelSparseAttention(**LAYER, group="world")
        with pytest.raises(TypeError, match="split over"):
            nsa.training.shared_projection_attention(layer, x.float())
        dist.all_reduce(torch.ones(1), group=group)                          # the group still works
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_constructor_and_errors(world, tmp_path):
    _spawn(_constructor_worker, world, tmp_path)


def _data_parallel_worker(rank, world, store, wrap):
    """Four ranks: two data-parallel replicas of a tensor-parallel pair. Replica r trains on row r of
    the batch under DDP, or FSDP2 (`fully_shard`, parameters sharded over the pair's data-parallel
    ranks: a two-dimensional mesh), over the data-parallel group; the gradients equal the whole
    layer's on the whole batch in one process (both average: the whole loss is the rows' mean)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    _init(rank, world, store)
    try:
        tp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]          # every rank makes every group
        dp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
        tp_group, dp_group, replica = tp_groups[rank // 2], dp_groups[rank % 2], rank // 2
        torch.manual_seed(0)
        whole = SparseAttention(**LAYER, num_mem_kv=1).double()
        part = TensorParallelSparseAttention.from_layer(whole, tp_group)
        generator = torch.Generator().manual_seed(1)
        x, weight = (torch.randn(2, 37, 32, dtype=torch.float64, generator=generator) for _ in range(2))
        ((whole(x) * weight).sum() / 2).backward()
        expected = part.split_state_dict({n: p.grad for n, p in whole.named_parameters()})
        if wrap == "ddp":
            model = DDP(part, process_group=dp_group)
        else:
            model = fully_shard(part, mesh=DeviceMesh.from_group(dp_group, "cpu"))
        (model(x[replica:replica + 1]) * weight[replica:replica + 1]).sum().backward()
        for name, p in part.named_parameters():
            grad = p.grad.full_tensor() if wrap == "fsdp2" else p.grad
            torch.testing.assert_close(grad, expected[name], msg=lambda m: f"{name}: {m}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("wrap", ["ddp", "fsdp2"])
def test_data_parallel_replicas_of_tensor_parallel_pairs(wrap, tmp_path):
    mp.spawn(_data_parallel_worker, args=(4, str(tmp_path / "store"), wrap), nprocs=4)


def _two_axes_worker(rank, world, store):
    """Four ranks: heads split over pairs {0, 1}, {2, 3} and tokens over {0, 2}, {1, 3}, equal to the
    whole layer; then groups of tokens that mix the heads' parts, refused on every rank."""
    _init(rank, world, store)
    try:
        packed = torch.tensor([0, 20, 23, 61, 75], dtype=torch.int32)
        for kwargs, shards, cu_seqlens in ((LAYER, [30, 45], None),
                                           ({**LAYER, "kv_per_branch": True, "num_mem_kv": 2}, [50, 25], packed)):
            errors = compare_tensor_and_context_parallel(dist.group.WORLD, kwargs, 2, shards, cu_seqlens)
            assert max(errors.values()) < 1e-12, errors
        heads_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        mixed = [dist.new_group([0, 3]), dist.new_group([1, 2])]                # each holds both parts
        torch.manual_seed(0)
        part = TensorParallelSparseAttention.from_layer(SparseAttention(**LAYER).double(), heads_groups[rank // 2])
        x = torch.randn(1, 20, 32, dtype=torch.float64)
        with pytest.raises(ValueError, match="heads_part is '[01] of 2' on rank 0 and '[01] of 2' on rank 1"):
            part(x, cp_group=mixed[0 if rank in (0, 3) else 1])
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_heads_and_tokens_split_at_once(tmp_path):
    _spawn(_two_axes_worker, 4, tmp_path)


def _compile_worker(rank, world, store):
    """torch.compile(fullgraph=True) of a split layer: its DTensor conversions and collectives trace
    into one graph; outputs and the input's gradient equal the eager split layer's."""
    _init(rank, world, store)
    try:
        torch.manual_seed(0)
        part = TensorParallelSparseAttention.from_layer(SparseAttention(**LAYER, backend="torch"), dist.group.WORLD)
        x = torch.randn(2, 37, 32, generator=torch.Generator().manual_seed(1))
        runs = []                                    # compiled first: nothing made by an eager call before
        for model in (torch.compile(part, fullgraph=True, backend="aot_eager"), part):
            x_in = x.clone().requires_grad_()
            y = model(x_in)
            y.sum().backward()
            runs.append((y.detach(), x_in.grad))
        torch.testing.assert_close(runs[0], runs[1])
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_split_layer_compiles_into_one_graph(tmp_path):
    _spawn(_compile_worker, 2, tmp_path)


def test_parameters_split_by_heads():
    layer = SparseAttention(**LAYER, kv_per_branch=True, num_mem_kv=1)
    split = {name: head_axis_of(name) for name, _ in layer.named_parameters()}
    assert {name for name, dim in split.items() if dim is None} == {
        name for name, _ in layer.named_parameters() if name.startswith(("phi_k.", "phi_v."))}
    assert split["to_out.weight"] == 1 and split["mem_k"] == 1 and split["to_k.win.weight"] == 0
    assert split["to_gates.bias"] == 0


def test_a_gpu_runs_table_says_how_it_was_made(tmp_path):
    from nsa.testing import write_run

    rows = [{"tokens": 16384, "ms": 1.5}, {"tokens": 65536, "ms": 6.25}]
    write_run(tmp_path / "t.csv", ["tokens", "ms"], rows, "torchrun x.py", "NVIDIA H200", "checks 0.0")
    first, *table = (tmp_path / "t.csv").read_text().splitlines()
    assert first.startswith("# torchrun x.py; NVIDIA H200, torch ") and first.endswith("; checks 0.0")
    assert table == ["tokens,ms", "16384,1.5", "65536,6.25"]


def test_a_group_is_needed():
    with pytest.raises(ValueError, match="init_process_group"):
        TensorParallelSparseAttention(**LAYER, group=None)
    assert nsa.TensorParallelSparseAttention is TensorParallelSparseAttention
