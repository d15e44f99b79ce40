"""The speed benchmark of the full-size model on one GPU, random weights.

    python -m tools.bench [--config NAME_OR_CONFIG_JSON] [--compile] [--baseline] [--fp8] [--quick]
    python -m tools.bench --context 4096,131072,1048576 [--out DIR] [--batch B]  # vs all-MLA
    python -m tools.bench --throughput [--context L,...] [--memory-cap-gb N] [--out DIR]

It builds the model with random weights (speed does not depend on their values) and prints
prefill tokens/s at B = 1 and decode tokens/s after a 4096-token prompt, each next to its ceiling
on this GPU: the bf16 matmul rate over 2 FLOP per active parameter for prefill; for decode, the HBM
copy rate over the bytes a step must read (active weights, MLA caches, KDA states). Decode runs
eager, as one CUDA graph per step of kimi.py's forward, as one of fast/decode.py's fused step
(what sample.py runs) and, with --compile, kimi.py's forward fused by torch.compile first; then
through generation.generate itself, for B = 1, 4 and 16 prompts of different lengths. --baseline
also times Hugging Face transformers' KimiLinearForCausalLM (tools/baseline_hf.py) on random
weights of the same shapes. --fp8 adds the same rows for FP8 weights (fast/quantize.py), with
ceilings at the FP8 matmul rate and in the FP8 model's bytes. --throughput: decode tokens/s at
the largest batch that fits the GPU, FP8 weights, Kimi Linear against its all-MLA twin. --quick:
only the rows of sample.py's path (prefill, and decode through fast/decode.py's step in a graph).
"""
import json
import os
import sys
import time

import torch

from fast.decode import cuda_graph_decoder
from generation import generate
from kimi import CONFIGS, CheckpointError, ModelArgs
from sample import Parser
from tools.fullsize import active_params, ceilings, model_decode_bytes, random_model
from tools.long_context import THROUGHPUT_CONTEXTS, bench_context, bench_throughput, plot
from tools.timing import cuda_time

PREFILL_T, DECODE_B, CONTEXT, STEPS = (8192, 32768), (1, 16), 4096, 32
GENERATE_B = (1, 4, 16)


def bench_ours(args, device, compile, fp8=False, quick=False):
    """{row name: (tokens/s, ceiling tokens/s)}; fp8: the same rows for FP8 weights (fast.quantize),
    their ceilings at the FP8 matmul rate and in FP8 bytes. quick: sample.py's path alone."""
    rows, tag, rates = {}, "fp8 " if fp8 else "", ceilings(device)
    model = random_model(args, device, 1, max(PREFILL_T), fp8=fp8)
    rate = rates.fp8_matmul_flop_per_s if fp8 else rates.matmul_flop_per_s
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
    hows = ["fast.decode + graph"] if quick else list(forwards)
    for B in DECODE_B:
        ceiling = B * rates.copy_bytes_per_s / model_decode_bytes(model, B, CONTEXT)
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
    for B in () if quick else GENERATE_B:   # generation.generate: host work, a sync a step included
        lengths = [CONTEXT - 61 * b for b in range(B)]       # different, so some rows are padded
        prompts = [torch.randint(0, args.vocab_size, (n,)).tolist() for n in lengths]
        steps = generate(model, None, prompts, STEPS, stop=(), decoder=cuda_graph_decoder(model, B))
        stamps = [time.perf_counter() for _ in steps]       # stamps[0]: the prefill's token
        name = f"{tag}generate B={B}, prompts of {CONTEXT - 61 * (B - 1)}..{CONTEXT} tokens"
        rows[name] = (B * (STEPS - 1) / (stamps[-1] - stamps[0]),
                      B * rates.copy_bytes_per_s / model_decode_bytes(model, B, CONTEXT))
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
    ap.add_argument("--quick", action="store_true", help="only the prefill rows and the decode "
                    "rows of fast.decode's step in a CUDA graph (what sample.py runs)")
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
    if opts.throughput and (opts.batch != 1 or opts.compile or opts.baseline or opts.fp8
                            or opts.quick):
        ap.error("--throughput finds its batch, FP8: --batch, --compile, --baseline, --fp8, "
                 "--quick do not apply")
    contexts = contexts or list(THROUGHPUT_CONTEXTS if opts.throughput else ())
    if opts.batch < 1 or (opts.batch != 1 and not contexts):
        ap.error("--batch takes a row count >= 1 and goes with --context")
    if opts.out and not contexts:
        ap.error("--out writes the --context or --throughput results: add one")
    if contexts and (opts.compile or opts.baseline):
        ap.error("--context replaces the speed table: --compile and --baseline do not apply")
    if contexts and (opts.fp8 or opts.quick):
        ap.error("--context replaces the speed table: --fp8 and --quick do not apply")
    if opts.quick and opts.compile:
        ap.error("--quick times sample.py's path alone: --compile does not apply")
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
        # (a device index: torch.device('cuda') has none, and is refused)
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 1e9 / total),
                                                   torch.cuda.current_device())
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
    ours = bench_ours(args, device, opts.compile, quick=opts.quick)
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.empty_cache()
    if opts.fp8:                                    # after the bf16 model is gone
        torch.cuda.reset_peak_memory_stats(device)
        ours.update(bench_ours(args, device, compile=False, fp8=True, quick=opts.quick))
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
