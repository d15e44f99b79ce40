"""Kimi Linear against its all-MLA twin (every layer MLA, all else equal) at long contexts, for
python -m tools.bench --context and --throughput: the decode step's time and cache at each length,
and the decode throughput at the largest batch that fits the GPU. Caches are filled with random
values, not by a prefill: a step's time does not depend on them.
"""
from dataclasses import replace

import torch

from fast.decode import cuda_graph_decoder
from tools.fullsize import random_model
from tools.timing import cuda_time

THROUGHPUT_CONTEXTS = (131072, 524288, 1048576)
# --throughput measures a one-row step with this many cached keys: enough that the latent attention
# splits over every SM (fast/mla_decode.num_splits), so its partials are as large as at 1M
MEASURE_CONTEXT = 65536
SAFETY_BYTES = 2**30        # left free: the allocator's rounding, what the measured step misses


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
