"""`python -m nsa.bench`: argument parsing and its behaviour without a GPU (timings are GPU-only)."""

import argparse

import pytest
import torch

from nsa import bench


def testparse_lengths_and_heads():
    assert bench.parse_lengths("4k,100,64K") == [4096, 100, 65536]
    assert bench.parse_heads("64/4,32/8") == [(64, 4), (32, 8)]
    for bad in ("4q", "0", "-1"):
        with pytest.raises(argparse.ArgumentTypeError, match="wants lengths like 4k"):
            bench.parse_lengths(bad)
    for bad in ("64-4", "0/4", "64/0", "64/3", "32/8,64/3"):       # a group must divide the heads evenly
        with pytest.raises(argparse.ArgumentTypeError, match="wants query/kv head pairs like 64/4"):
            bench.parse_heads(bad)
    assert bench.parse_head_dim("128") == 128
    for bad in ("0", "-5", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match="wants a head dim"):
            bench.parse_head_dim(bad)


@pytest.mark.parametrize("module", ["nsa.bench", "nsa.bench_decode"])
def test_a_bad_argument_names_its_flag(module, capsys):
    main = __import__(module, fromlist=["main"]).main
    for argv, flag in ((["--heads", "64/3"], "--heads"), (["--head-dim", "-5"], "--head-dim")):
        with pytest.raises(SystemExit):
            main(argv)
        assert f"argument {flag}: wants" in capsys.readouterr().err


def test_only_names_known_implementations():
    assert bench.parse_only("nsa_triton, sdpa_cudnn") == ("nsa_triton", "sdpa_cudnn")
    with pytest.raises(argparse.ArgumentTypeError, match="'sdpa_flsh'.*known: nsa_triton"):
        bench.parse_only("nsa_triton,sdpa_flsh")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_without_cuda_says_so(capsys):
    assert bench.main(["--seq-lens", "1k"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out


def test_decode_bench_arguments_bytes_and_without_cuda(capsys):
    from nsa import NSAConfig, bench_decode

    assert bench_decode._parse_batches("1,16") == [1, 16]
    with pytest.raises(argparse.ArgumentTypeError, match="--batches"):
        bench_decode._parse_batches("1,x")
    # at 64k, 64/4 heads of 128: 4095 compressed rows + 16 blocks of 64 + a window of 512, keys and
    # values in bf16, plus the scores (16 rows x 4095, float32) written and read
    assert bench_decode.step_bytes(65536, 1, 64, 4, 128, NSAConfig()) == \
        4 * ((4095 + 1024 + 512) * 2 * 128 * 2 + 2 * 16 * 4095 * 4)
    assert bench_decode.dense_bytes(65536, 1, 4, 128) == 65536 * 4 * 2 * 128 * 2
    # T new tokens: the compressed rows once, each token's blocks and window, T x 16 rows of scores
    assert bench_decode.step_bytes(65536, 1, 64, 4, 128, NSAConfig(), tokens=4) == \
        4 * ((4095 + 4 * (1024 + 512)) * 2 * 128 * 2 + 2 * 64 * 4095 * 4)
    assert bench_decode._parse_tokens("1,4,16") == [1, 4, 16]
    with pytest.raises(argparse.ArgumentTypeError, match="--tokens"):
        bench_decode._parse_tokens("0")
    if not torch.cuda.is_available():
        assert bench_decode.main(["--contexts", "8k"]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().out


def test_decode_bench_reference_row_by_row_equals_the_batch_at_once():
    """The decode bench checks against float64 row by row (the whole batch's float64 caches did not
    fit on an 80 GB GPU at 128k, batch 16, 32/8 heads): the rows equal one call on the batch, rows of
    different lengths included."""
    from nsa import NSAConfig, compress, sparse_attention_with_kvcache
    from nsa.bench_decode import reference_step

    config = NSAConfig(compress_block_size=8, compress_stride=4, select_block_size=16, num_selected_blocks=3,
                       window_size=12)
    g = torch.Generator().manual_seed(0)
    k_cache, v_cache = torch.randn(3, 90, 2, 16, generator=g), torch.randn(3, 90, 2, 16, generator=g)
    k_cmp, v_cmp = (compress(x, block_size=8, stride=4) for x in (k_cache, v_cache))
    q = torch.randn(3, 1, 4, 16, generator=g)
    gates = [torch.rand(3, 1, 4, generator=g) for _ in range(3)]
    args = (q, k_cache, v_cache, k_cmp, v_cmp, torch.tensor([89, 40, 7], dtype=torch.int32), *gates)
    whole = sparse_attention_with_kvcache(*(x.double() if x.is_floating_point() else x for x in args), config,
                                          backend="torch")
    got = reference_step(args, config)
    assert got.shape == (3, 1, 4, 16) and got.dtype == torch.float64
    torch.testing.assert_close(got, whole, rtol=1e-12, atol=1e-12)
    listed = reference_step((*args[:5], [89, 40, 7], *gates[:2], None), config)    # lengths a list, no window
    whole = sparse_attention_with_kvcache(*(x.double() for x in args[:5]), [89, 40, 7],
                                          *(g.double() for g in gates[:2]), None, config, backend="torch")
    torch.testing.assert_close(listed, whole, rtol=1e-12, atol=1e-12)


def test_gpu_tag_names_data_files_by_the_gpu(monkeypatch):
    from nsa import device
    from nsa.device import gpu_tag, gpu_tag_of

    names = {"NVIDIA H100 80GB HBM3": "h100", "NVIDIA H200": "h200", "NVIDIA A100-SXM4-80GB": "a100",
             "NVIDIA GeForce RTX 4090": "4090", "AMD Instinct MI300X": "mi300x", "NVIDIA": "gpu"}
    assert {name: gpu_tag_of(name) for name in names} == names
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    tags = {}
    for cuda in (True, False):
        for interpret in (True, False):
            monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
            monkeypatch.setattr(device, "INTERPRET", interpret)
            tags[cuda, interpret] = gpu_tag()
    # the GPU's name where its kernels run; "cpu" without CUDA or in the interpreter (--tiny checks)
    assert tags == {(True, False): "h200", (True, True): "cpu", (False, False): "cpu", (False, True): "cpu"}


def test_decode_bench_pages_hold_the_step_s_caches():
    """`--page-size`: the pool `bench_decode.paged` fills holds each row's caches where the block
    table says (read back through the step's own `cached_rows`), and a step over it equals the
    contiguous step; a page size the stride does not divide is refused."""
    from nsa import NSAConfig, compress, sparse_attention_with_kvcache
    from nsa.bench_decode import main, paged
    from nsa.cache import cached_rows, compressed_page_shift

    config = NSAConfig(compress_block_size=8, compress_stride=4, select_block_size=16, num_selected_blocks=3,
                       window_size=12)
    g = torch.Generator().manual_seed(1)
    k_cache, v_cache = torch.randn(2, 90, 2, 16, generator=g), torch.randn(2, 90, 2, 8, generator=g)
    caches = (k_cache, v_cache, *(compress(x, block_size=8, stride=4) for x in (k_cache, v_cache)))
    pages, table = paged(caches, 16, config, seed=0)
    assert table.dtype == torch.int32 and sorted(table.flatten().tolist()) == list(range(12))
    shift = compressed_page_shift(8, 4, 0)
    for x, pool, s in zip(caches, pages, (0, 0, shift, shift)):
        assert torch.equal(cached_rows(pool, slice(None), x.shape[1], table, s), x)
    q, gates = torch.randn(2, 1, 4, 16, generator=g), torch.rand(3, 2, 1, 4, generator=g)
    expected = sparse_attention_with_kvcache(q, *caches, [89, 89], *gates, config, backend="torch")
    got = sparse_attention_with_kvcache(q, *pages, [89, 89], *gates, config, backend="torch", block_table=table)
    assert torch.equal(got, expected)
    with pytest.raises(SystemExit):
        main(["--contexts", "8k", "--page-size", "24"])


def test_decode_bench_dense_baseline_of_several_tokens_folds_the_group():
    """For T > 1 the SDPA baseline folds each group's query heads into the query rows: each query
    head's output is its own (GQA: query head h on kv head h // G), every new token over every
    cached key — checked against a float64 dense attention, as the bench checks it itself."""
    from nsa import attention
    from nsa.bench_decode import dense_error, make_step

    step = make_step(40, 2, 8, 2, 16, device="cpu", tokens=3)
    got = step.sdpa()                                                    # (B, Hq, T, D)
    q, k, v = step.inputs[:3]
    expected = attention(q.double(), k.double(), v.double()).transpose(1, 2)
    torch.testing.assert_close(got.double(), expected, atol=2e-2, rtol=2e-2)
    assert dense_error(*step.dense_inputs, got) < 1e-2
    assert dense_error(*step.dense_inputs, got.flip(1)) > 0.1            # heads swapped: caught


def test_sweep_constants_checks_times_and_gives_the_constants_back(monkeypatch):
    """The decoding sweeps' loop (`benchmarks/gpu_decode_splits.py`, `gpu_decode_tiles.py`): every
    combination of the values set in turn and checked before it is timed, a wrong one refused by
    name, the module's own values back afterwards, even after a failure. (The graph and the timer
    stand in for the GPU's.)"""
    import triton.testing

    from nsa import bench_decode
    from nsa.kernels import decode

    own = decode.SELECT_MAX_ROWS, decode.STEPS_PER_SPLIT
    monkeypatch.setattr(bench_decode, "graphed", lambda fn: (fn, None))
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kwargs: (fn(), 0.001)[1])
    seen = []

    def nsa():                                   # right unless SELECT_MAX_ROWS is 4
        seen.append((decode.SELECT_MAX_ROWS, decode.STEPS_PER_SPLIT))
        return torch.ones(3) * (2.0 if decode.SELECT_MAX_ROWS == 4 else 1.0)

    step = bench_decode.DecodeStep(nsa, None, lambda: torch.ones(3, dtype=torch.float64), None, None, None, (), ())
    values = dict(SELECT_MAX_ROWS=(1, 16), STEPS_PER_SPLIT=(2, 8))
    timed = list(bench_decode.sweep_constants(step, values))
    assert [c for c, _, _ in timed] == [(1, 2), (1, 8), (16, 2), (16, 8)]
    assert all(us == 1.0 and err == 0.0 for _, us, err in timed)
    assert set(seen) == {(1, 2), (1, 8), (16, 2), (16, 8)}
    assert (decode.SELECT_MAX_ROWS, decode.STEPS_PER_SPLIT) == own
    with pytest.raises(RuntimeError, match="'SELECT_MAX_ROWS': 4"):
        list(bench_decode.sweep_constants(step, dict(SELECT_MAX_ROWS=(16, 4))))
    assert (decode.SELECT_MAX_ROWS, decode.STEPS_PER_SPLIT) == own


def test_decode_bench_refuses_more_tokens_than_the_kernels_take(capsys):
    """A step longer than `decode_max_tokens` is a prefill, which reads lengths on the host and no
    CUDA graph captures: refused before any GPU work, naming the limit."""
    from nsa import bench_decode

    with pytest.raises(SystemExit):
        bench_decode.main(["--tokens", "1,17", "--heads", "64/4"])
    assert "at most 16 new tokens at 64/4 heads, got 17" in capsys.readouterr().err
