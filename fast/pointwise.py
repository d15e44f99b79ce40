"""
kimi.py's norms and KDA's forget gate, one Triton kernel each, for prefill.

In torch each of these is five to nine passes over memory: an fp32 copy, the square, the mean, the
product, a cast, ... 20 KDA layers and 62 RMSNorms a prefill, on [T, 4096] and [T, 2304] tensors.
Here each reads its inputs once and writes its output once, with kimi.py's fp32 arithmetic and its
roundings (kimi.py stays the definition; the tests hold these to it):

    rms_norm(x, weight, eps)              = kimi.RMSNorm: round(x r) * weight, rounded again
                                            (round: to x's dtype; again: to the product's)
    gated_rms_norm(x, gate, weight, eps)  = kimi.GatedRMSNorm: x r weight sigmoid(gate), rounded
    l2norm(x, dtype)                      = kda_ref.l2norm(x.float()).to(dtype)
    kda_gate(f, A_log, dt_bias)           = kda_ref.kda_gate, fp32

with r = rsqrt(mean(x^2) + eps) over the last dimension (l2norm: the sum, eps 1e-6 on the sum).
A program of _norm_kernel normalises a [BR, BN] tile: BR rows of N values (BN = N rounded up to a
power of two); _gate_kernel handles BLOCK values of [rows, H*K].
"""
import torch
import triton
import triton.language as tl

from fast import e4m3_scale, round_to, softplus

TILE = 4096                 # values a program: BR = TILE // BN rows (one row when N > TILE / 2)
GATE_BLOCK, WARPS = 1024, 4
L2_EPS = 1e-6               # kda_ref.l2norm's
RMS, GATED, L2 = 0, 1, 2    # _norm_kernel's KIND


@triton.jit
def _norm_kernel(x, gate, w, y, q, s, R, N, ROWS, eps, KIND: tl.constexpr, QUANT: tl.constexpr,
                 BR: tl.constexpr, BN: tl.constexpr):
    """Rows [ROWS * pid, ROWS * (pid + 1)) of x [R, N] -> y [R, N]; KIND: RMS, GATED or L2.
    QUANT: also y's e4m3 q [R, N] and scale s, one a program (its ROWS rows are one token)."""
    i = tl.arange(0, BR)[:, None]                                               # [BR, 1]
    r = tl.program_id(0).to(tl.int64) * ROWS + i                                # rows
    c = tl.arange(0, BN)[None, :]                                               # [1, BN]
    m = (i < ROWS) & (r < R) & (c < N)
    xr = tl.load(x + r * N + c, mask=m, other=0.).to(tl.float32)               # [BR, BN]
    ss = tl.sum(xr * xr, axis=1)[:, None]                                       # [BR, 1]
    if KIND == 2:           # l2norm: eps on the sum of squares, not the mean (trap 6)
        out = xr * tl.rsqrt(ss + eps)
    else:
        out = xr * tl.rsqrt(ss / N + eps)
    if KIND == 0:           # RMSNorm rounds before the weight, then the product rounds (trap 10)
        out = round_to(out, x.dtype.element_ty) * tl.load(w + c, mask=c < N).to(tl.float32)
    if KIND == 1:           # GatedRMSNorm: fp32 throughout, sigmoid (not SiLU) of the gate
        z = tl.load(gate + r * N + c, mask=m, other=0.).to(tl.float32)
        out = out * tl.load(w + c, mask=c < N).to(tl.float32) * tl.sigmoid(z)
    out = round_to(out, y.dtype.element_ty)        # (the interpreter's cast truncates)
    tl.store(y + r * N + c, out.to(y.dtype.element_ty), mask=m)
    if QUANT:               # = fast.fp8.quantize_rows of the token's rows as one (0 where masked)
        amax = tl.maximum(tl.max(tl.max(tl.abs(out), axis=1), axis=0), 2.0 ** -100)
        scale, inverse = e4m3_scale(amax)
        tl.store(s + tl.program_id(0), scale)
        tl.store(q + r * N + c, (out * inverse).to(tl.float8e4nv), mask=m)


@triton.jit
def _gate_kernel(f, A_log, dt_bias, g, n, HK, K: tl.constexpr, BLOCK: tl.constexpr):
    """g = -exp(A_log[h]) softplus(f + dt_bias[c]) for BLOCK values of f [rows, H*K], fp32."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    on = i < n
    c = i % HK                                      # channel h*K + k
    z = tl.load(f + i, mask=on, other=0.).to(tl.float32) + tl.load(dt_bias + c, mask=on, other=0.)
    a = tl.load(A_log + c // K, mask=on, other=0.)
    tl.store(g + i, -tl.exp(a) * softplus(z), mask=on)


def _norm(x, gate, weight, eps, kind, dtype, rows=0):
    """rows: the rows of x [..., N] that make a token (its last dimensions), to quantise y per
    token as well (-> y, q, scale); 0: y alone, TILE values a program."""
    N = x.shape[-1]
    x = x.contiguous()                              # free when it already is
    R = x.numel() // N
    y = torch.empty(x.shape, dtype=dtype, device=x.device)
    BN = triton.next_power_of_2(N)
    ROWS = rows or max(1, TILE // BN)
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device) if rows else y
    scale = torch.empty(R // ROWS, 1, device=x.device) if rows else y   # [tokens, 1] fp32
    _norm_kernel[(triton.cdiv(R, ROWS),)](x, gate, weight, y, q, scale, R, N, ROWS, eps, KIND=kind,
                                          QUANT=rows > 0, BR=triton.next_power_of_2(ROWS), BN=BN,
                                          num_warps=WARPS)
    return (y, q.view(R // ROWS, ROWS * N), scale) if rows else y


def rms_norm(x, weight, eps, quantize=False):
    """= kimi.RMSNorm(weight, eps)(x): x [..., N], weight [N] -> y [..., N], the dtype of
    x * weight (as torch promotes the product). quantize: -> (y, q, scale) with q, scale =
    fast.fp8.quantize_rows(y.reshape(-1, N)), for FP8 products that read y (fast.quantize)."""
    return _norm(x, x, weight, eps, RMS, torch.promote_types(x.dtype, weight.dtype),
                 1 if quantize else 0)


def gated_rms_norm(x, gate, weight, eps, quantize=False):
    """= kimi.GatedRMSNorm(weight, eps)(x, gate): x, gate [..., H, N], weight [N] -> y, x's
    dtype. quantize: -> (y, q, scale), each token's H * N values quantised as one row (o_proj's
    input): q, scale = fast.fp8.quantize_rows(y.reshape(-1, H * N))."""
    if gate.shape != x.shape:
        raise ValueError(f"gated_rms_norm: gate {tuple(gate.shape)} is not x's {tuple(x.shape)}")
    return _norm(x, gate.contiguous(), weight, eps, GATED, x.dtype,
                 x.shape[-2] if quantize else 0)


def l2norm(x, dtype):
    """= kda_ref.l2norm(x.float()).to(dtype): x [..., K] -> [..., K] in dtype."""
    return _norm(x, x, x, L2_EPS, L2, dtype)


def kda_gate(f, A_log, dt_bias):
    """= kda_ref.kda_gate(f, A_log, dt_bias): f [..., H, K], A_log H values, dt_bias H*K values
    -> g [..., H, K] fp32."""
    H, K = f.shape[-2:]
    if A_log.numel() != H or dt_bias.numel() != H * K:
        raise ValueError(f"kda_gate: needs {H} A_log and {H * K} dt_bias values, got "
                         f"{A_log.numel()} and {dt_bias.numel()}")
    f = f.contiguous()
    g = torch.empty(f.shape, dtype=torch.float32, device=f.device)
    n = f.numel()
    _gate_kernel[(triton.cdiv(n, GATE_BLOCK),)](
        f, A_log.float().contiguous(), dt_bias.float().contiguous(), g, n, H * K, K=K,
        BLOCK=GATE_BLOCK, num_warps=WARPS)
    return g
