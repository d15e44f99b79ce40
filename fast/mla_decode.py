"""
Flash-decoding (split-K) latent attention for MLA decode, in two Triton launches per call.
It equals kimi.latent_attention, the middle of MLAAttention.attend_absorbed: from the query
rows [q_lat | q_pe] to o_lat, before W_uv. Every head's query is one row of a single attention
over the cached latents, so one program holds all H rows of its batch row and reads each cache
tile once. absorbed_attention adds attend_absorbed's two per-head products on either side
(_heads_matmul_kernel: q_lat = q_nope W_uk, o = o_lat W_uv^T), the whole of it in four launches;
write_latent writes the step's cache entry [RMSNorm(c) | k_pe] in one.

  kernel 1, _mla_split_kernel, grid (B, NUM_SPLITS): row b's visible keys [pad[b], pos] are cut
    into NUM_SPLITS ranges of whole tiles; a program walks its range BL keys at a time:
    s = q_lat c^T + q_pe k_pe^T, online softmax (running max m, sum l, fp32, in log2 units),
    acc += p c; it writes its partial (m, l, acc). Ranges after pos are empty: no loop, no acc.
  kernel 2, _mla_combine_kernel, grid (B, H, R / BLOCK_R): o = sum_s 2^(m_s - M) acc_s /
    sum_s 2^(m_s - M) l_s with M = max_s m_s, skipping empty splits (m = -inf, l = 0).

NUM_SPLITS (num_splits) is fixed on the host from L (the buffer length Lmax for a tensor pos, so
one CUDA graph serves every step); the split length is computed in the kernel from pos, so all
splits share the work whatever pos is, and the cost follows pos, not Lmax.
Shapes: B batch, H heads, R latent rank (kv_lora_rank: 512, tiny 32), PE shared key dims (64,
tiny 8), L cache length, S = NUM_SPLITS. q [B, H, R + PE]; kv_cache [B, L, R + PE] (= [c | k_pe]
per position); pad [B] int64; o_lat [B, H, R].
"""
import torch
import triton
import triton.language as tl

from fast import INTERPRET, dot_args, rms_norm_row, round_to, sm_count

LOG2E = 1.4426950408889634          # exp(x) = 2^(x log2 e): folded into the scale once
# The split kernel's configuration, fixed (autotune breaks the interpreter): the fastest of the few
# that `python -m tools.kernels mla_decode` times at 4K to 1M keys (its MLA_CONFIGS; the H100 run
# is in docs/kernels_h100.md). BL keys per step (BL = 64: 72 KB a tile, fp32 takes 16: 64 would
# spill); HEADS: the H query rows padded to at least this many (16: tl.dot's minimum; 64 runs both
# products as Hopper's warpgroup MMA, asynchronous and reading shared memory itself, for twice the
# multiply-adds at H = 32); stages: tiles in flight + 1. At H = 32 one program fills an SM's
# registers, so a program per SM (WAVES = 1). The interpreter takes small tiles so that its tests
# cross many tiles and splits.
SPLIT = dict(BL=16 if INTERPRET else 64, HEADS=16, num_warps=8, num_stages=3)
# fewest keys per split: a partial costs 8 H R bytes, but a short context cut in few splits leaves
# SMs idle (at 4K keys and B = 1, 36 splits of 128 beat 18 of 256: docs/kernels_h100.md)
MIN_SPLIT = 32 if INTERPRET else 128
WAVES = 1                               # B * NUM_SPLITS ~ WAVES * SMs: one program per SM
BLOCK_S, BLOCK_R = 16, 64               # combine: splits per step, latent columns per program
HEADS_BK, HEADS_BN = 128, 32            # heads_matmul's tile: H = 32 heads' W_uk in 512 programs,
#                                         W_uv in 128; a head's rows in one [16, BK] tile


def num_splits(L, B, device):
    """NUM_SPLITS = max(1, min(ceil(L / MIN_SPLIT), ceil(WAVES * SMs / B))): a program per SM
    when L is large, no split under MIN_SPLIT keys when it is short (SMs: 132 off the GPU)."""
    return max(1, min(triton.cdiv(L, MIN_SPLIT), triton.cdiv(WAVES * sm_count(device), B)))


@triton.jit(do_not_specialize=["pos", "L", "S"])   # pos, L == 1: no recompiles
def _mla_split_kernel(
        # pointers
        q_lat_ptr, q_pe_ptr, cache, pos, pad, m_part, l_part, acc_part,
        # sizes, strides (the last dims of the queries and cache are contiguous)
        L, S, scale_log2, stride_qb, stride_qh, stride_pb, stride_ph, stride_cb, stride_cl,
        # meta
        H: tl.constexpr, R: tl.constexpr, PE: tl.constexpr, HP: tl.constexpr, RP: tl.constexpr,
        PEP: tl.constexpr, BL: tl.constexpr, MIN_SPLIT: tl.constexpr, POS_TENSOR: tl.constexpr,
        HAS_PAD: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    b = tl.program_id(0)
    split = tl.program_id(1)
    if POS_TENSOR:                                      # a CUDA graph's step: read it on device
        end = tl.load(pos) + 1
    else:
        end = pos + 1
    end = tl.minimum(end, L)                            # never read past the buffer
    first = 0
    if HAS_PAD:
        first = tl.load(pad + b)
    # Row b's visible keys [first, end) in S ranges of whole tiles, at least MIN_SPLIT keys each:
    # a short context fills a few splits, the rest find lo >= hi and skip the loop.
    chunk = tl.maximum(tl.cdiv(tl.cdiv(end - first, S), BL) * BL, MIN_SPLIT)
    lo = first + split * chunk
    hi = tl.minimum(lo + chunk, end)
    h = tl.arange(0, HP)                                # heads padded (SPLIT's HEADS); the
    #                                                     padding rows' q = 0: finite, never stored
    r = tl.arange(0, RP)
    e = tl.arange(0, PEP)                               # PE = 8 padded to 16 likewise
    q_lat = tl.load(q_lat_ptr + b.to(tl.int64) * stride_qb + h[:, None] * stride_qh + r[None, :],
                    mask=(h[:, None] < H) & (r[None, :] < R), other=0.)
    q_pe = tl.load(q_pe_ptr + b.to(tl.int64) * stride_pb + h[:, None] * stride_ph + e[None, :],
                   mask=(h[:, None] < H) & (e[None, :] < PE), other=0.)
    # DOT: bf16 operands on a GPU; fp32 in the interpreter, whose bf16 tl.dot is silently wrong
    q_lat, q_pe = q_lat.to(DOT), q_pe.to(DOT)          # [HP, RP], [HP, PEP]; padded rows are 0
    m = tl.full([HP], float("-inf"), tl.float32)        # running max of s (log2 units)
    l = tl.zeros([HP], tl.float32)                      # running sum of 2^(s - m)
    acc = tl.zeros([HP, RP], tl.float32)                # running sum of 2^(s - m) c
    row = cache + b.to(tl.int64) * stride_cb            # int64: B Lmax 576 passes 2^31
    for start in range(lo, hi, BL):
        j = start + tl.arange(0, BL)                    # key positions, j >= first always
        keep = j < hi
        ptr = row + j[:, None].to(tl.int64) * stride_cl
        c = tl.load(ptr + r[None, :], mask=keep[:, None] & (r[None, :] < R), other=0.)
        k_pe = tl.load(ptr + R + e[None, :], mask=keep[:, None] & (e[None, :] < PE), other=0.)
        c = c.to(DOT)                                   # [BL, RP]: the one read of this tile
        s = tl.dot(q_lat, tl.trans(c), input_precision=PREC)       # [HP, BL] fp32
        s = tl.dot(q_pe, tl.trans(k_pe.to(DOT)), s, input_precision=PREC)
        # scale * log2(e) on the fp32 scores (not on q: no extra rounding); hidden keys -> -inf
        s = tl.where(keep[None, :], s * scale_log2, float("-inf"))
        # The tile's first key is visible, so m_new is finite: no -inf - -inf = NaN below, and
        # alpha = 2^(-inf) = 0 on the first tile wipes the empty start.
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])                 # [HP, BL] in [0, 1]: safe in bf16
        l = l * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(DOT), c, acc * alpha[:, None], input_precision=PREC)   # fp32 accumulate
        m = m_new
    part = b.to(tl.int64) * S + split                   # partials [B, S, H(, R)]
    tl.store(m_part + part * H + h, m, mask=h < H)
    tl.store(l_part + part * H + h, l, mask=h < H)
    # empty splits write no acc: the combine never reads it (m = -inf, l = 0 mark them)
    rows = tl.where(lo < hi, H, 0)
    tl.store(acc_part + (part * H + h[:, None]) * R + r[None, :], acc,
             mask=(h[:, None] < rows) & (r[None, :] < R))


@triton.jit(do_not_specialize=["S"])
def _mla_combine_kernel(
        m_part, l_part, acc_part, o, S, stride_ob, stride_oh,
        H: tl.constexpr, R: tl.constexpr, BS: tl.constexpr, BR: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    r = tl.program_id(2) * BR + tl.arange(0, BR)
    base = b.to(tl.int64) * S
    top = tl.full([BS], float("-inf"), tl.float32)
    for s0 in range(0, S, BS):                          # 1. M = the largest split max
        sp = s0 + tl.arange(0, BS)
        m = tl.load(m_part + (base + sp) * H + h, mask=sp < S, other=float("-inf"))
        top = tl.maximum(top, m)
    M = tl.max(top, axis=0)                             # finite: a row has a visible key
    den = tl.zeros([BS], tl.float32)
    num = tl.zeros([BR], tl.float32)
    for s0 in range(0, S, BS):                          # 2. rescale each split to M and add
        sp = s0 + tl.arange(0, BS)
        m = tl.load(m_part + (base + sp) * H + h, mask=sp < S, other=float("-inf"))
        full = m > float("-inf")                        # empty splits: weight 0, acc unread
        w = tl.where(full, tl.exp2(m - M), 0.)          # <= 1: no overflow
        den += w * tl.load(l_part + (base + sp) * H + h, mask=full, other=0.)
        acc = tl.load(acc_part + ((base + sp) * H + h)[:, None] * R + r[None, :],
                      mask=full[:, None] & (r[None, :] < R), other=0.)     # [BS, BR]
        num += tl.sum(w[:, None] * acc, axis=0)
    out = num / tl.sum(den, axis=0)                     # den >= 1: the split holding M adds l >= 1
    tl.store(o + b.to(tl.int64) * stride_ob + h * stride_oh + r, out.to(o.dtype.element_ty),
             mask=r < R)


@triton.jit(do_not_specialize=["pos"])
def _latent_write_kernel(c, k_pe, w, cache, pos, eps, stride_c, stride_k, stride_cb, stride_cl,
                         R: tl.constexpr, PE: tl.constexpr, RP: tl.constexpr, PEP: tl.constexpr,
                         POS_TENSOR: tl.constexpr):
    """cache[b, pos] = [RMSNorm(c[b]) | k_pe[b]] for row b = program 0: the step's cache entry,
    kv_a_layernorm with kimi's roundings."""
    b = tl.program_id(0).to(tl.int64)
    if POS_TENSOR:                                      # a CUDA graph's step: read it on device
        p = tl.load(pos)
    else:
        p = pos
    entry = cache + b * stride_cb + p.to(tl.int64) * stride_cl
    r = tl.arange(0, RP)
    x = tl.load(c + b * stride_c + r, mask=r < R, other=0.).to(tl.float32)
    wr = tl.load(w + r, mask=r < R, other=0.).to(tl.float32)
    n = rms_norm_row(x, wr, R, eps, c.dtype.element_ty, cache.dtype.element_ty)
    tl.store(entry + r, n.to(cache.dtype.element_ty), mask=r < R)
    e = tl.arange(0, PEP)
    tl.store(entry + R + e, tl.load(k_pe + b * stride_k + e, mask=e < PE), mask=e < PE)


def write_latent(c, k_pe, weight, eps, kv_cache, pos):
    """kv_cache[:, pos] = cat([RMSNorm(c), k_pe], -1) in one launch: c [B, R], k_pe [B, PE] (column
    slices of the projection's output), RMSNorm's weight [R] and eps, kv_cache [B, Lmax, R + PE];
    pos an int or a 0-d int64 tensor on the device (= MLAAttention.attend_absorbed's cache write
    of kv_a_layernorm's output)."""
    B, R = c.shape
    PE = k_pe.shape[1]
    _check(kv_cache.shape[0] == B and kv_cache.shape[2] == R + PE and len(k_pe) == B,
           f"c {tuple(c.shape)}, k_pe {tuple(k_pe.shape)}, kv_cache {tuple(kv_cache.shape)}")
    _check(c.stride(-1) == 1 and k_pe.stride(-1) == 1 and kv_cache.stride(-1) == 1,
           "c, k_pe and kv_cache need stride 1 last")
    _check(torch.is_tensor(pos) or 0 <= pos < kv_cache.shape[1],    # (a kernel writes anywhere)
           f"position {pos} outside the cache's {kv_cache.shape[1]}")
    _latent_write_kernel[(B,)](
        c, k_pe, weight, kv_cache, pos, eps, c.stride(0), k_pe.stride(0), kv_cache.stride(0),
        kv_cache.stride(1), R=R, PE=PE, RP=triton.next_power_of_2(R),
        PEP=triton.next_power_of_2(PE), POS_TENSOR=torch.is_tensor(pos))


@triton.jit
def _heads_matmul_kernel(x, w, y, B, K, N, stride_xb, stride_xh, stride_wh, stride_wk, stride_wn,
                         stride_yb, stride_yh, BB: tl.constexpr, BK: tl.constexpr,
                         BN: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """y[b, h, n] = sum_k x[b, h, k] w[h, k, n] for head h = program 0, BN columns n, every row b:
    fp32 sums, one rounding to y's dtype (as a bf16 einsum on a GPU rounds)."""
    h = tl.program_id(0)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    for b0 in range(0, B, BB):                          # decode: one block of rows (B <= BB)
        b = b0 + tl.arange(0, BB)
        acc = tl.zeros([BB, BN], tl.float32)
        for k0 in range(0, K, BK):
            k = k0 + tl.arange(0, BK)
            xt = tl.load(x + b[:, None].to(tl.int64) * stride_xb + h * stride_xh + k[None, :],
                         mask=(b[:, None] < B) & (k[None, :] < K), other=0.)      # [BB, BK]
            wt = tl.load(w + h * stride_wh + k[:, None] * stride_wk + n[None, :] * stride_wn,
                         mask=(k[:, None] < K) & (n[None, :] < N), other=0.)      # [BK, BN]
            acc = tl.dot(xt.to(DOT), wt.to(DOT), acc, input_precision=PREC)
        out = round_to(acc, y.dtype.element_ty)        # (the interpreter's cast truncates)
        tl.store(y + b[:, None].to(tl.int64) * stride_yb + h * stride_yh + n[None, :],
                 out.to(y.dtype.element_ty), mask=(b[:, None] < B) & (n[None, :] < N))


def heads_matmul(x, w):
    """x [B, H, K] (last dim contiguous), w [H, K, N] (any strides: a view of kv_b_proj's weight)
    -> y [B, H, N] = torch.einsum("bhk,hkn->bhn", x, w) in x's dtype, one launch."""
    B, H, K = x.shape
    N = w.shape[2]
    _check(w.shape[:2] == (H, K) and x.stride(-1) == 1, f"x {tuple(x.shape)}, w {tuple(w.shape)}")
    y = x.new_empty(B, H, N)
    BN = min(HEADS_BN, triton.next_power_of_2(N))
    _heads_matmul_kernel[(H, triton.cdiv(N, BN))](
        x, w, y, B, K, N, x.stride(0), x.stride(1), *w.stride(), y.stride(0), y.stride(1),
        BB=16, BK=min(HEADS_BK, max(16, triton.next_power_of_2(K))), BN=BN, **dot_args(x.dtype))
    return y


def absorbed_attention(q, kv_b, kv_cache, pos, scale, pad=None, *, v_head_dim):
    """= MLAAttention.attend_absorbed after its cache write, in four launches: q [B, H, nope + PE]
    (q_nope | q_pe), kv_b = kv_b_proj.weight [H (nope + v), R], kv_cache [B, Lmax, R + PE] holding
    this step's entry -> o [B, H, v]. q_lat = q_nope W_uk, the split and combine kernels (q_pe read
    where q holds it: no [q_lat | q_pe] copy), then o = o_lat W_uv^T."""
    B, H, _ = q.shape
    R, V = kv_b.shape[1], v_head_dim
    nope = kv_b.shape[0] // H - V
    w = kv_b.view(H, nope + V, R)
    q_lat = heads_matmul(q[..., :nope], w[:, :nope])                        # [B, H, R]
    o_lat = _attend(q_lat, q[..., nope:], kv_cache, pos, scale, pad)        # [B, H, R]
    return heads_matmul(o_lat, w[:, nope:].transpose(1, 2))                 # [B, H, V]


def mla_decode(q, kv_cache, pos, scale, pad=None, *, kv_lora_rank):
    """= kimi.latent_attention, reading the cache once: two launches, no host sync (graph safe).
    pos: an int (keys after it are never read), or a 0-d int64 tensor on q's device (a graph's
    step: NUM_SPLITS comes from the whole buffer and the kernel reads pos)."""
    R = kv_lora_rank
    _check(0 < R < q.shape[2], f"q {tuple(q.shape)}, kv_lora_rank {R}")  # _attend checks the rest
    return _attend(q[..., :R], q[..., R:], kv_cache, pos, scale, pad)


def _attend(q_lat, q_pe, kv_cache, pos, scale, pad):
    """The two launches: query rows q_lat [B, H, R], q_pe [B, H, PE] -> o_lat [B, H, R]."""
    B, H, R = q_lat.shape
    PE = q_pe.shape[2]
    _check(kv_cache.shape[0] == B and kv_cache.shape[2] == R + PE and q_pe.shape[:2] == (B, H),
           f"q_lat {tuple(q_lat.shape)}, q_pe {tuple(q_pe.shape)}, kv_cache "
           f"{tuple(kv_cache.shape)}")
    _check(q_lat.stride(-1) == 1 and q_pe.stride(-1) == 1 and kv_cache.stride(-1) == 1,
           "queries and kv_cache need stride 1 last")
    L = kv_cache.shape[1]
    pos_tensor = torch.is_tensor(pos)
    S = num_splits(L if pos_tensor else min(pos + 1, L), B, q_lat.device)
    m_part = torch.empty(B, S, H, dtype=torch.float32, device=q_lat.device)
    l_part = torch.empty_like(m_part)
    acc_part = torch.empty(B, S, H, R, dtype=torch.float32, device=q_lat.device)
    o = q_lat.new_empty(B, H, R)
    dot = dot_args(q_lat.dtype)
    _mla_split_kernel[(B, S)](
        q_lat, q_pe, kv_cache, pos, q_lat if pad is None else pad.to(torch.int64), m_part, l_part,
        acc_part, L, S, scale * LOG2E, q_lat.stride(0), q_lat.stride(1), q_pe.stride(0),
        q_pe.stride(1), kv_cache.stride(0), kv_cache.stride(1),
        H=H, R=R, PE=PE, HP=max(SPLIT["HEADS"], 16, triton.next_power_of_2(H)),
        RP=triton.next_power_of_2(R), PEP=max(16, triton.next_power_of_2(PE)),
        BL=SPLIT["BL"] if dot["DOT"] != tl.float32 else 16, MIN_SPLIT=MIN_SPLIT,
        POS_TENSOR=pos_tensor, HAS_PAD=pad is not None, **dot,
        num_warps=SPLIT["num_warps"], num_stages=SPLIT["num_stages"])
    BR = min(BLOCK_R, triton.next_power_of_2(R))
    _mla_combine_kernel[(B, H, triton.cdiv(R, BR))](
        m_part, l_part, acc_part, o, S, o.stride(0), o.stride(1), H=H, R=R, BS=BLOCK_S, BR=BR)
    return o


def _check(ok, message):
    if not ok:
        raise ValueError(f"mla_decode: {message}")
