"""
Kimi Delta Attention (KDA), the readable reference. Read this file first.

KDA is a linear attention whose state is a fast-weight matrix S [K, V] per head, updated token by
token with a gated delta rule (Kimi Linear tech report, https://arxiv.org/abs/2510.26692, eq. 1):

    S_t = (I - beta_t k_t k_t^T) Diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T
    o_t = S_t^T (scale q_t)

that is, for every token in order (docs/kda.md §2):
    1. decay each row c of S by exp(g_t[c]);
    2. delta write, using the *decayed* state: S += k_t (beta_t (v_t - S^T k_t))^T;
    3. read the *updated* state: o_t = S^T (scale q_t).

Two forms with one signature (fla's convention, kept by kda_triton.chunk_kda too):
    recurrent_kda   the three steps above, one token at a time: the definition
    chunk_kda_ref   the same result, 64 tokens at a time (the WY / UT transform), steps numbered
                    exactly like the Triton kernels in kda_triton.py

Glossary and layout:
    B batch, T tokens, H heads, K key/query dim, V value dim (Kimi-Linear: H = 32, K = V = 128)
    q, k [B, T, H, K]; v [B, T, H, V]; g [B, T, H, K] natural-log decay <= 0; beta [B, T, H]
    state S [B, H, K, V] float32 (K first; fla's own layer and vLLM store [V, K]: docs/kda.md §1)
    q and k are used as given: the caller L2-normalises them (see l2norm).

Official implementation (fla's naive reference):
https://github.com/fla-org/flash-linear-attention/blob/main/fla/ops/kda/naive.py
"""
import math

import torch
import torch.nn.functional as F


def l2norm(x, eps=1e-6):
    """x / sqrt(sum(x^2) + eps) over the last dim, computed in fp32, returned in x's dtype."""
    x32 = x.float()
    # eps is added to the *sum* of squares, not the mean: an rms_norm here would be off by K in eps
    # (trap 6 in docs/architecture.md).
    return (x32 * torch.rsqrt(x32.square().sum(-1, keepdim=True) + eps)).to(x.dtype)


def kda_gate(f, A_log, dt_bias):
    """Kimi's forget gate g = -exp(A_log) * softplus(f + dt_bias) in fp32.

    f [..., H, K] (the f_b_proj output viewed per head); A_log has H values (one per head, any
    shape); dt_bias has H*K values (one per channel). Unbounded below: per-token g of -85 is normal.
    """
    H, K = f.shape[-2:]
    z = f.float() + dt_bias.float().view(H, K)
    # softplus(z) = z for z > 20 (torch's default threshold, as in the released code); no clamp
    # (trap 3 in docs/architecture.md).
    return -A_log.float().view(H, 1).exp() * F.softplus(z)


def random_inputs(B, T, H, K, V, dtype=torch.float32, device="cpu"):
    """Kimi-like (q, k, v, g, beta) for trying the kernels: L2-normed q and k, Kimi's gate with
    decay rates exp(A_log) in [1, 16], sigmoid beta; q, k, v in dtype, g and beta fp32."""
    q, k = (l2norm(torch.randn(B, T, H, K, device=device)).to(dtype) for _ in range(2))
    v = torch.randn(B, T, H, V, device=device).to(dtype)
    A_log = torch.empty(H, device=device).uniform_(0, math.log(16))
    g = kda_gate(torch.randn(B, T, H, K, device=device), A_log, torch.randn(H * K, device=device))
    beta = torch.randn(B, T, H, device=device).sigmoid()
    return q, k, v, g, beta


def _prepare(q, k, v, g, beta, scale, initial_state):
    """Shared argument handling: upcast to fp32 (fp64 stays fp64) and build the starting state."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype = torch.promote_types(q.dtype, torch.float32)
    scale = K ** -0.5 if scale is None else scale
    q, k, v, g, beta = (x.to(dtype) for x in (q, k, v, g, beta))
    if initial_state is None:
        S = q.new_zeros(B, H, K, V)
    else:
        S = initial_state.to(dtype).clone()
    return q, k, v, g, beta, scale, S


def recurrent_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False):
    """Token-by-token KDA. Returns (o [B, T, H, V] in v's dtype, final S [B, H, K, V] fp32 or None).

    Math is fp32 (fp64 inputs stay fp64, and then so does the returned state).
    """
    out_dtype = v.dtype
    q, k, v, g, beta, scale, S = _prepare(q, k, v, g, beta, scale, initial_state)
    o = torch.empty_like(v)                                            # [B, T, H, V]
    for t in range(q.shape[1]):
        S = S * g[:, t, :, :, None].exp()                              # 1. decay rows [B, H, K, V]
        k_t = k[:, t]                                                  # [B, H, K]
        v_old = torch.einsum('bhk,bhkv->bhv', k_t, S)                  # what S recalls for k_t
        delta = beta[:, t, :, None] * (v[:, t] - v_old)                # [B, H, V]
        S = S + k_t[..., None] * delta[:, :, None, :]                  # 2. delta write
        o[:, t] = torch.einsum('bhk,bhkv->bhv', q[:, t] * scale, S)    # 3. read the updated S
    return o.to(out_dtype), (S if output_final_state else None)


def chunk_kda_ref(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                  chunk_size=64):
    """Chunked KDA (WY / UT transform) in plain PyTorch; same signature and result as recurrent_kda.

    Per chunk of C tokens, with S the state entering it (docs/kda.md §3 derives each line):
      no dependence on S, parallel over chunks (kda_triton: kernels 1 and 2)
        1. G = chunk-local cumsum of g, in log2 units; gamma = G at the last row
        2. Aqk[i, j] = scale sum_c q_i k_j 2^(G_i - G_j)  (j <= i)
           Akk[i, j] = beta_i sum_c k_i k_j 2^(G_i - G_j)  (j < i)
           (kda_triton splits it: 2a the 16 x 16 diagonal blocks, token by token in kernel 1;
           2b the blocks left of them, as matrix products in kernel 2)
        3. Tinv = (I + Akk)^-1 by forward substitution
        4. w = Tinv (beta k 2^G),  u = Tinv (beta v),  qg = q 2^G,  kg = k 2^(gamma - G)
      sequential over chunks (kda_triton: kernel 3)
        5. v_new = u - w S                                  (the pseudo-values, one per token)
        6. o = scale qg S + Aqk v_new
        7. S = 2^gamma S + kg^T v_new
    Every exponent above is <= 0, so nothing overflows whatever the gate (docs/kda.md §4).
    """
    out_dtype = v.dtype
    q, k, v, g, beta, scale, S = _prepare(q, k, v, g, beta, scale, initial_state)
    B, T, H, K = q.shape
    C = chunk_size
    # Pad the tail chunk with zeros: k = v = beta = 0 writes nothing and g = 0 decays nothing, so
    # the padded rows leave the state and the real outputs untouched.
    pad = (-T) % C
    q, k, v, g = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v, g))
    beta = F.pad(beta, (0, 0, 0, pad))
    # [B, T, H, *] -> [B, H, N, C, *]: one row of C tokens per chunk
    q, k, v, g = (x.transpose(1, 2).unflatten(2, (-1, C)) for x in (q, k, v, g))
    beta = beta.transpose(1, 2).unflatten(2, (-1, C))                  # [B, H, N, C]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()    # j <= i
    strict = causal.tril(-1)                                           # j < i
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    o = torch.empty_like(v)                                            # [B, H, N, C, V]
    for n in range(q.shape[2]):
        q_n, k_n, v_n, b_n = q[:, :, n], k[:, :, n], v[:, :, n], beta[:, :, n]
        # 1. chunk-local cumulative decay in log2 units (fold 1/ln 2 once, then exp2 everywhere)
        G = g[:, :, n].cumsum(-2) / math.log(2)                        # [B, H, C, K]
        gamma = G[:, :, -1]                                            # [B, H, K]
        # 2. pairwise decay 2^(G_i - G_j), the exponent masked to -inf *before* exp2 (for j > i it
        # would be > 0 and could overflow)
        diff = G[:, :, :, None, :] - G[:, :, None, :, :]               # [B, H, C(i), C(j), K]
        decay_qk = torch.exp2(diff.masked_fill(~causal[..., None], -math.inf))
        decay_kk = torch.exp2(diff.masked_fill(~strict[..., None], -math.inf))
        Aqk = scale * torch.einsum('bhik,bhjk,bhijk->bhij', q_n, k_n, decay_qk)
        Akk = b_n[..., None] * torch.einsum('bhik,bhjk,bhijk->bhij', k_n, k_n, decay_kk)
        # 3. Tinv = (I + Akk)^-1, unit lower triangular: row i = e_i - sum_{j<i} Akk[i, j] Tinv[j]
        # (rows collected in a list, not written in place, so that autograd can differentiate it)
        rows = [eye[0].expand_as(Akk[:, :, 0])]                        # [B, H, C] each
        for i in range(1, C):
            done = torch.stack(rows, dim=-2)                           # [B, H, i, C]
            rows.append(eye[i] - torch.einsum('bhj,bhjc->bhc', Akk[:, :, i, :i], done))
        Tinv = torch.stack(rows, dim=-2)                               # [B, H, C, C]
        # 4. the WY representation and the pre-decayed operands
        w = Tinv @ (b_n[..., None] * k_n * torch.exp2(G))              # [B, H, C, K]
        u = Tinv @ (b_n[..., None] * v_n)                              # [B, H, C, V]
        qg = q_n * torch.exp2(G)                                       # [B, H, C, K]
        kg = k_n * torch.exp2(gamma[:, :, None] - G)                   # [B, H, C, K]
        # 5. pseudo-values: what each token actually writes, given the state entering the chunk
        v_new = u - w @ S                                              # [B, H, C, V]
        # 6. output: the decayed state's contribution plus the intra-chunk part
        o[:, :, n] = scale * qg @ S + Aqk @ v_new
        # 7. carry the state to the next chunk
        S = torch.exp2(gamma)[..., None] * S + kg.transpose(-1, -2) @ v_new
    o = o.flatten(2, 3).transpose(1, 2)[:, :T]                         # [B, T, H, V]
    return o.to(out_dtype), (S if output_final_state else None)
