"""
FP8 (e4m3) weights: the format and the products, tensors in and tensors out (fast/quantize.py
builds a model from them).

Format: weight [N, K] float8_e4m3fn and weight_scale [N, 1] fp32, one per output channel, with
W = float(weight) * weight_scale. Each scale is the smallest power of two that brings the row's
largest |w| to <= 448 (e4m3's largest value), so dividing by it and multiplying by it are exact:
the only rounding is e4m3's own, at most 2^-4 of each value (2^-10 of the scale below e4m3's normal
range). Per channel rather than DeepSeek-V3's 128 x 128 blocks: with injected outlier channels both
give the same error (e4m3 spans 2^17, so an outlier 100x the typical value does not push the rest
below the normal range), and rows map to FP8 GEMMs with row-wise scales (measured: README).

Compute, by where and how many rows (fp8_linear, fp8_experts):
  - a GPU with FP8 (compute capability >= 8.9), more than DECODE_ROWS rows (prefill): activations
    are quantised per token (a Triton kernel; once per tensor, quantize_once, unless the kernel
    that made them quantised them too: the norms of fast.quantize, remember) and multiplied on
    FP8 tensor cores with row-wise scales (F.scaled_mm; the routed experts through
    F.scaled_grouped_mm, rows sorted by expert as fast.moe sorts them, SiLU(gate) * up in the
    kernel that quantises it for w2, the weighted sum where the rows lie in fast.moe.combine:
    fp8_sorted_experts, then fast.quantize.Fp8MoE)
  - the same GPU, at most DECODE_ROWS rows (decode): _rows_kernel reads each FP8 weight once,
    converts it to bf16 in registers (exact) and accumulates in fp32, one program per BN outputs
    (and per slice of K with split: fp32 parts, which fast.decode sums for o_proj); the routed
    experts' rows go through it too, grouped by expert: only the selected experts are read
  - anything else (CPU, older GPUs): dequantise and multiply in fp32 (correct, slow)
Shapes: M rows (tokens), K inputs, N outputs, E experts, F expert width.
"""
import functools
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F
import triton
import triton.language as tl

from fast import dot_args, e4m3_scale, operand
from fast.moe import silu_mul, silu_times, sort_by_expert

FP8 = torch.float8_e4m3fn
DECODE_ROWS = 16                        # at most this many rows (tokens): _rows_kernel, not a GEMM
# _rows_kernel's tiles: BM rows, BN outputs, BK inputs per step (fixed: autotune breaks the
# interpreter), the winners of a timed sweep of BN and BK over decode shapes on an H200.
ROWS = dict(BM=16, BN=32, BK=256, num_warps=4, num_stages=4)
QUANT_BK = 1024                         # _quantize_kernel's inputs per step


# -------------------------------------------------------------------------------------------------
# The format: power-of-two scales, one per row

def pow2_scale(amax):
    """The smallest power of two s with amax / s <= 448, for amax >= 0 fp32 [..., 1]. With
    amax = m 2^e, m in [0.5, 1): s = 2^(e - 9), or 2^(e - 8) when m > 448 / 512."""
    m, e = torch.frexp(amax.clamp(min=2.0 ** -100))     # all-zero rows: any scale will do
    return torch.ldexp(torch.ones_like(m), e - 9 + (m > 0.875).int())


def quantize_rows(x):
    """x [..., K] -> (q [..., K] float8_e4m3fn, scale [..., 1] fp32) with x ~ q * scale."""
    x = x.float()
    scale = pow2_scale(x.abs().amax(-1, keepdim=True))
    return (x / scale).to(FP8), scale                  # exact division; one rounding, to e4m3


def dequantize(q, scale, dtype=torch.float32):
    """q * scale in `dtype` (exact in fp32 and in bf16: 4 significant bits times a power of two)."""
    return (q.float() * scale).to(dtype)


@functools.cache
def _has_fp8(device):
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_gpu(x):
    """Whether x lives on a GPU with FP8 tensor cores (the fast paths); else dequantise."""
    return _has_fp8(x.device)


# -------------------------------------------------------------------------------------------------
# Kernels: per-token activation quantisation (prefill), and the decode product

@triton.jit
def _quantize_kernel(
        # pointers
        x_ptr, q_ptr, s_ptr,
        # sizes, strides
        K, stride_x,
        # meta
        BK: tl.constexpr, SILU_MUL: tl.constexpr):
    """= quantize_rows for one row of x per program: the row max, its power-of-two scale, q.
    SILU_MUL: the row is silu_mul's, SiLU(gate) * up of x's halves [gate | up] (K each), computed
    here (twice, once a pass) rather than written by silu_mul and read back."""
    row = tl.program_id(0).to(tl.int64)
    amax = tl.zeros((BK,), dtype=tl.float32)
    for k0 in range(0, K, BK):                          # 1. the row's largest |x|
        k = k0 + tl.arange(0, BK)
        x = _load_row(x_ptr + row * stride_x, k, K, SILU_MUL)
        amax = tl.maximum(amax, tl.abs(x))
    scale, inverse = e4m3_scale(tl.maximum(tl.max(amax, axis=0), 2.0 ** -100))   # 2. pow2_scale
    tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BK):                          # 3. q = x / scale (exact), rounded to e4m3
        k = k0 + tl.arange(0, BK)
        x = _load_row(x_ptr + row * stride_x, k, K, SILU_MUL)
        tl.store(q_ptr + row * K + k, (x * inverse).to(tl.float8e4nv), mask=k < K)


@triton.jit
def _load_row(x_ptr, k, K, SILU_MUL: tl.constexpr):
    """Values k (< K) of the row at x_ptr in fp32; SILU_MUL: silu_times of its two halves."""
    x = tl.load(x_ptr + k, mask=k < K, other=0.0)
    if SILU_MUL:
        up = tl.load(x_ptr + K + k, mask=k < K, other=0.0)
        return silu_times(x, up, x_ptr.dtype.element_ty)
    return x.to(tl.float32)


def quantize_rows_triton(x, gated=False):
    """= quantize_rows(x) for x [M, K], bit for bit, in one kernel: x read twice, q written once.
    gated: = quantize_rows(silu_mul(x)) for x [M, 2K] (SiLU(gate) * up in x's dtype, then q)."""
    M, K = x.shape
    if x.stride(-1) != 1:           # MLA's output arrives with its columns strided (a transpose)
        x = x.contiguous()
    K = K // 2 if gated else K
    q = torch.empty(M, K, dtype=FP8, device=x.device)
    scale = torch.empty(M, 1, dtype=torch.float32, device=x.device)
    _quantize_kernel[(M,)](x, q, scale, K, x.stride(0), BK=QUANT_BK, SILU_MUL=gated)
    return q, scale


_quantised = {}         # id(x) -> (weakref to x, x's version, q, scale): quantize_once's entries


def quantize_once(x):
    """= quantize_rows(x.reshape(-1, K)) for x [..., K] (on a GPU by quantize_rows_triton), once
    per input tensor: KDA's six projections read the same x, as do MLA's two and the MoE's routed
    and shared experts, so a layer quantises each input once; a norm kernel that quantised its
    output (fast.quantize) left its result here already (remember). A view of a whole contiguous
    tensor (the MoE's flattened input) counts as that tensor. An entry lives as long as x does
    (the weakref's callback drops it) and is recomputed if x was written in place since (its
    version counter); identity, not the id alone, decides: an id is reused once x is freed."""
    rows = x.reshape(-1, x.shape[-1])                                   # [M, K]
    quantize = quantize_rows_triton if x.is_cuda else quantize_rows
    if torch.compiler.is_compiling():                   # no weakrefs in a traced graph
        return quantize(rows)
    base = x._base
    if base is not None and x.is_contiguous() and base.is_contiguous() and (
            x.data_ptr(), x.numel()) == (base.data_ptr(), base.numel()):
        x = base                                        # the same rows, if K is the same
    entry = _quantised.get(id(x))
    if (entry is not None and entry[0]() is x and entry[1] == x._version
            and entry[2].shape == rows.shape):
        return entry[2], entry[3]
    q, scale = quantize(rows)
    remember(x, q, scale)
    return q, scale


def remember(x, q, scale):
    """Keep q, scale = quantize_rows(x.reshape(-1, K)) for quantize_once while x lives unchanged."""
    if torch.compiler.is_compiling():
        return
    drop = lambda _, key=id(x): _quantised.pop(key, None)              # noqa: E731
    _quantised[id(x)] = (weakref.ref(x, drop), x._version, q, scale)


@triton.jit
def _rows_kernel(
        # pointers
        x_ptr, w_ptr, s_ptr, out_ptr, expert_ptr, end_ptr,
        # sizes
        M, N, K,
        # strides (rows of x and out are contiguous), inputs per split
        stride_x, stride_out, KS,
        # meta
        GROUPED: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
        DOT: tl.constexpr, PREC: tl.constexpr):
    """out[m, i, n] = s[e, n] * sum_k x[m, k] w[e, n, k], k in split i's KS inputs, for the rows m
    of expert e (all rows and e = 0 unless GROUPED). Program (r, j, i) owns outputs j*BN.. of
    split i of the group that starts at row r (rows are sorted by expert; programs whose row
    starts no group do nothing): each weight is read once."""
    first = tl.program_id(0)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    split = tl.program_id(2)
    out_ptr += split * N                                # out [M, splits, N]: row stride_out
    if GROUPED:
        e = tl.load(expert_ptr + first).to(tl.int64)
        before = tl.load(expert_ptr + first - 1, mask=first > 0, other=-1)
        starts = e != before
        end = tl.load(end_ptr + first)                  # one past the group's last row
    else:                                               # one group: every row, expert 0
        e = first.to(tl.int64) * 0
        starts = first == 0
        end = M
    if starts:
        w_rows = w_ptr + e * N * K + n[None, :].to(tl.int64) * K                   # [1, BN]
        scale = tl.load(s_ptr + e * N + n, mask=n < N, other=0.0)                  # [BN]
        for m0 in range(first, end, BM):                # usually one pass: few rows per group
            m = m0 + tl.arange(0, BM)
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for k0 in range(split * KS, split * KS + KS, BK):       # KS: a multiple of BK
                k = k0 + tl.arange(0, BK)
                x = tl.load(x_ptr + m[:, None].to(tl.int64) * stride_x + k[None, :],
                            mask=(m[:, None] < end) & (k[None, :] < K), other=0.0)     # [BM, BK]
                w = tl.load(w_rows + k[:, None], mask=(k[:, None] < K) & (n[None, :] < N),
                            other=0.0)                  # [BK, BN] e4m3: exact in bf16 and fp32
                acc += tl.dot(x.to(DOT), operand(w, DOT), input_precision=PREC)
            out = acc * scale[None, :]                  # a power of two: exact
            tl.store(out_ptr + m[:, None].to(tl.int64) * stride_out + n[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=(m[:, None] < end) & (n[None, :] < N))


def fp8_rows(x, weight, scale, experts=None, split=1):
    """x [M, K] -> [M, N] in x's dtype: row m times (weight[e] * scale[e]).T, e = experts[m].
    weight [E, N, K] e4m3, scale [E, N, 1] fp32; experts [M] sorted (None: E = 1, every row).
    Decode's product: the weights are read once per group of rows, accumulated in fp32.
    split > 1 (E = 1): K in that many slices (whole BK steps; any past K are zero), programs for
    each -> fp32 parts [M, split, N] whose sum is the product, for where N / BN programs alone
    would leave SMs idle."""
    M, K = x.shape
    E, N, _ = weight.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    grouped = experts is not None
    if split < 1 or (split > 1 and grouped):
        raise ValueError(f"fp8_rows: split = {split}; a count >= 1, and 1 with experts")
    out = torch.empty(M, split, N, dtype=x.dtype if split == 1 else torch.float32,
                      device=x.device)
    ends = torch.searchsorted(experts, experts, right=True) if grouped else None
    KS = ROWS["BK"] * triton.cdiv(K, split * ROWS["BK"])          # inputs per split
    grid = (M if grouped else 1, triton.cdiv(N, ROWS["BN"]), split)
    _rows_kernel[grid](x, weight, scale, out, experts, ends, M, N, K, x.stride(0), out.stride(0),
                       KS, GROUPED=grouped, **dot_args(x.dtype), **ROWS)
    return out[:, 0] if split == 1 else out


# -------------------------------------------------------------------------------------------------
# Linear layers and the experts

def scaled_linear(x, weight, scale):
    """x [..., K] @ (weight * scale).T on FP8 tensor cores: x quantised per token, once per tensor
    (row-wise scales on both sides; F.scaled_mm accumulates in fp32) -> [M, N] in x's dtype."""
    xq, xs = quantize_once(x)
    return F.scaled_mm(xq, weight.T, xs, F.ScalingType.RowWise, scale.view(1, -1),
                       F.ScalingType.RowWise, output_dtype=x.dtype)


def fp8_linear(x, weight, scale):
    """x [..., K] -> x @ (weight * scale).T [..., N] in x's dtype, by the paths in the docstring."""
    x2 = x.reshape(-1, x.shape[-1])                                 # [M, K]
    N, K = weight.shape
    if not fp8_gpu(x):
        y = x2.float() @ dequantize(weight, scale).T                # CPU: dequantise, fp32
    elif len(x2) <= DECODE_ROWS:
        y = fp8_rows(x2, weight[None], scale[None])                 # decode
    elif K % 16 == 0 and N % 16 == 0:
        y = scaled_linear(x, weight, scale)                         # prefill
    else:                                                           # shapes FP8 GEMMs refuse
        y = x2.float() @ dequantize(weight, scale).T
    return y.to(x.dtype).view(*x.shape[:-1], N)


class Fp8Linear(nn.Module):
    """nn.Linear (no bias) with e4m3 weights and a power-of-two fp32 scale per output channel."""
    def __init__(self, in_features, out_features):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, 1), requires_grad=False)

    def forward(self, x):
        return fp8_linear(x, self.weight, self.weight_scale)


def fp8_experts(x, ids, moe):
    """= SparseMoeBlock.run_experts with FP8 experts: x [N, D], ids [N, k] -> [N, k, D] (the loop,
    each expert dequantised, where fp8_gpu(x) is false)."""
    if not fp8_gpu(x):
        return moe.run_experts(x, ids)
    out, pos = fp8_sorted_experts(x, ids, moe)
    return out.index_select(0, pos.flatten()).view(*ids.shape, -1)     # back to (token, slot)


def fp8_sorted_experts(x, ids, moe):
    """= fast.moe.sorted_experts with FP8 experts, on an FP8 GPU: x [N, D], ids [N, k] -> (out
    [N*k, D], pos [N, k]), out[pos[n, j]] = expert ids[n, j] applied to token n. The weights are
    moe.w13 [E, 2F, D], moe.w2 [E, D, F] with scales moe.s13, moe.s2 (prepare stacks them as they
    load: each expert's Fp8Linear holds views of them)."""
    token, expert, ends, pos = sort_by_expert(ids, len(moe.w13))
    if len(x) <= DECODE_ROWS:                           # decode: read the selected experts only
        h = silu_mul(fp8_rows(x[token], moe.w13, moe.s13, expert))               # [N*k, F]
        out = fp8_rows(h, moe.w2, moe.s2, expert)
    else:                                               # prefill: FP8 grouped GEMMs
        # each token quantised once (the shared expert reuses it), then its k rows gathered
        # (per-token scales: the same bits as quantising the gathered rows); e4m3 as bytes
        xq, xs = quantize_once(x)                                               # [N, D], [N, 1]
        xq = xq.view(torch.uint8)[token].view(FP8)      # [N*k, D], expert e's rows contiguous
        gu = _grouped(xq, xs[token], moe.w13, moe.s13, ends)                   # [N*k, 2F]
        hq, hs = quantize_rows_triton(gu, gated=True)   # SiLU(gate) * up, quantised [N*k, F]
        # w2 with the tensor cores' own sums (fast accumulation): CUTLASS's kernel at K = F
        # promoting to fp32 ran at a third of the rate, and the extra error is a small fraction
        # of e4m3's (docs/kernels_h100.md); w13's promoting kernel is as fast as its fast one
        out = _grouped(hq, hs, moe.w2, moe.s2, ends, fast=True)                  # [N*k, D]
    return out, pos


def fp8_stacked_expert(x, moe, e):
    """Stacked expert e (prefill's shared expert: row E) on every row of x [N, D] -> [N, D], on an
    FP8 GPU: = kimi.MLP.forward with its gate and up products in one GEMM (w13's rows are gate
    over up) and SiLU(gate) * up in the kernel that quantises it for w2."""
    gu = scaled_linear(x, moe.w13[e], moe.s13[e])                              # [N, 2F]
    hq, hs = quantize_rows_triton(gu, gated=True)                               # [N, F] e4m3
    return F.scaled_mm(hq, moe.w2[e].T, hs, F.ScalingType.RowWise, moe.s2[e].view(1, -1),
                       F.ScalingType.RowWise, output_dtype=x.dtype)


def _grouped(xq, xs, weight, scale, ends, fast=False):
    """Rows of x = xq * xs (e4m3 [M, K], fp32 [M, 1]; expert e's rows end at ends[e]) times their
    expert's (weight * scale).T -> [M, N] bf16. fast: the tensor cores' own sums over all of K,
    not promoted to fp32 every few products (Hopper's keep about 14 bits: DeepSeek-V3's report)."""
    return F.scaled_grouped_mm(xq, weight.mT, xs.view(-1), F.ScalingType.RowWise,
                               scale.view(len(weight), -1), F.ScalingType.RowWise, offs=ends,
                               output_dtype=torch.bfloat16, use_fast_accum=fast)
