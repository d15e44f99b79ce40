"""The full-size model for the programs that measure: built with random weights on the GPU (speed
does not depend on their values), what a step of it must read or compute, and the GPU's own rates:
the two make the ceilings.
"""
import collections
import dataclasses
import functools

import torch

from kimi import Transformer
from tools.timing import cuda_time

Rates = collections.namedtuple("Rates", "copy_bytes_per_s matmul_flop_per_s fp8_matmul_flop_per_s")


@functools.cache                                    # once per GPU a run: about two seconds
def ceilings(device):
    """The rates of the GPU this runs on, measured now, so that each ratio to a ceiling comes from
    one run on one card (CUDA events, median of 10 after warm-up): a device-to-device copy, and
    matrix products in bf16 and in FP8 (None below compute capability 8.9)."""
    fp8 = torch.cuda.get_device_capability(device) >= (8, 9)
    rates = Rates(_copy_rate(device), _matmul_rate(device, fp8=False),
                  _matmul_rate(device, fp8=True) if fp8 else None)
    torch.cuda.empty_cache()            # the helpers' tensors are gone; the model may need it all
    fp8_rate = f"{rates.fp8_matmul_flop_per_s / 1e12:.0f}" if fp8 else "none"
    print(f"ceilings on {torch.cuda.get_device_name(device)}, measured now: copy "
          f"{rates.copy_bytes_per_s / 1e12:.2f} TB/s, bf16 matmul "
          f"{rates.matmul_flop_per_s / 1e12:.0f} TFLOP/s, FP8 matmul {fp8_rate} TFLOP/s",
          flush=True)
    return rates


def _copy_rate(device):
    """Bytes read and written a second by a device-to-device copy of 1 GiB."""
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / cuda_time(lambda: dst.copy_(src), runs=10, warmup=2) * 1e3


def _matmul_rate(device, fp8, n=8192):
    """FLOP/s of an n x n x n matrix product: bf16, or FP8 as fast.fp8.scaled_linear runs it (e4m3,
    row-wise scales; its input is quantised once, in the warm-up, and remembered)."""
    from fast.fp8 import quantize_rows, scaled_linear
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    product = lambda: a @ b.T                                           # noqa: E731
    if fp8:
        bq, b_s = quantize_rows(b)                                      # [n, n] e4m3, [n, 1]
        product = lambda: scaled_linear(a, bq, b_s)                     # noqa: E731
    return 2 * n**3 / cuda_time(product, runs=10, warmup=2) * 1e3


def first_layers(args, n):
    """args with only its first n layers (the MLA ones among them kept): a cut of the model that
    fits a smaller GPU, to compare bf16 with FP8 where the whole bf16 model does not fit."""
    if not 1 <= n <= args.num_hidden_layers:
        raise ValueError(f"layers takes 1 to {args.num_hidden_layers}, not {n}")
    mla = [i for i in args.full_attn_layers if i < n]
    return dataclasses.replace(args, num_hidden_layers=n, full_attn_layers=mla)


def random_model(args, device, max_batch_size, max_seq_len, seed=0, fp8=False):
    """The model on `device` in bf16 (A_log, dt_bias fp32), random weights, experts stacked, caches
    set up. Made on `device` directly, one layer at a time: no fp32 copy (the 48B model fits an H200
    in bf16 only). fp8: each tensor is quantised as it is made (fast.quantize's loader), so the FP8
    model never exists in bf16 (it fits 80 GB)."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(args)
    load = None
    if fp8:
        from fast import quantize
        load = quantize.prepare(model, device)
    shapes = {n: t.shape for n, t in model.state_dict().items() if not load or n not in load.makes}
    layers = {}                                     # model.layers.{i} -> its names; others alone
    for name in shapes:
        key = ".".join(name.split(".")[:3]) if name.startswith("model.layers.") else name
        layers.setdefault(key, []).append(name)
    for names in layers.values():
        state = {}
        for name in names:
            t = random_tensor(name, shapes[name], device)
            state.update(load(name, t) if load else {name: t})
        model.load_state_dict(state, strict=False, assign=True)
    model.requires_grad_(False).eval().stack_experts()
    model.setup_cache(max_batch_size, max_seq_len)
    return model


def random_tensor(name, shape, device):
    if name.endswith("A_log"):                      # decay rates exp(A_log) in 1..16, as fla inits
        return torch.rand(shape, device=device).mul(15).add(1).log()
    if name.endswith("dt_bias"):
        return torch.zeros(shape, device=device)
    if len(shape) == 1 or name.endswith("e_score_correction_bias"):     # norms 1, router bias 0
        fill = 0.0 if name.endswith("bias") else 1.0
        return torch.full(shape, fill, device=device, dtype=torch.bfloat16)
    return torch.randn(shape, device=device, dtype=torch.bfloat16) * shape[-1] ** -0.5


def expert_bytes(a):
    return 3 * a.hidden_size * a.moe_intermediate_size * 2          # w1, w2, w3 in bf16


@functools.cache                                    # 3 s at full size; the ceilings ask often
def active_params(a):
    """Parameters a token's forward touches (the lm_head included, the embedding table not),
    counted on a meta-device model."""
    with torch.device("meta"):
        model = Transformer(a)
    total = sum(p.numel() for p in model.parameters()) - model.model.embed_tokens.weight.numel()
    moe_layers = sum(layer.is_moe for layer in model.model.layers)
    unused = moe_layers * (a.num_experts - a.num_experts_per_token) * expert_bytes(a) // 2
    return total - unused


def decode_bytes(a, B, context):
    """Bytes one decode step reads at batch B: the shared weights once, each distinct expert once
    (expected count under uniform routing), every sequence's MLA cache and KDA state (read and
    write)."""
    moe_layers = a.num_hidden_layers - a.first_k_dense_replace
    k, E = a.num_experts_per_token, a.num_experts
    distinct = E * (1 - (1 - k / E) ** B)
    shared = 2 * active_params(a) - moe_layers * k * expert_bytes(a)
    return shared + moe_layers * distinct * expert_bytes(a) + cache_step_bytes(a, B, context)


def cache_step_bytes(a, B, context):
    """What a decode step reads of the caches: MLA latents (bf16), KDA states (fp32, read and
    written)."""
    mla, kda = len(a.full_attn_layers), a.num_hidden_layers - len(a.full_attn_layers)
    return B * (mla * context * (a.kv_lora_rank + a.qk_rope_head_dim) * 2
                + kda * 2 * a.kda_num_heads * a.kda_head_dim ** 2 * 4)


def model_decode_bytes(model, B, context):
    """decode_bytes counted on a model's own tensors (any dtype, FP8 included): every tensor but
    the embedding and the routed experts once, the expected distinct experts, the caches."""
    a, experts, shared = model.args, 0, 0
    for name, t in model.state_dict().items():
        if ".experts." in name:
            experts += t.numel() * t.element_size()
        elif "embed_tokens" not in name:
            shared += t.numel() * t.element_size()
    moe_layers = sum(layer.is_moe for layer in model.model.layers)
    k, E = a.num_experts_per_token, a.num_experts
    distinct = E * (1 - (1 - k / E) ** B)
    per_expert = experts / (moe_layers * E)
    return shared + moe_layers * distinct * per_expert + cache_step_bytes(a, B, context)
