"""Triton kernels of the book (chapters 7-10), installed as `nsa.kernels`.

Hand-written glue. Import it as `nsa.kernels`, never as a top-level `kernels`.
"""

import nsa.device  # noqa: F401  (sets TRITON_INTERPRET on a machine without CUDA, before triton)
