"""
The MoE of a decode step (N <= 16 tokens) in 5 Triton launches, each selected expert's weights
(bf16, or e4m3 + scales) read once per step. Beside kimi.py:
route = MoEGate.forward after its F.linear; experts = SparseMoeBlock.run_experts + forward's fp32
weighted sum (as fast.moe.grouped_experts and fast.fp8.fp8_experts, which take ~35 torch kernels
and one-row GEMMs).
  _logits_kernel     (E / BE, S)   the router's logits x @ gate.weight^T, split over D in S
                                   slices, one fp32 partial sum per slice (a cuBLAS GEMV gets
                                   too few blocks for 1.2 MB of weights)
  _route_kernel      (N,)          the slices' sum in order, sigmoid, + bias, k rounds of max /
                                   argmax, the weights; and the shared expert's slot (its id, its
                                   weight) after the k routed (kimi.MoEGate's on a GPU, any N)
  _gate_up_kernel    (P, F / BN)   h = silu(x @ w1^T) * (x @ w3^T), one expert per program
  _down_kernel       (P, D / BN)   out = h @ w2^T, one expert per program
  _slot_sum_kernel   (N, D / BN)   y = sum_j w[n, j] out[n, j], j in order (the decode step
                                   leaves this sum to the next add + RMSNorm: experts(parts=True))
No sort: a token picks an expert at most once (distinct top-k ids; the shared expert is row E),
so expert e's group is the tokens whose row of ids holds e, one tile row per token (BM = 16 >= N,
tl.dot's minimum). The program of e's first (token, slot) pair reads e's weights once for them
all; the programs of e's other pairs return at once.
Two ways to lay a product on tl.dot (SWAP): tokens as the rows and weights as the columns, or
weights as the rows of a [BN, BK] tile and the 16 token slots as the columns (SWAP). On Hopper the
second runs as the asynchronous warpgroup MMA (wgmma: 64 rows or more), which reads a bf16 weight
tile from shared memory itself, where the first issues a shared-memory load per MMA.
Each pair's w2 product is written apart and _slot_sum_kernel adds them in a fixed order (no
atomics), so a replay gives the same bits.
Shapes: N tokens, E experts (E' = E + 1 with the shared one stacked), k experts per token
(k' = k + 1 with the shared one), D hidden, F expert width, P = N * k' (token, slot) pairs.
"""
import itertools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fast import dot_args, operand, round_to

MAX_TOKENS = 16                         # BM: tokens per tile (tl.dot's minimum dimension)
# Each kernel's form: weights as tl.dot's rows (True: wgmma on Hopper) or as its columns. Chosen by
# the GPU A/B of docs/kernels_h100.md: w13 as the columns (an e4m3 tile comes back from shared
# memory 8 bytes a load; as wgmma's register operand, 2 bytes), w2 as the rows.
SWAP = dict(gate_up=False, down=True)
# Fixed tiles (autotune breaks the interpreter). UP won a timed sweep over BN, BK, warps and stages
# at N = 1 on an H200, bf16 and FP8 experts, in the row form; DOWN is the tile that won it for an
# earlier w2 step (one program summing every slot); a sweep of the SWAP tiles on an H100 kept them
# (docs/kernels_h100.md, "Tried and left out"). fp32 x (twice the bytes a stage) gets 2 stages: 4
# need more shared memory than a Hopper GPU's block has. SWAP's gate_up tile is [2 BN, BK]: BN rows
# of w1 over the same rows of w3, 64 rows for wgmma; 3 stages (60 KB) let 3 programs share an SM,
# so N = 1's 288 fit at once.
UP = dict(BN=32, BK=128, num_warps=4, num_stages=3)
UP_SWAP = dict(BN=32, BK=128, num_warps=4, num_stages=3)
DOWN = dict(BN=32, BK=256, num_warps=4, num_stages=4)
DOWN_SWAP = dict(BN=64, BK=128, num_warps=4, num_stages=3)
SLOT_SUM = 256                          # _slot_sum_kernel's BN
# the router: E / BE x SLICES programs (256 experts: 16 x 8 = 128 for 132 SMs), each reading
# BE rows of D / SLICES weights; the route kernel's reductions stay within one warp
LOGITS = dict(BE=16, SLICES=8, BK=64, num_warps=4)
ROUTE_WARPS = 1


# -------------------------------------------------------------------------------------------------
# Routing

def route_ref(logits, bias, k, renormalize, scaling, biased, shared=None):
    """= kimi.MoEGate.forward from its logits [N, E] fp32: (ids [N, k] int64, w [N, k] fp32).
    ids by descending biased score, as route (whose ties go to the lowest id; topk's: free).
    shared = (id, weight): one more slot, the shared expert's, after the k routed ones."""
    s = torch.sigmoid(logits.float())
    scores = s + bias.float()                                       # [N, E] chooses the experts
    ids = scores.topk(k, dim=-1).indices                            # [N, k]
    w = (scores if biased else s).gather(-1, ids)                   # [N, k]
    if renormalize and k > 1:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    w = w * scaling
    if shared is not None:
        ids = torch.cat([ids, torch.full_like(ids[:, :1], shared[0])], dim=1)     # [N, k + 1]
        w = torch.cat([w, torch.full_like(w[:, :1], shared[1])], dim=1)
    return ids, w


@triton.jit
def _logits_kernel(x_ptr, w_ptr, out_ptr, N, E, D, SLICE, DOT: tl.constexpr, PREC: tl.constexpr,
                   BM: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr):
    """out[s, n, e] = sum_{d in slice s} x[n, d] w[e, d] in fp32: BE experts e per program along
    axis 0, slice s (inputs s*SLICE..) along axis 1; the gate's rows as tl.dot's rows, tokens as
    its columns."""
    e = tl.program_id(0) * BE + tl.arange(0, BE)
    s = tl.program_id(1)
    t = tl.arange(0, BM)
    end = tl.minimum(s * SLICE + SLICE, D)                          # one past the slice's inputs
    acc = tl.zeros((BE, BM), tl.float32)
    for k0 in range(s * SLICE, end, BK):
        k = k0 + tl.arange(0, BK)
        w = tl.load(w_ptr + e[:, None].to(tl.int64) * D + k[None, :],
                    mask=(e[:, None] < E) & (k[None, :] < end), other=0.0)      # [BE, BK]
        xT = tl.load(x_ptr + t[None, :] * D + k[:, None],
                     mask=(t[None, :] < N) & (k[:, None] < end), other=0.0)     # [BK, BM]
        acc = tl.dot(w.to(DOT), xT.to(DOT), acc, input_precision=PREC)
    tl.store(out_ptr + (s * N + t[None, :]) * E + e[:, None], acc,
             mask=(t[None, :] < N) & (e[:, None] < E))


def router_logits(x, weight, slices=LOGITS["SLICES"]):
    """= F.linear(x.float(), weight.float()) as partial sums: x [N <= 16, D], weight [E, D] ->
    [S, N, E] fp32 (S = slices), slice s the products of inputs s*ceil(D/S).. (route adds them
    in order)."""
    (N, D), E = x.shape, weight.shape[0]
    if N > MAX_TOKENS:
        raise ValueError(f"router_logits: {N} tokens, the decode kernels take at most {MAX_TOKENS}")
    S = slices
    parts = x.new_empty(S, N, E, dtype=torch.float32)
    _logits_kernel[(triton.cdiv(E, LOGITS["BE"]), S)](
        x.contiguous(), weight, parts, N, E, D, triton.cdiv(D, S), **dot_args(x.dtype),
        BM=MAX_TOKENS, BE=LOGITS["BE"], BK=LOGITS["BK"], num_warps=LOGITS["num_warps"])
    return parts


@triton.jit
def _route_kernel(logits_ptr, bias_ptr, ids_ptr, w_ptr, N, E, PARTS, scaling, shared_id,
                  shared_w, K: tl.constexpr, KP: tl.constexpr, BE: tl.constexpr,
                  BK: tl.constexpr, RENORMALIZE: tl.constexpr, BIASED: tl.constexpr):
    """= route_ref for one token per program on the sum of the PARTS partial logits (in order: the
    same bits every run): k rounds of (max, lowest index reaching it), then (KP = K + 1) the
    shared slot, so that no torch.cat follows."""
    n = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BE)
    logits = tl.zeros((BE,), tl.float32)
    for p in range(PARTS):
        logits += tl.load(logits_ptr + (p * N + n) * E + e, mask=e < E, other=0.0)
    s = tl.sigmoid(logits)                                          # [BE]
    biased = s + tl.load(bias_ptr + e, mask=e < E, other=0.0).to(tl.float32)
    mix = biased if BIASED else s
    score = tl.where(e < E, biased, float("-inf"))                  # padding lanes never win
    r = tl.arange(0, BK)
    ids, w = tl.zeros((BK,), tl.int32), tl.zeros((BK,), tl.float32)
    for i in tl.static_range(K):
        best = tl.max(score, axis=0)
        # lowest index on ties; a NaN score matches nothing: clamp so no later read leaves E
        j = tl.minimum(tl.min(tl.where(score == best, e, BE), axis=0), E - 1)
        ids = tl.where(r == i, j, ids)
        w = tl.where(r == i, tl.sum(tl.where(e == j, mix, 0.0), axis=0), w)
        score = tl.where(e == j, float("-inf"), score)              # taken: out of later rounds
    if RENORMALIZE:
        w = w / (tl.sum(w, axis=0) + 1e-20)                         # lanes r >= K hold 0
    w = w * scaling
    if KP > K:                                                      # the shared expert's slot
        ids = tl.where(r == K, shared_id, ids)
        w = tl.where(r == K, shared_w, w)
    tl.store(ids_ptr + n * KP + r, ids.to(tl.int64), mask=r < KP)
    tl.store(w_ptr + n * KP + r, w, mask=r < KP)


def route(logits, bias, k, renormalize, scaling, biased, shared=None):
    """= route_ref in one launch: logits [N, E] fp32, or router_logits' [S, N, E] partial sums
    (route_ref of their in-order sum), bias [E] -> (ids [N, k'] int64, w fp32)."""
    parts = logits.float().contiguous().view(-1, *logits.shape[-2:])       # [S, N, E]
    S, N, E = parts.shape
    KP = k + (shared is not None)
    shared_id, shared_w = shared if shared is not None else (0, 0.0)
    ids = logits.new_empty(N, KP, dtype=torch.int64)
    w = logits.new_empty(N, KP, dtype=torch.float32)
    _route_kernel[(N,)](parts, bias, ids, w, N, E, S, float(scaling), int(shared_id),
                        float(shared_w), K=k, KP=KP, BE=triton.next_power_of_2(E),
                        BK=triton.next_power_of_2(KP), RENORMALIZE=renormalize and k > 1,
                        BIASED=biased, num_warps=ROUTE_WARPS)
    return ids, w


# -------------------------------------------------------------------------------------------------
# Experts

def experts_ref(x, ids, w, w13, w2, s13=None, s2=None):
    """= run_experts + the fp32 weighted sum: x [N, D], ids, w [N, k'] -> y [N, D] in x's dtype.
    w13 [E', 2F, D], w2 [E', D, F]: x's dtype, or e4m3 with fp32 scales s13 [E', 2F, 1],
    s2 [E', D, 1]. Products in fp32, rounded to x's dtype where kimi.Expert in bf16 rounds."""
    dt, y = x.dtype, torch.zeros(x.shape, dtype=torch.float32, device=x.device)      # [N, D]
    for n, j in itertools.product(*map(range, ids.shape)):          # each (token, slot) pair
        e = ids[n, j]
        W13 = w13[e].float() * (1.0 if s13 is None else s13[e])    # [2F, D], exact (powers of 2)
        W2 = w2[e].float() * (1.0 if s2 is None else s2[e])         # [D, F]
        gate, up = (W13 @ x[n].float()).to(dt).chunk(2)             # [F] each, rounded
        h = F.silu(gate) * up                                       # two roundings, as in bf16
        y[n] += w[n, j] * (W2 @ h.float()).to(dt).float()           # out rounded, then fp32 sum
    return y.to(dt)


@triton.jit
def _group(ids_ptr, p, N, KP, BM: tl.constexpr, BJ: tl.constexpr):
    """Pair p's expert e = ids[p]; whether p is e's first pair (the leader, who does the work);
    per token t: whether t chose e (member [BM]) and in which slot (slot [BM])."""
    t, j = tl.arange(0, BM)[:, None], tl.arange(0, BJ)[None, :]
    chosen = tl.load(ids_ptr + t * KP + j, mask=(t < N) & (j < KP), other=-1)     # [BM, BJ]
    e = tl.load(ids_ptr + p)
    hit = chosen == e
    leader = tl.sum((hit & (t * KP + j < p)).to(tl.int32)) == 0
    member = tl.max(hit.to(tl.int32), axis=1) > 0
    slot = tl.max(tl.where(hit, j, 0), axis=1)                      # max: in range, whatever ids
    return e.to(tl.int64), leader, member, slot


@triton.jit
def _gate_up_kernel(x_ptr, ids_ptr, w13_ptr, s13_ptr, h_ptr, N, KP, D, F, SCALED: tl.constexpr,
                    SWAP: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
                    BM: tl.constexpr, BJ: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """h[t*k' + slot, f] = silu(gate) * up for expert ids[p]'s tokens t, outputs f of block 1."""
    e, leader, member, slot = _group(ids_ptr, tl.program_id(0), N, KP, BM, BJ)
    if leader:
        t = tl.arange(0, BM)
        f = tl.program_id(1) * BN + tl.arange(0, BN)
        w13 = w13_ptr + e * 2 * F * D
        if SWAP:    # one [2 BN, BK] tile: rows f of w1 (gate) over rows f of w3 (up, F rows on)
            r = tl.arange(0, 2 * BN)
            fr = tl.program_id(1) * BN + r % BN                     # [2 BN] output of each row
            rows = w13 + ((r // BN) * F + fr)[:, None].to(tl.int64) * D
            acc = tl.zeros((2 * BN, BM), tl.float32)
            for k0 in range(0, D, BK):
                k = k0 + tl.arange(0, BK)
                xT = tl.load(x_ptr + t[None, :] * D + k[:, None], other=0.0,
                             mask=member[None, :] & (k[:, None] < D))  # [BK, BM]: e's tokens
                w = tl.load(rows + k[None, :], mask=(fr[:, None] < F) & (k[None, :] < D),
                            other=0.0)                              # [2 BN, BK]
                acc = tl.dot(operand(w, DOT), xT.to(DOT), acc, input_precision=PREC)
            # [2, BN, BM] -> [BM, BN, 2] -> gate, up [BM, BN]: the row form's layout from here
            gate, up = tl.split(tl.permute(tl.reshape(acc, (2, BN, BM)), (2, 1, 0)))
        else:
            w1 = w13 + f[None, :].to(tl.int64) * D                  # [1, BN] rows of w1 (gate)
            gate, up = tl.zeros((BM, BN), tl.float32), tl.zeros((BM, BN), tl.float32)
            for k0 in range(0, D, BK):
                k = k0 + tl.arange(0, BK)
                x = tl.load(x_ptr + t[:, None] * D + k[None, :], other=0.0,
                            mask=member[:, None] & (k[None, :] < D)).to(DOT)    # [BM, BK]
                mask = (k[:, None] < D) & (f[None, :] < F)
                w1_t = tl.load(w1 + k[:, None], mask=mask, other=0.0)           # [BK, BN]
                w3_t = tl.load(w1 + F * D + k[:, None], mask=mask, other=0.0)   # w3 (up)
                gate += tl.dot(x, operand(w1_t, DOT), input_precision=PREC)
                up += tl.dot(x, operand(w3_t, DOT), input_precision=PREC)
        if SCALED:                                                  # powers of two: exact
            gate *= tl.load(s13_ptr + e * 2 * F + f, mask=f < F, other=0.0)[None, :]
            up *= tl.load(s13_ptr + e * 2 * F + F + f, mask=f < F, other=0.0)[None, :]
        dt: tl.constexpr = h_ptr.dtype.element_ty
        gate = round_to(gate, dt)                               # kimi's w1(x), w3(x) in bf16
        up = round_to(up, dt)
        silu = round_to(gate / (1.0 + tl.exp(-gate)), dt)       # torch's silu formula
        h = round_to(silu * up, dt)
        tl.store(h_ptr + (t * KP + slot)[:, None] * F + f[None, :], h.to(dt),
                 mask=member[:, None] & (f[None, :] < F))


@triton.jit
def _down_kernel(h_ptr, ids_ptr, w2_ptr, s2_ptr, out_ptr, N, KP, D, F, SCALED: tl.constexpr,
                 SWAP: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr,
                 BJ: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """out[t*k' + slot, d] = h @ w2^T for pair program 0's expert, outputs d of block 1."""
    e, leader, member, slot = _group(ids_ptr, tl.program_id(0), N, KP, BM, BJ)
    if leader:
        t = tl.arange(0, BM)
        d = tl.program_id(1) * BN + tl.arange(0, BN)
        dt: tl.constexpr = out_ptr.dtype.element_ty
        rows = (t * KP + slot)[:, None]                             # [BM, 1] pairs = rows of h
        w2 = w2_ptr + e * D * F + d[None, :].to(tl.int64) * F       # [1, BN] rows of w2
        if SWAP:                                                    # w2 rows as tl.dot's rows
            acc = tl.zeros((BN, BM), tl.float32)
            for k0 in range(0, F, BK):
                k = k0 + tl.arange(0, BK)
                hT = tl.load(h_ptr + rows.T * F + k[:, None], other=0.0,
                             mask=member[None, :] & (k[:, None] < F))       # [BK, BM]
                w2_t = tl.load(w2.T + k[None, :], mask=(d[:, None] < D) & (k[None, :] < F),
                               other=0.0)                           # [BN, BK]
                acc = tl.dot(operand(w2_t, DOT), hT.to(DOT), acc, input_precision=PREC)
            acc = tl.trans(acc)                                     # [BM, BN]
        else:
            acc = tl.zeros((BM, BN), tl.float32)
            for k0 in range(0, F, BK):
                k = k0 + tl.arange(0, BK)
                h = tl.load(h_ptr + rows * F + k[None, :], other=0.0,
                            mask=member[:, None] & (k[None, :] < F))        # [BM, BK]
                w2_t = tl.load(w2 + k[:, None], mask=(k[:, None] < F) & (d[None, :] < D),
                               other=0.0)                           # [BK, BN]
                acc += tl.dot(h.to(DOT), operand(w2_t, DOT), input_precision=PREC)
        if SCALED:
            acc *= tl.load(s2_ptr + e * D + d, mask=d < D, other=0.0)[None, :]
        out = round_to(acc, dt)                                     # kimi's w2(h) in bf16
        tl.store(out_ptr + rows * D + d[None, :], out.to(dt),
                 mask=member[:, None] & (d[None, :] < D))


@triton.jit
def _slot_sum_kernel(out_ptr, wts_ptr, y_ptr, KP, D, BN: tl.constexpr):
    """y[n, d] = sum_j w[n, j] out[n*k' + j, d] in fp32, j in order: the same sum every run (float
    atomics would add in arrival order, and greedy decoding could change from run to run)."""
    n, d = tl.program_id(0).to(tl.int64), tl.program_id(1) * BN + tl.arange(0, BN)
    dt: tl.constexpr = y_ptr.dtype.element_ty
    y = tl.zeros((BN,), tl.float32)
    for j in range(KP):
        out = tl.load(out_ptr + (n * KP + j) * D + d, mask=d < D, other=0.0).to(tl.float32)
        y += tl.load(wts_ptr + n * KP + j) * out
    tl.store(y_ptr + n * D + d, round_to(y, dt).to(dt), mask=d < D)


def _fit(tiles, x):
    """The tiles for x's dtype: fp32 x gets 2 stages (see UP)."""
    return dict(tiles, num_stages=2) if x.dtype == torch.float32 else tiles


def experts(x, ids, w, w13, w2, s13=None, s2=None, parts=False):
    """= experts_ref (x [N <= 16, D], ids [N, k'] distinct per row, w [N, k'] fp32) in 3 launches.
    Each selected expert's weights are read once; the sums are deterministic. parts: 2 launches,
    returning (out [N, k', D], w [N, k'] fp32) for the consumer to sum (fast.decode.add_rmsnorm)."""
    (N, D), KP, Fw = x.shape, ids.shape[1], w2.shape[-1]
    if N > MAX_TOKENS:
        raise ValueError(f"experts: {N} tokens, the decode kernels take at most {MAX_TOKENS}")
    x, ids, w, scaled = x.contiguous(), ids.contiguous(), w.float().contiguous(), s13 is not None
    meta = dict(SCALED=scaled, **dot_args(x.dtype), BM=MAX_TOKENS, BJ=triton.next_power_of_2(KP))
    up = UP_SWAP if SWAP["gate_up"] else UP
    down = DOWN_SWAP if SWAP["down"] else DOWN
    h = x.new_empty(N * KP, Fw)                                     # [P, F]
    _gate_up_kernel[(N * KP, triton.cdiv(Fw, up["BN"]))](
        x, ids, w13, s13 if scaled else w13, h, N, KP, D, Fw, SWAP=SWAP["gate_up"], **meta,
        **_fit(up, x))
    out = x.new_empty(N * KP, D)                                    # [P, D], each pair's w2(h)
    _down_kernel[(N * KP, triton.cdiv(D, down["BN"]))](
        h, ids, w2, s2 if scaled else w2, out, N, KP, D, Fw, SWAP=SWAP["down"], **meta,
        **_fit(down, x))
    if parts:
        return out.view(N, KP, D), w
    y = x.new_empty(N, D)
    _slot_sum_kernel[(N, triton.cdiv(D, SLOT_SUM))](out, w, y, KP, D, SLOT_SUM)
    return y
