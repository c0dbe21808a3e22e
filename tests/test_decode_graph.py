"""Chapter 13: a decoding step replayed from a CUDA graph (`nsa.DecodeGraph`).

On any machine: what a replay relies on (the cache's lengths in one tensor, advanced in place;
its tensors unmoved by steps, rollbacks and reorders to as many rows) and the refusals that come
before any capture. On a CUDA GPU: replays equal to eager steps of a twin model, through rows of
different lengths, T > 1, rollbacks and reorders, and the steps that cannot be replayed refused."""

import pytest
import torch

import nsa
from nsa import SparseAttention
from nsa.decode_graph import cache_pointers

GEOMETRY = dict(compress_block_size=8, compress_stride=4, select_block_size=16, num_selected_blocks=3, window_size=12)
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA GPU")


def layer_and_cache(batch=2, capacity=48, prompt=(21, 17), device="cpu", **kwargs):
    torch.manual_seed(0)
    layer = SparseAttention(32, heads=4, kv_heads=2, **GEOMETRY, **kwargs).to(device).eval()
    cache = layer.new_cache(batch, capacity)
    with torch.no_grad():
        layer(torch.randn(batch, max(prompt), 32, device=device), cache=cache, new_tokens=list(prompt))
    return layer, cache


def test_lengths_stay_in_one_tensor_advanced_in_place():
    layer, cache = layer_and_cache()
    lengths, where = cache._device_lengths(), cache_pointers(cache)
    with torch.no_grad():
        for T in (1, 3, 1):
            layer(torch.randn(2, T, 32), cache=cache)
            assert cache._device_lengths() is lengths and lengths.tolist() == cache.lengths
    assert cache.lengths == [26, 22] and cache_pointers(cache) == where
    cache.truncate_([24, 19])
    assert cache._device_lengths() is lengths and lengths.tolist() == [24, 19]


def test_reorder_to_as_many_rows_is_in_place_and_a_gather():
    layer, cache = layer_and_cache(batch=3, prompt=(21, 17, 9))
    tensors = lambda c: [*c.keys.values(), *c.values.values(), c.k_cmp, c.v_cmp]
    before, where, lengths = [x.clone() for x in tensors(cache)], cache_pointers(cache), cache._device_lengths()
    cache.reorder_([2, 0, 0])
    assert cache_pointers(cache) == where and cache.lengths == [9, 21, 21] and lengths.tolist() == [9, 21, 21]
    for x, old in zip(tensors(cache), before):
        assert torch.equal(x, old[[2, 0, 0]])
    cache.reorder_([1, 0])                                        # another batch size: new tensors
    assert cache_pointers(cache) != where and cache._device_lengths().tolist() == [21, 9]


def step_of(layer, cache):
    return lambda x: layer(x, cache=cache)


REFUSED = [
    ("not callable", lambda layer, cache: nsa.DecodeGraph(None, [cache], torch.zeros(2, 1, 32)), TypeError, "callable"),
    ("no caches", lambda layer, cache: nsa.DecodeGraph(step_of(layer, cache), [], torch.zeros(2, 1, 32)), TypeError,
     "non-empty"),
    ("not a cache", lambda layer, cache: nsa.DecodeGraph(step_of(layer, cache), [cache, {}], torch.zeros(2, 1, 32)),
     TypeError, r"caches\[1\]"),
    ("listed twice", lambda layer, cache: nsa.DecodeGraph(step_of(layer, cache), [cache, cache], torch.zeros(2, 1, 32)),
     ValueError, r"caches\[1\] is listed twice"),
    ("on the CPU", lambda layer, cache: nsa.DecodeGraph(step_of(layer, cache), cache, torch.zeros(2, 1, 32)),
     ValueError, "CUDA device"),
]


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_refused_before_any_capture(case):
    _, call, error, match = case
    layer, cache = layer_and_cache()
    with pytest.raises(error, match=match):
        call(layer, cache)


# -- on a CUDA GPU: replays against eager steps of a twin layer and cache --

def twins(dtype=torch.float32, **kwargs):
    """Two caches of one layer, prefilled alike (rows of different lengths)."""
    torch.manual_seed(0)
    layer = SparseAttention(32, heads=4, kv_heads=2, **GEOMETRY, **kwargs).to("cuda", dtype).eval()
    prompt = torch.randn(2, 21, 32, device="cuda", dtype=dtype)
    caches = [layer.new_cache(2, 96) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            layer(prompt, cache=cache, new_tokens=[21, 17])
    return layer, caches


@needs_cuda
@pytest.mark.parametrize("T,dtype,kwargs", [(1, torch.float32, {}), (3, torch.float32, dict(num_mem_kv=2)),
                                            (1, torch.bfloat16, dict(compress_mlp=False)),
                                            (1, torch.float32, dict(kv_per_branch=True, num_mem_kv=1))],
                         ids=["T1", "T3-mem", "bf16-mean", "T1-kv-per-branch"])
def test_replays_equal_eager_steps(T, dtype, kwargs):
    layer, (eager, graphed) = twins(dtype, **kwargs)
    x = torch.randn(2, T, 32, device="cuda", dtype=dtype)
    graph = nsa.DecodeGraph(step_of(layer, graphed), graphed, x)
    assert graphed.lengths == eager.lengths == [21, 17]            # capture leaves the lengths as they were
    with torch.no_grad():
        for i in range(6):
            x = torch.randn(2, T, 32, device="cuda", dtype=dtype)
            if i == 3:                     # a rollback across compressed blocks (l = 8), then beams, between replays
                for cache in (eager, graphed):
                    cache.truncate_([n - 9 for n in cache.lengths]).reorder_([1, 0])
            if i == 4:                     # an eager step of the graph's caches between replays, rows apart
                layer(x[:, :1], cache=graphed, new_tokens=[1, 0])
                layer(x[:, :1], cache=eager, new_tokens=[1, 0])
            expected = layer(x, cache=eager)
            got = graph(x)
            assert torch.equal(got, expected), (i, (got - expected).abs().max().item())
            assert graphed.lengths == eager.lengths
            assert graphed._device_lengths().tolist() == graphed.lengths


@needs_cuda
def test_steps_that_cannot_be_replayed_are_refused():
    layer, (cache, other) = twins()
    x = torch.randn(2, 1, 32, device="cuda")
    before = list(cache.lengths)
    layer.backend = "torch"                                          # slices keys by host lengths
    with pytest.raises(ValueError, match="wait for the GPU"):
        nsa.DecodeGraph(step_of(layer, cache), cache, x)
    layer.backend = "auto"
    with pytest.raises(ValueError, match="wait for the GPU|same number of tokens"):   # rows' own counts
        nsa.DecodeGraph(lambda y: layer(y, cache=cache, new_tokens=[1, 0]), cache, x)
    with pytest.raises(ValueError, match="same number of tokens"):
        nsa.DecodeGraph(lambda y: (layer(y, cache=cache), layer(y.repeat(1, 2, 1), cache=other)), [cache, other], x)
    assert cache.lengths == before and other.lengths == before
    graph = nsa.DecodeGraph(step_of(layer, cache), cache, x)
    with pytest.raises(ValueError, match=r"inputs\[0\]"):
        graph(torch.randn(2, 2, 32, device="cuda"))
    cache.reorder_([0, 1, 1])
    with pytest.raises(ValueError, match="capture a new DecodeGraph"):
        graph(torch.randn(2, 1, 32, device="cuda"))
    before = list(cache.lengths)
    with pytest.raises(ValueError, match="not in caches"):           # `other` stepped but not listed
        nsa.DecodeGraph(lambda y: (layer(y, cache=cache), layer(y[:2], cache=other))[0], cache,
                        torch.randn(3, 1, 32, device="cuda"))
    assert cache.lengths == before and other.lengths == [21, 17]
    assert other._device_lengths().tolist() == [21, 17]
    full = nsa.DecodeGraph(step_of(layer, cache), cache, torch.randn(3, 1, 32, device="cuda"))
    cache.lengths = [96, 95, 95]                                     # (an assignment: copied at the next replay)
    with pytest.raises(ValueError, match="do not fit"):
        full(torch.randn(3, 1, 32, device="cuda"))
    assert cache.lengths == [96, 95, 95]


@needs_cuda
@pytest.mark.parametrize("kwargs", [{}, dict(num_mem_kv=2, compress_mlp=False, dim_head_v=8)], ids=["mlp", "mean-mem"])
def test_steps_on_the_gpu_equal_the_whole_sequence(kwargs):
    """The decoding kernels with their Triton cache writes, a prefill and then steps of 1 and 3
    tokens, eager and replayed, against the layer on the whole sequence (float32)."""
    torch.manual_seed(2)
    layer = SparseAttention(32, heads=4, kv_heads=2, **GEOMETRY, **kwargs).to("cuda").eval()
    x = torch.randn(2, 60, 32, device="cuda")
    with torch.no_grad():
        expected = layer(x)
        cache = layer.new_cache(2, 60)
        outputs = [layer(x[:, :23], cache=cache)] + [layer(x[:, i:i + 1], cache=cache) for i in range(23, 30)]
        graph = nsa.DecodeGraph(step_of(layer, cache), cache, x[:, 30:33])
        outputs += [graph(x[:, i:i + 3]).clone() for i in range(30, 60, 3)]
    torch.testing.assert_close(torch.cat(outputs, 1), expected, rtol=2e-4, atol=2e-4)


def test_warm_up_refuses_and_puts_back_a_cache_not_listed(monkeypatch):
    """DecodeGraph's warm-up bookkeeping, run on the CPU without a capture: a step that appends to a
    cache missing from `caches` is refused, and that cache's lengths, host and device, are put back;
    the listed cache advanced (the constructor restores it)."""
    layer, cache = layer_and_cache()
    other = layer.new_cache(2, 48)
    with torch.no_grad():
        layer(torch.randn(2, 9, 32), cache=other)
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)      # (CUDA's, absent on the CPU)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: None)
    graph = object.__new__(nsa.DecodeGraph)
    graph.step = lambda y: (layer(y, cache=cache), layer(y, cache=other), layer(y, cache=other))
    graph.caches, graph.inputs = [cache], [torch.randn(2, 1, 32)]
    with torch.no_grad(), pytest.raises(ValueError, match=r"appends to 1 cache\(s\) not in caches"):
        graph._run_checked()
    assert other.lengths == [9, 9] and other._device_lengths().tolist() == [9, 9]
    assert cache.lengths == [22, 18]


@needs_cuda
def test_steps_of_sixteen_tokens_at_group_16_replay_and_equal_the_whole_sequence():
    """Speculative decoding's drafts at group 16: a step of 16 tokens holds 256 rows of tokens x
    query heads, more than a program holds (stages 1 and 2 split the tokens into tiles); an eager
    step of 11 tokens and graph replays of 16 against the layer on the whole sequence (float32)."""
    torch.manual_seed(3)
    layer = SparseAttention(64, heads=32, kv_heads=2, dim_head=16, **GEOMETRY).to("cuda").eval()
    x = torch.randn(2, 90, 64, device="cuda")
    with torch.no_grad():
        expected = layer(x)
        cache = layer.new_cache(2, 90)
        outputs = [layer(x[:, :27], cache=cache), layer(x[:, 27:38], cache=cache)]
        graph = nsa.DecodeGraph(step_of(layer, cache), cache, x[:, 38:54])
        outputs += [graph(x[:, i:i + 16]).clone() for i in range(38, 86, 16)]
        outputs.append(layer(x[:, 86:], cache=cache))
    torch.testing.assert_close(torch.cat(outputs, 1), expected, rtol=2e-4, atol=2e-4)
