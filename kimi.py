"""
Kimi-Linear-48B-A3B in one readable file: every layer, prefill/decode caches, sharded loading.

Read kda_ref.py first: it defines the KDA recurrence that 20 of the 27 layers are built around.
This file loads the official checkpoint (moonshotai/Kimi-Linear-48B-A3B-{Base,Instruct}) unchanged:
module names below are the safetensors names, so there is no rename table.

Glossary (sizes for 48B-A3B):
    B batch, T new tokens, L cached + new tokens, N = B*T tokens seen by the MoE
    D = 2304 hidden size            P = H*K = 4096 KDA projection width (head-major: c = h*128 + d)
    H = 32 KDA heads                K = V = 128 KDA head dims
    W = 4 short-conv width          R = 512 MLA latent rank (+ 64 shared "pe" key dims, never rotated)
    E = 256 routed experts, top 8 per token, plus 1 shared expert
Layer map (0-based): MLA at 3, 7, 11, 15, 19, 23, 26; KDA everywhere else. Layer 0 has a dense MLP
(`mlp`), layers 1..26 a MoE (`block_sparse_moe`). There is no positional encoding at all: order enters
only through the KDA recurrence, the short convs and the MLA causal mask.

References: the Kimi Linear tech report (arXiv 2510.26692); the official modeling_kimi.py in
huggingface.co/moonshotai/Kimi-Linear-48B-A3B-Instruct; fla's fla/ops/kda/naive.py and fla/layers/kda.py;
../shared/docs/ARCHITECTURE.md (section numbers and "trap n" below refer to it).
"""
import functools
import json
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from kda_ref import chunk_kda_ref, kda_gate, l2norm, recurrent_kda


@functools.cache
def _kda_triton():
    """The kda_triton module if it imports, else None (the model then runs on kda_ref, just slower)."""
    try:
        import kda_triton
        return kda_triton
    except ImportError as e:
        print(f"kimi.py: kda_triton unavailable ({e}); using kda_ref", file=sys.stderr)
        return None


# ----------------------------------------------------------------------------------------------------
# Config

@dataclass
class ModelArgs:
    """Defaults are Kimi-Linear-48B-A3B. Field names are config.json's names."""
    vocab_size: int = 163840
    hidden_size: int = 2304                 # D
    num_hidden_layers: int = 27
    rms_norm_eps: float = 1e-5
    # KDA (config.json: linear_attn_config)
    kda_num_heads: int = 32                 # H
    kda_head_dim: int = 128                 # K = V
    short_conv_kernel_size: int = 4         # W
    full_attn_layers: tuple = (3, 7, 11, 15, 19, 23, 26)   # 0-based MLA layers; the rest are KDA
    # MLA
    num_attention_heads: int = 32
    kv_lora_rank: int = 512                 # R
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64              # "rope" in name only: NoPE, never rotated
    v_head_dim: int = 128
    # MLP / MoE
    intermediate_size: int = 9216           # dense MLP, layer 0
    moe_intermediate_size: int = 1024
    num_experts: int = 256                  # E
    num_experts_per_token: int = 8
    num_shared_experts: int = 1
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    num_expert_group: int = 1
    topk_group: int = 1
    moe_renormalize: bool = True
    routed_scaling_factor: float = 2.446
    routing_weights_biased: bool = True     # released code's quirk (trap 1); False = vLLM/DeepSeek rule

    # field -> key inside config.json's linear_attn_config (every other field is top level)
    LINEAR_KEYS = {"kda_num_heads": "num_heads", "kda_head_dim": "head_dim",
                   "short_conv_kernel_size": "short_conv_kernel_size", "full_attn_layers": "full_attn_layers"}

    @classmethod
    def from_json(cls, path):
        """Read an official config.json. Its layer lists are 1-based; unknown keys are ignored."""
        try:
            cfg = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot read config ({e})") from None
        linear = cfg.get("linear_attn_config") if isinstance(cfg, dict) else None
        if not isinstance(linear, dict):
            raise CheckpointError(f"{path}: not a Kimi-Linear config (no linear_attn_config object)")
        kwargs = {}
        for f in fields(cls):
            src, key = (linear, cls.LINEAR_KEYS[f.name]) if f.name in cls.LINEAR_KEYS else (cfg, f.name)
            if key in src:
                kwargs[f.name] = src[key]
            elif f.name != "routing_weights_biased":      # ours, not a config.json key
                where = "linear_attn_config." if src is linear else ""
                raise CheckpointError(f"{path}: missing required key '{where}{key}'")
        full, kda = kwargs["full_attn_layers"], linear.get("kda_layers") or []
        ok = isinstance(full, list) and isinstance(kda, list) and all(isinstance(i, int) for i in full + kda)
        if not ok or (kda and sorted(full + kda) != list(range(1, kwargs["num_hidden_layers"] + 1))):
            raise CheckpointError(f"{path}: kda_layers and full_attn_layers must split the layers 1..n")
        kwargs["full_attn_layers"] = tuple(i - 1 for i in full)     # 1-based in config.json (trap 11)
        return cls(**kwargs)

    def to_config(self, dtype="bfloat16"):
        """The official config.json layout (1-based layer lists), as written by save_pretrained."""
        cfg = {f.name: getattr(self, f.name) for f in fields(self)
               if f.name not in self.LINEAR_KEYS and f.name != "routing_weights_biased"}
        linear = {key: getattr(self, f) for f, key in self.LINEAR_KEYS.items()}
        linear["full_attn_layers"] = full = [i + 1 for i in self.full_attn_layers]
        linear["kda_layers"] = [i for i in range(1, self.num_hidden_layers + 1) if i not in full]
        return {"architectures": ["KimiLinearForCausalLM"], "model_type": "kimi_linear", "dtype": dtype,
                **cfg, "num_key_value_heads": self.num_attention_heads, "q_lora_rank": None,
                "mla_use_nope": True, "hidden_act": "silu", "moe_router_activation_func": "sigmoid",
                "use_grouped_topk": True, "tie_word_embeddings": False, "linear_attn_config": linear}


class CheckpointError(Exception):
    """A checkpoint folder that does not match the model; the message names the file or tensor."""


# ----------------------------------------------------------------------------------------------------
# Leaves

class RMSNorm(nn.Module):
    """x / rms(x) in fp32, cast back, times the weight (no 1 + w offset)."""
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)
        return x32.to(x.dtype) * self.weight        # cast back *before* the weight multiply (trap 10)


class GatedRMSNorm(RMSNorm):
    """KDA's o_norm: per-head RMSNorm, then times sigmoid(gate); all fp32 with one final cast."""
    def forward(self, x, gate):                     # x, gate [B, T, H, V]
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps) * self.weight.float()
        return (y * torch.sigmoid(gate.float())).to(x.dtype)     # sigmoid, not SiLU (trap 8)


class ShortConv(nn.Conv1d):
    """Depthwise causal conv over time, then SiLU. Weight [C, 1, W]; tap W-1 is the current token."""
    def __init__(self, channels, width):
        super().__init__(channels, channels, width, groups=channels, bias=False)

    def forward(self, x, state):
        """x [B, T, C]; state [B, C, W-1]: the last W-1 inputs (zeros at the start), updated in place."""
        xs = torch.cat([state, x.transpose(1, 2)], dim=-1)         # [B, C, W-1+T]: left context
        state.copy_(xs[:, :, xs.shape[-1] - state.shape[-1]:])     # cache PRE-conv inputs (trap 7)
        y = F.conv1d(xs.float(), self.weight.float(), groups=self.groups)  # fp32, like fla's kernel
        return F.silu(y).to(x.dtype).transpose(1, 2)               # [B, T, C], one rounding


# ----------------------------------------------------------------------------------------------------
# Mixers: KDA (20 layers) and MLA (7 layers)

def kda_core(q, k, v, g, beta, initial_state):
    """q, k, v [B, T, H, K] -> (o [B, T, H, V], S fp32 [B, H, K, V]). As the official code: the recurrent
    form for decode and inputs of <= 64 tokens, with the normalised q and k in fp32; the chunked form for
    longer prefill, with q and k rounded to the model dtype first (trap 13). Triton on a GPU."""
    T, K = q.shape[1], q.shape[-1]
    fast = q.is_cuda and _kda_triton()
    if T <= 64:
        kernel = fast.fused_recurrent_kda if fast else recurrent_kda
    else:
        q, k = q.to(v.dtype), k.to(v.dtype)
        kernel = fast.chunk_kda if fast else chunk_kda_ref
    return kernel(q, k, v, g, beta, scale=K ** -0.5, initial_state=initial_state,
                  output_final_state=True)


class KimiDeltaAttention(nn.Module):
    """KDA mixer (section 2.3): project, short conv, fp32 gate and beta, recurrence, o_norm, o_proj."""
    def __init__(self, args: ModelArgs):
        super().__init__()
        D, H, K, W = args.hidden_size, args.kda_num_heads, args.kda_head_dim, args.short_conv_kernel_size
        self.H, self.K, self.W = H, K, W
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(D, H * K, bias=False) for _ in range(3))
        self.q_conv1d, self.k_conv1d, self.v_conv1d = (ShortConv(H * K, W) for _ in range(3))
        # Forget gate, low rank (D -> K -> P, no activation in between); A_log per head, dt_bias per
        # channel (trap 4). Both stay fp32 whatever the model dtype: loading with assign=True keeps them.
        self.f_a_proj = nn.Linear(D, K, bias=False)
        self.f_b_proj = nn.Linear(K, H * K, bias=False)
        self.A_log = nn.Parameter(torch.zeros(1, 1, H, 1, dtype=torch.float32))
        self.dt_bias = nn.Parameter(torch.zeros(H * K, dtype=torch.float32))
        self.b_proj = nn.Linear(D, H, bias=False)
        self.g_a_proj = nn.Linear(D, K, bias=False)                # output gate, low rank as well
        self.g_b_proj = nn.Linear(K, H * K, bias=False)
        self.o_norm = GatedRMSNorm(K, eps=args.rms_norm_eps)
        self.o_proj = nn.Linear(H * K, D, bias=False)

    def setup_cache(self, max_batch_size, max_seq_len, dtype, device):
        B, H, K = max_batch_size, self.H, self.K    # the last W-1 pre-conv inputs of q, k, v; S in fp32
        conv = torch.zeros(3, B, H * K, self.W - 1, dtype=dtype, device=device)
        self.register_buffer("conv_state", conv, persistent=False)
        self.register_buffer("recurrent_state", torch.zeros(B, H, K, K, device=device), persistent=False)

    def forward(self, x, start_pos):                                # x [B, T, D]
        B, T, _ = x.shape
        H, K = self.H, self.K
        new = not torch.is_tensor(start_pos) and start_pos == 0    # (a tensor: a CUDA graph's decode)
        if new:                                                     # a new sequence: forget the past
            self.conv_state[:, :B].zero_()
        q, k, v = (conv(proj(x), state).view(B, T, H, K)           # [B, T, H, K] each
                   for proj, conv, state in zip((self.q_proj, self.k_proj, self.v_proj),
                                                (self.q_conv1d, self.k_conv1d, self.v_conv1d),
                                                self.conv_state[:, :B]))
        # g = -exp(A_log) * softplus(f + dt_bias), fp32 and <= 0 (trap 3)
        g = kda_gate(self.f_b_proj(self.f_a_proj(x)).view(B, T, H, K), self.A_log, self.dt_bias)
        beta = self.b_proj(x).float().sigmoid()                     # [B, T, H], upcast first (trap 10)
        # L2 norm with eps on the sum of squares (trap 6); the 1/sqrt(K) scale is applied by the kernel
        o, S = kda_core(l2norm(q.float()), l2norm(k.float()), v, g, beta,
                        None if new else self.recurrent_state[:B])
        self.recurrent_state[:B] = S
        gate = self.g_b_proj(self.g_a_proj(x)).view(B, T, H, K)
        return self.o_proj(self.o_norm(o, gate).view(B, T, H * K))


class MLAAttention(nn.Module):
    """Multi-head latent attention without positional encoding (section 2.4). The cache holds, per token,
    the normalised latent c [R] and the shared key slot k_pe [64]: 1,152 bytes per token and layer in
    bf16, 17.8x less than per-head K and V. A prefill expands keys and values with kv_b_proj; a decode
    step folds kv_b_proj into the query and the output instead ("absorbed", as DeepSeek-V3 and vLLM
    decode) and attends in the latent space: the same attention, without re-expanding the cache."""
    def __init__(self, args: ModelArgs):
        super().__init__()
        D, self.H, self.R = args.hidden_size, args.num_attention_heads, args.kv_lora_rank
        self.nope, self.pe, self.v = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        self.scale = (self.nope + self.pe) ** -0.5      # 1/sqrt(192), no mscale (trap 2)
        self.q_proj = nn.Linear(D, self.H * (self.nope + self.pe), bias=False)   # no q LoRA
        self.kv_a_proj_with_mqa = nn.Linear(D, self.R + self.pe, bias=False)
        self.kv_a_layernorm = RMSNorm(self.R, eps=1e-6)    # 1e-6, not the config's 1e-5 (trap 9)
        self.kv_b_proj = nn.Linear(self.R, self.H * (self.nope + self.v), bias=False)
        self.o_proj = nn.Linear(self.H * self.v, D, bias=False)

    def setup_cache(self, max_batch_size, max_seq_len, dtype, device):
        self.register_buffer("kv_cache", torch.zeros(max_batch_size, max_seq_len, self.R + self.pe,
                                                     dtype=dtype, device=device), persistent=False)

    def forward(self, x, start_pos):                                # x [B, T, D]
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.H, self.nope + self.pe)
        c, k_pe = self.kv_a_proj_with_mqa(x).split([self.R, self.pe], dim=-1)
        ckv = torch.cat([self.kv_a_layernorm(c), k_pe], dim=-1)    # [B, T, R + 64]: the cache entry
        if T == 1:
            return self.o_proj(self.decode(q[:, 0], ckv, start_pos).reshape(B, 1, self.H * self.v))
        end = start_pos + T
        self.kv_cache[:B, start_pos:end] = ckv                     # start_pos = 0 overwrites the past
        c, k_pe = self.kv_cache[:B, :end].split([self.R, self.pe], dim=-1)
        kv = self.kv_b_proj(c).view(B, end, self.H, self.nope + self.v)
        k_nope, v = kv.split([self.nope, self.v], dim=-1)          # [B, L, H, 128] each
        k = torch.cat([k_nope, k_pe[:, :, None].expand(-1, -1, self.H, -1)], dim=-1)  # [B, L, H, 192]
        # NoPE: q_pe, k_pe never rotated. Causal with an offset: query i sees keys j <= start_pos + i.
        mask = None if start_pos == 0 else torch.ones(T, end, dtype=torch.bool,
                                                      device=x.device).tril(start_pos)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask, is_causal=start_pos == 0, scale=self.scale)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.H * self.v))   # o [B, H, T, 128]

    def decode(self, q, ckv, pos):
        """q [B, H, 192], ckv [B, 1, R + 64] -> [B, H, 128]. Absorbed: q_nope . (W_uk c) = (q_nope W_uk) . c
        and sum_j p_j W_uv c_j = W_uv sum_j p_j c_j, so the heads are the query rows of one attention over
        the cache. pos: an int, or a CUDA graph's device tensor (then the whole buffer is read, masked)."""
        B, L = q.shape[0], self.kv_cache.shape[1] if torch.is_tensor(pos) else pos + 1
        pos = torch.as_tensor(pos, device=q.device).view(1)
        cache = self.kv_cache[:B].index_copy_(1, pos, ckv)[:, :L]   # [B, L, R + 64]
        w = self.kv_b_proj.weight.view(self.H, self.nope + self.v, self.R)   # [H, 256, R]
        q_nope, q_pe = q.split([self.nope, self.pe], dim=-1)       # [B, H, 128], [B, H, 64]
        q_lat = torch.einsum("bhd,hdr->bhr", q_nope, w[:, :self.nope])     # [B, H, R]
        qc = torch.cat([q_lat, q_pe], dim=-1)                      # [B, H, R + 64]
        if q.is_cuda and q.dtype != torch.float32:     # fp32 scores, as flash attention keeps them
            scores = torch.bmm(qc, cache.mT, out_dtype=torch.float32)      # (no out_dtype on CPU)
        else:
            scores = torch.bmm(qc.float(), cache.float().mT)        # [B, H, L]
        scores = (scores * self.scale).masked_fill(torch.arange(L, device=q.device) > pos, float("-inf"))
        o_lat = torch.bmm(scores.softmax(dim=-1).to(q.dtype), cache[..., :self.R])     # [B, H, R]
        return torch.einsum("bhr,hdr->bhd", o_lat, w[:, self.nope:])   # [B, H, 128]


# ----------------------------------------------------------------------------------------------------
# FFN: dense SwiGLU (layer 0, shared expert) and the MoE (layers 1..26)

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
    """The same SwiGLU under the routed experts' names: w1 = gate, w3 = up, w2 = down (trap 12)."""
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
        self.e_score_correction_bias = nn.Parameter(torch.zeros(E))     # bf16 in the checkpoint

    def forward(self, x):
        """x [N, D] -> (expert ids [N, k], mixing weights fp32 [N, k])."""
        a = self.args
        s = torch.sigmoid(F.linear(x.float(), self.weight.float()))        # [N, E], fp32
        biased = s + self.e_score_correction_bias.float()                  # used for selection only...
        choice = biased
        if a.num_expert_group > 1:      # group-limited: keep the topk_group groups of best top-2 sum
            grouped = biased.view(len(x), a.num_expert_group, -1)           # [N, G, E/G]
            best = grouped.topk(2, dim=-1).values.sum(-1).topk(a.topk_group, dim=-1).indices
            keep = torch.zeros_like(grouped[..., 0], dtype=torch.bool).scatter_(1, best, True)
            choice = grouped.masked_fill(~keep[..., None], 0.0).flatten(1)  # 0.0 as the official code
        ids = choice.topk(a.num_experts_per_token, dim=-1, sorted=False).indices     # [N, k]
        # ...but the released code adds the bias in place on a view of s, so its mixing weights are the
        # *biased* scores sigmoid + bias (trap 1). vLLM, SGLang and transformers use the unbiased s.
        w = (biased if a.routing_weights_biased else s).gather(-1, ids)    # [N, k]
        if a.moe_renormalize and a.num_experts_per_token > 1:      # as the official code
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return ids, w * a.routed_scaling_factor


class SparseMoeBlock(nn.Module):
    """Routed experts plus the always-on shared expert. The routed experts run as a loop over those that
    got tokens (CPU), or as two grouped matmuls over stacked weights (GPU): no host sync, graph-safe."""
    def __init__(self, args: ModelArgs):
        super().__init__()
        D, F_ = args.hidden_size, args.moe_intermediate_size
        self.gate = MoEGate(args)
        self.experts = nn.ModuleList(Expert(D, F_) for _ in range(args.num_experts))
        self.shared_experts = MLP(D, F_ * args.num_shared_experts)
        self.w13 = self.w2 = None                                   # set by stack_experts()

    def stack_experts(self):
        """Copy the experts into w13 [E, 2F, D] (w1 over w3) and w2 [E, D, F], each expert's weights now
        views of them (same names and state_dict). Call it on the device (mmapped CPU weights: copies)."""
        w = self.experts[0].w1.weight
        if self.w13 is not None or (w.is_cuda and w.dtype != torch.bfloat16):   # CUDA: bf16 only
            return
        w13 = torch.stack([torch.cat([e.w1.weight, e.w3.weight]) for e in self.experts])
        w2 = torch.stack([e.w2.weight for e in self.experts])
        for e, a, b in zip(self.experts, w13, w2):
            e.w1.weight, e.w3.weight, e.w2.weight = (nn.Parameter(t, False) for t in (*a.chunk(2), b))
        self.w13, self.w2 = w13, w2

    def forward(self, x):                                           # x [B, T, D]
        shape, x = x.shape, x.flatten(0, 1)                         # [N, D]
        ids, w = self.gate(x)                                       # [N, k] each
        # Sort the N*k (token, slot) pairs by expert, so that each expert's rows are one slice.
        expert_of_row, order = ids.flatten().sort()                 # [N*k] each
        xs = x[order // ids.shape[1]]                               # [N*k, D]
        if self.w13 is not None:                                    # ends: [E] cumulative row counts
            experts = torch.arange(len(self.experts), device=x.device)
            ends = torch.searchsorted(expert_of_row, experts, right=True).int()
            gate, up = torch._grouped_mm(xs, self.w13.mT, offs=ends).chunk(2, dim=-1)
            out = torch._grouped_mm(F.silu(gate) * up, self.w2.mT, offs=ends)
        else:
            counts = torch.bincount(expert_of_row, minlength=len(self.experts)).tolist()  # host sync
            out = torch.cat([expert(rows) if len(rows) else rows      # skip experts with no tokens
                             for expert, rows in zip(self.experts, xs.split(counts))])
        out = torch.empty_like(out).index_copy_(0, order, out).view(*ids.shape, -1)   # [N, k, D]
        y = torch.einsum("nk,nkd->nd", w, out.float())              # weighted sum in fp32
        return (y.to(x.dtype) + self.shared_experts(x)).view(shape)


# ----------------------------------------------------------------------------------------------------
# Decoder layer and model

class DecoderLayer(nn.Module):
    def __init__(self, i, args: ModelArgs):
        super().__init__()
        D = args.hidden_size
        self.input_layernorm = RMSNorm(D, args.rms_norm_eps)
        self.self_attn = MLAAttention(args) if i in args.full_attn_layers else KimiDeltaAttention(args)
        self.post_attention_layernorm = RMSNorm(D, args.rms_norm_eps)
        # The one irregular name: layer 0's FFN is `mlp`, the MoE layers' is `block_sparse_moe`.
        self.is_moe = (args.num_experts > 0 and i >= args.first_k_dense_replace
                       and i % args.moe_layer_freq == 0)
        if self.is_moe:
            self.block_sparse_moe = SparseMoeBlock(args)
        else:
            self.mlp = MLP(D, args.intermediate_size)

    def forward(self, x, start_pos):
        h = x + self.self_attn(self.input_layernorm(x), start_pos)
        ffn = self.block_sparse_moe if self.is_moe else self.mlp
        return h + ffn(self.post_attention_layernorm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(args.vocab_size, args.hidden_size),
            layers=nn.ModuleList(DecoderLayer(i, args) for i in range(args.num_hidden_layers)),
            norm=RMSNorm(args.hidden_size, args.rms_norm_eps)))
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)    # untied
        self.max_batch_size = self.max_seq_len = 0                 # until setup_cache

    def setup_cache(self, max_batch_size, max_seq_len):
        """Allocate every layer's cache (non-persistent buffers) in the model's dtype and device."""
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        w = self.model.embed_tokens.weight
        for layer in self.model.layers:
            layer.self_attn.setup_cache(max_batch_size, max_seq_len, w.dtype, w.device)

    def stack_experts(self):
        """Stack each MoE layer's experts for the grouped-matmul path (see SparseMoeBlock)."""
        for moe in (layer.block_sparse_moe for layer in self.model.layers if layer.is_moe):
            moe.stack_experts()

    @torch.no_grad()        # not inference_mode: torch.compile fails on its tensors (torch 2.13)
    def forward(self, tokens, start_pos=0, last_only=False):
        """tokens [B, T] int64 -> logits [B, T, vocab] fp32 (last_only: [B, 1, vocab]). start_pos = 0
        starts new sequences; start_pos > 0 continues them from the caches. In a CUDA graph start_pos
        is a device tensor and T = 1 (bench.cuda_graph_decoder)."""
        B, T = tokens.shape
        if B > self.max_batch_size:
            raise ValueError(f"batch of {B} exceeds max_batch_size={self.max_batch_size} (see setup_cache)")
        if torch.is_tensor(start_pos) and T != 1:
            raise ValueError("a tensor start_pos is for decode steps of one token")
        elif not torch.is_tensor(start_pos) and start_pos + T > self.max_seq_len:
            raise ValueError(f"start_pos {start_pos} + {T} tokens exceeds max_seq_len="
                             f"{self.max_seq_len} (call setup_cache with a larger one)")
        h = self.model.embed_tokens(tokens)                         # [B, T, D]; no positional encoding
        for layer in self.model.layers:
            h = layer(h, start_pos)
        return self.lm_head(self.model.norm(h[:, -1:] if last_only else h)).float()

    # ------------------------------------------------------------------------------------------------
    # Checkpoints: config.json + model-0000i-of-0000n.safetensors + model.safetensors.index.json

    @classmethod
    def from_pretrained(cls, ckpt_dir, device=None, dtype=None, max_batch_size=1, max_seq_len=4096):
        """Load an official checkpoint folder shard by shard straight onto `device` (host memory stays
        about one shard; on CPU without a dtype change the weights stay memory-mapped). `dtype` casts all
        but A_log and dt_bias, which stay fp32. Raises CheckpointError naming the file/tensor."""
        ckpt_dir = Path(ckpt_dir)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        args = ModelArgs.from_json(ckpt_dir / "config.json")
        index_path = ckpt_dir / "model.safetensors.index.json"
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: cannot read the index ({e!r})") from None
        with torch.device("meta"):                                  # no memory, no init
            model = cls(args)
        expected = {name: t.shape for name, t in model.state_dict().items()}
        _check(index_path, "lists tensors this model does not have", set(weight_map) - set(expected))
        _check(index_path, "lacks tensors this model needs", set(expected) - set(weight_map))
        shards = sorted(set(weight_map.values()))
        loaded_bytes, t0 = 0, time.perf_counter()
        for i, shard in enumerate(shards, 1):
            path, listed = ckpt_dir / shard, {n for n, s in weight_map.items() if s == shard}
            if not path.is_file():
                raise CheckpointError(f"{path}: shard listed in the index is missing")
            try:
                with safe_open(path, framework="pt", device=str(device)) as f:
                    names = set(f.keys())
                    _check(path, "holds tensors not listed for it in the index", names - listed)
                    _check(path, "lacks tensors the index lists in it", listed - names)
                    state = {n: f.get_tensor(n) for n in sorted(names)}
            except SafetensorError as e:
                raise CheckpointError(f"{path}: unreadable or truncated shard ({e})") from None
            _check(path, "has tensors of the wrong shape", [
                f"{n} {list(t.shape)} (expected {list(expected[n])})"
                for n, t in state.items() if t.shape != expected[n]])
            if dtype is not None:   # A_log and dt_bias stay fp32 whatever dtype is asked (trap 10);
                # copied, since a view into a cast shard would keep the whole shard mapped in memory
                state = {n: t.to(torch.float32, copy=True) if n.endswith(("A_log", "dt_bias"))
                         else t.to(dtype) for n, t in state.items()}
            model.load_state_dict(state, strict=False, assign=True)    # assign keeps their dtypes
            loaded_bytes += sum(t.numel() * t.element_size() for t in state.values())
            del state
            print(f"shard {i}/{len(shards)}: {loaded_bytes / 1e9:.2f} GB loaded in "
                  f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
        _check(ckpt_dir, "left parameters unloaded", [n for n, p in model.state_dict().items()
                                                     if p.is_meta])
        model.requires_grad_(False).eval()
        if device.type == "cuda":                       # the grouped-matmul MoE (SparseMoeBlock)
            model.stack_experts()
        model.setup_cache(max_batch_size, max_seq_len)
        return model

    def save_pretrained(self, ckpt_dir, num_shards=2):
        """Write config.json, num_shards safetensors shards and the index, in the official layout."""
        (ckpt_dir := Path(ckpt_dir)).mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        sizes = {n: t.numel() * t.element_size() for n, t in state.items()}
        total, done, groups = sum(sizes.values()), 0, [[] for _ in range(num_shards)]
        for n in state:                     # contiguous runs of tensors, balanced by bytes
            groups[min(num_shards - 1, (done + sizes[n] // 2) * num_shards // total)].append(n)
            done += sizes[n]
        weight_map = {}
        for i, names in enumerate(groups, 1):
            shard = f"model-{i:05d}-of-{num_shards:05d}.safetensors"
            # copies: stacked experts (SparseMoeBlock.stack_experts) are views of one shared tensor
            save_file({n: state[n].detach().to("cpu", copy=True, memory_format=torch.contiguous_format)
                       for n in names}, ckpt_dir / shard, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(names, shard))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (ckpt_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        dtype = str(self.model.embed_tokens.weight.dtype).removeprefix("torch.")
        (ckpt_dir / "config.json").write_text(json.dumps(self.args.to_config(dtype), indent=2) + "\n")


def _check(where, problem, offenders, shown=8):
    """Raise a one-line CheckpointError naming the offending tensors, if there are any."""
    offenders = sorted(offenders)
    if offenders:
        more = f" and {len(offenders) - shown} more" if len(offenders) > shown else ""
        raise CheckpointError(f"{where}: {problem}: {', '.join(offenders[:shown])}{more}")


if __name__ == "__main__":      # smoke run: a tiny random model, one prefill vs token by token
    args = ModelArgs(vocab_size=256, hidden_size=64, num_hidden_layers=4, kda_num_heads=2, kda_head_dim=16,
                     full_attn_layers=(1, 3), num_attention_heads=2, kv_lora_rank=32, qk_nope_head_dim=16,
                     qk_rope_head_dim=8, v_head_dim=16, intermediate_size=128, moe_intermediate_size=32,
                     num_experts=8, num_experts_per_token=2)
    (model := Transformer(args).eval()).setup_cache(max_batch_size=1, max_seq_len=128)
    tokens = torch.randint(0, args.vocab_size, (1, 100), generator=torch.Generator().manual_seed(0))
    full, steps = model(tokens), torch.cat([model(tokens[:, t:t + 1], t) for t in range(100)], dim=1)
    print(f"token by token vs one prefill: max |diff| {(steps - full).abs().max():.2e} of {full.std():.2f}")
