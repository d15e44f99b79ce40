"""
Kimi-Linear-48B-A3B in one readable file: every layer, the caches, sharded loading.

Read kda_ref.py first: it defines the KDA recurrence that 20 of the 27 layers are built on.
This file loads the official checkpoint (moonshotai/Kimi-Linear-48B-A3B-{Base,Instruct})
unchanged: module names below are the safetensors names, so there is no rename table.

Glossary (sizes for 48B-A3B):
    B batch, T new tokens, L cached + new tokens, N = B*T tokens seen by the MoE
    D = 2304 hidden size      P = H*K = 4096 KDA projection width (head-major: c = h*128 + d)
    H = 32 KDA heads          K = V = 128 KDA head dims
    W = 4 short-conv width    R = 512 MLA latent rank (+ 64 shared "pe" key dims, unrotated)
    E = 256 routed experts, top 8 per token, plus 1 shared expert
Layer map (0-based): MLA at 3, 7, 11, 15, 19, 23, 26; KDA everywhere else. Layer 0 has a
dense MLP (`mlp`), layers 1..26 a MoE (`block_sparse_moe`). There is no positional encoding:
order enters only through the KDA recurrence, the short convs and the MLA causal mask.

References: the tech report (https://arxiv.org/abs/2510.26692); the official modeling_kimi.py
(https://huggingface.co/moonshotai/Kimi-Linear-48B-A3B-Instruct); fla's fla/ops/kda/naive.py
(https://github.com/fla-org/flash-linear-attention); ours, docs/architecture.md ("§n", "trap n").
"""
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
from checkpoint import CheckpointError, require  # noqa: F401 (kimi.CheckpointError)
from kda_ref import chunk_kda_ref, kda_gate, l2norm, recurrent_kda

try:    # the fast paths need Triton; without it (macOS, say) every layer runs its torch code
    import kda_triton
    from fast import moe as fast_moe, moe_decode as fast_md, pointwise as fast_pw
    from fast import short_conv as fast_conv
except ModuleNotFoundError as e:
    if e.name != "triton":
        raise
    kda_triton = fast_moe = fast_md = fast_pw = fast_conv = None

KERNELS = kda_triton is not None   # the one switch to the fast paths (the end); False: torch


def use_kernels(*tensors, backward=False):
    """Whether a Triton kernel, computing what a layer's torch code computes, replaces it for
    these inputs: KERNELS is on, they are on a GPU, and no gradient is asked for, unless the
    kernel has a backward (backward=True: chunk_kda's; the others are forward-only)."""
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return KERNELS and tensors[0].is_cuda and (backward or not wants_grad)


# ---- Config ----

@dataclass(frozen=True)
class ModelArgs:
    """The model's sizes: the defaults are Kimi-Linear-48B-A3B, the names config.json's. KDA:
    kda_num_heads H, kda_head_dim K = V, short_conv_kernel_size W; full_attn_layers (0-based) are
    MLA, the rest KDA. MLA: kv_lora_rank R; qk_rope_head_dim, a key slot shared by the heads,
    unrotated. intermediate_size: layer 0's MLP, moe_intermediate_size one expert's. (CONFIGS)"""
    vocab_size: int = 163840
    hidden_size: int = 2304
    num_hidden_layers: int = 27
    rms_norm_eps: float = 1e-5
    # KDA (config.json: linear_attn_config)
    kda_num_heads: int = 32
    kda_head_dim: int = 128
    short_conv_kernel_size: int = 4
    full_attn_layers: tuple = (3, 7, 11, 15, 19, 23, 26)
    # MLA
    num_attention_heads: int = 32
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # MLP / MoE
    intermediate_size: int = 9216
    moe_intermediate_size: int = 1024
    num_experts: int = 256
    num_experts_per_token: int = 8
    num_shared_experts: int = 1
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    num_expert_group: int = 1
    topk_group: int = 1
    moe_renormalize: bool = True
    routed_scaling_factor: float = 2.446
    routing_weights_biased: bool = True     # the release's quirk; False: DeepSeek's rule

    def __post_init__(self):
        """Refuse impossible sizes in one line naming the field (checkpoint.check_args)."""
        checkpoint.check_args(self)
        object.__setattr__(self, "full_attn_layers", tuple(self.full_attn_layers))  # hashable

    @classmethod
    def from_json(cls, path):
        """Read an official config.json (checkpoint.read_config); raises CheckpointError."""
        return checkpoint.read_config(cls, path)

    def cache_bytes(self, batch_size, seq_len, dtype=torch.bfloat16):
        """Bytes of setup_cache(batch_size, seq_len): per MLA layer c and k_pe of each
        position; per KDA layer W-1 inputs of q, k, v and the fp32 S [H, K, V]; per row a pad."""
        mla, kda = len(self.full_attn_layers), self.num_hidden_layers - len(self.full_attn_layers)
        P, K = self.kda_num_heads * self.kda_head_dim, self.kda_head_dim
        per_mla = seq_len * (self.kv_lora_rank + self.qk_rope_head_dim) * dtype.itemsize
        per_kda = 3 * P * (self.short_conv_kernel_size - 1) * dtype.itemsize + P * K * 4
        return batch_size * (mla * per_mla + kda * per_kda + 8)


# Named configurations: the released model; `python sample.py --demo`'s (the real vocabulary,
# so the special ids line up; tiny everything else); a classroom model that trains on a CPU in
# minutes. Each keeps the real structure: KDA and MLA layers, a dense layer 0, then MoE.
_SMALL = dict(hidden_size=64, num_hidden_layers=4, full_attn_layers=(1, 3), kda_num_heads=2,
              num_attention_heads=2, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
              v_head_dim=16, intermediate_size=128, moe_intermediate_size=32, num_experts=8,
              num_experts_per_token=2)
CONFIGS = {
    "kimi-linear-48b-a3b": ModelArgs(),
    "demo": ModelArgs(vocab_size=163840, kda_head_dim=32, **_SMALL),
    "tiny": ModelArgs(vocab_size=256, kda_head_dim=16, **_SMALL),
}


# ---- Leaves ----

class RMSNorm(nn.Module):
    """x / rms(x) in fp32, cast back, times the weight (no 1 + w offset)."""
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if use_kernels(x, self.weight):
            return fast_pw.rms_norm(x, self.weight, self.eps)       # the same in one kernel
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)
        return x32.to(x.dtype) * self.weight        # cast back *before* the weight (trap 10)


class GatedRMSNorm(RMSNorm):
    """KDA's o_norm: per-head RMSNorm, times sigmoid(gate); all fp32, one final cast."""
    def forward(self, x, gate):                     # x, gate [B, T, H, V]
        if use_kernels(x, gate, self.weight):
            return fast_pw.gated_rms_norm(x, gate, self.weight, self.eps)
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)
        y = y * self.weight.float() * torch.sigmoid(gate.float())     # not SiLU (trap 8)
        return y.to(x.dtype)


class ShortConv(nn.Conv1d):
    """Depthwise causal conv in time, then SiLU. Weight [C, 1, W]; tap W-1: the newest token."""
    def __init__(self, channels, width):
        super().__init__(channels, channels, width, groups=channels, bias=False)

    def forward(self, x, state=None):
        """x [B, T, C] -> [B, T, C]. state [B, C, W-1]: the last W-1 inputs before x (None:
        zeros, a new sequence); when given, updated in place to the last W-1 inputs of x."""
        if use_kernels(x, self.weight):
            return fast_conv.short_conv(x, self.weight, state)     # the same in one kernel
        xt = x.transpose(1, 2)                                      # [B, C, T]
        if state is None:
            xs = F.pad(xt, (self.kernel_size[0] - 1, 0))           # zeros before the start
        else:
            xs = torch.cat([state, xt], dim=-1)                     # [B, C, W-1+T]
            state.copy_(xs[:, :, -state.shape[-1]:])                # PRE-conv inputs (trap 7)
        y = F.conv1d(xs.float(), self.weight.float(), groups=self.groups)  # fp32, as fla
        return F.silu(y).to(x.dtype).transpose(1, 2)                # one rounding


# ---- Mixers: KDA (20 layers) and MLA (7 layers) ----

def kda_core(q, k, v, g, beta, initial_state=None):
    """q, k (before their L2 norm: fp32, eps on the sum of squares, trap 6), v [B, T, H, K] ->
    (o [B, T, H, V], S fp32 [B, H, K, V]). As the official code: the recurrent form for inputs
    of <= 64 tokens (decode), q and k in fp32; the chunked form for longer ones, q and k rounded
    to the model dtype first (trap 13). The kernels apply 1/sqrt(K)."""
    T, K = q.shape[1], q.shape[-1]
    fast = use_kernels(q, k, v, g, beta)            # the same two forms as Triton kernels
    if T <= 64:
        q, k = l2norm(q.float()), l2norm(k.float())
        kernel = kda_triton.fused_recurrent_kda if fast else recurrent_kda
    elif fast:                                      # the norm and the rounding in one kernel
        q, k = fast_pw.l2norm(q, v.dtype), fast_pw.l2norm(k, v.dtype)
        kernel = kda_triton.chunk_kda
    else:                           # on a GPU chunk_kda trains too (its backward: kda_backward.py)
        q, k = l2norm(q.float()).to(v.dtype), l2norm(k.float()).to(v.dtype)
        train = use_kernels(q, k, v, g, beta, backward=True)
        kernel = kda_triton.chunk_kda if train else chunk_kda_ref
    return kernel(q, k, v, g, beta, scale=K ** -0.5, initial_state=initial_state,
                  output_final_state=True)


class KimiDeltaAttention(nn.Module):
    """KDA mixer (§2.3): project, short conv, fp32 gate and beta, recurrence, o_norm, out."""
    def __init__(self, args: ModelArgs):
        super().__init__()
        D, H, K = args.hidden_size, args.kda_num_heads, args.kda_head_dim
        self.H, self.K, self.W = H, K, args.short_conv_kernel_size
        self.q_proj = nn.Linear(D, H * K, bias=False)
        self.k_proj = nn.Linear(D, H * K, bias=False)
        self.v_proj = nn.Linear(D, H * K, bias=False)
        self.q_conv1d, self.k_conv1d, self.v_conv1d = (ShortConv(H * K, self.W) for _ in range(3))
        # Forget gate, low rank (D -> K -> P, no activation between); A_log per head, dt_bias
        # per channel (trap 4), both fp32 always; initialised as fla does (decay rates 1..16).
        self.f_a_proj = nn.Linear(D, K, bias=False)
        self.f_b_proj = nn.Linear(K, H * K, bias=False)
        self.A_log = nn.Parameter(torch.empty(1, 1, H, 1).uniform_(1, 16).log())
        dt = torch.empty(H * K).uniform_(math.log(1e-3), math.log(0.1)).exp()
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))     # softplus^-1(dt)
        self.b_proj = nn.Linear(D, H, bias=False)
        self.g_a_proj = nn.Linear(D, K, bias=False)             # the output gate, low rank
        self.g_b_proj = nn.Linear(K, H * K, bias=False)
        self.o_norm = GatedRMSNorm(K, eps=args.rms_norm_eps)
        self.o_proj = nn.Linear(H * K, D, bias=False)

    def setup_cache(self, max_batch_size, max_seq_len, dtype, device):
        """The last W-1 pre-conv inputs of q, k and v, and the recurrent state S in fp32."""
        B, P = max_batch_size, self.H * self.K
        conv = torch.zeros(3, B, P, self.W - 1, dtype=dtype, device=device)
        state = torch.zeros(B, self.H, self.K, self.K, device=device)
        self.register_buffer("conv_state", conv, persistent=False)
        self.register_buffer("recurrent_state", state, persistent=False)

    def forward(self, x, start_pos=None, pad=None):                 # x [B, T, D]
        B, T, _ = x.shape
        H, K = self.H, self.K
        # start_pos None: stateless; 0: a new sequence; else continue it (an int or a tensor)
        cached = start_pos is not None
        new = not cached or (isinstance(start_pos, int) and start_pos == 0)
        states = self.conv_state[:, :B] if cached else [None] * 3   # [3, B, P, W-1]
        if cached and new:
            states.zero_()
        if pad is not None and new:     # left padding is zero input (see Transformer.forward)
            x = x.masked_fill((torch.arange(T, device=x.device) < pad[:, None])[..., None], 0)
        q = self.q_conv1d(self.q_proj(x), states[0]).view(B, T, H, K)   # [B, T, H, K]
        k = self.k_conv1d(self.k_proj(x), states[1]).view(B, T, H, K)
        v = self.v_conv1d(self.v_proj(x), states[2]).view(B, T, H, K)
        # g = -exp(A_log) * softplus(f + dt_bias), fp32 and <= 0 (trap 3)
        f = self.f_b_proj(self.f_a_proj(x)).view(B, T, H, K)
        gate_fn = fast_pw.kda_gate if use_kernels(f, self.A_log, self.dt_bias) else kda_gate
        g = gate_fn(f, self.A_log, self.dt_bias)
        beta = self.b_proj(x).float().sigmoid()             # [B, T, H], upcast (trap 10)
        S0 = None if new else self.recurrent_state[:B]
        o, S = kda_core(q, k, v, g, beta, S0)
        if cached:
            self.recurrent_state[:B] = S
        gate = self.g_b_proj(self.g_a_proj(x)).view(B, T, H, K)
        return self.o_proj(self.o_norm(o, gate).view(B, T, H * K))


def latent_attention(q, cache, pos, scale, pad=None, *, kv_lora_rank):
    """Absorbed MLA's attention (MLAAttention.attend_absorbed): query rows q [B, H, R + 64]
    over the entries [c | k_pe] of cache [B, L, R + 64] -> o_lat [B, H, R] in q's dtype, the
    softmax-weighted sum of the latents c. Keys after pos, and before pad[b], are hidden."""
    L = cache.shape[1]
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):   # fp32 sums and scores, as
        scores = torch.bmm(q, cache.mT, out_dtype=torch.float32)   # flash attention does
    else:                                                           # elsewhere: upcast first
        wide = torch.promote_types(q.dtype, torch.float32)
        scores = torch.bmm(q.to(wide), cache.mT.to(wide))
    scores = scores * scale                                         # [B, H, L]
    j = torch.arange(L, device=q.device)                            # key positions
    hidden = j > pos                                                # [L]: the future
    if pad is not None:
        hidden = hidden | (j < pad[:, None])                        # [B, L]: and left padding
    p = scores.masked_fill(hidden.view(-1, 1, L), float("-inf")).softmax(dim=-1)
    return torch.bmm(p.to(q.dtype), cache[..., :kv_lora_rank])     # [B, H, R]


class MLAAttention(nn.Module):
    """Multi-head latent attention, no positional encoding (§2.4). Every head's keys and
    values come from one latent per token: c [R] (normalised) and a shared key slot k_pe
    [64], all the cache keeps. `attend` expands them, `attend_absorbed` (decode) never does."""
    def __init__(self, args: ModelArgs):
        super().__init__()
        D, self.H, self.R = args.hidden_size, args.num_attention_heads, args.kv_lora_rank
        self.nope, self.pe, self.v = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        self.scale = (self.nope + self.pe) ** -0.5      # 1/sqrt(192), no mscale (trap 2)
        self.q_proj = nn.Linear(D, self.H * (self.nope + self.pe), bias=False)   # no q LoRA
        self.kv_a_proj_with_mqa = nn.Linear(D, self.R + self.pe, bias=False)
        self.kv_a_layernorm = RMSNorm(self.R, eps=1e-6)    # not the config's 1e-5 (trap 9)
        self.kv_b_proj = nn.Linear(self.R, self.H * (self.nope + self.v), bias=False)
        self.o_proj = nn.Linear(self.H * self.v, D, bias=False)

    def setup_cache(self, max_batch_size, max_seq_len, dtype, device):
        """One [B, L, R + 64] buffer: the normalised latent c, then k_pe, at every position."""
        shape = (max_batch_size, max_seq_len, self.R + self.pe)
        cache = torch.zeros(shape, dtype=dtype, device=device)
        self.register_buffer("kv_cache", cache, persistent=False)

    def forward(self, x, start_pos=None, pad=None):                 # x [B, T, D]
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.H, self.nope + self.pe)
        c, k_pe = self.kv_a_proj_with_mqa(x).split([self.R, self.pe], dim=-1)
        ckv = torch.cat([self.kv_a_layernorm(c), k_pe], dim=-1)    # [B, T, R + 64] entries
        if start_pos is None:                                       # stateless: x sees x
            o = self.attend(q, ckv, 0, pad)
        elif T == 1:                                                # decode: one new token
            o = self.attend_absorbed(q[:, 0], ckv, start_pos, pad)
        else:                                                       # prefill into the cache
            end = start_pos + T
            self.kv_cache[:B, start_pos:end] = ckv                 # 0 drops the past
            o = self.attend(q, self.kv_cache[:B, :end], start_pos, pad)
        return self.o_proj(o.reshape(B, T, self.H * self.v))       # o [B, T, H, 128]

    def attend(self, q, ckv, start_pos, pad=None):
        """q [B, T, H, 192] over ckv [B, L, R + 64], the last T positions being q's own -> o
        [B, T, H, 128]. Keys and values expanded per head: k = [W_uk c | k_pe], v = W_uv c.
        pad [B] (optional): row b's keys before position pad[b] are hidden (left padding)."""
        B, L, _ = ckv.shape
        T = q.shape[1]
        c, k_pe = ckv.split([self.R, self.pe], dim=-1)
        kv = self.kv_b_proj(c).view(B, L, self.H, self.nope + self.v)
        k_nope, v = kv.split([self.nope, self.v], dim=-1)          # [B, L, H, 128] each
        k_pe = k_pe[:, :, None].expand(-1, -1, self.H, -1)         # one slot for all heads
        k = torch.cat([k_nope, k_pe], dim=-1)                      # [B, L, H, 192]
        # NoPE: q_pe and k_pe are never rotated. Causal, offset: query i sees j <= pos + i
        mask = None                                                 # is_causal: flash attention
        if start_pos > 0 or pad is not None:
            i = torch.arange(T, device=q.device)[:, None] + start_pos
            j = torch.arange(L, device=q.device)
            mask = j <= i                                           # [T, L]
            if pad is not None:     # a padding query sees itself only (a row of -inf is NaN)
                mask = ((mask & (j >= pad[:, None, None])) | (j == i))[:, None]  # [B, 1, T, L]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           scale=self.scale)
        return o.transpose(1, 2)                                    # [B, T, H, 128]

    def attend_absorbed(self, q, ckv, pos, pad=None, attention=latent_attention):
        """Decode: q [B, H, 192] of one token at pos (an int, or a 0-d tensor in a CUDA graph),
        its entry ckv [B, 1, R + 64] -> o [B, 1, H, 128], = `attend` without expanding the cache.
        With kv_b_proj split into W_uk, W_uv [H, 128, R], q_nope . (W_uk c) = (q_nope W_uk) . c
        and sum_j p_j W_uv c_j = W_uv (sum_j p_j c_j): each head is one query row of a single
        attention over the cached latents, as DeepSeek-V3 decodes (or a kernel equal to it)."""
        B = q.shape[0]
        L = self.kv_cache.shape[1] if torch.is_tensor(pos) else pos + 1
        self.kv_cache[:B].index_copy_(1, torch.as_tensor(pos, device=q.device).view(1), ckv)
        cache = self.kv_cache[:B, :L]                               # [B, L, R + 64]
        w = self.kv_b_proj.weight.view(self.H, self.nope + self.v, self.R)
        w_uk, w_uv = w.split([self.nope, self.v], dim=1)            # [H, 128, R] each
        q_nope, q_pe = q.split([self.nope, self.pe], dim=-1)       # [B, H, 128], [B, H, 64]
        q_lat = torch.einsum("bhd,hdr->bhr", q_nope, w_uk)          # [B, H, R]
        q_rows = torch.cat([q_lat, q_pe], dim=-1)                   # [B, H, R + 64]
        o_lat = attention(q_rows, cache, pos, self.scale, pad, kv_lora_rank=self.R)
        return torch.einsum("bhr,hdr->bhd", o_lat, w_uv)[:, None]   # [B, 1, H, 128]


# ---- FFN: dense SwiGLU (layer 0, shared expert) and the MoE (layers 1..26) ----

class MLP(nn.Module):
    """SwiGLU: down(SiLU(gate(x)) * up(x)). Layer 0's `mlp` and the MoE's `shared_experts`."""
    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Expert(nn.Module):
    """The same SwiGLU under the routed experts' names: w1 gate, w3 up, w2 down (trap 12)."""
    def __init__(self, dim, hidden):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoEGate(nn.Module):
    """Sigmoid router: choose top-k by score + e_score_correction_bias, renormalise, scale."""
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        E, D = args.num_experts, args.hidden_size
        self.weight = nn.Parameter(torch.randn(E, D) * D ** -0.5)
        self.e_score_correction_bias = nn.Parameter(torch.zeros(E))     # bf16 when stored

    def forward(self, x):
        """x [N, D] -> (expert ids [N, k], mixing weights fp32 [N, k])."""
        a = self.args
        # = x.float() @ W.float().T; on a GPU from the bf16 operands (their products are exact)
        bf16 = use_kernels(x, self.weight) and x.dtype == self.weight.dtype == torch.bfloat16
        logits = (torch.mm(x, self.weight.T, out_dtype=torch.float32) if bf16
                  else F.linear(x.float(), self.weight.float()))
        if use_kernels(logits):                 # all that follows in one kernel, ties to low ids
            return fast_md.route(logits, self.e_score_correction_bias, a.num_experts_per_token,
                                 a.moe_renormalize, a.routed_scaling_factor,
                                 a.routing_weights_biased)
        s = torch.sigmoid(logits)                                       # [N, E], fp32
        biased = s + self.e_score_correction_bias.float()              # chooses the experts
        ids = biased.topk(a.num_experts_per_token, dim=-1, sorted=False).indices    # [N, k]
        # The mixing weights: the release adds the bias in place on a view of s, so they are
        # the *biased* scores too (trap 1). vLLM, SGLang and transformers use the unbiased s.
        w = (biased if a.routing_weights_biased else s).gather(-1, ids)    # [N, k]
        if a.moe_renormalize and a.num_experts_per_token > 1:      # as the release
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return ids, w * a.routed_scaling_factor


class SparseMoeBlock(nn.Module):
    """Routed experts, mixed by the router's weights in fp32, plus the always-on shared one."""
    def __init__(self, args: ModelArgs):
        super().__init__()
        D, F_ = args.hidden_size, args.moe_intermediate_size
        self.gate = MoEGate(args)
        self.experts = nn.ModuleList(Expert(D, F_) for _ in range(args.num_experts))
        self.shared_experts = MLP(D, F_ * args.num_shared_experts)
        self.w13 = self.w2 = None           # stacked weights (fast.moe.stack_experts)

    def forward(self, x):                                           # x [B, T, D]
        shape, x = x.shape, x.flatten(0, 1)                         # [N, D]
        ids, w = self.gate(x)                                       # [N, k] each
        if self.w13 is None:
            out = self.run_experts(x, ids)                          # [N, k, D]
            y = torch.einsum("nk,nkd->nd", w, out.float()).to(x.dtype)    # fp32 sum
        else:                                                       # the same (fast/moe.py)
            y = fast_moe.grouped_moe(x, ids, w, self.w13, self.w2, use_kernels(x, w))
        return (y + self.shared_experts(x)).view(shape)

    def run_experts(self, x, ids):
        """out[n, j] = expert ids[n, j] applied to token n: [N, D], [N, k] -> [N, k, D]."""
        out = x.new_zeros(*ids.shape, x.shape[-1])
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(ids == e)                     # the tokens routed to e
            if len(token):                                          # skip experts with none
                out[token, slot] = expert(x[token])
        return out


# ---- Decoder layer and model ----

class DecoderLayer(nn.Module):
    """h += mixer(norm(h)); h += ffn(norm(h)). Mixer: KDA or MLA; FFN: a MLP or a MoE."""
    def __init__(self, i, args: ModelArgs):
        super().__init__()
        D = args.hidden_size
        self.input_layernorm = RMSNorm(D, args.rms_norm_eps)
        self.self_attn = (MLAAttention if i in args.full_attn_layers else KimiDeltaAttention)(args)
        self.post_attention_layernorm = RMSNorm(D, args.rms_norm_eps)
        # The checkpoint names the FFN `mlp` in layer 0 and `block_sparse_moe` elsewhere.
        self.is_moe = (args.num_experts > 0 and i >= args.first_k_dense_replace
                       and i % args.moe_layer_freq == 0)
        if self.is_moe:
            self.block_sparse_moe = SparseMoeBlock(args)
        else:
            self.mlp = MLP(D, args.intermediate_size)

    def forward(self, x, start_pos=None, pad=None):
        h = x + self.self_attn(self.input_layernorm(x), start_pos, pad)
        ffn = self.block_sparse_moe if self.is_moe else self.mlp
        return h + ffn(self.post_attention_layernorm(h))


class Transformer(nn.Module):
    """Kimi Linear: token embedding, the decoder layers, a final RMSNorm, an untied lm_head.

        model = Transformer(CONFIGS["tiny"])       # random; from_pretrained(dir) loads
        logits = model(tokens)                     # [B, T] int64 -> [B, T, vocab] fp32
        model.setup_cache(max_batch_size, max_seq_len)    # then, for generation:
        logits = model(prompt, start_pos=0)        # a prefill that fills the caches
        logits = model(next_token, start_pos=T)    # one decode step
        logits = model(prompts, start_pos=0, pad=n)    # left-padded prompts

    The module tree equals the checkpoint's names (model.layers.{i}.self_attn.q_proj, ...)."""
    def __init__(self, args: ModelArgs):
        """args: a ModelArgs (CONFIGS[name], ModelArgs.from_json(path), ...). Random weights"""
        super().__init__()
        if not isinstance(args, ModelArgs):
            raise TypeError(f"args: expected a ModelArgs, not {type(args).__name__}")
        self.args = args
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(args.vocab_size, args.hidden_size),
            layers=nn.ModuleList(DecoderLayer(i, args) for i in range(args.num_hidden_layers)),
            norm=RMSNorm(args.hidden_size, args.rms_norm_eps)))
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)    # untied
        self.max_batch_size = self.max_seq_len = 0

    def setup_cache(self, max_batch_size, max_seq_len):
        """(Re)allocate the caches start_pos needs: args.cache_bytes(...) bytes, not saved."""
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        w = self.model.embed_tokens.weight
        for layer in self.model.layers:
            layer.self_attn.setup_cache(max_batch_size, max_seq_len, w.dtype, w.device)
        pad = torch.zeros(max_batch_size, dtype=torch.long, device=w.device)
        self.register_buffer("pad", pad, persistent=False)

    def forward(self, tokens, start_pos=None, last_only=False, pad=None):
        """tokens [B, T] int64 -> logits [B, T, vocab] fp32 ([B, 1, vocab] if last_only).
        start_pos None: stateless, over whole sequences. start_pos = n: the tokens sit at
        positions n.. of the sequences in the caches (0 starts new ones; a 0-d device tensor
        for one-token steps in a CUDA graph). pad [B] (start_pos None or 0): row b begins with
        pad[b] tokens of left padding, hidden from the rest (docs/architecture.md)."""
        pad = self.check_inputs(tokens, start_pos, pad)
        B, T = tokens.shape
        if start_pos is not None:
            if isinstance(start_pos, int) and start_pos == 0:      # new sequences
                self.pad[:B] = 0 if pad is None else pad
            else:               # continue them: hide the padding they began with
                pad = self.pad[:B]
        # Gradients flow through the stateless forward only: cached calls are generation, and
        # a graph kept through the caches would chain every step to all the steps before it.
        with torch.set_grad_enabled(torch.is_grad_enabled() and start_pos is None):
            h = self.model.embed_tokens(tokens)                     # [B, T, D]; no positions
            for layer in self.model.layers:
                h = layer(h, start_pos, pad)
            if last_only:
                h = h[:, -1:]
            return self.lm_head(self.model.norm(h)).float()

    def check_inputs(self, tokens, start_pos=None, pad=None):
        """forward's arguments, checked: a ValueError or TypeError of one line if forward
        cannot take them. -> pad as int64 on the tokens' device, or None."""
        ids = torch.is_tensor(tokens) and not tokens.is_floating_point()
        if not ids or tokens.dtype == torch.bool:
            what = tokens.dtype if torch.is_tensor(tokens) else type(tokens).__name__
            raise TypeError(f"tokens: expected a tensor of integer ids, not {what}")
        require(tokens.dim() == 2, f"tokens: expected [B, T], got {tuple(tokens.shape)} "
                "(one sequence of T ids is tokens[None])")
        (B, T), V = tokens.shape, self.args.vocab_size
        require(B >= 1 and T >= 1, f"tokens: expected at least one id, got {(B, T)}")
        if torch.is_tensor(start_pos):  # a graph's step: no host sync, no tensor in a message
            require(T == 1 and start_pos.dim() == 0, "a tensor start_pos is for one-token steps")
        else:       # reading the ids back syncs with the device: checked in eager calls only
            require(bool(((tokens >= 0) & (tokens < V)).all()), f"tokens: ids lie in 0..{V - 1}")
            ok = start_pos is None or (type(start_pos) is int and start_pos >= 0)
            require(ok, f"start_pos: expected None, an int >= 0 or a tensor: {start_pos!r}")
            ok = start_pos is None or start_pos + T <= self.max_seq_len
            require(ok, f"start_pos {start_pos} + {T} tokens exceeds the cache's "
                    f"max_seq_len={self.max_seq_len} (call setup_cache)")
        ok = start_pos is None or B <= self.max_batch_size
        require(ok, f"batch of {B} exceeds the cache's max_batch_size={self.max_batch_size} "
                "(call setup_cache, or omit start_pos)")
        if pad is None:
            return None
        pad = torch.as_tensor(pad, device=tokens.device)
        require(start_pos is None or (isinstance(start_pos, int) and start_pos == 0),
                "pad goes with start_pos None or 0 (the first tokens; the cache keeps it)")
        ok = pad.shape == (B,) and not pad.is_floating_point() and pad.dtype != torch.bool
        require(ok, f"pad: expected {B} ints (one per row), got {pad.dtype} {tuple(pad.shape)}")
        require(bool(((0 <= pad) & (pad < T)).all()), f"pad: need 0 <= pad < {T}: {pad.tolist()}")
        return pad.long()

    def stack_experts(self):
        """Stack each MoE layer's experts for fast.moe's grouped matmuls (see Fast paths)."""
        for layer in self.model.layers:
            if layer.is_moe:
                fast_moe.stack_experts(layer.block_sparse_moe)

    # ---- Checkpoints in the official layout (the file format is in checkpoint.py) ----

    @classmethod
    def from_pretrained(cls, ckpt_dir, device=None, dtype=None, max_batch_size=1,
                        max_seq_len=4096):
        """Load an official checkpoint folder shard by shard (every name and shape checked; a
        CheckpointError of one line otherwise). dtype (None: as stored) casts all but A_log
        and dt_bias, which stay fp32. In eval mode, without gradients, caches set up."""
        checkpoint.check_plain_load(ckpt_dir, dtype)    # FP8 is fast.quantize.from_pretrained
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        args = ModelArgs.from_json(Path(ckpt_dir) / "config.json")
        with torch.device("meta"):                                  # no memory, no init
            model = cls(args)
        checkpoint.load_into(model, ckpt_dir, device, dtype)
        model.requires_grad_(False).eval()
        if device.type == "cuda" and KERNELS:           # the grouped-matmul MoE (Fast paths)
            model.stack_experts()
        model.setup_cache(max_batch_size, max_seq_len)
        return model

    def save_pretrained(self, ckpt_dir, num_shards=2):
        """Write the official layout: config.json, num_shards safetensors shards, the index."""
        checkpoint.save(self, ckpt_dir, num_shards)


# ---- Fast paths: each computes what a definition above does; tests check each equality ----
#   - KDA, the short convs, the norms and KDA's gate on a GPU, without gradients: kda_triton.py,
#     fast/short_conv.py, fast/pointwise.py; with gradients, chunk_kda (and its backward)
#   - MLA decode: attend_absorbed (part of the MLA idea) instead of attend
#   - MoE: fast.moe.grouped_moe in place of the loop and einsum, once stack_experts has run; the
#     router after its logits on a GPU: fast.moe_decode.route (the decode step's, any N)
#   - transforms of a built model, never imported here: FP8 weights (fast.quantize), a decode
#     step in ~18 kernels a layer instead of ~110, replayed from a CUDA graph (fast.decode)
