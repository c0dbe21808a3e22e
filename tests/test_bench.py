"""`python -m nsa.bench`: argument parsing and its behaviour without a GPU (timings are GPU-only)."""

import argparse

import pytest
import torch

from nsa import bench


def testparse_lengths_and_heads():
    assert bench.parse_lengths("4k,100,64K") == [4096, 100, 65536]
    assert bench.parse_heads("64/4,32/8") == [(64, 4), (32, 8)]
    for bad in ("4q", "0", "-1"):
        with pytest.raises(argparse.ArgumentTypeError, match="--seq-lens"):
            bench.parse_lengths(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="--heads"):
        bench.parse_heads("64-4")


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
    if not torch.cuda.is_available():
        assert bench_decode.main(["--contexts", "8k"]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().out


def test_gpu_tag_names_data_files_by_the_gpu():
    from nsa.device import gpu_tag, gpu_tag_of

    names = {"NVIDIA H100 80GB HBM3": "h100", "NVIDIA H200": "h200", "NVIDIA A100-SXM4-80GB": "a100",
             "NVIDIA GeForce RTX 4090": "4090", "AMD Instinct MI300X": "mi300x", "NVIDIA": "gpu"}
    assert {name: gpu_tag_of(name) for name in names} == names
    assert gpu_tag() == (gpu_tag_of(torch.cuda.get_device_name()) if torch.cuda.is_available() else "cpu")
