"""Chunked KDA in three Triton kernels (its backward: kda_backward.py), plus a fused one-token step
for decode.
Read kda_ref.py first: chunk_kda and fused_recurrent_kda here have the signature and the result
of kda_ref.recurrent_kda, and chunk_kda's steps are chunk_kda_ref's, numbered the same way.

Per chunk of C = 64 tokens, with S [K, V] the fp32 state entering it (docs/kda.md §3, §5):
  kernel 1, _kda_diag_kernel, grid (B*T, H / BH): token-parallel, row i of its 16 x 16
    diagonal block, j = i, i-1, .. down the block: exponent = the sum of g over (j, i], never > 0
    2a. Aqk[i, j] = scale sum_c q_i k_j 2^(G_i - G_j),  Akk[i, j] = sum_c k_i k_j 2^(G_i - G_j)
  kernel 2, _kda_intra_kernel, grid (NT, B*H): the rest of what does not depend on S
    1. G = chunk-local cumsum of g, in log2 units; gamma = G at the last row
    2b. Aqk and Akk (times beta_i) left of the diagonal blocks, anchored products (tl.dot)
    3. Tinv = (I + Akk)^-1 by blocked forward substitution
    4. w = Tinv (beta k 2^G),  u = Tinv (beta v),  qg = scale q 2^G,  kg = k 2^(gamma - G)
  kernel 3, _kda_scan_kernel, grid (V / BV, B*H): one program walks one head's chunks in order,
    holding a [K, BV] slice of S in fp32 registers (a V-slice of o needs only that slice of S)
    5. v_new = u - w S
    6. o = qg S + Aqk v_new                  (scale is already folded into qg and Aqk)
    7. S = 2^gamma S + kg^T v_new

No exponent is ever positive, whatever the gate: the diagonal blocks sum g directly, the blocks
left of them split 2^(G_i - G_j) at an anchor row between i and j, and G is a cumsum restarted
every 16 rows plus block totals (docs/kda.md §4, §5). w, u, qg, kg, Aqk are stored in bf16 for
bf16/fp16 inputs (as fla does; ~3e-3 relative error), in fp32 otherwise; G, Akk, the inverse and
the running state: fp32.

Gradients: when an input requires grad, chunk_kda runs the same kernels inside an autograd Function
(_ChunkKDA), with two constexpr stores switched on for the backward (kda_backward.py): kernel 2
keeps Tinv (STORE_TINV), kernel 3 the state entering each chunk and v_new (STORE_H); w, qg, kg,
Aqk and 2^gamma are kept rather than freed. Without gradients neither store is compiled in.

fused_recurrent_kda, _kda_step_kernel, grid (B*H, V / BV): recurrent_kda's three steps token by
token (decode, T = 1, short inputs); the [K, BV] fp32 state slice is read once, written once.
Supported: K and V powers of two from 16 to 256, any B, H (chunk_kda: B*H <= 65535), T >= 1.
Not here: varlen (cu_seqlens), fused gate / l2norm / sigmoid(beta), fused_recurrent_kda's backward.
Layout: q, k, g [B, T, H, K]; v, o [B, T, H, V]; beta [B, T, H]; state [B, H, K, V] fp32.
"""
import torch

from fast import INTERPRET  # noqa: I001 (first: without a GPU it chooses Triton's interpreter)
import triton
import triton.language as tl

from kda_backward import BC, C, RCP_LN2, _dot, _gate, chunk_kda_bwd, precision

# C = 64 tokens per chunk, BC = 16 rows per diagonal block, the exp2 constant, the _gate load
# (clamped at the gate floor) and the _dot helper are kda_backward's (one copy, shared)
BK = 32                     # channel slice of kernel 2's loops: [C, BK] tiles, [C, C] @ [C, BK]
BV_SCAN = 64                # V-slice per scan program (32 crashed with h0 on Triton 3.6, H200)
BV_STEP = 32                # V-slice per decode-step program (as fla's fused_recurrent_kda)
# Fixed configs instead of autotune (multi-config autotune breaks the CPU interpreter), each the
# fastest of a sweep on an H100 (each kernel's GPU time by torch.profiler; docs/kda.md §5)
DIAG_HEADS, DIAG_WARPS, INTRA_WARPS, SCAN_WARPS, SCAN_STAGES, STEP_WARPS = 4, 2, 4, 4, 3, 4
SUPPORTED = (16, 32, 64, 128, 256)


@triton.jit
def _kda_diag_kernel(q, k, g, Akkd, Aqk,                            # pointers
                     T, H, NT, scale, s_qk,                          # sizes, the token stride
                     K: tl.constexpr, C: tl.constexpr, BC: tl.constexpr, BH: tl.constexpr):
    """Step 2a, token-parallel: row i of its 16 x 16 diagonal block, for BH heads at once."""
    tok = tl.program_id(0).to(tl.int64)          # token of the [B, T] sequences (int64)
    b, t = tok // T, tok % T
    hh = tl.program_id(1) * BH + tl.arange(0, BH)                          # [BH] heads
    ck = tl.arange(0, K)
    on = (hh < H)[:, None]                     # [BH, 1]: the last program's heads past H
    p = (b * T + t) * s_qk + hh[:, None] * K + ck[None, :]                 # [BH, K] offsets
    q_i = tl.load(q + p, mask=on, other=0.).to(tl.float32)
    k_i = tl.load(k + p, mask=on, other=0.).to(tl.float32)
    jj = tl.arange(0, BC)[None, :]
    Aqk_i = tl.zeros([BH, BC], dtype=tl.float32)                          # j > i stay 0
    Akk_i = tl.zeros([BH, BC], dtype=tl.float32)
    E = tl.zeros([BH, K], dtype=tl.float32)      # G_i - G_j = the sum of g over (j, i], in log2
    first = t - t % BC                           # the block's first token
    for d in range(0, t - first + 1):            # j = i, i-1, ..., first: E only ever decreases
        j = t - d
        pj = (b * T + j) * s_qk + hh[:, None] * K + ck[None, :]
        kd = tl.load(k + pj, mask=on, other=0.).to(tl.float32) * tl.exp2(E)   # k_j 2^(G_i - G_j)
        Aqk_i += tl.where(jj == j - first, tl.sum(q_i * kd, axis=1)[:, None], 0.)
        Akk_i += tl.where(jj == j - first, tl.sum(k_i * kd, axis=1)[:, None], 0.)
        # clamped at G_FLOOR as kernel 2 clamps it (see there): the same gates in both kernels
        E += _gate(g, pj, on) * RCP_LN2
    row = ((b * H + hh) * NT * C + t)[:, None]  # [BH, 1] row in the [B*H, NT*C, *] intermediates
    tl.store(Aqk + row * C + t % C - t % BC + jj, (Aqk_i * scale).to(Aqk.dtype.element_ty),
             mask=on)
    tl.store(Akkd + row * BC + jj, Akk_i, mask=on)          # unmasked, unscaled: kernel 2 does both


@triton.jit
def _kda_intra_kernel(q, k, v, g, beta, Akkd, w, u, qg, kg, Aqk, decay, tinv,   # pointers
                      T, H, scale, s_qk, s_v, s_beta,               # sizes, token strides
                      K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BC: tl.constexpr,
                      BK: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
                      STORE_TINV: tl.constexpr):
    """Steps 1, 2b, 3 and 4 for one chunk (grid: chunks x heads), after _kda_diag_kernel."""
    n = tl.program_id(0).to(tl.int64)          # chunk; int64 so that offsets cannot overflow
    bh = tl.program_id(1).to(tl.int64)
    NT = tl.num_programs(0)
    b, h = bh // H, bh % H
    NB: tl.constexpr = C // BC
    i = tl.arange(0, C)                          # token within the chunk (rows; also columns j)
    ib = i // BC                                 # its 16-row block
    t = n * C + i
    valid = t < T                                # ragged last chunk: rows past T load 0
    bt = b * T + t                               # [C] row of token t in the [B*T, H, *] inputs
    row = (bh * NT + n) * C + i                  # [C] row in the [B*H, NT*C, *] intermediates
    b_beta = tl.load(beta + bt * s_beta + h, mask=valid, other=0.)                  # [C]
    blk_c = tl.arange(0, NB)[:, None, None]      # [NB, 1, 1] and [1, NB, 1]: block indices
    blk_m = tl.arange(0, NB)[None, :, None]
    r3 = tl.arange(0, BC)[None, :, None]         # [1, BC, 1] row within a block

    # ---- 1. + 2b. G, and Aqk and Akk left of the diagonal blocks, over channel slices ----
    # Column block c (cb below): anchor m_c = G at its last row. Column operand k_j 2^(m_c - G_j),
    # m_c - G_j = tot_c - Gb_j (the sum of g after j in its block); row operand x_i 2^(G_i - m_c),
    # G_i - m_c = Gb_i + tot_(c+1) + ... + tot_(r-1) for i in a block r > c: direct sums of g,
    # every exponent <= 0, and their product is exactly 2^(G_i - G_j). The column operand does
    # not depend on r: one transpose per channel slice. The products of 2b and 4 take the scan's
    # operands (bf16 for bf16 inputs, as fla; fp32 in the interpreter); 3 stays fp32.
    Aqk_off = tl.zeros([C, C], dtype=tl.float32)
    Akk_off = tl.zeros([C, C], dtype=tl.float32)
    for k0 in range(0, K, BK):  # a loop, not unrolled: compile time
        c = k0 + tl.arange(0, BK)
        p = bt[:, None] * s_qk + h * K + c[None, :]                        # [C, BK] offsets
        b_q = tl.load(q + p, mask=valid[:, None], other=0.).to(tl.float32)
        b_k = tl.load(k + p, mask=valid[:, None], other=0.).to(tl.float32)
        # a gate below G_FLOOR nats already wipes the state in fp32 (exp(-104) is below the
        # smallest denormal); clamping it changes nothing but keeps -inf out of G (-inf - -inf: NaN)
        b_g = _gate(g, p, valid[:, None])                                   # [C, BK]
        # 1. G restarted at every 16-row block, Gb (small numbers: differences lose little to
        # rounding). G itself = Gb + the totals of the blocks before; gamma = the sum of all totals.
        Gb3 = tl.cumsum(tl.reshape(b_g, [NB, BC, BK]), axis=1) * RCP_LN2     # [NB, BC, BK]
        tot = tl.sum(tl.where(r3 == BC - 1, Gb3, 0.), axis=1)               # [NB, BK] block totals
        # tot_c - Gb_j, the sum of g after j in its block, summed directly: a reverse cumsum of g
        # one row on. As a difference of two block sums it would lose |tot| 2^-24 to rounding, 1e-4
        # under Kimi's gates (tot ~ -2000 in log2), in an exponent that may be near 0 (kg).
        g_next = _gate(g, p + s_qk, ((i % BC < BC - 1) & (t + 1 < T))[:, None])
        tail3 = tl.cumsum(tl.reshape(g_next, [NB, BC, BK]), axis=1, reverse=True) * RCP_LN2
        # 4, the part that needs no Tinv: qg = scale q 2^G, kg = k 2^(gamma - G), 2^gamma
        before = tl.sum(tl.where(blk_m < blk_c, tot[None, :, :], 0.), axis=1)   # blocks before c
        after = tl.sum(tl.where(blk_m > blk_c, tot[None, :, :], 0.), axis=1)    # blocks after c
        b_G = tl.reshape(Gb3 + before[:, None, :], [C, BK])                    # G_i
        gamma_minus_G = tl.reshape(tail3 + after[:, None, :], [C, BK])
        out = row[:, None] * K + c[None, :]
        e_G = tl.exp2(b_G)                                                     # 2^G_i
        tl.store(qg + out, (b_q * e_G * scale).to(qg.dtype.element_ty))
        # w holds k 2^G until step 4 overwrites it with Tinv (beta k 2^G): a round trip through
        # memory this program just wrote (in L2) beats reloading g and redoing step 1. In bf16
        # (bf16 inputs) it is stored as bf16, the dtype step 4's dot reads it in anyway.
        tl.store(w + out, (b_k * e_G).to(w.dtype.element_ty))
        tl.store(kg + out, (b_k * tl.exp2(gamma_minus_G)).to(kg.dtype.element_ty))
        tl.store(decay + (bh * NT + n) * K + c, tl.exp2(tl.sum(tot, axis=0)))     # 2^gamma, fp32
        # (tl.trans of a load, not of a dot result: safe on Hopper)
        k_colT = tl.trans(b_k * tl.exp2(tl.reshape(tail3, [C, BK])))    # [BK, C] k_j 2^(m_c - G_j)
        b_Gb = tl.reshape(Gb3, [C, BK])
        for cb in tl.static_range(NB - 1):
            # G_i - m_c = Gb_i + the totals of the blocks strictly between c and i's block
            between = tl.sum(tl.where((blk_m > cb) & (blk_m < blk_c), tot[None, :, :], 0.), axis=1)
            row_e = b_Gb + tl.reshape(tl.broadcast_to(between[:, None, :], [NB, BC, BK]), [C, BK])
            # rows in block c or before: -inf BEFORE exp2 (there G_i - m_c may be positive)
            e_row = tl.exp2(tl.where((ib > cb)[:, None], row_e, float("-inf")))      # [C, BK]
            k_col = tl.where((ib == cb)[None, :], k_colT, 0.)                          # [BK, C]
            Aqk_off += _dot(b_q * e_row, k_col, DOT, PREC)
            Akk_off += _dot(b_k * e_row, k_col, DOT, PREC)
    Akk_off = Akk_off * b_beta[:, None]
    off = ib[:, None] != ib[None, :]             # the diagonal blocks are _kda_diag_kernel's (2a)
    tl.store(Aqk + row[:, None] * C + i[None, :], (Aqk_off * scale).to(Aqk.dtype.element_ty),
             mask=off)

    # ---- 3. Tinv = (I + Akk)^-1, unit lower triangular, in fp32 ----
    # 3a. the diagonal blocks (kernel 2a's, scaled by beta_i, strictly lower), all NB at once:
    # row m = e_m - sum_{j<m} Akk[m, j] Tinv[j]
    c3 = tl.arange(0, BC)[None, None, :]
    A3 = tl.reshape(tl.load(Akkd + row[:, None] * BC + tl.arange(0, BC)[None, :])
                    * b_beta[:, None], [NB, BC, BC])
    A3 = tl.where(c3 < r3, A3, 0.)
    D_inv = tl.where(c3 == r3, 1., 0.) + tl.zeros([NB, BC, BC], dtype=tl.float32)
    for m in tl.static_range(1, BC):
        a_m = tl.sum(tl.where(r3 == m, A3, 0.), axis=1)                           # [NB, BC] row m
        new_row = D_inv - tl.sum(a_m[:, :, None] * D_inv, axis=1)[:, None, :]
        D_inv = tl.where(r3 == m, new_row, D_inv)
    same = (i // BC)[:, None, None] == tl.arange(0, NB)[None, :, None]    # [C, C] as [C, NB, BC]
    D_inv = tl.reshape(tl.where(same, tl.reshape(D_inv, [C, BC])[:, None, :], 0.), [C, C])
    # 3b. the blocks below: I + Akk = D (I + M) with M = D^-1 Akk_off strictly block-lower, so
    # Tinv = (I + M)^-1 D^-1 and (I + M)^-1 = I - M (I - M (I - M ...)): NB - 1 Horner steps, the
    # same arithmetic as block forward substitution (not the unstable doubling product).
    eye = tl.where(i[:, None] == i[None, :], 1., 0.)
    M = _dot(D_inv, Akk_off, tl.float32, PREC)
    X = eye - M
    for _ in tl.static_range(NB - 2):
        X = eye - _dot(M, X, tl.float32, PREC)
    Tinv = _dot(X, D_inv, tl.float32, PREC)                                    # [C, C]
    if STORE_TINV:                               # for the backward (fp32): no second solve
        tl.store(tinv + row[:, None] * C + i[None, :], Tinv)

    # ---- 4. w = Tinv (beta k 2^G), u = Tinv (beta v) (qg, kg and 2^gamma: in the loop above) ----
    tl.debug_barrier()      # every thread's k 2^G is in memory before any thread reads it back
    for k0 in range(0, K, BK):
        out = row[:, None] * K + (k0 + tl.arange(0, BK))[None, :]             # [C, BK]
        b_kG = tl.load(w + out).to(tl.float32)                                 # k 2^G
        b_w = _dot(Tinv, b_kG * b_beta[:, None], DOT, PREC)
        tl.store(w + out, b_w.to(w.dtype.element_ty))
    for v0 in range(0, V, BK):
        c = v0 + tl.arange(0, BK)
        b_v = tl.load(v + bt[:, None] * s_v + h * V + c[None, :], mask=valid[:, None], other=0.)
        b_u = _dot(Tinv, b_v.to(tl.float32) * b_beta[:, None], DOT, PREC)
        tl.store(u + row[:, None] * V + c[None, :], b_u.to(u.dtype.element_ty))


@triton.jit
def _kda_scan_kernel(w, u, qg, kg, Aqk, decay, o, h0, ht, hn, vn,    # pointers
                     T, H, NT, s_o,                                  # sizes, o's token stride
                     K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BV: tl.constexpr,
                     HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, DOT: tl.constexpr,
                     PREC: tl.constexpr, STORE_H: tl.constexpr):
    iv = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    i = tl.arange(0, C)
    ck = tl.arange(0, K)
    cv = iv * BV + tl.arange(0, BV)
    state = (bh * K + ck[:, None]) * V + cv[None, :]                      # [K, BV] in [B*H, K, V]
    if HAS_H0:
        S = tl.load(h0 + state)
    else:
        S = tl.zeros([K, BV], dtype=tl.float32)
    for n in range(NT):  # runtime trip count: Triton 3.6's interpreter needs numpy < 2.4 for this
        row = (bh * NT + n) * C + i                                      # [C] intermediate rows
        b_w = tl.load(w + row[:, None] * K + ck[None, :])                 # [C, K]
        b_qg = tl.load(qg + row[:, None] * K + ck[None, :])               # [C, K]
        # kg^T is loaded transposed (swapped strides), not tl.trans'ed: tl.trans of a tl.dot result
        # fed into tl.dot miscompiles on Hopper with Triton 3.4-3.7 (docs/kda.md §6).
        b_kgT = tl.load(kg + row[None, :] * K + ck[:, None])              # [K, C]
        b_u = tl.load(u + row[:, None] * V + cv[None, :]).to(tl.float32)  # [C, BV]
        b_A = tl.load(Aqk + row[:, None] * C + i[None, :])                # [C, C]
        b_decay = tl.load(decay + (bh * NT + n) * K + ck)                 # [K] 2^gamma
        # ---- 5. v_new = u - w S ----
        v_new = b_u - _dot(b_w, S, DOT, PREC)                             # [C, BV]
        if STORE_H:     # for the backward: the state entering chunk n, and v_new
            tl.store(hn + ((bh * NT + n) * K + ck[:, None]) * V + cv[None, :],
                     S.to(hn.dtype.element_ty))
            tl.store(vn + row[:, None] * V + cv[None, :], v_new.to(vn.dtype.element_ty))
        # ---- 6. o = qg S + Aqk v_new (uses the state *entering* the chunk) ----
        b_o = _dot(b_qg, S, DOT, PREC) + _dot(b_A, v_new, DOT, PREC)
        t = n * C + i
        tl.store(o + ((b * T + t) * s_o + h * V)[:, None] + cv[None, :],
                 b_o.to(o.dtype.element_ty), mask=(t < T)[:, None])
        # ---- 7. S = 2^gamma S + kg^T v_new ----
        S = b_decay[:, None] * S + _dot(b_kgT, v_new, DOT, PREC)
    if STORE_HT:
        tl.store(ht + state, S)


def _check_shapes(name, q, k, v, g, beta, initial_state):
    """The launchers' argument checks (a ValueError saying what is wrong) -> B, T, H, K, V."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    for bad, what in [
            (K not in SUPPORTED or V not in SUPPORTED,
             f"supports K and V in {SUPPORTED} (powers of two from 16 to 256), "
             f"got K = {K}, V = {V}"),
            (T < 1, "needs T >= 1"),
            (k.shape != q.shape or g.shape != q.shape, "needs q, k and g all [B, T, H, K]"),
            (v.shape != (B, T, H, V) or beta.shape != (B, T, H),
             "needs v [B, T, H, V] and beta [B, T, H]"),
            (initial_state is not None and initial_state.shape != (B, H, K, V),
             "needs initial_state [B, H, K, V]")]:
        if bad:
            raise ValueError(f"{name} {what}")
    return B, T, H, K, V


def chunk_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False):
    """Chunked KDA. Same signature and result as kda_ref.recurrent_kda, and differentiable: with
    inputs that require grad, o and the final state backpropagate through kda_backward.

    q, k, g [B, T, H, K]; v [B, T, H, V]; beta [B, T, H]; initial_state [B, H, K, V] fp32 or None.
    Returns o [B, T, H, V] in v's dtype and the final state [B, H, K, V] fp32 (or None).
    """
    B, T, H, K, V = _check_shapes("chunk_kda", q, k, v, g, beta, initial_state)
    if B * H > 65535:
        raise ValueError(f"chunk_kda needs B*H <= 65535 (the grid's second axis), got {B * H}")
    scale = K ** -0.5 if scale is None else scale
    if precision(q.dtype)[0] == torch.float32 and K > 128 and not INTERPRET:   # docs/kda.md §1
        raise ValueError(f"chunk_kda: fp32 q, k, v with K = {K} > 128 overflow a GPU block's "
                         f"shared memory; pass bf16 ones, or use kda_ref")
    # The kernels index contiguous tensors; .contiguous() is free when they already are. These
    # casts are torch operations, so autograd carries the gradients back through them.
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    g, beta = g.float().contiguous(), beta.float().contiguous()
    h0 = None if initial_state is None else initial_state.float().contiguous()
    inputs = (q, k, v, g, beta, h0)
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs):
        return _ChunkKDA.apply(*inputs, scale, output_final_state)
    return _forward(*inputs, scale, output_final_state, save=False)[:2]


def _forward(q, k, v, g, beta, h0, scale, output_final_state, save):
    """The three kernels -> o, ht and, if save, what kda_backward.chunk_kda_bwd reads."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    mid, dot, prec = precision(q.dtype)      # intermediates' storage, scan dots, tl.dot precision
    NT = triton.cdiv(T, C)
    dev = q.device
    w, qg, kg = (torch.empty(B * H, NT * C, K, device=dev, dtype=mid) for _ in range(3))
    u = torch.empty(B * H, NT * C, V, device=dev, dtype=mid)
    Aqk = torch.empty(B * H, NT * C, C, device=dev, dtype=mid)
    decay = torch.empty(B * H, NT, K, device=dev, dtype=torch.float32)
    Akkd = torch.empty(B * H, NT * C, BC, device=dev, dtype=torch.float32)  # step 2a's blocks
    if T % C:   # kernel 1 has no program for rows past T; kernel 2 and the backward multiply
        # them by zeros, so they must not hold garbage (0 * NaN = NaN)
        Aqk.view(B, H, NT * C, C)[:, :, T:] = 0
        Akkd.view(B, H, NT * C, BC)[:, :, T:] = 0
    # only for the backward: Tinv (fp32), the state entering each chunk and v_new
    tinv = torch.empty(B * H, NT * C, C, device=dev, dtype=torch.float32) if save else None
    hn = torch.empty(B * H, NT, K, V, device=dev, dtype=mid) if save else None
    vn = torch.empty_like(u) if save else None
    _kda_diag_kernel[(B * T, triton.cdiv(H, DIAG_HEADS))](
        q, k, g, Akkd, Aqk, T, H, NT, scale, H * K,
        K=K, C=C, BC=BC, BH=DIAG_HEADS, num_warps=DIAG_WARPS)
    bk = min(BK, K, V)
    # bf16 products faulted (an illegal address) on an H100 under Triton 3.6 where a channel loop
    # runs once (K = V = 16 and 32; 64 and up ran): those keep fp32 operands, as before bf16 ones
    low = min(K, V) > BK
    _kda_intra_kernel[(NT, B * H)](
        q, k, v, g, beta, Akkd, w, u, qg, kg, Aqk, decay, tinv,
        T, H, scale, H * K, H * V, H,
        K=K, V=V, C=C, BC=BC, BK=bk, DOT=dot if low else tl.float32, PREC=prec,
        STORE_TINV=save, num_warps=INTRA_WARPS)
    o = torch.empty_like(v)
    ht = torch.empty(B, H, K, V, device=dev, dtype=torch.float32) if output_final_state else None
    BV = min(BV_SCAN, V)
    # 3 stages prefetch two chunks ahead (the scan waits on loads, not math): three sets of
    # shared-memory tiles fit only when small (bf16, K <= 128; 4 stages would need 264 KB)
    stages = SCAN_STAGES if mid == torch.bfloat16 and K <= 128 else 1
    _kda_scan_kernel[(V // BV, B * H)](
        w, u, qg, kg, Aqk, decay, o, h0, ht, hn, vn,
        T, H, NT, H * V,
        K=K, V=V, C=C, BV=BV, HAS_H0=h0 is not None, STORE_HT=output_final_state,
        DOT=dot, PREC=prec, STORE_H=save, num_warps=SCAN_WARPS, num_stages=stages)
    return o, ht, (Aqk, w, qg, kg, decay, tinv, hn, vn)


class _ChunkKDA(torch.autograd.Function):
    """chunk_kda with a backward: the forward keeps what kda_backward.chunk_kda_bwd reads."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, h0, scale, output_final_state):
        o, ht, saved = _forward(q, k, v, g, beta, h0, scale, output_final_state, save=True)
        ctx.save_for_backward(q, k, v, g, beta, *saved)
        ctx.scale, ctx.need_dh0 = scale, ctx.needs_input_grad[5]     # h0's gradient: if asked
        ctx.set_materialize_grads(False)         # an unused output's gradient stays None
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, *saved = ctx.saved_tensors
        do = torch.zeros_like(v) if do is None else do          # only the final state was used
        grads = chunk_kda_bwd(q, k, v, g, beta, ctx.scale, saved, do, dht, ctx.need_dh0)
        return *grads, None, None                                # none for scale, the flag


@triton.jit
def _kda_step_kernel(q, k, v, g, beta, o, h0, ht,                    # pointers
                     T, H, scale, s_qk, s_v, s_beta,                 # sizes, token strides
                     K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr,
                     HAS_H0: tl.constexpr, STORE_HT: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)          # (b, h) on the first axis: no 65535 limit on B*H
    iv = tl.program_id(1).to(tl.int64)          # int64 so that offsets cannot overflow
    b, h = bh // H, bh % H
    ck = tl.arange(0, K)                        # whole K per program (v_old and o reduce over K)
    cv = iv * BV + tl.arange(0, BV)
    # the state slice as an int64 base plus int32 offsets within the head (< K*V), constant per
    # thread: the addresses fold into the loads, where int64 [K, BV] addresses would hold 64
    # registers until the store
    base = bh * K * V + iv * BV
    state = ck[:, None] * V + tl.arange(0, BV)[None, :]                  # [K, BV] in [K, V]
    if HAS_H0:
        S = tl.load(h0 + base + state)
    else:
        S = tl.zeros([K, BV], dtype=tl.float32)
    for t in range(T):  # runtime trip count: Triton 3.6's interpreter needs numpy < 2.4 for this
        bt = b * T + t
        # any input dtype, upcast on load: no conversion kernels in front of a decode step
        b_q = tl.load(q + bt * s_qk + h * K + ck).to(tl.float32) * scale      # [K]
        b_k = tl.load(k + bt * s_qk + h * K + ck).to(tl.float32)              # [K]
        b_g = tl.load(g + bt * s_qk + h * K + ck).to(tl.float32)              # [K]
        b_v = tl.load(v + bt * s_v + h * V + cv).to(tl.float32)               # [BV]
        b_beta = tl.load(beta + bt * s_beta + h).to(tl.float32)
        # 1. decay rows; natural exp is safe here: one token's g, exponent <= 0 (-inf gives 0)
        S = S * tl.exp(b_g)[:, None]
        # 2. delta write with the decayed state: v_old = S^T k, S += k (beta (v - v_old))^T
        delta = b_beta * (b_v - tl.sum(b_k[:, None] * S, axis=0))             # [BV]
        S = S + b_k[:, None] * delta[None, :]
        # 3. read the updated state: o = S^T (scale q); elementwise products and sums, no tl.dot
        b_o = tl.sum(b_q[:, None] * S, axis=0)                                 # [BV]
        tl.store(o + bt * s_v + h * V + cv, b_o.to(o.dtype.element_ty))
    if STORE_HT:
        tl.store(ht + base + state, S)


def fused_recurrent_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False):
    """Token-by-token KDA in one kernel, for decode (T = 1) and short inputs (long ones: chunk_kda).

    Same signature and result as kda_ref.recurrent_kda: o [B, T, H, V] in v's dtype and the final
    state [B, H, K, V] fp32 (or None). Inputs may be in any float dtype; all arithmetic is fp32.
    """
    B, T, H, K, V = _check_shapes("fused_recurrent_kda", q, k, v, g, beta, initial_state)
    scale = K ** -0.5 if scale is None else scale
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))   # free if they already are
    h0 = None if initial_state is None else initial_state.float().contiguous()
    # a new final state, as recurrent_kda returns (ht = h0 would update it in place: also correct)
    ht = q.new_empty(B, H, K, V, dtype=torch.float32) if output_final_state else None
    o = torch.empty_like(v)
    BV = min(BV_STEP, V)
    _kda_step_kernel[(B * H, V // BV)](
        q, k, v, g, beta, o, h0, ht,
        T, H, scale, H * K, H * V, H,
        K=K, V=V, BV=BV, HAS_H0=h0 is not None, STORE_HT=output_final_state,
        num_warps=STEP_WARPS)
    return o, ht


if __name__ == "__main__":
    # Self-check of chunk_kda against the fp32 recurrence: small shapes in Triton's CPU interpreter,
    # the 48B layer's shapes on a GPU. (python -m tools.kernels kda times the kernels.)
    from kda_ref import random_inputs, recurrent_kda

    def errors(inputs):
        """Relative L2 errors of (o, final state) vs the fp32 recurrence on the same inputs."""
        o, S = chunk_kda(*inputs, output_final_state=True)
        o_ref, S_ref = recurrent_kda(*(x.float() for x in inputs), output_final_state=True)
        assert torch.isfinite(o).all() and torch.isfinite(S).all()
        return [((a.float() - b).norm() / b.norm()).item() for a, b in ((o, o_ref), (S, S_ref))]

    torch.manual_seed(0)
    if torch.cuda.is_available():
        device = "cuda"
        print(f"{torch.cuda.get_device_name()}: the 48B layer's shapes")
        shapes = [(1, 4096, 32, 128, 128, torch.float32), (1, 4096, 32, 128, 128, torch.bfloat16),
                  (8, 4096, 32, 128, 128, torch.bfloat16)]
    else:
        device = "cpu"
        print("no CUDA: self-check in the Triton CPU interpreter at small shapes")
        shapes = [(1, 100, 2, 32, 32, torch.float32), (2, 130, 1, 16, 64, torch.float32),
                  (1, 100, 2, 32, 32, torch.bfloat16)]
    for B, T, H, K, V, dtype in shapes:
        err_o, err_S = errors(random_inputs(B, T, H, K, V, dtype, device))
        name = f"B={B} T={T} H={H} K={K} V={V} {str(dtype)[6:]:>8}"
        print(f"{name}: err o {err_o:.1e}  err S {err_S:.1e}")
