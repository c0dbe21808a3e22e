"""Native Sparse Attention (DeepSeek, arXiv 2502.11089), built step by step in the book.

Hand-written glue: re-exports the public API from the modules the chapters generate, and
imports the three backends of `native_sparse_attention` so that they register themselves
("torch" in nsa.sparse_attention, "flex" in nsa.flex, "triton" in nsa.kernels.nsa).
"""

import importlib.util
from pathlib import Path

_checkout = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("nsa.kernels") is None and (_checkout / "kernels" / "__init__.py").is_file():
    __path__.append(str(_checkout))  # a source checkout, not installed: its kernels/ is nsa.kernels

from nsa import device  # first: switches on Triton's interpreter on a machine without CUDA
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

__version__ = "0.1.0"
