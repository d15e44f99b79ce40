"""The GPU fast paths of kimi.py's model. Each file names the definition it computes and has tests.

Kernels (tensors in, tensors out; they never import kimi):
    short_conv.py   ShortConv.forward in one kernel
    pointwise.py    the norms (RMSNorm, GatedRMSNorm, l2norm) and KDA's gate, one kernel each
    moe.py          the routed experts as grouped matmuls, and their weighted sum in one kernel
    kda_decode.py   a KDA layer's decode step, from the projections to o_proj's input
    mla_decode.py   the absorbed latent attention of one decode step, split over the cache
    moe_decode.py   one decode step's router and experts, each expert's weights read once
    fp8.py          FP8 weights: the per-channel format, the decode product and the scaled matmuls
Transforms (take a built model and change how it runs):
    decode.py       decode.step, one decode step in fused kernels, and cuda_graph_decoder
    quantize.py     a model in FP8: from_pretrained (quantised as it loads), Fp8MoE

Importing this package chooses Triton's CPU interpreter where there is no GPU. It must come before
Triton's own first import, which builds tl.sum and the other library functions for the compiler or
for the interpreter once and for all: every file in fast/ runs this first, as its package, and
kda_triton.py imports it before triton. What the fast paths share is here too: round_to (a bf16
rounding the interpreter gets right), rms_norm_row (a row of kimi.RMSNorm), e4m3_scale (FP8's
per-row scale), dot_args (tl.dot's operand type), stack_linears (weights stacked, the layers'
views of them) and sm_count.
"""
import functools
import os
import sys

import torch

if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    if "triton" in sys.modules:
        raise ImportError("without a GPU, import fast (or kimi) before triton, or set "
                          "TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402 (after the interpreter is chosen)
import triton.language as tl  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_BITS = tl.constexpr(INTERPRET)        # (globals read in @triton.jit must be constexpr)


@functools.cache
def sm_count(device):
    """The GPU's streaming multiprocessors; 132 (an H100's) off the GPU, so that the interpreter's
    tests take the paths a GPU takes at the same sizes."""
    if torch.device(device).type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def dot_args(dtype):
    """The DOT and PREC arguments of the kernels that multiply inputs of this dtype by tl.dot: bf16
    or fp16 operands on a GPU (their products are exact in the fp32 sums; e4m3 weights convert to
    either exactly); fp32 in the interpreter, whose bf16 tl.dot is silently wrong, and for fp32
    inputs, 'ieee' (no TF32 rounding of them)."""
    if dtype in (torch.bfloat16, torch.float16) and not INTERPRET:
        return dict(DOT=tl.bfloat16 if dtype == torch.bfloat16 else tl.float16, PREC="tf32")
    return dict(DOT=tl.float32, PREC="ieee")


@triton.jit
def round_to(x, DT: tl.constexpr):
    """fp32 x rounded to the nearest DT value (ties to even), returned as fp32. The interpreter's
    fp32 -> bf16 cast truncates instead of rounding to nearest (about half the values come out one
    unit in the last place low), so kernels that must round exactly where kimi.py rounds call this,
    which rounds on the bits there."""
    if _BITS and DT == tl.bfloat16:
        # add half a unit (less one unless the kept last bit is odd), then drop the low 16 bits;
        # a carry into the exponent is the correct rounding up (finite x)
        u = x.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return u.to(tl.float32, bitcast=True)
    else:
        return x.to(DT).to(tl.float32)


@triton.jit
def rms_norm_row(x, w, N, eps, DT: tl.constexpr, OUT: tl.constexpr):
    """kimi.RMSNorm of one row: x [BN] and its weight w [BN] in fp32 (0 past N) -> fp32 values of
    OUT. x r is rounded to DT (x's dtype) *before* the weight (trap 10), the product to OUT."""
    n = x * tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
    return round_to(round_to(n, DT) * w, OUT)


@triton.jit
def e4m3_scale(amax):
    """fast.fp8.pow2_scale of a row's largest |x| (fp32, > 0) from its bits, and its inverse:
    amax = 1.f 2^E -> scale 2^(E - 8), doubled when 1.f > 1.75; both exact powers of two."""
    bits = amax.to(tl.int32, bitcast=True)
    E = ((bits >> 23) & 255) - 127
    e = E - 8 + ((bits & 0x7FFFFF) > 0x600000).to(tl.int32)
    return ((e + 127) << 23).to(tl.float32, bitcast=True), ((127 - e) << 23).to(tl.float32,
                                                                                bitcast=True)


@triton.jit
def operand(w, DOT: tl.constexpr):
    """A weight tile as tl.dot's operand type. e4m3 -> bf16: fp32's top 16 bits are the bf16
    value, exact (e4m3 has 3 mantissa bits); an fp16 unpack and a widening half-precision add get
    there, where the cast spends a slow conversion op (F2F) on every element."""
    if DOT == tl.bfloat16 and w.dtype == tl.float8e4nv:
        bits = w.to(tl.float32).to(tl.uint32, bitcast=True)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return w.to(DOT)


@triton.jit
def softplus(z):
    """torch's softplus (threshold 20) of fp32 z: z above 20 as is, below max(z, 0) + log1p(u)
    with u = exp(-|z|) in (0, 1]. log1p(u) = 2 atanh(s) = 2 s (1 + s^2/3 + s^4/5 + ...) with
    s = u / (2 + u) <= 1/3, seven terms (what is left: about 2^-26 of it at most). No log, whose
    absolute error (a GPU's lg2.approx) would be a large relative one where u is small; and exact
    where 1 + u rounds to 1."""
    u = tl.exp(-tl.abs(z))
    s = u / (2.0 + u)
    s2 = s * s
    p = 1.0 + s2 * (1 / 3 + s2 * (1 / 5 + s2 * (1 / 7 + s2 * (1 / 9 + s2 * (1 / 11 + s2 / 13)))))
    return tl.where(z > 20.0, z, tl.maximum(z, 0.0) + 2.0 * s * p)


@torch.no_grad()     # the stack is a plain tensor, outside autograd
def stack_linears(linears):
    """Stack nn.Linear (or fast.fp8.Fp8Linear) layers over their outputs: -> (weight
    [sum N, K], scale [sum N, 1] or None). Each layer's weight (and scale) becomes a view of the
    stack, so the module names and the state_dict stay the checkpoint's."""
    fp8 = hasattr(linears[0], "weight_scale")
    weight = torch.cat([m.weight for m in linears])
    scale = torch.cat([m.weight_scale for m in linears]) if fp8 else None
    start = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight = torch.nn.Parameter(weight[start:start + n], requires_grad=False)
        if fp8:
            m.weight_scale = torch.nn.Parameter(scale[start:start + n], requires_grad=False)
        start += n
    return weight, scale
