"""Where a prefill's time goes: kimi.py's forward over one prompt of the 48B model, by kernel.

    python -m tools.profile_prefill [--tokens 8192] [--config tiny] [--fp8] [--layers N]

Random weights at full size (tools.fullsize.random_model, as the benchmark builds them), one cached
prefill (start_pos=0, last_only=True, as generation.generate runs it). Prints tokens/s the way
tools/bench.py's prefill rows measure them (tools.timing.cuda_time: CUDA events, median of 3 after
one warm-up) next to the GPU's matmul ceiling (its rate measured in the run: fullsize.ceilings),
then torch.profiler's GPU time per kernel over 2 more prefills, the largest first. --fp8: the FP8
model (fast/quantize.py), its ceiling at the FP8 matmul rate. --layers N: the first N layers, to
compare bf16 with FP8 where the whole bf16 model does not fit the GPU. Without a GPU (a tiny
--config only, bf16) it times on the host and profiles CPU operators.
"""
import collections
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import kimi
from sample import Parser
from tools import fullsize
from tools.timing import cuda_time


def main(argv):
    ap = Parser(prog="python -m tools.profile_prefill", description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--config", default="kimi-linear-48b-a3b", choices=sorted(kimi.CONFIGS))
    ap.add_argument("--fp8", action="store_true", help="FP8 weights (needs a GPU)")
    ap.add_argument("--layers", type=int, help="only the first N layers")
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if a.fp8 and not cuda:
        ap.error("--fp8 needs a CUDA GPU")
    args, T = kimi.CONFIGS[a.config], a.tokens
    if a.layers is not None:
        try:
            args = fullsize.first_layers(args, a.layers)
        except ValueError as e:
            ap.error(f"--{e}")
    model = fullsize.random_model(args, torch.device("cuda" if cuda else "cpu"), 1, T, fp8=a.fp8)
    tokens = torch.randint(0, args.vocab_size, (1, T), device=model.lm_head.weight.device)
    prefill = lambda: model(tokens, start_pos=0, last_only=True)      # noqa: E731
    with torch.no_grad():
        if cuda:
            ms = cuda_time(prefill, runs=3)
        else:
            prefill()
            ms = statistics.median(_host_ms(prefill) for _ in range(3))
        line = (f"{'FP8 ' if a.fp8 else ''}prefill B=1 T={T}, {args.num_hidden_layers} layers: "
                f"{T / ms * 1e3:,.0f} tokens/s")
        if cuda:                    # (ceilings prints the rates it measures on a line of its own)
            rates = fullsize.ceilings(model.lm_head.weight.device)
            rate = rates.fp8_matmul_flop_per_s if a.fp8 else rates.matmul_flop_per_s
            ceiling = rate / (2 * fullsize.active_params(args))
            line += (f", {T / ms * 1e3 / ceiling:.1%} of this GPU's matmul ceiling "
                     f"({ceiling:,.0f} tokens/s)")
        print(line)
        activity = ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU
        with profile(activities=[activity]) as prof:
            for _ in range(2):
                prefill()
            if cuda:
                torch.cuda.synchronize()
    per_kernel, calls = collections.Counter(), collections.Counter()
    for e in prof.key_averages():
        t = e.device_time_total if cuda else e.self_cpu_time_total
        if t > 0:
            per_kernel[e.key] += t / 2e3                        # ms per prefill
            calls[e.key] += e.count / 2
    print(f"{sum(per_kernel.values()):.1f} ms of {'GPU kernels' if cuda else 'CPU operators'} "
          f"a prefill; the largest:")
    for name, t in per_kernel.most_common(25):
        print(f"  {t:8.3f} ms  {calls[name]:5.0f} x  {name[:90]}")


def _host_ms(fn):
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


if __name__ == "__main__":
    main(sys.argv[1:])
