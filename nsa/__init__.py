"""Native Sparse Attention (DeepSeek, arXiv 2502.11089), built step by step in the book.

Hand-written glue: re-exports the public API from the modules the chapters generate, and
imports the three backends of `native_sparse_attention` so that they register themselves
("torch" in nsa.sparse_attention, "flex" in nsa.flex, "triton" in nsa.kernels.nsa).
"""

import importlib.util
import sys
from pathlib import Path

from nsa import device  # first: switches on Triton's interpreter on a machine without CUDA

import torch


def _checkout_kernels() -> None:
    """In a source checkout, load its own kernels/ as nsa.kernels (what pyproject's package-dir
    maps at install) unless the import system finds exactly those: a checkout never installed,
    or one beside another checkout installed in editable mode, whose nsa.kernels the import
    system would find instead (this nsa, that one's kernels). Installed, nsa.kernels is found
    as it is."""
    root = Path(__file__).resolve().parent.parent
    init = root / "kernels" / "__init__.py"
    if not init.is_file() or not (root / "pyproject.toml").is_file():
        return
    found = importlib.util.find_spec("nsa.kernels")
    if found is not None and found.origin is not None and Path(found.origin).resolve() == init.resolve():
        return                       # this checkout's own: installed from here, or linked as nsa/kernels
    spec = importlib.util.spec_from_file_location("nsa.kernels", init, submodule_search_locations=[str(init.parent)])
    sys.modules["nsa.kernels"] = module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError:              # no triton: nsa.kernels stays missing, as installed (below)
        del sys.modules["nsa.kernels"]
        return
    globals()["kernels"] = module    # nsa.kernels, as an import would bind it


_checkout_kernels()

from nsa.attention import attention
from nsa.backends import available_backends, backend_unavailable
from nsa.cache import KVCache, sparse_attention_with_kvcache
from nsa.compression import CompressionMLP, compress, compressed_attention
from nsa.config import NSAConfig
from nsa.decode_graph import DecodeGraph
from nsa.distributed import context_parallel_sparse_attention
from nsa.flex import create_compress_mask, create_fine_mask, create_sliding_mask
from nsa.layer import SparseAttention
from nsa.masks import block_selection_mask, causal_mask, compressed_block_mask, sliding_window_mask
from nsa.selection import select_blocks, selected_attention, selection_scores
from nsa.sparse_attention import native_sparse_attention
from nsa.window import sliding_window_attention

try:
    import nsa.kernels.nsa  # noqa: F401  (registers backend="triton")
    import nsa.kernels.decode  # noqa: F401  (registers the "triton" decoder of sparse_attention_with_kvcache)
    import nsa.kernels.cache  # noqa: F401  (the decoder's own cache writes, in Triton)
except ImportError as missing:  # triton is not installed: "auto" uses "torch"
    backend_unavailable("triton", f"Triton kernels could not be imported ({missing})")


# `from nsa import *`: the public API (DESIGN.md's, and what the later chapters add), nothing else;
# the tensor-parallel layer only where torch has torch.distributed (its module imports it).
__all__ = ["NSAConfig", "attention", "compress", "CompressionMLP", "compressed_attention", "selection_scores",
           "select_blocks", "selected_attention", "sliding_window_attention", "native_sparse_attention",
           "SparseAttention", "create_compress_mask", "create_fine_mask", "create_sliding_mask", "causal_mask",
           "sliding_window_mask", "block_selection_mask", "compressed_block_mask", "KVCache",
           "sparse_attention_with_kvcache", "DecodeGraph", "context_parallel_sparse_attention", "available_backends"]
if torch.distributed.is_available():
    __all__.append("TensorParallelSparseAttention")


def __getattr__(name):
    """`nsa.TensorParallelSparseAttention`, imported on first use: its module loads
    torch.distributed.tensor (about 0.4 s), which a model on one device never needs."""
    if name == "TensorParallelSparseAttention":
        from nsa.tensor_parallel import TensorParallelSparseAttention
        return TensorParallelSparseAttention
    raise AttributeError(f"module 'nsa' has no attribute {name!r}")


__version__ = "0.1.0"
