"""Decode at GPU speed (one CUDA graph per step), and the speed benchmark of the full-size model.

    python sample.py --bench [--config config.json] [--compile] [--peer]

The benchmark builds the model with random weights (speed does not depend on their values) and prints
prefill tokens/s at B = 1 and decode tokens/s after a 4096-token prompt, each next to its ceiling on
this GPU: the bf16 matmul rate over 2 FLOP per active parameter for prefill; for decode, the HBM copy
rate over the bytes a step must read (active weights, MLA caches, KDA states). --peer also times Hugging
Face transformers' KimiLinearForCausalLM (peer_hf.py) on random weights of the same shapes.
"""
import statistics
import sys

import torch

from kimi import CheckpointError, ModelArgs, Transformer

# --------------------------------------------------------------------------------------------------
# Decode at GPU speed (sample.generate uses it too)

def cuda_graph_decoder(model, batch_size, compile=False):
    """decode(tokens [B, 1], start_pos) -> logits [B, 1, vocab]: a decode step replayed from a CUDA graph,
    so its ~3,000 small kernels cost one launch (compile=True first fuses them with torch.compile, which
    takes minutes). The position is a device tensor, so one graph serves every step, and MLA reads its
    whole cache buffer, masked. Make it before a prefill: capturing runs decode steps on the caches."""
    device = model.lm_head.weight.device
    model.stack_experts()                               # the expert loop syncs with the host
    tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
    pos = torch.ones((), dtype=torch.long, device=device)
    step = torch.compile(model, dynamic=False, options={"emulate_precision_casts": True}) \
        if compile else model                           # (round to bf16 where eager does)
    stream = torch.cuda.Stream(device)                  # warm up (compile, plan) off the main stream
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            step(tokens, pos, last_only=True)
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = step(tokens, pos, last_only=True)      # overwritten by every replay

    def decode(new_tokens, start_pos):
        tokens.copy_(new_tokens)
        pos.fill_(start_pos)
        graph.replay()
        return logits
    return decode


# --------------------------------------------------------------------------------------------------
# The benchmark

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
    """{row name: (tokens/s, ceiling tokens/s)}"""
    rows = {}
    model = random_model(args, device, 1, max(PREFILL_T))
    for T in PREFILL_T:
        tokens = torch.randint(0, args.vocab_size, (1, T), device=device)
        ms = cuda_time(lambda: model(tokens, last_only=True), runs=3)
        rows[f"prefill B=1 T={T}"] = (T / ms * 1e3, MATMUL_FLOP_PER_S / (2 * active_params(args)))
        print(f"prefill B=1 T={T}: {T / ms * 1e3:.1f} tok/s", flush=True)
    model.setup_cache(max(DECODE_B), CONTEXT + STEPS + 16)     # the graph's MLA reads the whole buffer
    for B in DECODE_B:
        ceiling = B * COPY_BYTES_PER_S / decode_bytes(args, B, CONTEXT)
        for how in ("eager", "CUDA graph") + (("torch.compile + graph",) if compile else ()):
            step = None if how == "eager" else cuda_graph_decoder(model, B, compile=how != "CUDA graph")
            prompt = torch.randint(0, args.vocab_size, (B, CONTEXT), device=device)
            tok = model(prompt, last_only=True)[:, -1].argmax(-1, keepdim=True)     # the prefill
            pos = iter(range(CONTEXT, CONTEXT + STEPS + 16))
            if step is None:                            # eager: launch-bound, a few steps suffice
                ms = cuda_time(lambda: model(tok, next(pos), last_only=True), runs=3, warmup=2)
            else:
                ms = cuda_time(lambda: step(tok, next(pos)), runs=STEPS, warmup=8)
            name = f"decode B={B} context {CONTEXT}, {how}"
            rows[name] = (B / ms * 1e3, ceiling)
            print(f"{name}: {B / ms * 1e3:.1f} tok/s", flush=True)
            step = None
    return rows


def bench_peer(args, device):
    """The same shapes through transformers' KimiLinearForCausalLM. Its pure-PyTorch KDA holds ~3 MB
    per prompt token, so long prompts go in pieces (B x piece <= 8192 tokens per forward)."""
    from peer_hf import peer_decoder, peer_model, peer_prefill
    rows, model = {}, peer_model(args, device)
    for T in PREFILL_T:
        tokens = torch.randint(0, args.vocab_size, (1, T), device=device)
        piece = 8192 if T > 8192 else None
        tps = T / cuda_time(lambda: peer_prefill(model, tokens, piece), runs=1) * 1e3
        rows[f"prefill B=1 T={T}"] = f"{tps:.1f}" + (" (pieces)" if piece else "")
        print(f"transformers prefill B=1 T={T}: {rows[f'prefill B=1 T={T}']} tok/s", flush=True)
    for B in DECODE_B:
        prompt = torch.randint(0, args.vocab_size, (B, CONTEXT), device=device)
        step = peer_decoder(model, prompt, piece=8192 // B)
        rows[f"decode B={B} context {CONTEXT}"] = f"{B / cuda_time(step, runs=5, warmup=2) * 1e3:.1f}"
        print(f"transformers decode B={B}: {rows[f'decode B={B} context {CONTEXT}']} tok/s", flush=True)
        step = None
    return rows


def main(config=None, peer=False, compile=False):
    if not torch.cuda.is_available():
        sys.exit("error: --bench needs a CUDA GPU")
    try:
        args = ModelArgs.from_json(config) if config else ModelArgs()
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    device = torch.device("cuda")
    print(f"{active_params(args) / 1e9:.2f} B active parameters per token; random bf16 weights on "
          f"{torch.cuda.get_device_name(device)}", flush=True)
    ours = bench_ours(args, device, compile)
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.empty_cache()
    theirs = bench_peer(args, device) if peer else {}
    print(f"{'':46} {'tok/s':>8} {'ceiling':>8} {'of ceiling':>10} {'transformers':>18}")
    for name, (tps, ceiling) in ours.items():
        other = theirs.get(name.split(",")[0], "") if "eager" not in name else ""
        print(f"{name:46} {tps:8.1f} {ceiling:8.0f} {tps / ceiling:10.1%} {other:>18}")
    print(f"peak GPU memory (ours): {peak:.1f} GiB")
