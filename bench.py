"""Speed of the full-size model on one GPU, with random weights (speed does not depend on their values).

    python sample.py --bench [--config config.json] [--peer]

Prefill tokens/s at B = 1 and decode tokens/s (one CUDA-graph replay per step) after a 4096-token
prompt, each next to its ceiling on this GPU: the bf16 matmul rate for prefill, the HBM copy rate over
the bytes a decode step must read (active weights, caches, KDA states). --peer runs Hugging Face
transformers' KimiLinearForCausalLM on random weights of the same shapes, after ours is freed.
"""
import statistics

import torch

from kimi import CUDAGraphDecoder, ModelArgs, Transformer

# Measured on the H200 these numbers were written for (KERNELS.md): device copy and bf16 matmul.
COPY_BYTES_PER_S, MATMUL_FLOP_PER_S = 4.27e12, 702e12
PREFILL_T, DECODE_B, CONTEXT, STEPS = (8192, 32768), (1, 16), 4096, 32


def random_model(args, device, max_batch_size, max_seq_len, seed=0):
    """The model on `device` in bf16 (A_log, dt_bias fp32), random weights, experts stacked."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(args)
    state = {}
    for name, p in model.named_parameters():
        if name.endswith(("A_log", "dt_bias")):     # decay rates exp(A_log) in 1..16, as fla inits
            t = torch.rand(p.shape, device=device).mul(15).add(1).log() if name.endswith("A_log") \
                else torch.zeros(p.shape, device=device)
        elif p.dim() == 1 or name.endswith("e_score_correction_bias"):
            t = torch.full(p.shape, float(not name.endswith("bias")), device=device, dtype=torch.bfloat16)
        else:
            t = torch.randn(p.shape, device=device, dtype=torch.bfloat16) * p.shape[-1] ** -0.5
        state[name] = t
    model.load_state_dict(state, assign=True)
    del state
    model.requires_grad_(False).eval().stack_experts()
    model.setup_cache(max_batch_size, max_seq_len)
    return model


def expert_bytes(a):
    return 3 * a.hidden_size * a.moe_intermediate_size * 2          # w1, w2, w3 in bf16


def active_params(a):
    """Parameters a token's forward touches (the lm_head included, the embedding table not)."""
    with torch.device("meta"):
        model = Transformer(a)
    total = sum(p.numel() for p in model.parameters()) - model.model.embed_tokens.weight.numel()
    moe_layers = sum(layer.is_moe for layer in model.model.layers)
    return total - moe_layers * (a.num_experts - a.num_experts_per_token) * expert_bytes(a) // 2


def decode_bytes(a, B, context):
    """Bytes one decode step reads at batch B: the shared weights once, each distinct expert once
    (expected count under uniform routing), every sequence's MLA cache and KDA state (read + write)."""
    moe_layers = a.num_hidden_layers - a.first_k_dense_replace
    k, E = a.num_experts_per_token, a.num_experts
    distinct = E * (1 - (1 - k / E) ** B)
    shared = 2 * active_params(a) - moe_layers * k * expert_bytes(a)
    mla, kda = len(a.full_attn_layers), a.num_hidden_layers - len(a.full_attn_layers)
    caches = B * (mla * context * (a.kv_lora_rank + a.qk_rope_head_dim) * 2
                  + kda * 2 * a.kda_num_heads * a.kda_head_dim ** 2 * 4)
    return shared + moe_layers * distinct * expert_bytes(a) + caches


def cuda_time(fn, runs, warmup=1):
    """Median milliseconds of fn() over `runs` calls, CUDA events, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench_ours(args, device, compile):
    rows = {}
    model = random_model(args, device, 1, max(PREFILL_T))
    for T in PREFILL_T:
        tokens = torch.randint(0, args.vocab_size, (1, T), device=device)
        ms = cuda_time(lambda: model(tokens, last_only=True), runs=3)
        rows[f"prefill B=1 T={T}"] = (T / ms * 1e3, MATMUL_FLOP_PER_S / (2 * active_params(args)))
        print(f"prefill B=1 T={T}: {T / ms * 1e3:.1f} tok/s", flush=True)
    # A decode-sized cache: the graph's MLA step reads the whole buffer (see CUDAGraphDecoder)
    model.setup_cache(max(DECODE_B), CONTEXT + STEPS + 16)
    for B in DECODE_B:
        ceiling = B * COPY_BYTES_PER_S / decode_bytes(args, B, CONTEXT)
        for how in ("eager", "CUDA graph") + (("torch.compile + graph",) if compile else ()):
            step = None if how == "eager" else CUDAGraphDecoder(model, B, compile=how != "CUDA graph")
            prompt = torch.randint(0, args.vocab_size, (B, CONTEXT), device=device)
            tok = model(prompt, last_only=True)[:, -1].argmax(-1, keepdim=True)     # the prefill
            pos = iter(range(CONTEXT, CONTEXT + STEPS + 16))
            if step is None:                            # eager: launch-bound, a few steps suffice
                ms = cuda_time(lambda: model(tok, next(pos), last_only=True), runs=3, warmup=2)
            else:
                ms = cuda_time(lambda: step(tok, next(pos)), runs=STEPS, warmup=8)
            name = f"decode B={B} context {CONTEXT}, {how}"
            rows[name] = (B / ms * 1e3, ceiling)
            print(f"{name}: {rows[name][0]:.1f} tok/s", flush=True)
            step = None
    return rows


def bench_peer(args, device):
    """The same shapes through transformers' KimiLinearForCausalLM. Its pure-PyTorch KDA holds ~3 MB
    per prompt token, so long prompts go in pieces of 8192 tokens (B x piece <= 8192)."""
    from peer_hf import peer_decoder, peer_model, peer_prefill
    rows, model = {}, peer_model(args, device)
    for T in PREFILL_T:
        tokens = torch.randint(0, args.vocab_size, (1, T), device=device)
        piece = 8192 if T > 8192 else None
        ms = cuda_time(lambda: peer_prefill(model, tokens, piece), runs=2)
        rows[f"prefill B=1 T={T}"] = f"{T / ms * 1e3:.1f}" + (" (pieces)" if piece else "")
    for B in DECODE_B:
        step = peer_decoder(model, torch.randint(0, args.vocab_size, (B, CONTEXT), device=device),
                            piece=8192 // B)
        rows[f"decode B={B} context {CONTEXT}"] = f"{B / cuda_time(step, runs=5, warmup=2) * 1e3:.1f}"
        step = None
    return rows


def main(config=None, peer=False, compile=False):
    device = torch.device("cuda")
    args = ModelArgs.from_json(config) if config else ModelArgs()
    print(f"{active_params(args) / 1e9:.2f} B active parameters per token; random bf16 weights on "
          f"{torch.cuda.get_device_name(device)}", flush=True)
    ours = bench_ours(args, device, compile)
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.empty_cache()
    theirs = bench_peer(args, device) if peer else {}
    print(f"{'':48} {'tok/s':>9} {'ceiling':>9} {'of ceiling':>10} {'transformers':>16}")
    for name, (tps, ceiling) in ours.items():
        other = theirs.get(name.split(",")[0], "") if "eager" not in name else ""
        print(f"{name:48} {tps:9.1f} {ceiling:9.0f} {tps / ceiling:10.1%} {other:>16}")
    print(f"peak GPU memory (ours): {peak:.1f} GiB")
