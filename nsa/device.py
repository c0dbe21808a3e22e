"""Where the code runs: the GPU when there is one, else the CPU with Triton's interpreter.

Hand-written glue (not a chapter): every chapter and the package start here.

* `DEVICE` is `cuda` when PyTorch sees a GPU, else `cpu`. `NSA_DEVICE=cpu` forces the CPU.
* Without CUDA, Triton kernels run in Triton's interpreter: `TRITON_INTERPRET=1` must be set
  before `triton` is first imported (the `@triton.jit` decorator reads it), so importing `nsa`
  sets it and says so once. Under the interpreter fp32 and fp16 are right; bf16 is not.
* `sized(cpu=..., gpu=...)` is the size knob: chapters run small problems on the CPU and real
  ones on a GPU. `NSA_SIZE=small` or `NSA_SIZE=full` overrides the choice.
* `gpu_tag()` names the GPU in the files its measurements go to (`bench_h200.csv`; `cpu` in the
  interpreter).
"""

import os
import re
import sys
import warnings

import torch

_VALID_DEVICES = ("cuda", "cpu")
_VALID_SIZES = ("small", "full")

_forced = os.environ.get("NSA_DEVICE")
if _forced is not None and _forced not in _VALID_DEVICES:
    raise ValueError(f"NSA_DEVICE={_forced!r}; allowed: {', '.join(_VALID_DEVICES)} (or unset)")
HAS_CUDA = torch.cuda.is_available() and _forced != "cpu"
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")

if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    if "triton" in sys.modules:
        warnings.warn(
            "nsa: no CUDA device and triton was imported before nsa, so Triton's interpreter "
            "could not be switched on; import nsa first (or set TRITON_INTERPRET=1) to run the "
            "kernels on the CPU.",
            stacklevel=2,
        )
    else:
        os.environ["TRITON_INTERPRET"] = "1"
        warnings.warn(
            "nsa: no CUDA device; Triton kernels will run on the CPU in Triton's interpreter "
            "(TRITON_INTERPRET=1): slow, fine for small sizes, bf16 unsupported there.",
            stacklevel=2,
        )

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_size = os.environ.get("NSA_SIZE")
if _size is not None and _size not in _VALID_SIZES:
    raise ValueError(f"NSA_SIZE={_size!r}; allowed: {', '.join(_VALID_SIZES)} (or unset)")
FULL_SIZE = _size == "full" if _size is not None else HAS_CUDA


def sized(cpu, gpu):
    """`gpu` on a GPU (real sizes), `cpu` on the CPU (small sizes); `NSA_SIZE` overrides."""
    return gpu if FULL_SIZE else cpu


_VENDOR_WORDS = {"NVIDIA", "GEFORCE", "TESLA", "RTX", "QUADRO", "AMD", "RADEON", "INSTINCT"}


def gpu_tag_of(name: str) -> str:
    """The short lower-case name of a GPU from its device name, for data files: the first word
    after the vendor's ("NVIDIA H100 80GB HBM3" -> "h100", "NVIDIA A100-SXM4-80GB" -> "a100",
    "NVIDIA GeForce RTX 4090" -> "4090", "AMD Instinct MI300X" -> "mi300x")."""
    words = [w for w in re.split(r"[\s_-]+", name) if w and w.upper() not in _VENDOR_WORDS]
    return re.sub(r"\W+", "", words[0]).lower() if words else "gpu"


def gpu_tag(device=None) -> str:
    """`gpu_tag_of` the current CUDA device's name (or `device`'s); "cpu" where the kernels run on
    the CPU: without CUDA, or in Triton's interpreter (a script's --tiny check on a GPU machine)."""
    return gpu_tag_of(torch.cuda.get_device_name(device)) if torch.cuda.is_available() and not INTERPRET else "cpu"
