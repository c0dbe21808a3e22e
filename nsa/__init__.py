"""Native Sparse Attention (DeepSeek, arXiv 2502.11089), built step by step in the book.

Hand-written glue: re-exports the public API from the modules the chapters generate.
"""

from nsa import device  # first: switches on Triton's interpreter on a machine without CUDA
from nsa.attention import attention
from nsa.masks import block_selection_mask, causal_mask, sliding_window_mask

__version__ = "0.1.0"
