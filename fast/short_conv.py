"""
KDA's short convolution in one Triton kernel: kimi.ShortConv.forward, fused, for prefill.

kimi.ShortConv.forward is the definition and the reference: a depthwise causal conv over time with
W taps (tap W-1 the newest token), summed in fp32, then SiLU, rounded once to the input's dtype. In
torch that is a transpose, a torch.cat of the conv state (or F.pad), an fp32 copy, conv1d, SiLU, a
cast and a transpose back, each a pass over memory, 60 times a prefill (q, k and v in each of 20
KDA layers). The work itself is one read of x and one write of y.

    short_conv(x, weight, state=None) -> y, equal to kimi.ShortConv.forward(x, state) with weight
    x [B, T, C] (any batch and token strides, unit channel stride: often a column slice of a stacked
    projection), weight [C, 1, W], state [B, C, W-1] or None, y [B, T, C] contiguous in x's dtype.
    state is the left context (None: zeros, a new sequence) and is updated in place to the last
    W-1 inputs including x: when T < W-1 that is the old state's newest columns, then x.

A program owns BT tokens x BC channels of one row (grid: token blocks, channel blocks, B). It sums
the W taps one at a time, each a [BT, BC] load of x shifted back by W-1-j tokens (the shifted tiles
overlap; the repeats come from cache, not memory), taking the state's columns where the shift runs
before the first token. BT >= W-1, so only the first token block reads the state; it also writes
the new one (see the kernel for why that is race free).
"""
import torch
import triton
import triton.language as tl

from fast import round_to

BT, BC, WARPS = 16, 64, 4       # the fastest tile of `python -m tools.kernels short_conv`'s sweep


@triton.jit
def _short_conv_kernel(x, w, state, y, T, C, s_xb, s_xt, s_wc, s_wt, s_sb, s_sc, s_st,
                       W: tl.constexpr, WP: tl.constexpr, HAS_STATE: tl.constexpr,
                       BT: tl.constexpr, BC: tl.constexpr):
    """y[b, tokens, channels] of program (token block i, channel block, b); the new state too."""
    i = tl.program_id(0)
    b = tl.program_id(2).to(tl.int64)                   # int64 offsets: B*T*C may pass 2^31
    t = (i * BT + tl.arange(0, BT)).to(tl.int64)        # tokens [BT]
    c = tl.program_id(1) * BC + tl.arange(0, BC)        # channels [BC]
    cm = (c < C)[None, :]                               # [1, BC]
    x += b * s_xb
    state += b * s_sb
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    for j in tl.static_range(W):                        # tap j sees token t - (W-1) + j
        src = (t - (W - 1) + j)[:, None]                # [BT, 1]; < 0: before x, in the state
        xj = tl.load(x + src * s_xt + c[None, :], mask=(src >= 0) & (src < T) & cm, other=0.)
        xj = xj.to(tl.float32)                          # [BT, BC]
        if HAS_STATE:                                   # column W-1+src of [B, C, W-1]
            old = tl.load(state + c[None, :] * s_sc + (src + W - 1) * s_st,
                          mask=(src < 0) & cm, other=0.)
            xj = tl.where(src < 0, old.to(tl.float32), xj)
        wj = tl.load(w + c * s_wc + j * s_wt, mask=c < C, other=0.).to(tl.float32)    # [BC]
        acc += xj * wj[None, :]
    out = round_to(acc / (1. + tl.exp(-acc)), y.dtype.element_ty)   # SiLU as torch's; rounded
    tl.store(y + (b * T + t[:, None]) * C + c[None, :], out.to(y.dtype.element_ty),
             mask=(t[:, None] < T) & cm)
    if HAS_STATE:
        if i == 0:
            # The new state: column k is input T-(W-1)+k of [old state, x] (old state column T+k
            # when that is < 0). Written here, by the first token block: the only programs that
            # read the old state are the first blocks (BT >= W-1), and each reads just its own row
            # and channels, the ones it writes, so no other program can see a half-updated state.
            # (Written by the last block instead, it would race with the first one's reads.) Within
            # this program, the state elements a thread reads (above, and here) are written by
            # other threads: the barrier puts every read before any write.
            # (new names: Triton refuses to give a variable of the loop above another shape here)
            k = tl.arange(0, WP).to(tl.int64)[None, :]  # state columns [1, WP]
            src_k = T - (W - 1) + k                     # [1, WP]
            km = (k < W - 1) & (c < C)[:, None]         # [BC, WP]
            from_x = tl.load(x + src_k * s_xt + c[:, None], mask=km & (src_k >= 0), other=0.)
            from_old = tl.load(state + c[:, None] * s_sc + (src_k + W - 1) * s_st,
                               mask=km & (src_k < 0), other=0.)
            kept = tl.where(src_k < 0, from_old.to(tl.float32), from_x.to(tl.float32))  # [BC, WP]
            tl.debug_barrier()
            tl.store(state + c[:, None] * s_sc + k * s_st, round_to(kept, state.dtype.element_ty),
                     mask=km)                           # (exact: a copy when the dtypes agree)


def short_conv(x, weight, state=None):
    """= kimi.ShortConv.forward(x, state) of a ShortConv with this weight, in one launch (no host
    sync: CUDA graph safe). x [B, T, C] with unit channel stride; weight [C, 1, W]; state
    [B, C, W-1] or None, updated in place. Returns y [B, T, C] contiguous, x's dtype."""
    if x.dim() != 3 or x.stride(2) != 1:
        raise ValueError(f"short_conv: x must be [B, T, C] with unit channel stride, got shape "
                         f"{tuple(x.shape)}, strides {x.stride()} (.contiguous() makes one)")
    (B, T, C), W = x.shape, weight.shape[-1]
    if weight.shape != (C, 1, W):
        raise ValueError(f"short_conv: weight must be [C, 1, W] = [{C}, 1, W], "
                         f"got {tuple(weight.shape)}")
    if state is not None and state.shape != (B, C, W - 1):
        raise ValueError(f"short_conv: state must be [B, C, W-1] = [{B}, {C}, {W - 1}], "
                         f"got {tuple(state.shape)}")
    y = torch.empty(B, T, C, dtype=x.dtype, device=x.device)
    bt = max(min(BT, triton.next_power_of_2(T)), triton.next_power_of_2(W))    # >= W-1 always
    bc = min(BC, triton.next_power_of_2(C))
    st = state if state is not None else x              # (not read without a state)
    s_st = state.stride() if state is not None else (0, 0, 0)
    grid = (max(1, triton.cdiv(T, bt)), triton.cdiv(C, bc), B)     # T = 0: just the state copy
    _short_conv_kernel[grid](x, weight, st, y, T, C, x.stride(0), x.stride(1), weight.stride(0),
                             weight.stride(2), *s_st, W=W, WP=triton.next_power_of_2(W),
                             HAS_STATE=state is not None, BT=bt, BC=bc, num_warps=WARPS)
    return y
