"""Chunked KDA backward in four Triton kernels: the gradients of kda_triton.chunk_kda, its forward
steps (read kda_triton.py first) run backwards; docs/kda.md §5a derives each formula. Per chunk,
with S the state entering it, dS' the gradient of the state leaving it, dO of its output:
  _kda_bwd_scan_kernel, chunks last to first: dv_new = Aqk^T dO + kg dS', and dS' of the chunk
    before = 2^gamma dS' + qg^T dO - w^T dv_new (qg, Aqk carry scale; finally d initial_state)
  _kda_bwd_wy_kernel: dU = Tinv^T dv_new, dv = beta dU, dAqk = dO v_new^T, dAkk = -dU v_new^T
  _kda_bwd_sub_kernel: step 2 reversed, per 16-row sub-chunk: partials of dq, dk, dG through A
  _kda_bwd_intra_kernel: dq, dk through S, dS' and w, plus those partials; dG = q dq + k (dk
    through 2^G factors) - k (dk through 2^-G factors), and dg = the reverse cumsum of dG
No exponent is ever positive (the forward's anchors, G_FLOOR). Saved by the forward only for a
gradient: Aqk, w, qg, kg, 2^gamma, Tinv (fp32), h_n, v_new. G and its 2^G factors are recomputed
here, u is never needed, and every gradient stays fp32 until stored.
"""
import torch

from fast import INTERPRET  # noqa: I001 (first: without a GPU it chooses Triton's interpreter)
import triton
import triton.language as tl

C = 64                      # chunk size, the forward's and the backward's
BC = 16                     # diagonal block size of Akk / Aqk (smallest tl.dot tile)
# Fixed tiles (no autotune), each the fastest tried on an H100 (docs/kda.md §5a); the intra
# kernel's [C, 64] K-slices spill on sm_90 but win: fewer re-reads of dO, v_new, dv_new and Tinv.
BV_BWD_SCAN, BV_BWD, BK_BWD = 64, 16, 64
BWD_SCAN_WARPS, BWD_WY_WARPS, BWD_INTRA_WARPS, BWD_SCAN_STAGES = 4, 8, 8, 3
BK_BWD_SUB, BWD_SUB_WARPS = 32, 2
# Globals read inside @triton.jit must be tl.constexpr (compiled Triton refuses plain globals).
# 1 / ln 2: g goes to log2 units once, then exp2 everywhere (docs/kda.md §4)
RCP_LN2 = tl.constexpr(1.4426950408889634)
G_FLOOR = tl.constexpr(-128.0)              # per-token gate floor (nats): see kda_triton step 1


@triton.jit
def _dot(a, b, DOT: tl.constexpr, PREC: tl.constexpr):
    # Operands are cast to DOT: bf16 on a GPU for speed, fp32 in the interpreter, whose bf16 tl.dot
    # is silently wrong. PREC is 'ieee' for fp32 inputs, else a GPU uses TF32 (docs/kda.md §6).
    return tl.dot(a.to(DOT), b.to(DOT), input_precision=PREC)


@triton.jit
def _gate(g, p, mask):
    # g at offsets p (0 where masked), clamped below at G_FLOOR (kda_triton step 1 says why)
    return tl.maximum(tl.load(g + p, mask=mask, other=0.), G_FLOOR)


def precision(dtype):
    """(storage dtype of the intermediates, scan dot operand dtype, tl.dot precision) for inputs
    of `dtype`, shared by the forward and the backward."""
    low = dtype in (torch.bfloat16, torch.float16)
    # bf16 storage and bf16 scan dots only when compiled: the interpreter's bf16 tl.dot is wrong and
    # its fp32 -> bf16 casts truncate instead of rounding to nearest (twice the error, and biased).
    mid = torch.bfloat16 if low and not INTERPRET else torch.float32
    dot = tl.bfloat16 if low and not INTERPRET else tl.float32
    return mid, dot, "tf32" if low else "ieee"


@triton.jit
def _kda_bwd_scan_kernel(qg, kg, w, Aqk, decay, do, dht, dhn, dvn, dh0,    # pointers
                         T, H, NT, s_o,                                   # sizes, do's token stride
                         K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BV: tl.constexpr,
                         HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr, DOT: tl.constexpr,
                         PREC: tl.constexpr):
    """Steps 7, 6, 5 reversed, chunks last to first: dv_new per chunk and dS' per chunk."""
    iv = tl.program_id(0).to(tl.int64)          # int64 so that offsets cannot overflow
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    i = tl.arange(0, C)
    ck = tl.arange(0, K)
    cv = iv * BV + tl.arange(0, BV)
    state = (bh * K + ck[:, None]) * V + cv[None, :]                      # [K, BV] in [B*H, K, V]
    dS = tl.load(dht + state) if HAS_DHT else tl.zeros([K, BV], dtype=tl.float32)   # [K, BV]
    for m in range(NT):  # runtime trip count: Triton 3.6's interpreter needs numpy < 2.4 for this
        n = NT - 1 - m
        row = (bh * NT + n) * C + i                                      # [C] intermediate rows
        # the transposed operands are loaded transposed (swapped strides), never tl.trans'ed: a
        # tl.trans of a tl.dot result fed into tl.dot miscompiles on Hopper (docs/kda.md §6)
        b_AT = tl.load(Aqk + row[None, :] * C + i[:, None])              # [C, C] Aqk^T
        b_kg = tl.load(kg + row[:, None] * K + ck[None, :])               # [C, K]
        b_qgT = tl.load(qg + row[None, :] * K + ck[:, None])              # [K, C]
        b_wT = tl.load(w + row[None, :] * K + ck[:, None])                # [K, C]
        b_decay = tl.load(decay + (bh * NT + n) * K + ck)                 # [K] 2^gamma
        t = n * C + i
        b_do = tl.load(do + ((b * T + t) * s_o + h * V)[:, None] + cv[None, :],
                       mask=(t < T)[:, None], other=0.)                   # [C, BV]
        tl.store(dhn + ((bh * NT + n) * K + ck[:, None]) * V + cv[None, :],
                 dS.to(dhn.dtype.element_ty))                            # dS' of chunk n
        # ---- 6. and 7. reversed: v_new feeds o through Aqk and the next state through kg ----
        b_dvn = _dot(b_AT, b_do, DOT, PREC) + _dot(b_kg, dS, DOT, PREC)   # [C, BV]
        tl.store(dvn + row[:, None] * V + cv[None, :], b_dvn)
        # ---- 7., 6. and 5. reversed: S feeds S' (2^gamma), o (qg) and v_new (-w) ----
        dS = b_decay[:, None] * dS + _dot(b_qgT, b_do, DOT, PREC) - _dot(b_wT, b_dvn, DOT, PREC)
    if STORE_DH0:
        tl.store(dh0 + state, dS)


@triton.jit
def _kda_bwd_wy_kernel(v, beta, do, vn, dvn, tinv, dv, dAqk, dAkk, dbeta_wy,   # pointers
                       T, H, scale, s_v, s_beta,                 # sizes, token strides
                       V: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """Steps 4 (u = Tinv beta v) and 3 reversed for one chunk: dv, part of dbeta, dAqk, dAkk."""
    n = tl.program_id(0).to(tl.int64)          # chunk; int64 so that offsets cannot overflow
    bh = tl.program_id(1).to(tl.int64)
    NT = tl.num_programs(0)
    b, h = bh // H, bh % H
    i = tl.arange(0, C)
    t = n * C + i
    valid = t < T                                # ragged last chunk: rows past T load 0
    bt = b * T + t
    row = (bh * NT + n) * C + i
    b_beta = tl.load(beta + bt * s_beta + h, mask=valid, other=0.)                  # [C]
    b_TT = tl.load(tinv + row[None, :] * C + i[:, None])         # [C, C] Tinv^T, swapped strides
    dA_qk = tl.zeros([C, C], dtype=tl.float32)
    dA_kk = tl.zeros([C, C], dtype=tl.float32)
    b_db = tl.zeros([C], dtype=tl.float32)
    for v0 in range(0, V, BV):
        cv = v0 + tl.arange(0, BV)
        # dU = the gradient of (beta v) and, through v_new = u - w S, all that Tinv receives:
        # dTinv = dv_new (beta v - beta k 2^G S)^T, so dAkk = -Tinv^T dTinv Tinv^T = -dU v_new^T
        b_dU = _dot(b_TT, tl.load(dvn + row[:, None] * V + cv[None, :]), tl.float32, PREC)
        p_v = bt[:, None] * s_v + h * V + cv[None, :]                     # [C, BV] offsets
        b_v = tl.load(v + p_v, mask=valid[:, None], other=0.).to(tl.float32)
        b_db += tl.sum(b_v * b_dU, axis=1)
        tl.store(dv + p_v, (b_beta[:, None] * b_dU).to(dv.dtype.element_ty), mask=valid[:, None])
        b_do = tl.load(do + p_v, mask=valid[:, None], other=0.)
        b_vnT = tl.load(vn + row[None, :] * V + cv[:, None])              # [BV, C] v_new^T
        dA_qk += _dot(b_do, b_vnT, tl.float32, PREC)
        dA_kk -= _dot(b_dU, b_vnT, tl.float32, PREC)
    out = row[:, None] * C + i[None, :]
    # masked with where (never a product with a 0/1 mask), scale folded in as the forward does
    tl.store(dAqk + out, tl.where(i[:, None] >= i[None, :], dA_qk * scale, 0.))
    tl.store(dAkk + out, tl.where(i[:, None] > i[None, :], dA_kk, 0.))
    tl.store(dbeta_wy + row, b_db)


@triton.jit
def _kda_bwd_sub_kernel(q, k, g, beta, dAqk, dAkk,                     # pointers: inputs
                        dq2, dk2, dG2, db2,                             # pointers: fp32 outputs
                        T, H, s_qk, s_beta,                             # sizes, token strides
                        K: tl.constexpr, C: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                        PREC: tl.constexpr):
    """Step 2 reversed for a 16-row sub-chunk r and a K slice, r as the rows i (dqA; dkA through
    Akk) and as the columns j (dkc). For the intra kernel (fp32, 0 past T): dq2 = dqA + dAqk_ii k,
    dk2 = beta dkA + dkc + dAqk_ii q, dG2 = q dqA + beta k dkA - k dkc, db2 = sum_slice k dkA."""
    NC: tl.constexpr = C // BC                   # sub-chunks per chunk
    NK: tl.constexpr = K // BK                   # K slices
    ik = tl.program_id(0) // NC                  # the K slice
    r = tl.program_id(0) % NC                    # the sub-chunk
    n = tl.program_id(1).to(tl.int64)            # chunk; int64 so that offsets cannot overflow
    bh = tl.program_id(2).to(tl.int64)
    NT = tl.num_programs(1)
    b, h = bh // H, bh % H
    # the chunk as an int64 base plus int32 offsets within it, as the intra kernel
    tok = b * T + n * C                          # the chunk's first token in [B, T]
    rows = (bh * NT + n) * C                     # its first row in the [B*H, NT*C, *] scratch
    q, k, g = q + tok * s_qk + h * K, k + tok * s_qk + h * K, g + tok * s_qk + h * K
    beta = beta + tok * s_beta + h
    dAqk, dAkk = dAqk + rows * C, dAkk + rows * C
    ii = tl.arange(0, BC)                        # row within a sub-chunk
    c = ik * BK + tl.arange(0, BK)               # the K slice's columns
    i = r * BC + ii                              # [BC] sub-chunk r's tokens within the chunk
    left = T - n * C                             # tokens of the chunk before T (rows >= left: pad)
    valid = i < left
    p = i[:, None] * s_qk + c[None, :]                                   # [BC, BK] offsets
    b_q = tl.load(q + p, mask=valid[:, None], other=0.).to(tl.float32)   # [BC, BK]
    b_k = tl.load(k + p, mask=valid[:, None], other=0.).to(tl.float32)   # [BC, BK]
    b_beta = tl.load(beta + i * s_beta, mask=valid, other=0.)             # [BC]
    # ---- 1. G inside sub-chunk r, as the forward builds it: Gb_i = G_i - n_r, n_r = G at the
    # last row of sub-chunk r-1; tail_j = m_r - G_j (m_r = G at r's last row), the sum of g
    # after j in r summed directly one row on, not tot_r - Gb_j, a difference of cumsums that
    # lost accuracy (docs/kda.md §5a) ----
    b_Gb = tl.cumsum(_gate(g, p, valid[:, None]), axis=0) * RCP_LN2           # [BC, BK] <= 0
    e_Gb = tl.exp2(b_Gb)                                                    # 2^(G_i - n_r)
    g_next = _gate(g, p + s_qk, ((ii < BC - 1) & (i + 1 < left))[:, None])
    tail = tl.cumsum(g_next, axis=0, reverse=True) * RCP_LN2                  # [BC, BK] <= 0

    # ---- rows i in r, columns j in the sub-chunks before r: anchor n_r. The column operand
    # k_j 2^(n_r - G_j), n_r - G_j = tail_j + the totals of the sub-chunks strictly between ----
    row_q = tl.zeros([BC, BK], dtype=tl.float32)        # sum_j dAqk_ij k_j 2^(n_r - G_j)
    row_k = tl.zeros([BC, BK], dtype=tl.float32)        # sum_j dAkk_ij k_j 2^(n_r - G_j)
    between = tl.zeros([BK], dtype=tl.float32)          # sum of g after sub-chunk cb, up to n_r
    for m in range(1, r + 1):                          # column sub-chunk cb = r-1, ..., 0
        j = (r - m) * BC + ii                           # [BC] its tokens
        okj = (j < left)[:, None]                        # (all of them where r has a valid row)
        pj = j[:, None] * s_qk + c[None, :]                                  # [BC, BK]
        k_j = tl.load(k + pj, mask=okj, other=0.).to(tl.float32)
        g_j = _gate(g, pj, okj)
        g_jn = _gate(g, pj + s_qk, ((ii < BC - 1) & (j + 1 < left))[:, None])
        tail_j = tl.cumsum(g_jn, axis=0, reverse=True) * RCP_LN2
        # every j here is before every i: no entry to mask, and the exponent is <= 0
        k_col = k_j * tl.exp2(tail_j + between[None, :])                    # [BC, BK]
        p_A = i[:, None] * C + j[None, :]                                    # [BC, BC] dA[i, j]
        row_q += _dot(tl.load(dAqk + p_A), k_col, tl.float32, PREC)
        row_k += _dot(tl.load(dAkk + p_A), k_col, tl.float32, PREC)
        between += tl.sum(g_j, axis=0) * RCP_LN2       # sub-chunk cb's total joins the anchor
    d_qA = row_q * e_Gb                                  # dq through Aqk
    d_kA = row_k * e_Gb                                  # dk through Akk's rows, before beta_i

    # ---- columns j in r, rows i in the sub-chunks after r: anchor m_r, G at r's last row. The
    # row operand x_i 2^(G_i - m_r), G_i - m_r = Gb_i + the totals strictly between; the column
    # factor 2^(m_r - G_j) = 2^tail_j. dA^T tiles by swapped strides (no tl.trans) ----
    col = tl.zeros([BC, BK], dtype=tl.float32)          # sum_i (dAqk q_i + dAkk beta_i k_i)
    between = tl.zeros([BK], dtype=tl.float32)          #       2^(G_i - m_r)
    for rb in range(r + 1, NC):                         # row sub-chunk rb
        i2 = rb * BC + ii                                # [BC] its tokens
        ok = i2 < left
        pi = i2[:, None] * s_qk + c[None, :]                                 # [BC, BK]
        Gb_i = tl.cumsum(_gate(g, pi, ok[:, None]), axis=0) * RCP_LN2       # G_i - n_rb <= 0
        e_row = tl.exp2(Gb_i + between[None, :])                            # 2^(G_i - m_r)
        q_i = tl.load(q + pi, mask=ok[:, None], other=0.).to(tl.float32)
        k_i = tl.load(k + pi, mask=ok[:, None], other=0.).to(tl.float32)
        beta_i = tl.load(beta + i2 * s_beta, mask=ok, other=0.)
        p_AT = i2[None, :] * C + i[:, None]                                  # [BC, BC] dA[i, j]^T
        col += _dot(tl.load(dAqk + p_AT), q_i * e_row, tl.float32, PREC)
        col += _dot(tl.load(dAkk + p_AT), beta_i[:, None] * k_i * e_row, tl.float32, PREC)
        between += tl.sum(tl.where((ii == BC - 1)[:, None], Gb_i, 0.), axis=0)  # rb's total
    d_kc = col * tl.exp2(tail)                           # dk through the column sides

    # ---- r's own block, one loop over the distance d: lane ii is the row i (column i - d) and
    # the column i (row i + d). The exponents, sums of g over (column, row], are running sums
    # (E_r adds g_{i-d+1}, E_c adds g_{i+d}), masked to -inf outside r BEFORE exp2 (exp2(-inf) =
    # 0, never inf * 0 = NaN). i - d < 0 is a negative offset: masked lanes are never read ----
    E_r = tl.zeros([BC, BK], dtype=tl.float32)
    E_c = tl.zeros([BC, BK], dtype=tl.float32)
    for d in range(1, BC):
        up = ii >= d                                     # [BC] j = i - d still in r
        E_r += _gate(g, p - (d - 1) * s_qk, (up & (i - d + 1 < left))[:, None]) * RCP_LN2
        k_j = tl.load(k + p - d * s_qk, mask=(up & (i - d < left))[:, None], other=0.)
        kd = k_j.to(tl.float32) * tl.exp2(tl.where(up[:, None], E_r, float("-inf")))
        at = i * C + i - d                                                     # [BC] dA[i, j]
        d_qA += tl.load(dAqk + at, mask=up, other=0.)[:, None] * kd
        d_kA += tl.load(dAkk + at, mask=up, other=0.)[:, None] * kd
        dn = ii + d < BC                                 # [BC] i + d still in r
        ok = dn & (i + d < left)
        E_c += _gate(g, p + d * s_qk, ok[:, None]) * RCP_LN2
        q_i = tl.load(q + p + d * s_qk, mask=ok[:, None], other=0.).to(tl.float32)   # [BC, BK]
        k_i = tl.load(k + p + d * s_qk, mask=ok[:, None], other=0.).to(tl.float32)
        beta_i = tl.load(beta + (i + d) * s_beta, mask=ok, other=0.)
        at = (i + d) * C + i                                                   # [BC] dA[i+d, i]
        a_q = tl.load(dAqk + at, mask=dn, other=0.)
        a_k = tl.load(dAkk + at, mask=dn, other=0.) * beta_i
        e_c = tl.exp2(tl.where(dn[:, None], E_c, float("-inf")))
        d_kc += (a_q[:, None] * q_i + a_k[:, None] * k_i) * e_c

    # ---- the combination. j = i (Aqk's diagonal, factor 1) is left out of dG, not added and
    # cancelled in fp32: it would give dG_i q_i dAqk_ii k_i - k_i dAqk_ii q_i = 0 exactly ----
    a_ii = tl.load(dAqk + i * C + i)[:, None]            # [BC, 1] dAqk[i, i]
    out = (rows + i)[:, None] * K + c[None, :]           # [BC, BK] in [B*H, NT*C, K]
    on = valid[:, None]                       # zeros past T: the intra kernel adds every row
    tl.store(dq2 + out, tl.where(on, d_qA + a_ii * b_k, 0.))
    tl.store(dk2 + out, tl.where(on, b_beta[:, None] * d_kA + d_kc + a_ii * b_q, 0.))
    tl.store(dG2 + out, tl.where(on, b_q * d_qA + b_k * b_beta[:, None] * d_kA - b_k * d_kc, 0.))
    tl.store(db2 + ((bh * NT + n) * NK + ik) * C + i, tl.where(valid, tl.sum(b_k * d_kA, 1), 0.))


@triton.jit
def _kda_bwd_intra_kernel(q, k, g, beta, do, vn, dvn, hn, dhn, tinv, dbeta_wy,  # pointers: in
                          dq2, dk2, dG2, db2,                     # in: step 2's part (fp32)
                          dq, dk, dg, dbeta,                      # pointers: the gradients
                          T, H, scale, s_qk, s_v, s_beta,         # sizes, token strides
                          K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BC: tl.constexpr,
                          BK: tl.constexpr, BV: tl.constexpr, NK2: tl.constexpr,
                          PREC: tl.constexpr):
    """Steps 4 (w, qg, kg) and 1 reversed for a chunk, plus the sub kernel's: dq, dk, dg, dbeta."""
    n = tl.program_id(0).to(tl.int64)          # chunk; int64 so that offsets cannot overflow
    bh = tl.program_id(1).to(tl.int64)
    NT = tl.num_programs(0)
    b, h = bh // H, bh % H
    NB: tl.constexpr = C // BC
    i = tl.arange(0, C)                          # token within the chunk (rows; also columns j)
    ii = i % BC                                  # its row within the block
    valid = n * C + i < T                        # ragged last chunk: rows past T load 0
    # Every tensor's chunk as an int64 base (one per program) plus int32 offsets within the chunk,
    # as kda_triton's scan does with the state: int64 [C, *] offsets would take twice the registers.
    tok = b * T + n * C                          # the chunk's first token in [B, T]
    rows = (bh * NT + n) * C                     # its first row in the [B*H, NT*C, *] scratch
    q, k, g = q + tok * s_qk + h * K, k + tok * s_qk + h * K, g + tok * s_qk + h * K
    do, beta, dbeta = do + tok * s_v + h * V, beta + tok * s_beta + h, dbeta + tok * s_beta + h
    dq, dk, dg = dq + tok * s_qk + h * K, dk + tok * s_qk + h * K, dg + tok * s_qk + h * K
    vn, dvn, tinv = vn + rows * V, dvn + rows * V, tinv + rows * C
    dq2, dk2, dG2 = dq2 + rows * K, dk2 + rows * K, dG2 + rows * K
    b_beta = tl.load(beta + i * s_beta, mask=valid, other=0.)                       # [C]
    blk_c = tl.arange(0, NB)[:, None, None]      # [NB, 1, 1] and [1, NB, 1]: block indices
    blk_m = tl.arange(0, NB)[None, :, None]
    r3 = tl.arange(0, BC)[None, :, None]         # [1, BC, 1] row within a block
    b_db = tl.load(dbeta_wy + rows + i)          # the wy kernel's part of dbeta, and the
    for s in tl.static_range(NK2):               # sub kernel's (NK2 partials, one per K slice)
        b_db += tl.load(db2 + ((bh * NT + n) * NK2 + s) * C + i)
    hn, dhn = hn + (bh * NT + n) * K * V, dhn + (bh * NT + n) * K * V      # S and dS' of chunk n
    for k0 in range(0, K, BK):  # a loop, not unrolled: compile time
        c = k0 + tl.arange(0, BK)
        p = i[:, None] * s_qk + c[None, :]                                 # [C, BK] offsets
        b_q = tl.load(q + p, mask=valid[:, None], other=0.).to(tl.float32)
        b_k = tl.load(k + p, mask=valid[:, None], other=0.).to(tl.float32)
        g_in = tl.load(g + p, mask=valid[:, None], other=0.)
        # ---- 1. G as the forward builds it: 16-row block cumsums Gb plus block totals; the sum
        # of g after j in its block (tot_c - Gb_j) summed directly, one row on (kda_triton's
        # kernel 2): 2^G_i and 2^(gamma - G_i), each exponent a sum of gates, never positive ----
        g_c = tl.reshape(tl.maximum(g_in, G_FLOOR), [NB, BC, BK])         # clamped as forward
        Gb3 = tl.cumsum(g_c, axis=1) * RCP_LN2
        tot = tl.sum(tl.where(r3 == BC - 1, Gb3, 0.), axis=1)               # [NB, BK] block totals
        g_next = _gate(g, p + s_qk, ((ii < BC - 1) & (n * C + i + 1 < T))[:, None])
        tail3 = tl.cumsum(tl.reshape(g_next, [NB, BC, BK]), axis=1, reverse=True) * RCP_LN2
        before = tl.sum(tl.where(blk_m < blk_c, tot[None, :, :], 0.), axis=1)   # blocks before c
        after = tl.sum(tl.where(blk_m > blk_c, tot[None, :, :], 0.), axis=1)    # blocks after c
        e_G = tl.exp2(tl.reshape(Gb3 + before[:, None, :], [C, BK]))           # 2^G_i
        e_kg = tl.exp2(tl.reshape(tail3 + after[:, None, :], [C, BK]))         # 2^(gamma - G_i)
        e_gamma = tl.exp2(tl.sum(tot, axis=0))                                  # [BK]

        # ---- 4. reversed, the state's part: qg, kg and w met S or dS' in the scan ----
        d_qg = tl.zeros([C, BK], dtype=tl.float32)          # dO S^T
        d_w = tl.zeros([C, BK], dtype=tl.float32)           # dv_new S^T
        d_kg = tl.zeros([C, BK], dtype=tl.float32)          # v_new dS'^T
        S_dS = tl.zeros([BK], dtype=tl.float32)             # sum_v S dS', for 2^gamma
        for v0 in range(0, V, BV):
            cv = v0 + tl.arange(0, BV)
            b_do = tl.load(do + i[:, None] * s_v + cv[None, :], mask=valid[:, None],
                           other=0.)                                          # [C, BV]
            b_dvn = tl.load(dvn + i[:, None] * V + cv[None, :])              # [C, BV]
            b_vn = tl.load(vn + i[:, None] * V + cv[None, :])                # [C, BV]
            st = c[None, :] * V + cv[:, None]                                 # [BV, BK] S^T
            b_hT = tl.load(hn + st).to(tl.float32)
            b_dhT = tl.load(dhn + st).to(tl.float32)
            d_qg += _dot(b_do, b_hT, tl.float32, PREC)
            d_w += _dot(b_dvn, b_hT, tl.float32, PREC)
            d_kg += _dot(b_vn, b_dhT, tl.float32, PREC)
            S_dS += tl.sum(b_hT * b_dhT, axis=0)
        b_dq = d_qg * scale * e_G
        d_kg = d_kg * e_kg                                   # the gradient of k through kg
        # w = Tinv (beta k 2^G): the gradient of (beta k 2^G) is Tinv^T (-dv_new S^T)
        b_TT = tl.load(tinv + i[None, :] * C + i[:, None])       # [C, C] Tinv^T, swapped strides
        d_kb = -_dot(b_TT, d_w, tl.float32, PREC)
        b_dk = b_beta[:, None] * e_G * d_kb + d_kg
        b_db += tl.sum(b_k * e_G * d_kb, axis=1)
        # what G receives from each factor x 2^(+-G): +-x dx (unit-free: no ln 2 anywhere)
        b_dG = b_q * b_dq + b_k * b_beta[:, None] * e_G * d_kb - b_k * d_kg
        # gamma: through kg = k 2^(gamma - G) and S' = 2^gamma S + ...
        d_gamma = tl.sum(b_k * d_kg, axis=0) + e_gamma * S_dS                  # [BK]

        # ---- 2. reversed, from _kda_bwd_sub_kernel: the gradients through Aqk and Akk ----
        p_2 = i[:, None] * K + c[None, :]                    # [C, BK] in [B*H, NT*C, K]
        b_dq += tl.load(dq2 + p_2)
        b_dk += tl.load(dk2 + p_2)
        b_dG += tl.load(dG2 + p_2)
        # gamma is G at the last row (padded rows past T add g = 0): its gradient joins there
        b_dG += tl.where((i == C - 1)[:, None], d_gamma[None, :], 0.)
        # ---- 1. reversed: G = cumsum of g in the chunk, so dg = the reverse cumsum of dG; the
        # clamp at G_FLOOR passes no gradient below it ----
        b_dg = tl.where(g_in >= G_FLOOR, tl.cumsum(b_dG, axis=0, reverse=True), 0.)
        tl.store(dq + p, b_dq.to(dq.dtype.element_ty), mask=valid[:, None])
        tl.store(dk + p, b_dk.to(dk.dtype.element_ty), mask=valid[:, None])
        tl.store(dg + p, b_dg, mask=valid[:, None])
    tl.store(dbeta + i * s_beta, b_db, mask=valid)


def chunk_kda_bwd(q, k, v, g, beta, scale, saved, do, dht, need_dh0):
    """Gradients of kda_triton.chunk_kda from what its forward saved.

    q, k, g [B, T, H, K]; v, do [B, T, H, V]; beta [B, T, H] (contiguous, g and beta fp32);
    saved = (Aqk, w, qg, kg, decay, tinv, hn, vn), the forward's [B*H, NT*C, *] intermediates;
    dht [B, H, K, V] fp32 or None. Returns dq, dk, dv in the inputs' dtypes, dg, dbeta fp32 and
    d initial_state [B, H, K, V] fp32 (None unless need_dh0).
    """
    Aqk, w, qg, kg, decay, tinv, hn, vn = saved
    B, T, H, K = q.shape
    V = v.shape[-1]
    NT = triton.cdiv(T, C)
    mid, dot, prec = precision(q.dtype)
    f32 = dict(device=q.device, dtype=torch.float32)
    do = do.contiguous()
    dht = None if dht is None else dht.float().contiguous()
    dvn = torch.empty(B * H, NT * C, V, **f32)
    dhn = torch.empty_like(hn)                                   # [B*H, NT, K, V]: dS' per chunk
    dh0 = torch.empty(B, H, K, V, **f32) if need_dh0 else None
    BV = min(BV_BWD_SCAN, V)
    # 3 stages prefetch two chunks ahead: three sets of shared-memory tiles fit only when small
    # (bf16, K <= 128; fp32 at K = 128 would need 294,912 bytes, more than a block has)
    stages = BWD_SCAN_STAGES if mid == torch.bfloat16 and K <= 128 else 1
    _kda_bwd_scan_kernel[(V // BV, B * H)](
        qg, kg, w, Aqk, decay, do, dht, dhn, dvn, dh0, T, H, NT, H * V,
        K=K, V=V, C=C, BV=BV, HAS_DHT=dht is not None, STORE_DH0=need_dh0,
        DOT=dot, PREC=prec, num_warps=BWD_SCAN_WARPS, num_stages=stages)
    dv = torch.empty_like(v)
    dAqk, dAkk = (torch.empty(B * H, NT * C, C, **f32) for _ in "qk")
    dbeta_wy = torch.empty(B * H, NT * C, **f32)
    _kda_bwd_wy_kernel[(NT, B * H)](
        v, beta, do, vn, dvn, tinv, dv, dAqk, dAkk, dbeta_wy, T, H, scale, H * V, H,
        V=V, C=C, BV=min(BV_BWD, V), PREC=prec, num_warps=BWD_WY_WARPS)
    dq2, dk2, dG2 = (torch.empty(B * H, NT * C, K, **f32) for _ in range(3))
    BK2 = min(BK_BWD_SUB, K)
    db2 = torch.empty(B * H, NT, K // BK2, C, **f32)
    _kda_bwd_sub_kernel[(K // BK2 * (C // BC), NT, B * H)](
        q, k, g, beta, dAqk, dAkk, dq2, dk2, dG2, db2, T, H, H * K, H,
        K=K, C=C, BC=BC, BK=BK2, PREC=prec, num_warps=BWD_SUB_WARPS)
    dq, dk, dg, dbeta = (torch.empty_like(x) for x in (q, k, g, beta))
    _kda_bwd_intra_kernel[(NT, B * H)](
        q, k, g, beta, do, vn, dvn, hn, dhn, tinv, dbeta_wy, dq2, dk2, dG2, db2,
        dq, dk, dg, dbeta, T, H, scale, H * K, H * V, H,
        K=K, V=V, C=C, BC=BC, BK=min(BK_BWD, K), BV=min(BV_BWD, V), NK2=K // BK2, PREC=prec,
        num_warps=BWD_INTRA_WARPS)
    return dq, dk, dv, dg, dbeta, dh0
