"""The FP8 prefill's matmuls at the 48B model's shapes, against bf16: rate and error.

    python -m tools.fp8_gemms [--tokens 8192]

One MoE layer's two grouped expert GEMMs (T tokens routed at random to 8 of 256 experts, rows
sorted by expert as fast.moe sorts them; F.grouped_mm in bf16, F.scaled_grouped_mm in FP8), then
the dense GEMMs of a layer's projections (F.scaled_mm), each FP8 product twice: promoting the
tensor cores' sums to fp32 every few products, and with their own sums over all of K (fast
accumulation). Error: relative (Frobenius) against the fp64 product of the same operands, the
dequantised e4m3 ones for FP8 (so it shows the accumulation alone), over the first 8 experts'
rows. Times: tools.timing.cuda_time, median of 20 after warm-up. Needs a GPU with FP8.
"""
import argparse
import sys

import torch
import torch.nn.functional as F

from fast.fp8 import dequantize, quantize_rows
from fast.moe import sort_by_expert
from tools.timing import cuda_time

D, F_, E, TOP_K = 2304, 1024, 256, 8         # hidden size, expert width, experts, experts a token
DENSE = {"q, k or v_proj": (D, 4096), "o_proj": (4096, D), "shared gate or up": (D, F_),
         "shared down": (F_, D)}            # name: (K inputs, N outputs)
ROW = "{:34s} {:>8} {:>9} {:>10}"


def rel_error(out, a, w, rows):
    """|out - a @ w.T| / |a @ w.T| over rows = [(start, end, expert)], in fp64."""
    num = den = 0.0
    for r0, r1, e in rows:
        ref = a[r0:r1].double() @ w[e].double().T
        num += (out[r0:r1].double() - ref).square().sum().item()
        den += ref.square().sum().item()
    return (num / den) ** 0.5


def time_row(name, fn, flop, a, w, rows):
    ms = cuda_time(fn, runs=20, warmup=3)
    error = rel_error(fn(), a, w, rows)
    print(ROW.format(name, f"{ms:.3f}", f"{flop / ms / 1e9:.0f}", f"{error:.2e}"), flush=True)


def main(argv):
    ap = argparse.ArgumentParser(prog="python -m tools.fp8_gemms",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    T = ap.parse_args(argv).tokens
    if not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)):
        ap.error("needs a GPU with FP8 (compute capability >= 8.9)")
    torch.manual_seed(0)
    ids = torch.rand(T, E, device="cuda").topk(TOP_K, dim=-1).indices      # [T, 8] distinct
    _, _, ends, _ = sort_by_expert(ids, E)
    M = T * TOP_K
    rows = [(0 if e == 0 else ends[e - 1].item(), ends[e].item(), e) for e in range(8)]
    print(f"{torch.cuda.get_device_name()}: T = {T}, {M} expert rows")
    print(ROW.format("", "ms", "TFLOP/s", "rel. error"))
    for name, K, N in (("experts w13", D, 2 * F_), ("experts w2", F_, D)):
        a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w = (torch.randn(E, N, K, device="cuda") * K ** -0.5).bfloat16()
        aq, a_s = quantize_rows(a)
        wq, w_s = quantize_rows(w)                                  # [E, N, K], [E, N, 1]
        a8, w8 = dequantize(aq, a_s), dequantize(wq, w_s)
        flop = 2 * M * K * N
        time_row(f"{name} bf16", lambda: F.grouped_mm(a, w.mT, offs=ends), flop, a, w, rows)
        for fast in (False, True):
            time_row(f"{name} FP8{', fast' if fast else ''}", lambda: F.scaled_grouped_mm(
                aq, wq.mT, a_s.view(-1), F.ScalingType.RowWise, w_s.view(E, N),
                F.ScalingType.RowWise, offs=ends, use_fast_accum=fast), flop, a8, w8, rows)
        del a, w, aq, wq, a8, w8
    whole = [(0, T, 0)]
    for name, (K, N) in DENSE.items():
        a = torch.randn(T, K, device="cuda", dtype=torch.bfloat16)
        w = (torch.randn(1, N, K, device="cuda") * K ** -0.5).bfloat16()
        aq, a_s = quantize_rows(a)
        wq, w_s = quantize_rows(w[0])
        a8, w8 = dequantize(aq, a_s), dequantize(wq, w_s)[None]
        flop = 2 * T * K * N
        time_row(f"{name} bf16", lambda: a @ w[0].T, flop, a, w, whole)
        for fast in (False, True):
            time_row(f"{name} FP8{', fast' if fast else ''}", lambda: F.scaled_mm(
                aq, wq.T, a_s, F.ScalingType.RowWise, w_s.view(1, -1), F.ScalingType.RowWise,
                use_fast_accum=fast), flop, a8, w8, whole)


if __name__ == "__main__":
    main(sys.argv[1:])
