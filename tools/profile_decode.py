"""Where a decode step's time goes: fast.decode.step of the 48B model on one GPU, by kernel.

    python -m tools.profile_decode [--batch 1] [--context 4096] [--fp8] [--layers N]

Random weights at full size (fullsize.random_model), caches filled by a real prefill of `--context`
tokens, then torch.profiler over 5 eager fast.decode.step calls (the same kernels a CUDA graph
replays; the graph removes only the launch gaps). Prints GPU microseconds per step by kernel, the
largest first, grouped into what they do, and the sum next to the graph's own step time.
--layers N keeps the first N layers (MLA where the full model has it, one in four): the bf16 model
fits an 80 GB card at N = 16, so bf16 and FP8 steps can be compared on an H100.
"""
import collections
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import kimi
from fast import decode
from fast.decode import cuda_graph_decoder
from sample import Parser
from tools import fullsize
from tools.timing import cuda_time

GROUPS = (                                  # kernel-name fragment -> what it does (first match)
    ("_mla_", "MLA attention"), ("_heads_matmul", "MLA: W_uk, W_uv"),
    ("_latent_write", "MLA: cache write"), ("_gate_up_kernel", "experts: w13 + SiLU"),
    ("_down_kernel", "experts: w2"), ("_route_kernel", "router top-k"),
    ("_logits_kernel", "router logits"), ("_kda_decode_kernel", "KDA step"),
    ("_add_rmsnorm", "add + RMSNorm"), ("_rows_kernel", "FP8 projections"),
    ("gemv", "projections (GEMV)"), ("gemm", "projections (GEMM)"), ("nvjet", "projections (GEMM)"),
)


def main(argv):
    ap = Parser(prog="python -m tools.profile_decode", description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--fp8", action="store_true")
    ap.add_argument("--layers", type=int, help="the first N of the 48B model's 27 layers")
    a = ap.parse_args(argv)
    args = kimi.ModelArgs()
    if a.layers is not None:
        try:
            args = fullsize.first_layers(args, a.layers)
        except ValueError as e:
            ap.error(f"--{e}")
    if not torch.cuda.is_available():
        ap.error("the decode step's kernels need a CUDA GPU")
    B, L, device = a.batch, a.context, torch.device("cuda")
    model = fullsize.random_model(args, device, B, L + 256, fp8=a.fp8)
    with torch.no_grad():   # last_only: all positions' fp32 logits at B = 16 would take 40 GiB
        model(torch.randint(0, args.vocab_size, (B, L), device=device), start_pos=0, last_only=True)
    tok = torch.randint(0, args.vocab_size, (B, 1), device=device)    # rows route apart
    pos = iter(range(L, L + 256))
    start = time.perf_counter()
    graph = cuda_graph_decoder(model, B)                    # prepares the model, too
    built = time.perf_counter() - start                     # Triton's first compiles included
    graph_ms = cuda_time(lambda g=graph: g(tok, next(pos)), runs=16, warmup=4)
    print(f"graph built in {built:.1f} s, step {graph_ms * 1e3:.0f} us = "
          f"{B / graph_ms * 1e3:,.1f} tokens/s", flush=True)
    del graph
    for _ in range(3):
        decode.step(model, tok, next(pos))
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            decode.step(model, tok, next(pos))
        torch.cuda.synchronize()
    per_kernel = collections.Counter()
    calls = collections.Counter()
    for e in prof.key_averages():
        if e.device_time_total > 0:
            per_kernel[e.key] += e.device_time_total / 5
            calls[e.key] += e.count / 5
    groups = collections.Counter()
    for name, us in per_kernel.items():
        group = next((g for frag, g in GROUPS if frag in name), "other (elementwise, copies)")
        groups[group] += us
    total = sum(per_kernel.values())
    print(f"B={B} context {L}{' FP8' if a.fp8 else ''}, {args.num_hidden_layers} layers: "
          f"graph step {graph_ms * 1e3:.0f} us; kernels {total:.0f} us in "
          f"{sum(calls.values()):.0f} launches a step")
    for group, us in groups.most_common():
        print(f"  {group:30} {us:8.1f} us  {us / total:6.1%}")
    print("largest kernels:")
    for name, us in per_kernel.most_common(12):
        print(f"  {us:8.1f} us  {calls[name]:5.0f} x  {name[:90]}")


if __name__ == "__main__":
    main(sys.argv[1:])
