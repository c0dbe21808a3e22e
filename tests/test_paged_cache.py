"""Chapter 13, "Pages": caches in a pool of pages, found through a block table.

A paged step must equal the same step over contiguous caches (tested against the whole
sequence in test_cache.py), write no page but those that hold its new tokens, and refuse a
bad table or layout before anything is written."""

import pytest
import torch

import nsa.kernels.decode as decode
from nsa import NSAConfig, sparse_attention_with_kvcache
from nsa.cache import cache_index, compressed_page_shift
from nsa.compression import CompressionMLP
from nsa.device import DEVICE
from nsa.geometry import num_compressed_blocks
from tolerance import close

SMALL = NSAConfig(8, 4, 16, 4, 1, 2, 32)         # l = 8, d = 4, l' = 16, n = 4, w = 32: one memory row fits
WIDE = NSAConfig(12, 4, 8, 3, 0, 1, 20)          # l' < l, (l - 1) // d = 2 memory rows fit
LONG = NSAConfig(16, 4, 16, 3, 0, 1, 20)         # the kernels' powers of two; (l - 1) // d = 3 memory rows fit


def paged_and_contiguous(B, pages_per_row, page_size, Hq, H, Dqk, Dv, config, mem, window, dtype, device, seed):
    """Random tokens for B rows, and empty caches for them both ways: contiguous (B, capacity, ...)
    and paged in a pool with a table in random order where rows 0 and 1 share their first two
    pages (their tokens there are the same). The memory rows written in both. Returns (tokens,
    contiguous caches, paged caches, table, pool size)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device, dtype)   # noqa: E731
    capacity, l, d = pages_per_row * page_size, config.compress_block_size, config.compress_stride
    shapes = [Dqk, Dv] + ([Dqk, Dv] if window else [])
    tokens = dict(q=r(B, capacity, Hq, Dqk), gates=[r(B, capacity, Hq).sigmoid() for _ in range(3)],
                  kv=[r(B, capacity, H, D) for D in shapes])
    for x in tokens["kv"]:
        x[1, :2 * page_size] = x[0, :2 * page_size]                       # rows 0 and 1: one prompt
    mem_kv = [r(mem, H, D) for D in (Dqk, Dv)]
    zeros = lambda *s: torch.zeros(*s, device=device, dtype=dtype)         # noqa: E731
    rows = mem + num_compressed_blocks(capacity, l, d)
    contiguous = [zeros(B, capacity, H, Dqk), zeros(B, capacity, H, Dv), zeros(B, rows, H, Dqk), zeros(B, rows, H, Dv)]
    contiguous += [zeros(B, capacity, H, D) for D in shapes[2:]]
    pool = B * pages_per_row + 3
    order = torch.randperm(pool, generator=g).tolist()
    own = iter(order[2:])
    table = torch.tensor([order[:2] + [next(own) for _ in range(pages_per_row - 2)] if b < 2 else
                          [next(own) for _ in range(pages_per_row)] for b in range(B)], dtype=torch.int32,
                         device=device)
    paged = [zeros(pool, page_size, H, Dqk), zeros(pool, page_size, H, Dv), zeros(pool, page_size // d, H, Dqk),
             zeros(pool, page_size // d, H, Dv)] + [zeros(pool, page_size, H, D) for D in shapes[2:]]
    at = cache_index(paged[2], torch.arange(mem, device=device).expand(B, mem), table, compressed_page_shift(l, d, mem))
    for i, x in enumerate(mem_kv):
        contiguous[2 + i][:, :mem] = x
        paged[2 + i][at] = x
    return tokens, contiguous, paged, table, pool


def step(tokens, caches, lengths, T, rows, config, mem, phis, backend, block_table=None):
    """Rows `rows`' next T tokens through the caches, from `lengths`."""
    new = lambda x: torch.stack([x[b, n:n + T] for b, n in zip(rows, lengths)])   # noqa: E731
    window = {} if len(caches) == 4 else dict(k_win_cache=caches[4], v_win_cache=caches[5],
                                               k_win=new(tokens["kv"][2]), v_win=new(tokens["kv"][3]))
    return sparse_attention_with_kvcache(new(tokens["q"]), *caches[:4], lengths, *map(new, tokens["gates"]), config,
                                         k=new(tokens["kv"][0]), v=new(tokens["kv"][1]), phi_k=phis[0],
                                         phi_v=phis[1], mem_kv_len=mem, backend=backend, block_table=block_table,
                                         **window)


CASES = [  # pages per row, page size, Hq, H, Dqk, Dv, config, mem, mlp, window caches, steps, dtype, backend
    (6, 16, 4, 2, 16, 8, SMALL, 1, False, False, [13, 1, 1, 7, 3, 17, 1], torch.float64, "torch"),
    (10, 8, 2, 2, 8, 12, WIDE, 2, True, True, [1, 5, 1, 1, 9, 2], torch.float64, "torch"),
    (20, 4, 2, 2, 8, 12, WIDE, 0, True, True, [1, 5, 1, 1, 9, 2], torch.float64, "torch"),
    (3, 32, 8, 1, 16, 16, SMALL, 0, True, False, [1, 25, 1, 2], torch.float64, "torch"),
    (4, 16, 4, 2, 16, 8, SMALL, 1, False, False, [13, 1, 3], torch.float32, "triton"),
    (5, 16, 3, 1, 16, 16, LONG, 3, False, True, [1, 9, 1, 2], torch.float32, "triton"),
    (5, 16, 16, 1, 16, 16, SMALL, 0, False, False, [13, 1], torch.float32, "triton"),   # group 16: token tiles,
    # padding tokens in the last (13 tokens take the tiles of 16)
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"P{c[1]}-Hq{c[2]}-H{c[3]}-mem{c[7]}-{'mlp' if c[8] else 'mean'}"
                         f"{'-window' if c[9] else ''}-{c[12]}")
@torch.no_grad()
def test_paged_steps_equal_contiguous_steps_and_write_only_their_pages(case):
    pages_per_row, P, Hq, H, Dqk, Dv, config, mem, mlp, window, sizes, dtype, backend = case
    device = DEVICE if backend == "triton" else "cpu"
    B = 3
    tokens, contiguous, paged, table, pool = paged_and_contiguous(B, pages_per_row, P, Hq, H, Dqk, Dv, config, mem,
                                                                  window, dtype, device, seed=len(sizes))
    l = config.compress_block_size
    phis = [CompressionMLP(D, l).to(device, dtype) for D in (Dqk, Dv)] if mlp else [None, None]
    step(tokens, paged, [0], 2 * P, [0], config, mem, phis, backend, table[:1])        # the shared prompt, once
    step(tokens, paged, [0], 3, [2], config, mem, phis, backend, table[2:])
    for b, n in ((0, 2 * P), (1, 2 * P), (2, 3)):
        step(tokens, [x[b:b + 1] for x in contiguous], [0], n, [b], config, mem, phis, backend)
    lengths = [2 * P, 2 * P, 3]
    for T in sizes:
        before = [x.clone() for x in paged]
        got = step(tokens, paged, lengths, T, [0, 1, 2], config, mem, phis, backend, table)
        expected = step(tokens, contiguous, lengths, T, [0, 1, 2], config, mem, phis, backend)
        if dtype == torch.float64:
            assert torch.equal(got, expected)
        else:
            torch.testing.assert_close(got, expected, **close(dtype, 1e-5))
        written = {table[b, c].item() for b, n in enumerate(lengths) for c in range(n // P, (n + T - 1) // P + 1)}
        kept = [p for p in range(pool) if p not in written]
        assert all(torch.equal(x[kept], y[kept]) for x, y in zip(before, paged))
        lengths = [n + T for n in lengths]


def test_paged_step_takes_the_decoding_kernels(monkeypatch):
    """A short paged step on backend="triton" runs the decoding kernels, given the table."""
    seen = []
    original = decode.decode_compressed_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(kwargs["PAGED"])
                return original[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(decode, "decode_compressed_kernel", Spy())
    tokens, _, paged, table, _ = paged_and_contiguous(3, 6, 16, 4, 2, 16, 8, SMALL, 1, False, torch.float32,
                                                      DEVICE, seed=0)
    step(tokens, paged, [40, 33, 1], 1, [0, 1, 2], SMALL, 1, [None, None], "triton", table)
    assert seen == [True]


def paged_step_inputs():
    """A step of one token over paged caches (pool of 6 pages of 16 tokens), rows of 20 and 9 tokens."""
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g)                          # noqa: E731
    caches = [r(6, 16, 2, 16), r(6, 16, 2, 8), r(6, 4, 2, 16), r(6, 4, 2, 8)]
    args = [r(2, 1, 4, 16), *caches, [20, 9], *torch.rand(3, 2, 1, 4, generator=g), SMALL]
    kwargs = dict(k=r(2, 1, 2, 16), v=r(2, 1, 2, 8), block_table=torch.tensor([[0, 1, 2], [3, 4, 5]],
                                                                              dtype=torch.int32))
    return args, kwargs


BAD = [  # what, how, error, words
    ("table of int64", dict(block_table="long"), TypeError, "block_table must be an int32 tensor"),
    ("table of one dim", dict(block_table="flat"), ValueError, r"block_table must have shape \(batch, pages per row\)"),
    ("table for three rows", dict(block_table="three"), ValueError, r"expected \(batch, pages per row\) = \(2, >= 1\)"),
    ("page of 18 tokens", ("pages", 18), ValueError, "a multiple of compress_stride = 4"),
    ("compressed pages too small", ("cmp", 3), ValueError, "expected \\(6, 4, 2, 16\\)"),
    ("two memory rows", dict(mem_kv_len=2), ValueError, r"at most \(compress_block_size - 1\) // compress_stride = 1"),
    ("memory rows past the first page", "small pages", ValueError, "with mem_kv_len = 1, page_size must be at least 12"),
    ("page out of the pool", dict(table=[[0, 9, 2], [3, 4, 5]]), ValueError, "names page 9 among the 2 pages"),
    ("a page twice in a row", dict(table=[[0, 0, 2], [3, 4, 5]]), ValueError, "names page 0 twice among the 2"),
    ("a shared page written", dict(table=[[0, 1, 2], [0, 4, 5]]), ValueError, "page 0 holds new tokens of row 1"),
    ("rows past the table", dict(lengths=[48, 9]), ValueError, "cache row 0 holds 48 tokens; 1 more do not fit its 48"),
    ("window pages of another size", "window", ValueError, "k_win_cache has shape"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_paged_steps_are_refused_and_nothing_changes(case):
    _, how, error, words = case
    args, kwargs = paged_step_inputs()
    if how == "small pages":                                       # l = 16, d = 4: block 0 at row 3; pages of 4
        args[1:5] = [torch.zeros(24, 4, 2, 16), torch.zeros(24, 4, 2, 8), torch.zeros(24, 1, 2, 16),
                     torch.zeros(24, 1, 2, 8)]
        args[9] = LONG
        kwargs.update(mem_kv_len=1, block_table=torch.arange(24, dtype=torch.int32).view(2, 12))
    elif how == "window":
        kwargs.update(k_win_cache=torch.zeros(6, 8, 2, 16), v_win_cache=torch.zeros(6, 8, 2, 8),
                      k_win=kwargs["k"], v_win=kwargs["v"])
    elif isinstance(how, tuple) and how[0] == "pages":
        args[1], args[2] = torch.zeros(6, how[1], 2, 16), torch.zeros(6, how[1], 2, 8)
    elif isinstance(how, tuple):
        args[3] = torch.zeros(6, how[1], 2, 16)
    elif how.get("block_table") == "long":
        kwargs["block_table"] = kwargs["block_table"].long()
    elif how.get("block_table") == "flat":
        kwargs["block_table"] = kwargs["block_table"].flatten()
    elif how.get("block_table") == "three":
        kwargs["block_table"] = torch.zeros(3, 3, dtype=torch.int32)
    elif "table" in how:
        kwargs["block_table"] = torch.tensor(how["table"], dtype=torch.int32)
    elif "lengths" in how:
        args[5] = how["lengths"]
    else:
        kwargs.update(how)
    tensors = [x for x in (*args[1:5], *kwargs.values()) if isinstance(x, torch.Tensor)]
    before = [x.clone() for x in tensors]
    with pytest.raises(error, match=words):
        sparse_attention_with_kvcache(*args, backend="torch", **kwargs)
    assert all(torch.equal(x, y) for x, y in zip(tensors, before))


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a GPU")
@torch.no_grad()
def test_paged_steps_with_writes_replay_from_a_cuda_graph():
    """A paged step that appends and compresses (T = 1, lengths on the GPU) captures in a CUDA
    graph: replayed token after token, with the lengths advanced in place, it gives the eager
    steps' outputs and pages."""
    tokens, _, paged, table, _ = paged_and_contiguous(3, 6, 16, 4, 2, 16, 16, SMALL, 1, False, torch.bfloat16,
                                                      DEVICE, seed=5)
    eager_pages = [x.clone() for x in paged]
    start = [40, 33, 2]
    lengths = torch.tensor(start, dtype=torch.int32, device=DEVICE)
    q, k, v = (torch.empty_like(x[:, :1]) for x in (tokens["q"], *tokens["kv"]))
    gates = [torch.empty_like(x[:, :1]) for x in tokens["gates"]]

    def load(t):                                                    # the inputs of step t, in place
        for static, x in zip((q, k, v, *gates), (tokens["q"], *tokens["kv"], *tokens["gates"])):
            static.copy_(torch.stack([x[b, n + t:n + t + 1] for b, n in enumerate(start)]))

    def graph_step():
        return sparse_attention_with_kvcache(q, *paged, lengths, *gates, SMALL, k=k, v=v, mem_kv_len=1,
                                             backend="triton", block_table=table)

    load(0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph_step()                                                # warm-up: compiles (writes step 0)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = graph_step()
    for t in range(12):                                             # 12 tokens: blocks complete on the way
        load(t)
        graph.replay()
        eager = step(tokens, eager_pages, [n + t for n in start], 1, [0, 1, 2], SMALL, 1, [None, None], "triton",
                     table)
        assert torch.equal(out, eager), t
        lengths += 1
    assert all(torch.equal(x, y) for x, y in zip(paged, eager_pages))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@torch.no_grad()
def test_a_row_reads_no_page_past_those_its_tokens_need(backend):
    """A serving engine gives a short row only the pages it needs: the table's other columns name a
    page of NaN. Steps from 1 and 2 tokens (memory rows in the first page, a window, a block that
    completes) equal the same rows over contiguous caches, with no NaN."""
    device, dtype = (DEVICE, torch.float32) if backend == "triton" else ("cpu", torch.float64)
    for config, mem, P in ((SMALL, 1, 16), (LONG, 3, 16), (WIDE, 2, 8)):
        if backend == "triton" and config is not SMALL:
            continue                                                # the interpreter's time: one geometry
        tokens, contiguous, paged, table, pool = paged_and_contiguous(3, 4, P, 4, 2, 16, 8, config, mem, True,
                                                                      dtype, device, seed=mem)
        nan_page = pool - 1                                         # (paged_and_contiguous leaves 3 pages unused)
        for x in paged:
            x[nan_page] = float("nan")
        for x in paged[2:4]:                                        # row 1's own first page: its memory rows
            x[table[2, 1]] = x[table[1, 0]]
        for start, T in ((1, 1), (2, P - 2)):
            short = table.clone()
            short[:, 1:] = nan_page                                 # the rows hold one page each
            short[1, 0] = table[2, 1]                               # (rows 0 and 1 shared theirs: no more)
            lengths = [start] * 3
            for b in range(3):
                for x, cache in zip(tokens["kv"], (paged[0], paged[1], paged[4], paged[5])):
                    cache[short[b, 0], :start] = x[b, :start]
            got = step(tokens, paged, lengths, T, [0, 1, 2], config, mem, [None, None], backend, short)
            for b in range(3):
                step(tokens, [x[b:b + 1] for x in contiguous], [0], start, [b], config, mem, [None, None], backend)
            expected = step(tokens, contiguous, lengths, T, [0, 1, 2], config, mem, [None, None], backend)
            assert not got.isnan().any()
            torch.testing.assert_close(got, expected, **close(dtype, 1e-5))
