"""What the Triton kernels of the decode step share (kda_decode, mla_decode, moe_decode, decode).

Without CUDA they run in Triton's CPU interpreter, which must be chosen before triton is imported:
import this module first. And the interpreter's fp32 -> bf16 cast truncates instead of rounding to
nearest (about half the values come out one unit in the last place low), so kernels that must
round exactly where kimi.py rounds call round_to, which rounds on the bits there.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_BITS = tl.constexpr(INTERPRET)        # (globals read in @triton.jit must be constexpr)


@triton.jit
def round_to(x, DT: tl.constexpr):
    """fp32 x rounded to the nearest DT value (ties to even), returned as fp32."""
    if _BITS and DT == tl.bfloat16:
        # add half a unit (less one unless the kept last bit is odd), then drop the low 16 bits;
        # a carry into the exponent is the correct rounding up (finite x)
        u = x.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return u.to(tl.float32, bitcast=True)
    else:
        return x.to(DT).to(tl.float32)
