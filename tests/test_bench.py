"""`python -m nsa.bench`: argument parsing and its behaviour without a GPU (timings are GPU-only)."""

import argparse

import pytest
import torch

from nsa import bench


def test_parse_lengths_and_heads():
    assert bench._parse_lengths("4k,100,64K") == [4096, 100, 65536]
    assert bench._parse_heads("64/4,32/8") == [(64, 4), (32, 8)]
    for bad in ("4q", "0", "-1"):
        with pytest.raises(argparse.ArgumentTypeError, match="--seq-lens"):
            bench._parse_lengths(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="--heads"):
        bench._parse_heads("64-4")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_without_cuda_says_so(capsys):
    assert bench.main(["--seq-lens", "1k"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out
