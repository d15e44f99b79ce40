"""The speed benchmark of the full-size model on one GPU, random weights.

    python -m tools.bench [--config NAME_OR_CONFIG_JSON] [--compile] [--baseline] [--fp8]
    python -m tools.bench --context 4096,131072,1048576 [--out DIR] [--batch B]  # vs all-MLA
    python -m tools.bench --throughput [--context L,...] [--memory-cap-gb N] [--out DIR]

It builds the model with random weights (speed does not depend on their values) and prints
prefill tokens/s at B = 1 and decode tokens/s after a 4096-token prompt, each next to its ceiling
on this GPU: the bf16 matmul rate over 2 FLOP per active parameter for prefill; for decode, the HBM
copy rate over the bytes a step must read (active weights, MLA caches, KDA states). Decode runs
eager, as one CUDA graph per step of kimi.py's forward, as one of fast/decode.py's fused step
(what sample.py runs) and, with --compile, kimi.py's forward fused by torch.compile first; then
through sample.generate itself, for B = 1, 4 and 16 prompts of different lengths. --baseline
also times Hugging Face transformers' KimiLinearForCausalLM (tools/baseline_hf.py) on random
weights of the same shapes. --fp8 adds the same rows for FP8 weights (fast/quantize.py), with
ceilings at the FP8 matmul rate and in the FP8 model's bytes. --throughput: decode tokens/s at
the largest batch that fits the GPU, FP8 weights, Kimi Linear against its all-MLA twin.
"""
import functools
import json
import os
import sys
import time
from dataclasses import replace

import torch

from kimi import CONFIGS, CheckpointError, ModelArgs, Transformer
from fast.decode import cuda_graph_decoder
from sample import Parser, generate
from tools.timing import cuda_time

# The ceilings' rates, an H200's as measured (docs/kda.md §8): device-to-device copy (bytes/s),
# bf16 matmul and FP8 matmul (e4m3, row-wise scales, F.scaled_mm, 8192^3) in FLOP/s.
COPY_BYTES_PER_S, MATMUL_FLOP_PER_S, FP8_MATMUL_FLOP_PER_S = 4.27e12, 702e12, 1384e12
PREFILL_T, DECODE_B, CONTEXT, STEPS = (8192, 32768), (1, 16), 4096, 32
GENERATE_B = (1, 4, 16)
THROUGHPUT_CONTEXTS = (131072, 524288, 1048576)
# --throughput measures a one-row step with this many cached keys: enough that the latent attention
# splits over every SM (fast/mla_decode.num_splits), so its partials are as large as at 1M
MEASURE_CONTEXT = 65536
SAFETY_BYTES = 2**30        # left free: the allocator's rounding, what the measured step misses


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


def bench_ours(args, device, compile, fp8=False):
    """{row name: (tokens/s, ceiling tokens/s)}; fp8: the same rows for FP8 weights (fast.quantize),
    their ceilings at the FP8 matmul rate and in FP8 bytes."""
    rows, tag = {}, "fp8 " if fp8 else ""
    model = random_model(args, device, 1, max(PREFILL_T), fp8=fp8)
    rate = FP8_MATMUL_FLOP_PER_S if fp8 else MATMUL_FLOP_PER_S
    for T in PREFILL_T:
        tokens = torch.randint(0, args.vocab_size, (1, T), device=device)
        ms = cuda_time(lambda: model(tokens, start_pos=0, last_only=True), runs=3)
        rows[f"{tag}prefill B=1 T={T}"] = (T / ms * 1e3, rate / (2 * active_params(args)))
        print(f"{tag}prefill B=1 T={T}: {T / ms * 1e3:.1f} tok/s", flush=True)
    model.setup_cache(max(DECODE_B), CONTEXT + STEPS + 16)  # the graph's MLA reads all the buffer
    forwards = {"eager": None, "CUDA graph": model, "fast.decode + graph": None}
    if compile:             # kimi.py's forward fused by torch.compile (rounds to bf16 as eager)
        options = {"emulate_precision_casts": True}
        forwards["torch.compile + graph"] = torch.compile(model, dynamic=False, options=options)
    hows = list(forwards)
    for B in DECODE_B:
        ceiling = B * COPY_BYTES_PER_S / model_decode_bytes(model, B, CONTEXT)
        for how in hows:
            step, start = None, time.perf_counter()
            if how != "eager":         # the build: kernel compilation (or torch.compile), capture
                step = cuda_graph_decoder(model, B, forward=forwards[how])
            built = f" (graph built in {time.perf_counter() - start:.1f} s)" if step else ""
            prompt = torch.randint(0, args.vocab_size, (B, CONTEXT), device=device)
            tok = model(prompt, start_pos=0, last_only=True)[:, -1].argmax(-1, keepdim=True)
            pos = iter(range(CONTEXT, CONTEXT + STEPS + 16))
            if step is None:                            # eager: launch-bound, a few steps suffice
                ms = cuda_time(lambda: model(tok, start_pos=next(pos), last_only=True), runs=3,
                               warmup=2)
            else:
                ms = cuda_time(lambda: step(tok, next(pos)), runs=STEPS, warmup=8)
            name = f"{tag}decode B={B} context {CONTEXT}, {how}"
            rows[name] = (B / ms * 1e3, ceiling)
            print(f"{name}: {B / ms * 1e3:.1f} tok/s{built}", flush=True)
            step = None
    for B in GENERATE_B:        # sample.generate itself: host work and a sync per step included
        lengths = [CONTEXT - 61 * b for b in range(B)]       # different, so some rows are padded
        prompts = [torch.randint(0, args.vocab_size, (n,)).tolist() for n in lengths]
        steps = generate(model, None, prompts, STEPS, stop=(), decoder=cuda_graph_decoder(model, B))
        stamps = [time.perf_counter() for _ in steps]       # stamps[0]: the prefill's token
        name = f"{tag}generate B={B}, prompts of {CONTEXT - 61 * (B - 1)}..{CONTEXT} tokens"
        rows[name] = (B * (STEPS - 1) / (stamps[-1] - stamps[0]),
                      B * COPY_BYTES_PER_S / model_decode_bytes(model, B, CONTEXT))
        print(f"{name}: {rows[name][0]:.1f} tok/s", flush=True)
    return rows


def bench_baseline(args, device):
    """The same shapes through transformers' KimiLinearForCausalLM, the baseline. Its pure-PyTorch
    KDA holds ~3 MB per prompt token, so long prompts go in pieces (B x piece <= 8192 tokens per
    forward)."""
    from tools.baseline_hf import baseline_decoder, baseline_model, baseline_prefill
    rows, model = {}, baseline_model(args, device)
    for T in PREFILL_T:
        tokens = torch.randint(0, args.vocab_size, (1, T), device=device)
        piece = 8192 if T > 8192 else None
        tps = T / cuda_time(lambda: baseline_prefill(model, tokens, piece), runs=1) * 1e3
        name = f"prefill B=1 T={T}"
        rows[name] = f"{tps:.1f}" + (" (pieces)" if piece else "")
        print(f"transformers {name}: {rows[name]} tok/s", flush=True)
    for B in DECODE_B:
        prompt = torch.randint(0, args.vocab_size, (B, CONTEXT), device=device)
        step = baseline_decoder(model, prompt, piece=8192 // B)
        name = f"decode B={B} context {CONTEXT}"
        rows[name] = f"{B / cuda_time(step, runs=5, warmup=2) * 1e3:.1f}"
        print(f"transformers {name}: {rows[name]} tok/s", flush=True)
        step = None
    return rows


def bench_context(args, device, contexts, steps=16, prefill=65536, batch=1):
    """Decode time per output token (TPOT: one step of `batch` rows) after `contexts` tokens, for
    the model and its all-MLA twin (every layer MLA, all else equal). The caches are filled with
    random values, not by a prefill: a step's time does not depend on them. -> list of dicts."""
    results = []
    for variant, a in variants(args):
        model = random_model(a, device, 1, 1)
        for L in contexts:
            row = dict(variant=variant, context=L, batch=batch,
                       formula_bytes=a.cache_bytes(batch, L))
            try:
                model.setup_cache(0, 0)                 # free the last caches, measure the new ones
                torch.cuda.empty_cache()
                before = torch.cuda.memory_allocated(device)
                model.setup_cache(batch, L)
                row["allocated_bytes"] = torch.cuda.memory_allocated(device) - before
                row["tpot_ms"] = random_cache_tpot_ms(model, L, steps, batch)
            except torch.OutOfMemoryError:
                row["tpot_ms"] = None                   # the twin's cache may not fit next to 98 GB
            results.append(row)
            tpot = f"{row['tpot_ms']:.2f} ms" if row["tpot_ms"] else "out of memory"
            print(f"{variant:12} context {L:>8}: cache {row['formula_bytes'] / 2**30:7.3f} GiB "
                  f"(allocated {row.get('allocated_bytes', 0) / 2**30:7.3f}), TPOT {tpot}",
                  flush=True)
            if L == prefill and batch == 1:             # bonus: the prefill that fills such a cache
                tokens = torch.randint(0, a.vocab_size, (1, L), device=device)
                prefill_ms = cuda_time(lambda: model(tokens, start_pos=0, last_only=True), runs=1)
                row["prefill_s"] = prefill_ms / 1e3
                print(f"{variant:12} prefill of {L} tokens: {row['prefill_s']:.2f} s", flush=True)
        model = None
        torch.cuda.empty_cache()
    return results


def variants(args):
    """(name, ModelArgs) of the model and its all-MLA twin (every layer MLA, all else equal)."""
    return ("Kimi Linear", args), ("all-MLA twin", replace(
        args, full_attn_layers=tuple(range(args.num_hidden_layers))))


def largest_batch(args, context, memory_bytes, weight_bytes, step_bytes_per_row):
    """The most rows whose caches (args.cache_bytes, linear in the rows) and decode step fit in
    memory_bytes beside the weights, SAFETY_BYTES left free. ValueError if not one row fits."""
    room = memory_bytes - weight_bytes - SAFETY_BYTES           # for the caches and the step
    per_row = args.cache_bytes(1, context) + step_bytes_per_row  # cache_bytes(B): B times this
    if room < per_row:
        raise ValueError(f"not one row fits at context {context}: {per_row / 2**30:.2f} GiB a row, "
                         f"{max(room, 0) / 2**30:.2f} GiB beside the weights")
    return int(room // per_row)


def bench_throughput(args, device, contexts, cap_bytes=None, steps=16):
    """Decode tokens/s at the largest batch that fits (largest_batch; memory: what the allocator
    holds and the GPU has free, at most cap_bytes), FP8 weights, for the model and its all-MLA
    twin; caches random as in bench_context. -> list of dicts, each with the ratio Kimi / twin."""
    results = []
    for variant, a in variants(args):
        model = random_model(a, device, 1, MEASURE_CONTEXT, fp8=True)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        random_cache_tpot_ms(model, MEASURE_CONTEXT, steps=2)      # a one-row step, its graph
        # per row: all of a one-row step (its fixed part too, counted B times: a margin)
        step_bytes = torch.cuda.max_memory_allocated(device) - before
        model.setup_cache(0, 0)
        torch.cuda.empty_cache()
        # the weights, decode.prepare's stacks, and the part-used segments they sit in (the cap
        # bounds the reserve)
        weight_bytes = torch.cuda.memory_reserved(device)
        for L in contexts:
            free, _ = torch.cuda.mem_get_info(device)
            memory = min(free + torch.cuda.memory_reserved(device), cap_bytes or float("inf"))
            row = dict(variant=variant, context=L, batch=0, cache_gib=None, ms_per_step=None,
                       tokens_per_s=None, memory_gib=memory / 2**30,     # largest_batch's inputs
                       weight_gib=weight_bytes / 2**30, step_gib_per_row=step_bytes / 2**30,
                       safety_gib=SAFETY_BYTES / 2**30)
            try:
                row["batch"] = B = largest_batch(a, L, memory, weight_bytes, step_bytes)
                row["cache_gib"] = a.cache_bytes(B, L) / 2**30
                torch.cuda.reset_peak_memory_stats(device)
                model.setup_cache(B, L)
                row["ms_per_step"] = random_cache_tpot_ms(model, L, steps, B)
                row["tokens_per_s"] = B / row["ms_per_step"] * 1e3
                row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            except (ValueError, torch.OutOfMemoryError) as e:   # ValueError: largest_batch's
                row["note"] = str(e).splitlines()[0]
            model.setup_cache(0, 0)
            torch.cuda.empty_cache()
            results.append(row)
            print(f"{variant:12} context {L:>8}: batch {row['batch']:>3}, " + (row.get("note") or
                  f"cache {row['cache_gib']:.2f} GiB, {row['ms_per_step']:.2f} ms a step, "
                  f"{row['tokens_per_s']:.1f} tok/s"), flush=True)
        model = None
        torch.cuda.empty_cache()
    tps = {(r["variant"], r["context"]): r["tokens_per_s"] for r in results}
    for r in results:
        kimi, twin = (tps[name, r["context"]] for name, _ in variants(args))
        r["kimi_over_twin"] = kimi / twin if kimi and twin else None
    for r in results[:len(contexts)]:                   # Kimi Linear's rows
        print(f"context {r['context']:>8}: tokens/s, Kimi Linear / all-MLA twin: " + (
              f"{r['kimi_over_twin']:.2f}" if r["kimi_over_twin"] else "none (one did not run)"))
    return results


def random_cache_tpot_ms(model, L, steps=16, batch=1):
    """Milliseconds per decode step of `batch` rows on caches set up for L tokens, filled here with
    random values (a step's time does not depend on them), through one CUDA graph that reads all
    L (fast.decode.cuda_graph_decoder: its fused step)."""
    for name, buf in model.named_buffers():
        if buf.is_floating_point():                     # caches; not `pad` (no left padding)
            buf.normal_().mul_(0.1 if name.endswith("recurrent_state") else 1.0)
    step = cuda_graph_decoder(model, batch)
    tok = torch.zeros(batch, 1, dtype=torch.long, device=model.lm_head.weight.device)
    return cuda_time(lambda: step(tok, L - 1), runs=steps, warmup=4)


def plot(results, path, y="tpot_ms", ylabel=None, weights="bf16"):
    """y (TPOT by default) against context for both variants (matplotlib, optional) -> PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for variant in dict.fromkeys(r["variant"] for r in results):
        pts = [(r["context"], r[y]) for r in results if r["variant"] == variant and r[y]]
        if pts:                                     # none, where not one row fits
            ax.plot(*zip(*pts), marker="o", label=variant)
    ylabel = ylabel or f"decode step time, B = {results[0].get('batch', 1)} (ms)"
    ax.set(xscale="log", xlabel="context (tokens)", ylabel=ylabel, title="Kimi Linear 48B-A3B vs "
           f"an all-MLA twin, {torch.cuda.get_device_name()}, {weights}")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")


def parse(argv):
    """The options, checked before any GPU work: (options, ModelArgs, contexts)."""
    ap = Parser(prog="python -m tools.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="kimi-linear-48b-a3b", help="a configuration name (" +
                    ", ".join(CONFIGS) + ") or a config.json path (default: %(default)s)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile + CUDA graph")
    ap.add_argument("--baseline", action="store_true", help="also time the transformers "
                    "baseline, KimiLinearForCausalLM (tools/baseline_hf.py)")
    ap.add_argument("--context", help="comma-separated context lengths: decode time per token and "
                    "cache size against an all-MLA twin, instead of the speed table")
    ap.add_argument("--out", help="with --context: write tpot.json and tpot.png into this folder; "
                    "with --throughput: throughput.json and .png (throughput_Ngb.* if capped)")
    ap.add_argument("--batch", type=int, default=1, help="with --context: rows per decode step "
                    "(default: %(default)s)")
    ap.add_argument("--fp8", action="store_true", help="also the rows with FP8 weights "
                    "(fast/quantize.py), after the bf16 ones")
    ap.add_argument("--throughput", action="store_true", help="decode tokens/s at the largest "
                    "batch that fits, FP8 weights, against the all-MLA twin, at --context (default "
                    + ",".join(map(str, THROUGHPUT_CONTEXTS)) + ")")
    ap.add_argument("--memory-cap-gb", type=float, metavar="N", help="with --throughput: let "
                    "this process hold at most N x 1e9 bytes of GPU memory "
                    "(set_per_process_memory_fraction)")
    opts = ap.parse_args(argv)
    try:
        contexts = [int(c) for c in opts.context.split(",")] if opts.context else []
    except ValueError:
        ap.error(f"--context takes comma-separated token counts, not {opts.context!r}")
    if any(c < 1 for c in contexts):
        ap.error("--context lengths must be positive")
    cap = opts.memory_cap_gb
    if cap is not None and not (opts.throughput and 0 < cap < float("inf")):   # nan fails too
        ap.error("--memory-cap-gb takes a positive number of GB and goes with --throughput")
    if opts.throughput and (opts.batch != 1 or opts.compile or opts.baseline or opts.fp8):
        ap.error("--throughput finds its batch, FP8: --batch, --compile, --baseline, --fp8 do not "
                 "apply")
    contexts = contexts or list(THROUGHPUT_CONTEXTS if opts.throughput else ())
    if opts.batch < 1 or (opts.batch != 1 and not contexts):
        ap.error("--batch takes a row count >= 1 and goes with --context")
    if opts.out and not contexts:
        ap.error("--out writes the --context or --throughput results: add one")
    if contexts and (opts.compile or opts.baseline):
        ap.error("--context replaces the speed table: --compile and --baseline do not apply")
    if contexts and opts.fp8:
        ap.error("--context replaces the speed table: --fp8 does not apply")
    try:
        if opts.config in CONFIGS:
            args = CONFIGS[opts.config]
        else:
            args = ModelArgs.from_json(opts.config)
    except CheckpointError as e:
        ap.error(str(e))
    try:
        if opts.baseline:
            import tools.baseline_hf  # noqa: F401 (transformers >= 5.17)
        if opts.out:
            import matplotlib  # noqa: F401
            os.makedirs(opts.out, exist_ok=True)
    except ImportError as e:
        ap.error(f"{'--baseline' if opts.baseline else '--out'} needs a missing module: {e}")
    except OSError as e:
        ap.error(f"cannot make --out {opts.out}: {e.strerror or e}")
    if not torch.cuda.is_available():
        ap.error("the benchmark needs a CUDA GPU")
    if (cap or 0) * 1e9 > torch.cuda.get_device_properties(0).total_memory:
        ap.error(f"--memory-cap-gb {cap:g} is more than this GPU holds")
    return opts, args, contexts


@torch.no_grad()
def main(argv=()):
    opts, args, contexts = parse(argv)
    device = torch.device("cuda")
    print(f"{active_params(args) / 1e9:.2f} B active parameters per token; random "
          f"{'FP8' if opts.throughput else 'bf16'} weights on {torch.cuda.get_device_name(device)}",
          flush=True)
    cap = opts.memory_cap_gb
    if cap:                                         # the allocator's limit, for all that follows
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(cap * 1e9 / total, device)
    if opts.throughput:
        results = bench_throughput(args, device, contexts, int(cap * 1e9) if cap else None)
        name = "throughput" + (f"_{cap:g}gb" if cap else "")
        how = ("tokens_per_s", "decode tokens/s at the largest batch that fits",
               "FP8" + (f", {cap:g} GB cap" if cap else ""))
    elif contexts:
        results, name, how = bench_context(args, device, contexts, batch=opts.batch), "tpot", ()
    if contexts:                                    # (--throughput's are never empty)
        if opts.out:
            with open(os.path.join(opts.out, name + ".json"), "w") as f:
                json.dump(results, f, indent=1)
            plot(results, os.path.join(opts.out, name + ".png"), *how)
        return
    ours = bench_ours(args, device, opts.compile)
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.empty_cache()
    if opts.fp8:                                    # after the bf16 model is gone
        torch.cuda.reset_peak_memory_stats(device)
        ours.update(bench_ours(args, device, compile=False, fp8=True))
        print(f"peak GPU memory (FP8): {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
        torch.cuda.empty_cache()
    theirs = bench_baseline(args, device) if opts.baseline else {}
    print(f"{'':52} {'tok/s':>8} {'ceiling':>8} {'of ceiling':>10} {'transformers':>18}")
    for name, (tps, ceiling) in ours.items():
        other = theirs.get(name.split(",")[0], "") if "eager" not in name else ""
        print(f"{name:52} {tps:8.1f} {ceiling:8.0f} {tps / ceiling:10.1%} {other:>18}")
    print(f"peak GPU memory (ours): {peak:.1f} GiB")


if __name__ == "__main__":
    main(sys.argv[1:])
