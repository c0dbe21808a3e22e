"""Native Sparse Attention (DeepSeek, arXiv 2502.11089), built step by step in the book.

Hand-written glue: re-exports the public API from the modules the chapters generate.
"""

from nsa import device  # first: switches on Triton's interpreter on a machine without CUDA
from nsa.attention import attention
from nsa.masks import block_selection_mask, causal_mask, sliding_window_mask
from nsa.config import NSAConfig
from nsa.compression import CompressionMLP, compress, compressed_attention, compressed_block_mask
from nsa.selection import select_blocks, selected_attention, selection_scores
from nsa.sliding import sliding_window_attention
from nsa.sparse_attention import SparseAttention, native_sparse_attention
from nsa.flex import create_compress_mask, create_fine_mask, create_sliding_mask

__version__ = "0.1.0"
