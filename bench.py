"""Decode at GPU speed (one CUDA graph per step), and the speed benchmark of the full-size model.

    python sample.py --bench [--config config.json] [--compile] [--peer]
    python sample.py --bench --context 4096,131072,1048576 [--out DIR]   # TPOT vs an all-MLA twin

The benchmark builds the model with random weights (speed does not depend on their values) and prints
prefill tokens/s at B = 1 and decode tokens/s after a 4096-token prompt, each next to its ceiling on
this GPU: the bf16 matmul rate over 2 FLOP per active parameter for prefill; for decode, the HBM copy
rate over the bytes a step must read (active weights, MLA caches, KDA states). --peer also times Hugging
Face transformers' KimiLinearForCausalLM (peer_hf.py) on random weights of the same shapes.
"""
import argparse
import json
import os
import statistics
import sys
from dataclasses import replace

import torch

from kimi import CheckpointError, ModelArgs, Transformer

# --------------------------------------------------------------------------------------------------
# Decode at GPU speed (sample.generate uses it too)

def cuda_graph_decoder(model, batch_size, compile=False):
    """decode(tokens [B, 1], start_pos) -> logits [B, 1, vocab]: a decode step replayed from a CUDA graph,
    so its ~3,000 small kernels cost one launch (compile=True first fuses them with torch.compile: about
    a minute for the 48B model on an H200). The position is a device tensor, so one graph serves every
    step, and MLA reads its whole cache buffer, masked. Make it before a prefill: capturing runs decode
    steps on the caches."""
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


def active_params(a, _counted={}):
    """Parameters a token's forward touches (the lm_head included, the embedding table not). Counted on
    a meta-device model (3 s at full size), once per config: the ceilings ask for it often."""
    if repr(a) not in _counted:                     # ModelArgs is not hashable; its repr has every field
        with torch.device("meta"):
            model = Transformer(a)
        total = sum(p.numel() for p in model.parameters()) - model.model.embed_tokens.weight.numel()
        moe_layers = sum(layer.is_moe for layer in model.model.layers)
        unused = moe_layers * (a.num_experts - a.num_experts_per_token) * expert_bytes(a) // 2
        _counted[repr(a)] = total - unused
    return _counted[repr(a)]


def cache_bytes(a, B, context):
    """Bytes of the caches of B sequences: MLA latent + k_pe per token; KDA conv inputs and fp32 state."""
    mla, kda = len(a.full_attn_layers), a.num_hidden_layers - len(a.full_attn_layers)
    P = a.kda_num_heads * a.kda_head_dim
    return B * (mla * context * (a.kv_lora_rank + a.qk_rope_head_dim) * 2
                + kda * (3 * P * (a.short_conv_kernel_size - 1) * 2 + P * a.kda_head_dim * 4))


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


def bench_context(args, device, contexts, steps=16, prefill=65536):
    """Decode time per output token (TPOT) at B = 1 after `contexts` tokens, for the model and its
    all-MLA twin (every layer MLA, all else equal). The caches are filled with random values, not by a
    prefill: a decode step's time does not depend on the cached values. -> list of result dicts."""
    results = []
    twin = replace(args, full_attn_layers=tuple(range(args.num_hidden_layers)))
    for variant, a in (("Kimi Linear", args), ("all-MLA twin", twin)):
        model = random_model(a, device, 1, 1)
        for L in contexts:
            row = dict(variant=variant, context=L, formula_bytes=cache_bytes(a, 1, L))
            try:
                model.setup_cache(0, 0)                 # free the last caches, then measure the new ones
                torch.cuda.empty_cache()
                before = torch.cuda.memory_allocated(device)
                model.setup_cache(1, L)
                row["allocated_bytes"] = torch.cuda.memory_allocated(device) - before
                for name, buf in model.named_buffers():
                    buf.normal_().mul_(0.1 if name.endswith("recurrent_state") else 1.0)
                step = cuda_graph_decoder(model, 1)     # reads the whole cache of L tokens
                tok = torch.zeros(1, 1, dtype=torch.long, device=device)
                row["tpot_ms"] = cuda_time(lambda: step(tok, L - 1), runs=steps, warmup=4)
            except torch.OutOfMemoryError:
                row["tpot_ms"] = None                   # the twin's cache may not fit next to 98 GB
            step = None
            results.append(row)
            print(f"{variant:12} context {L:>8}: cache {row['formula_bytes'] / 2**30:7.3f} GiB "
                  f"(allocated {row.get('allocated_bytes', 0) / 2**30:7.3f}), TPOT "
                  + (f"{row['tpot_ms']:.2f} ms" if row["tpot_ms"] else "out of memory"), flush=True)
            if L == prefill:                            # bonus: the prefill that fills such a cache
                tokens = torch.randint(0, a.vocab_size, (1, L), device=device)
                row["prefill_s"] = cuda_time(lambda: model(tokens, last_only=True), runs=1) / 1e3
                print(f"{variant:12} prefill of {L} tokens: {row['prefill_s']:.2f} s", flush=True)
        model = None
        torch.cuda.empty_cache()
    return results


def plot(results, path):
    """TPOT against context for both variants (matplotlib, optional) -> PNG at `path`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for variant in dict.fromkeys(r["variant"] for r in results):
        pts = [(r["context"], r["tpot_ms"]) for r in results if r["variant"] == variant and r["tpot_ms"]]
        ax.plot(*zip(*pts), marker="o", label=variant)
    ax.set(xscale="log", xlabel="context (tokens)", ylabel="decode time per token, B = 1 (ms)",
           title="Kimi Linear 48B-A3B vs an all-MLA twin, one H200, bf16")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main(argv=()):
    ap = argparse.ArgumentParser(prog="sample.py --bench", description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="a config.json instead of the 48B-A3B defaults")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile + CUDA graph decode")
    ap.add_argument("--peer", action="store_true", help="also time transformers' KimiLinearForCausalLM")
    ap.add_argument("--context", help="comma-separated contexts: TPOT and cache size vs an all-MLA twin")
    ap.add_argument("--out", help="with --context: write the results (JSON) and a plot (PNG) here")
    opts = ap.parse_args(argv)
    try:
        contexts = [int(c) for c in opts.context.split(",")] if opts.context else []
    except ValueError:
        ap.error(f"--context takes comma-separated token counts, not {opts.context!r}")
    if any(c < 1 for c in contexts):
        ap.error("--context lengths must be positive")
    if not torch.cuda.is_available():
        sys.exit("error: --bench needs a CUDA GPU")
    try:
        args = ModelArgs.from_json(opts.config) if opts.config else ModelArgs()
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    device = torch.device("cuda")
    print(f"{active_params(args) / 1e9:.2f} B active parameters per token; random bf16 weights on "
          f"{torch.cuda.get_device_name(device)}", flush=True)
    if contexts:
        results = bench_context(args, device, contexts)
        if opts.out:
            os.makedirs(opts.out, exist_ok=True)
            with open(os.path.join(opts.out, "tpot.json"), "w") as f:
                json.dump(results, f, indent=1)
            plot(results, os.path.join(opts.out, "tpot.png"))
        return
    ours = bench_ours(args, device, opts.compile)
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.empty_cache()
    theirs = bench_peer(args, device) if opts.peer else {}
    print(f"{'':46} {'tok/s':>8} {'ceiling':>8} {'of ceiling':>10} {'transformers':>18}")
    for name, (tps, ceiling) in ours.items():
        other = theirs.get(name.split(",")[0], "") if "eager" not in name else ""
        print(f"{name:46} {tps:8.1f} {ceiling:8.0f} {tps / ceiling:10.1%} {other:>18}")
    print(f"peak GPU memory (ours): {peak:.1f} GiB")


if __name__ == "__main__":
    main(sys.argv[1:])
