"""
One KDA decode step (T = 1) in one Triton kernel: everything kimi.KimiDeltaAttention.forward does
between the input projections and o_proj, for one new token per row.

kimi.py spends ~50 small torch kernels on this per layer and step (three short convs and their
state shift, SiLU, casts, two l2norms, the gate, beta, the recurrence, the gated RMSNorm); in a
CUDA graph each still costs a launch's microseconds, far more than its work. Here:
kda_decode_ref (plain torch, kimi.py's rounding points) and kda_decode (one launch, grid B*H),
with one signature:

    kda_decode[_ref](q, k, v, f_a, g_a, b, conv_state, conv_w, f_b_w, g_b_w, A_log, dt_bias,
                     o_norm_w, eps, S) -> o [B, P], the input of o_proj, in q's dtype
It equals, per row and head h (channels c = h*K .. h*K + K-1):
    1. q, k, v = silu(short conv over [conv_state, new]) in fp32, rounded to the model dtype;
       conv_state shifted in place to the last W-1 PRE-conv inputs    (kimi.ShortConv)
    2. q, k = l2norm(q.float()), l2norm(k.float()): eps 1e-6 on the sum of squares  (kda_ref.l2norm)
    3. g = -exp(A_log) softplus(f_b_proj(f_a) + dt_bias), f rounded as nn.Linear returns it
    4. beta = sigmoid(b.float())
    5. S *= exp(g); S += k (beta (v - S^T k))^T; o = S^T (q / sqrt(K)), rounded  (recurrent_kda)
    6. o = GatedRMSNorm(o, g_b_proj(g_a)): fp32, one final rounding      (kimi.GatedRMSNorm)
conv_state and S are updated in place, as the module updates its caches.

At small B the B*H programs leave most SMs idle, each moving its head's whole [K, V] state alone;
then `splits` programs share a head, each over V / splits state columns (q, k and the forget gate,
over K, computed by each). The gated norm needs all V of the head and q's and k's conv states may be
shifted only once every program has read them: the last program of a head to finish (a counter)
does both.

Glossary (48B sizes): B rows (one token each), H = 32 heads, K = V = 128 head dims, P = H*K = 4096,
W = 4 short-conv taps. Inputs: q, k, v [B, P]; f_a, g_a [B, K]; b [B, H] (column slices of one
fused projection: unit column stride, any row stride); conv_state [3, B, P, W-1] (q, k, v; oldest
first); conv_w = (wq, wk, wv) [P, 1, W] each; f_b_w, g_b_w [P, K]; A_log [H] values fp32;
dt_bias [P] fp32; o_norm_w [V]; S [B, H, K, V] fp32 contiguous.
"""
import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fast import round_to, sm_count, softplus
from kda_ref import kda_gate, l2norm, recurrent_kda

WARPS = 8           # the [128, 128] fp32 state tile over 256 threads: 64 registers each
SPLITS = 2          # at most this many programs a head (timed against 4: docs/kernels_h100.md)
SPLIT_WARPS = 4     # their warps: a [128, 64] tile
MV = 32             # input columns per step of the two low-rank matvecs (bounds their registers)
L2_EPS = tl.constexpr(1e-6)         # kda_ref.l2norm's eps (globals in @triton.jit: constexpr)


def kda_decode_ref(q, k, v, f_a, g_a, b, conv_state, conv_w, f_b_w, g_b_w, A_log, dt_bias,
                   o_norm_w, eps, S):
    """The step in plain torch, as kimi.KimiDeltaAttention.forward computes it for T = 1."""
    (B, P), H = q.shape, b.shape[1]
    K = P // H
    # 1. short convs: xs = [state, new] (tap W-1 newest), fp32 products, SiLU, one rounding
    xs = torch.cat([conv_state, torch.stack([q, k, v])[..., None]], dim=-1)     # [3, B, P, W]
    conv_state.copy_(xs[..., 1:])                       # keep the PRE-conv inputs (trap 7)
    w = torch.stack([wi.squeeze(1) for wi in conv_w]).float()                   # [3, P, W]
    y = F.silu((xs.float() * w[:, None]).sum(-1)).to(q.dtype)                   # [3, B, P]
    qc, kc, vc = (t.view(B, 1, H, K) for t in y)                                # [B, T=1, H, K]
    # 3. forget gate: f rounded to the model dtype by the Linear, then fp32 (trap 3)
    g = kda_gate(F.linear(f_a, f_b_w).view(B, 1, H, K), A_log, dt_bias)         # [B, 1, H, K]
    beta = b.float().sigmoid()[:, None]                 # 4. upcast before sigmoid  [B, 1, H]
    # 2. + 5. l2norm in fp32 (eps on the sum), the recurrence with the fp32 state
    o, S_new = recurrent_kda(l2norm(qc.float()), l2norm(kc.float()), vc, g, beta,
                             scale=K ** -0.5, initial_state=S, output_final_state=True)
    S.copy_(S_new)
    # 6. gated RMSNorm: o (rounded to the model dtype by the recurrence) in fp32, one last rounding
    gate = F.linear(g_a, g_b_w).view(B, H, K)                                   # [B, H, V]
    o32 = o[:, 0].float()                                                       # [B, H, V]
    o32 = o32 * torch.rsqrt(o32.square().mean(-1, keepdim=True) + eps)
    o32 = o32 * o_norm_w.float() * torch.sigmoid(gate.float())      # sigmoid, not SiLU (trap 8)
    return o32.to(q.dtype).view(B, P)


@triton.jit
def _conv(x, s_x, st, w, row, c, W: tl.constexpr, WP: tl.constexpr):
    """Short conv + SiLU of channels c of one row, its state st [P, W-1] (row's) read, not shifted.
    Returns the output rounded to the model dtype, as fp32."""
    cw = tl.arange(0, WP)[None, :]                      # taps, padded to a power of two [1, WP]
    new = tl.load(x + row * s_x + c)[:, None]                                   # [C, 1]
    old = tl.load(st + c[:, None] * (W - 1) + cw, mask=cw < W - 1, other=0.)    # [C, WP]
    xs = tl.where(cw == W - 1, new, old)                # [state..., new, 0...]
    wt = tl.load(w + c[:, None] * W + cw, mask=cw < W, other=0.)                # [C, WP]
    y = tl.sum(xs.to(tl.float32) * wt.to(tl.float32), axis=1)                  # [C] fp32
    return round_to(y * tl.sigmoid(y), x.dtype.element_ty)                # SiLU, one rounding


@triton.jit
def _shift(x, s_x, st, row, c, W: tl.constexpr, WP: tl.constexpr):
    """Channels c's conv state shifted in place: the oldest input out, the new PRE-conv one in."""
    cw = tl.arange(0, WP)[None, :]
    new = tl.load(x + row * s_x + c)[:, None]                                   # [C, 1]
    # column j <- column j + 1, re-read rather than moved across registers
    nxt = tl.load(st + c[:, None] * (W - 1) + cw + 1, mask=cw + 1 < W - 1, other=0.)
    nxt = tl.where(cw == W - 2, new, nxt)                                       # [C, WP]
    # Threads holding copies of one element load it independently; without this barrier a fast
    # warp could overwrite state that a slow warp has still to read.
    tl.debug_barrier()
    tl.store(st + c[:, None] * (W - 1) + cw, nxt, mask=cw < W - 1)


@triton.jit
def _lowrank(w, x, s_x, row, co, K: tl.constexpr, MV: tl.constexpr):
    """Outputs co of w [P, K] @ x[row] [K], fp32 sums rounded as nn.Linear rounds; fp32."""
    acc = tl.zeros(co.shape, dtype=tl.float32)
    for i0 in tl.static_range(0, K, MV):                # [C, MV] tiles: 16 registers a thread each
        ci = i0 + tl.arange(0, MV)
        xi = tl.load(x + row * s_x + ci).to(tl.float32)                         # [MV]
        wi = tl.load(w + co[:, None] * K + ci[None, :]).to(tl.float32)          # [C, MV]
        acc += tl.sum(wi * xi[None, :], axis=1)
    return round_to(acc, x.dtype.element_ty)


@triton.jit
def _gated_norm(oc, gate, o_norm_w, o, eps, K: tl.constexpr):
    """6. GatedRMSNorm of one head's V values oc, fp32, stored with one final rounding at o."""
    oc = oc * tl.rsqrt(tl.sum(oc * oc, axis=0) / K + eps)
    oc = oc * tl.load(o_norm_w + tl.arange(0, K)).to(tl.float32) * tl.sigmoid(gate)
    oc = round_to(oc, o.dtype.element_ty)                 # then the cast below is exact
    tl.store(o + tl.arange(0, K), oc.to(o.dtype.element_ty))


@triton.jit
def _kda_decode_kernel(
        # pointers
        q, k, v, f_a, g_a, b, conv, wq, wk, wv, f_b_w, g_b_w, A_log, dt_bias, o_norm_w, S, o,
        gates, done,
        # sizes, strides
        H, scale, eps, s_qkv, s_a, s_b, s_c0, s_c1,
        # meta
        K: tl.constexpr, W: tl.constexpr, WP: tl.constexpr, MV: tl.constexpr,
        SPLITS: tl.constexpr):
    """Program (row * H + head, j): the step for that head, state columns j*BV .. j*BV + BV-1."""
    bh = tl.program_id(0).to(tl.int64)                  # int64: B*H*K*K offsets grow past 2^31
    row, h = bh // H, bh % H
    BV: tl.constexpr = K // SPLITS
    ck = tl.arange(0, K)                                # channel within the head (S's rows)
    cv = tl.program_id(1) * BV + tl.arange(0, BV)       # this program's V columns
    c = h * K + ck                                      # channels within P
    # 3. and 6. the two low-rank products first, before S takes its registers
    f = _lowrank(f_b_w, f_a, s_a, row, c, K, MV)                                 # [K]
    gate = _lowrank(g_b_w, g_a, s_a, row, h * K + cv, K, MV)                     # [BV]
    # 1. convs; state rows at conv + i*s_c0 + row*s_c1 + c*(W-1) + tap, for i = q, k, v
    st = conv + row * s_c1
    qc = _conv(q, s_qkv, st, wq, row, c, W, WP)
    kc = _conv(k, s_qkv, st + s_c0, wk, row, c, W, WP)
    vc = _conv(v, s_qkv, st + 2 * s_c0, wv, row, h * K + cv, W, WP)
    _shift(v, s_qkv, st + 2 * s_c0, row, h * K + cv, W, WP)     # v's channels: this program's
    # 2. l2norm, eps on the sum of squares (an rms eps would be K times too small: trap 6)
    qc = qc * tl.rsqrt(tl.sum(qc * qc, axis=0) + L2_EPS) * scale     # and q's 1/sqrt(K)
    kc = kc * tl.rsqrt(tl.sum(kc * kc, axis=0) + L2_EPS)
    # 3. g = -exp(A_log) softplus(z), torch's softplus (fast.softplus)
    z = f + tl.load(dt_bias + c).to(tl.float32)
    g = -tl.exp(tl.load(A_log + h).to(tl.float32)) * softplus(z)               # [K], <= 0
    beta = tl.sigmoid(tl.load(b + row * s_b + h).to(tl.float32))              # 4.
    # 5. the recurrence on the [K, BV] fp32 tile, read once and written once. exp(g): g <= 0, so no
    # overflow; g = -inf (a huge gate) gives 0, a full reset, as torch does
    # an int64 base plus int32 offsets within the head: int64 [K, V] addresses would hold 128
    # more registers a thread until the store
    S += bh * K * K
    state = ck[:, None] * K + cv[None, :]                                       # [K, BV] int32
    s = tl.load(S + state) * tl.exp(g)[:, None]
    delta = beta * (vc - tl.sum(kc[:, None] * s, axis=0))                      # [BV]
    s += kc[:, None] * delta[None, :]
    tl.store(S + state, s)
    oc = tl.sum(qc[:, None] * s, axis=0)                                        # [BV]
    oc = round_to(oc, v.dtype.element_ty)                # the recurrence returns o in v's dtype
    o += row * H * K + h * K                            # this head's outputs [V]
    if SPLITS == 1:
        _shift(q, s_qkv, st, row, c, W, WP)
        _shift(k, s_qkv, st + s_c0, row, c, W, WP)
        _gated_norm(oc, gate, o_norm_w, o, eps, K)
    else:
        # leave this program's part (exact in these dtypes: both are rounded to them) ...
        tl.store(o + cv, oc.to(o.dtype.element_ty))
        tl.store(gates + row * H * K + h * K + cv, gate.to(gates.dtype.element_ty))
        tl.debug_barrier()          # every warp's loads of the conv states and stores above done
        # ... and count it: release (the part, the reads) and acquire (the others' parts)
        if tl.atomic_add(done + bh, 1, sem="acq_rel") == SPLITS - 1:    # the head's last program
            tl.store(done + bh, 0)                      # ready for the next step
            _shift(q, s_qkv, st, row, c, W, WP)
            _shift(k, s_qkv, st + s_c0, row, c, W, WP)
            # .cg: from L2, where the other programs' stores are, past this SM's L1
            o_all = tl.load(o + ck, cache_modifier=".cg").to(tl.float32)             # [V]
            gate_all = tl.load(gates + row * H * K + c, cache_modifier=".cg").to(tl.float32)
            _gated_norm(o_all, gate_all, o_norm_w, o, eps, K)


@functools.cache
def counters(device):
    """int32, one per head of a launch that splits: how many of its programs have finished, 0
    between launches. Made once per device and kept: a CUDA graph holds its address (splitting
    needs B*H*2 <= SMs, so SMs of them are enough)."""
    return torch.zeros(sm_count(device), dtype=torch.int32, device=device)


def num_splits(B, H, device):
    """Programs a head: doubled up to SPLITS while B*H*splits still fits the SMs."""
    n = 1
    while n < SPLITS and 2 * n * B * H <= sm_count(device):
        n *= 2
    return n


def kda_decode(q, k, v, f_a, g_a, b, conv_state, conv_w, f_b_w, g_b_w, A_log, dt_bias,
               o_norm_w, eps, S, splits=None):
    """= kda_decode_ref, in one launch (grid B*H x splits; None: num_splits). Graph safe: no sync,
    sizes from shapes only; the counters are zero again when the kernel ends."""
    (B, P), H, W = q.shape, b.shape[1], conv_w[0].shape[-1]
    K = P // H
    splits = splits or num_splits(B, H, q.device)
    assert K * H == P and K & (K - 1) == 0, f"K = {K}: a power of two (tl.arange's sizes)"
    assert splits & (splits - 1) == 0 and K // splits >= 1, f"splits = {splits}: 2^n <= K"
    assert k.stride() == v.stride() == q.stride() and q.stride(1) == 1, "q, k, v: one layout"
    assert f_a.stride() == g_a.stride() and f_a.stride(1) == 1 and b.stride(1) == 1
    assert conv_state.shape == (3, B, P, W - 1) and conv_state.stride()[2:] == (W - 1, 1)
    assert S.is_contiguous() and S.dtype == torch.float32 and S.shape == (B, H, K, K)
    assert all(w.is_contiguous() for w in (*conv_w, f_b_w, g_b_w, A_log, dt_bias, o_norm_w))
    o = q.new_empty(B, P)
    done = counters(q.device)
    if splits > 1 and B * H > len(done):
        raise ValueError(f"kda_decode: {splits} programs a head need B*H <= {len(done)}, not "
                         f"{B * H}")
    gates = g_a.new_empty(B, P) if splits > 1 else o                # the head's gate, in parts
    _kda_decode_kernel[(B * H, splits)](
        q, k, v, f_a, g_a, b, conv_state, *conv_w, f_b_w, g_b_w, A_log, dt_bias, o_norm_w, S, o,
        gates, done,
        H, K ** -0.5, eps, q.stride(0), f_a.stride(0), b.stride(0), conv_state.stride(0),
        conv_state.stride(1), K=K, W=W, WP=triton.next_power_of_2(W), MV=min(MV, K),
        SPLITS=splits, num_warps=WARPS if splits == 1 else SPLIT_WARPS)
    return o


def random_step(B, H, K, W, dtype, device, Bmax=None, seed=0):
    """Random inputs laid out as the model's: q..b column slices of one fused projection output,
    conv_state a [:, :B] view of a larger cache. Returns kda_decode's arguments as a tuple."""
    gen = torch.Generator(device).manual_seed(seed)
    P = H * K

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)
    proj = rand(B, 3 * P + 2 * K + H)
    q, k, v, f_a, g_a, b = proj.split([P, P, P, K, K, H], dim=1)
    conv_state = rand(3, Bmax or B + 1, P, W - 1)[:, :B]
    conv_w = tuple(rand(P, 1, W, scale=W ** -0.5) for _ in range(3))
    f_b_w, g_b_w = rand(P, K, scale=K ** -0.5), rand(P, K, scale=K ** -0.5)
    A_log = torch.empty(H, device=device).uniform_(1, 16, generator=gen).log()
    dt_bias = torch.randn(P, generator=gen, device=device) - 4     # softplus ~ 0.02, as trained
    o_norm_w = rand(K, scale=0.1) + 1
    S = torch.randn(B, H, K, K, generator=gen, device=device) * 0.1
    return q, k, v, f_a, g_a, b, conv_state, conv_w, f_b_w, g_b_w, A_log, dt_bias, o_norm_w, 1e-5, S
