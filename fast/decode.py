"""
One decode step of kimi.py's model in a few fused kernels a layer: the fast path of generation.

    step(model, tokens, start_pos) = model(tokens, start_pos, last_only=True)
    for tokens [B, 1] that continue the sequences in the caches (start_pos >= 1, an int or a 0-d
    device tensor, as cuda_graph_decoder below replays it).

kimi.py's forward says the math in small torch operations: about 110 kernels per layer, 3,000 per
step, each costing a launch's microseconds even when replayed from a CUDA graph, so a step took
several times as long as reading its weights. This file runs the same math layer by layer in fused
pieces, each with a torch reference beside its kernel (a test checks each, and step against model):
  - add_rmsnorm (here): the residual add and the next RMSNorm in one kernel; it also sums the
    parts that the layer's last kernel left apart (the MoE's slots, FP8 o_proj's slices of K)
  - one matmul for all of a layer's input projections, stacked once by prepare (their weights
    become views of the stacked one, as fast.moe.stack_experts does for the experts)
  - kda_decode.py: a KDA layer's short convs, norms, gates, recurrence and gated norm in one kernel
  - mla_decode.py: the absorbed latent attention, split over the cache (flash-decoding)
  - moe_decode.py: the router's top-k (it writes the shared expert's slot too), then the selected
    experts (the shared one stacked with them as row E) read once
Everything else is kimi.py's own modules. Shapes: B rows, D hidden, P = H*K KDA width, N = B.
"""
import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import kimi
from fast import (fp8, kda_decode, mla_decode, moe_decode, rms_norm_row, round_to,
                  stack_linears)
from fast import moe as fast_moe


# -------------------------------------------------------------------------------------------------
# The residual add and RMSNorm, fused

@triton.jit
def _add_rmsnorm_kernel(h_ptr, parts_ptr, wts_ptr, w_ptr, h_out, n_out, D, eps,
                        HAS_DELTA: tl.constexpr, J: tl.constexpr, WEIGHTED: tl.constexpr,
                        BD: tl.constexpr):
    """One row per program: delta = sum_j w_j parts[row, j] (fp32, j in order, one rounding),
    h = h + delta (rounded), n = RMSNorm(h) with kimi's rounding points."""
    row = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BD)
    h = tl.load(h_ptr + row * D + d, mask=d < D, other=0.0)
    if HAS_DELTA:
        delta = tl.zeros((BD,), tl.float32)
        for j in tl.static_range(J):        # unrolled: no load waits for the one before
            part = tl.load(parts_ptr + (row * J + j) * D + d, mask=d < D, other=0.0)
            if WEIGHTED:
                delta += tl.load(wts_ptr + row * J + j) * part.to(tl.float32)
            else:
                delta += part.to(tl.float32)
        delta = round_to(delta, h_out.dtype.element_ty)     # the layer's output, as kimi's
        h = round_to(h.to(tl.float32) + delta, h_out.dtype.element_ty)             # bf16 add
        tl.store(h_out + row * D + d, h.to(h_out.dtype.element_ty), mask=d < D)
    w = tl.load(w_ptr + d, mask=d < D, other=0.0).to(tl.float32)
    n = rms_norm_row(h.to(tl.float32), w, D, eps, h_out.dtype.element_ty, n_out.dtype.element_ty)
    tl.store(n_out + row * D + d, n.to(n_out.dtype.element_ty), mask=d < D)


def delta_ref(delta, dtype):
    """A layer's output from what its last kernel left: delta [B, D] itself, or (parts [B, J, D],
    weights [B, J] fp32 or None for ones) -> sum_j w_j parts[:, j] in fp32, j in order, rounded
    to dtype once: the MoE's expert slots, or o_proj's slices of its inputs."""
    if not isinstance(delta, tuple):
        return delta
    parts, weights = delta
    total = torch.zeros(parts[:, 0].shape, dtype=torch.float32, device=parts.device)
    for j in range(parts.shape[1]):
        w = 1.0 if weights is None else weights[:, j, None]
        total += w * parts[:, j].float()
    return total.to(dtype)


def add_rmsnorm_ref(h, delta, norm):
    """(h + delta, norm(h + delta)) for h [B, D], delta as delta_ref takes it (None: h, norm(h))."""
    if delta is not None:
        h = h + delta_ref(delta, h.dtype)
    return h, norm(h)


def add_rmsnorm(h, delta, norm):
    """= add_rmsnorm_ref in one kernel (norm: a kimi.RMSNorm): the sum of the parts, the residual
    add and the norm, where a separate kernel would sum the parts first."""
    parts, weights = delta if isinstance(delta, tuple) else (delta, None)
    h = h.contiguous()                                  # rows D apart, as h_out's and n_out's
    B, D = h.shape
    if parts is not None:
        parts = parts.reshape(B, -1, D).contiguous()                            # [B, J, D]
        weights = weights.float().contiguous() if weights is not None else None  # [B, J]
    h_out = torch.empty_like(h) if parts is not None else h
    n_out = h.new_empty(B, D)
    _add_rmsnorm_kernel[(B,)](h, parts, weights, norm.weight, h_out, n_out, D, norm.eps,
                              HAS_DELTA=parts is not None, J=1 if parts is None else parts.shape[1],
                              WEIGHTED=weights is not None, BD=triton.next_power_of_2(D),
                              num_warps=8)
    return h_out, n_out


# -------------------------------------------------------------------------------------------------
# Stacked projections

def linear(x, weight, scale):
    """x @ weight.T for x [B, K] and a stack_linears result (FP8: fast.fp8.fp8_linear)."""
    if scale is not None:
        return fp8.fp8_linear(x, weight, scale)
    return F.linear(x, weight)


O_SPLIT = 4                 # FP8 o_proj's slices of P (o_proj; the A/B: docs/kernels_h100.md)
KDA_IN = ("q_proj", "k_proj", "v_proj", "f_a_proj", "g_a_proj", "b_proj")
MLA_IN = ("q_proj", "kv_a_proj_with_mqa")


def prepare(model):
    """Stack what step reads (idempotent; again after .to(), whose copies are no longer views)."""
    for layer in model.model.layers:
        attn = layer.self_attn
        names = MLA_IN if isinstance(attn, kimi.MLAAttention) else KDA_IN
        first = getattr(attn, names[0]).weight
        if getattr(attn, "stacked", None) is None or attn.stacked[0].data_ptr() != first.data_ptr():
            attn.stacked = stack_linears([getattr(attn, n) for n in names])
        if isinstance(attn, kimi.KimiDeltaAttention):   # the kernel reads these as plain matrices
            attn.low_rank = [_plain(attn.f_b_proj), _plain(attn.g_b_proj)]
        if layer.is_moe and not hasattr(layer.block_sparse_moe, "s13"):
            fast_moe.stack_experts(layer.block_sparse_moe)     # (FP8 blocks stack as they load)


def _plain(m):
    """A Linear's weight in the model's dtype (an Fp8Linear's dequantised: exact in bf16)."""
    if not hasattr(m, "weight_scale"):
        return m.weight
    return fp8.dequantize(m.weight, m.weight_scale, torch.bfloat16)


# -------------------------------------------------------------------------------------------------
# The step

@torch.no_grad()
def step(model, tokens, start_pos, fast=True):
    """= model(tokens, start_pos, last_only=True) for tokens [B, 1] continuing the sequences in
    the caches (start_pos >= 1). fast=False runs every piece's torch reference instead."""
    B = tokens.shape[0]
    if not (torch.is_tensor(start_pos) or start_pos >= 1):
        raise ValueError("decode.step continues sequences: start_pos >= 1 (a prefill starts them)")
    model.check_inputs(tokens, start_pos)
    pad = model.pad[:B]                                     # the left padding the rows began with
    h, delta = model.model.embed_tokens(tokens[:, 0]), None     # [B, D]
    norm = add_rmsnorm if fast else add_rmsnorm_ref
    for layer in model.model.layers:
        h, x = norm(h, delta, layer.input_layernorm)       # h += previous output; x = norm(h)
        attn = layer.self_attn
        if isinstance(attn, kimi.MLAAttention):
            delta = mla_step(attn, x, start_pos, pad, fast)
        else:
            delta = kda_step(attn, x, fast)
        h, x = norm(h, delta, layer.post_attention_layernorm)
        delta = moe_step(layer.block_sparse_moe, x, fast) if layer.is_moe else layer.mlp(x)
    h, x = norm(h, delta, model.model.norm)
    return model.lm_head(x).float()[:, None]               # [B, 1, vocab]


def kda_step(attn, x, fast):
    """= KimiDeltaAttention.forward for one token per row, continuing: x [B, D] -> [B, D]."""
    B, H, K = x.shape[0], attn.H, attn.K
    P = H * K
    q, k, v, f_a, g_a, b = linear(x, *attn.stacked).split([P, P, P, K, K, H], dim=-1)
    conv_w = (attn.q_conv1d.weight, attn.k_conv1d.weight, attn.v_conv1d.weight)
    f_b_w, g_b_w = attn.low_rank
    kernel = kda_decode.kda_decode if fast else kda_decode.kda_decode_ref
    o = kernel(q, k, v, f_a, g_a, b, attn.conv_state[:, :B], conv_w, f_b_w, g_b_w, attn.A_log,
               attn.dt_bias, attn.o_norm.weight, attn.o_norm.eps, attn.recurrent_state[:B])
    return o_proj(attn.o_proj, o)                           # o [B, P]


def mla_step(attn, x, pos, pad, fast):
    """= MLAAttention.forward for one token per row at position pos: x [B, D] -> [B, D]: its
    attend_absorbed itself, or (fast) mla_decode.absorbed_attention, which equals it."""
    B, H, R = x.shape[0], attn.H, attn.R
    q, c, k_pe = linear(x, *attn.stacked).split([H * (attn.nope + attn.pe), R, attn.pe], dim=-1)
    q = q.view(B, H, -1)                                    # [B, H, nope + pe]
    if not fast:
        ckv = torch.cat([attn.kv_a_layernorm(c), k_pe], dim=-1)             # [B, R + pe]
        o = attn.attend_absorbed(q, ckv[:, None], pos, pad, kimi.latent_attention)
    else:                       # attend_absorbed's cache write, then its math, in five kernels
        norm, cache = attn.kv_a_layernorm, attn.kv_cache[:B]
        mla_decode.write_latent(c, k_pe, norm.weight, norm.eps, cache, pos)
        o = mla_decode.absorbed_attention(q, attn.kv_b_proj.weight, cache, pos, attn.scale, pad,
                                          v_head_dim=attn.v)                    # [B, H, V]
    return o_proj(attn.o_proj, o.reshape(B, H * attn.v))


def o_proj(linear, o):
    """The attention's output projection, o [B, P] -> [B, D]. FP8 on a GPU at decode's row
    counts: split over its P inputs into O_SPLIT fp32 parts for add_rmsnorm to sum, since D / BN
    programs alone leave SMs idle (fp8.fp8_rows); else the module itself."""
    decode_fp8 = hasattr(linear, "weight_scale") and fp8.fp8_gpu(o) and len(o) <= fp8.DECODE_ROWS
    if O_SPLIT > 1 and decode_fp8:                          # (more rows: fp8_linear's GEMM)
        parts = fp8.fp8_rows(o, linear.weight[None], linear.weight_scale[None], split=O_SPLIT)
        return parts, None                                  # [B, O_SPLIT, D] fp32
    return linear(o)


def moe_step(moe, x, fast):
    """= SparseMoeBlock.forward for one token per row: x [B, D] -> [B, D], or with fast (the
    shared expert stacked) the slots' outputs and weights, for add_rmsnorm to sum."""
    if len(x) > moe_decode.MAX_TOKENS:      # more rows than the decode kernels' tile holds
        return moe(x[:, None])[:, 0]       # the block itself (grouped matmuls once stacked)
    gate, args = moe.gate, moe.gate.args
    if fast:        # [S, N, E]: partial sums over slices of D, which route adds in order
        logits = moe_decode.router_logits(x, gate.weight)
    elif x.is_cuda:  # fp32 accumulation of exact bf16 products = F.linear(x.float(), W.float())
        logits = torch.mm(x, gate.weight.T, out_dtype=torch.float32)
    else:
        logits = F.linear(x.float(), gate.weight.float())
    route = moe_decode.route if fast else moe_decode.route_ref
    # the shared expert, stacked as row E (fast.moe.stack_experts: when it has the routed ones'
    # width), gets its slot from the route kernel, weight 1: y + shared(x); else its own MLP
    stacked = len(moe.w13) > args.num_experts
    slot = (args.num_experts, 1.0) if stacked else None
    ids, w = route(logits, gate.e_score_correction_bias, args.num_experts_per_token,
                   args.moe_renormalize, args.routed_scaling_factor, args.routing_weights_biased,
                   slot)
    weights = (moe.w13, moe.w2, getattr(moe, "s13", None), getattr(moe, "s2", None))
    if fast and stacked:        # the slots' weighted sum is left to the next add_rmsnorm
        return moe_decode.experts(x, ids, w, *weights, parts=True)
    experts = moe_decode.experts if fast else moe_decode.experts_ref
    y = experts(x, ids, w, *weights)
    return y if stacked else y + moe.shared_experts(x)


# -------------------------------------------------------------------------------------------------
# One CUDA graph for every step

def cuda_graph_decoder(model, batch_size, forward=None):
    """decode(tokens [B, 1], start_pos) -> logits [B, 1, vocab]: one step replayed from a CUDA
    graph: step's fused kernels, or forward(tokens, start_pos=, last_only=True) if given
    (tools/bench.py times kimi.py's forward so). One graph serves every position (a device tensor;
    MLA reads its whole cache, masked). Build it after setup_cache, before a prefill."""
    device = model.lm_head.weight.device
    model.stack_experts()                               # the expert loop syncs with the host
    tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
    pos = torch.ones((), dtype=torch.long, device=device)
    if forward is None:
        prepare(model)
        one_step = functools.partial(step, model, tokens, pos)
    else:
        one_step = functools.partial(forward, tokens, start_pos=pos, last_only=True)
    stream = torch.cuda.Stream(device)                  # warm up (compile, plan) off the main one
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.no_grad(), torch.cuda.stream(stream):
        for _ in range(2):
            one_step()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        logits = one_step()                             # overwritten by every replay

    def replay(new_tokens, start_pos):
        tokens.copy_(new_tokens)
        pos.fill_(start_pos)
        graph.replay()
        return logits
    replay.batch_size = batch_size
    return replay
