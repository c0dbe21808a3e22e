"""Write scratch/select_variants.py: the select kernel with a MODE switch for timing experiments."""
import re
src = open("kernels/compressed.py").read()
start = src.index("@triton.jit\ndef rank_keys")
end = src.index("from nsa.config import NSAConfig")
kernel = src[start:end]
kernel = kernel.replace("    BLOCK_S: tl.constexpr,   # selection blocks per step (>= 16)\n):",
                        "    BLOCK_S: tl.constexpr,   # selection blocks per step (>= 16)\n    MODE: tl.constexpr = 0,\n):")
old_merge = kernel[kernel.index("        # -- 5. merge"):kernel.index("    # -- the chosen blocks")]
new_merge = '''        # -- 5. merge --
        if MODE == 0:
            best = tl.max(cand, axis=1)
            worst = tl.min(top, axis=1)
            enters = best > worst
            while tl.max(enters.to(tl.int32), axis=0) > 0:
                top = tl.where(enters[:, None] & (top == worst[:, None]), best[:, None], top)
                cand = tl.where(enters[:, None] & (cand == best[:, None]), EMPTY - SLOTS, cand)
                best = tl.max(cand, axis=1)
                worst = tl.min(top, axis=1)
                enters = best > worst
        elif MODE == 1:
            top = tl.sort(tl.maximum(top, tl.sort(cand, dim=1, descending=True)), dim=1)
        else:
            top = tl.maximum(top, cand)

'''
kernel = kernel.replace(old_merge, new_merge)
kernel = kernel.replace("    carry = tl.zeros([BLOCK_M, BLOCK_S], dtype=tl.float32)\n",
                        "    carry = tl.zeros([BLOCK_M, BLOCK_S], dtype=tl.float32)\n    if MODE == 1:\n        top = tl.sort(top, dim=1)\n")
if "MODE == 3" not in kernel:
    kernel = kernel.replace("        score = carry + tl.dot(p_group, w_this, input_precision=\"tf32x3\")         # (BLOCK_M, BLOCK_S)\n        carry = tl.dot(p_group, w_next, input_precision=\"tf32x3\")\n",
    "        if MODE == 3:\n            score = tl.sum(tl.reshape(p_group, (BLOCK_M, BLOCK_S, BLOCK_C // BLOCK_S)), axis=2)\n        else:\n            score = carry + tl.dot(p_group, w_this, input_precision=\"tf32x3\")\n            carry = tl.dot(p_group, w_next, input_precision=\"tf32x3\")\n")
assert "MODE == 3" in kernel
header = "import triton\nimport triton.language as tl\n\n\n"
open("scratch/select_variants.py", "w").write(header + kernel)
