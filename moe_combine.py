"""
The MoE's weighted sum in one Triton kernel: moe_fast.combine_ref without its [N, k, D] tensors.

    y[n, :] = sum_j w[n, j] * out[pos[n, j], :]     in fp32, j = 0, 1, ..., k-1, rounded once

out [N*k, D] is the grouped matmuls' output in expert order (moe_fast.sorted_experts), pos [N, k]
where (token n, slot j) landed in it. The reference copies out back to (token, slot) order, then
to fp32 [N, k, D] (600 MB a layer at N = 8192) and reduces that; the kernel reads each row of out
once, where it lies, and writes y. Each program sums its k rows in slot order: the same sum every
run, no atomics (float atomics add in arrival order). Without CUDA it runs in Triton's interpreter
(tests); moe_fast.grouped_moe calls it on a GPU only.
  _combine_kernel  (N / BM, D / BN)     BM tokens x BN columns a program

python moe_combine.py: checks the kernel against combine_ref; on a GPU also times, at the 48B
model's prefill of 8192 tokens (k = 8, D = 2304), the old path, the reference and the kernel.
"""
import torch

from triton_util import round_to  # noqa: I001 (first: without CUDA, the interpreter)
import triton
import triton.language as tl

# Fixed tile (autotune breaks the interpreter). BN = 256 divides D = 2304; with 4 warps a program
# loads BM * BN / 128 = 16 values a thread per slot, in 16-byte pieces, and its k slots unrolled.
TILE = dict(BM=8, BN=256, num_warps=4)


@triton.jit
def _combine_kernel(out_ptr, pos_ptr, w_ptr, y_ptr, N, D, K: tl.constexpr, BM: tl.constexpr,
                    BN: tl.constexpr):
    """y[n, d] = sum_j w[n, j] out[pos[n, j], d] for BM tokens n and BN columns d, j in order."""
    n = tl.program_id(0) * BM + tl.arange(0, BM)                   # [BM] tokens
    d = tl.program_id(1) * BN + tl.arange(0, BN)                   # [BN] columns
    mask = (n < N)[:, None] & (d < D)[None, :]                     # [BM, BN]
    y = tl.zeros((BM, BN), tl.float32)
    for j in tl.static_range(K):        # unrolled: all k rows' loads can be in flight at once
        # pos is int64, so row * D is too: N*k*D passes 2^31 (int32 would wrap) at N = 116,509
        row = tl.load(pos_ptr + n * K + j, mask=n < N, other=0)    # [BM] rows of out
        wj = tl.load(w_ptr + n * K + j, mask=n < N, other=0.0)     # [BM] fp32
        o = tl.load(out_ptr + row[:, None] * D + d[None, :], mask=mask, other=0.0)
        y += wj[:, None] * o.to(tl.float32)
    dt: tl.constexpr = y_ptr.dtype.element_ty
    # the interpreter's cast truncates (triton_util): round_to rounds to nearest, as .to() in torch
    tl.store(y_ptr + n[:, None].to(tl.int64) * D + d[None, :], round_to(y, dt).to(dt), mask=mask)


def combine(out, pos, w, BM=TILE["BM"], BN=TILE["BN"], num_warps=TILE["num_warps"]):
    """= moe_fast.combine_ref(out, pos, w): out [N*k, D] (bf16 or fp32), pos [N, k] int64 (each
    row of out once), w [N, k] fp32 -> y [N, D] in out's dtype. Forward only."""
    (N, K), D = pos.shape, out.shape[1]
    out, pos, w = out.contiguous(), pos.contiguous(), w.float().contiguous()
    y = out.new_empty(N, D)
    BN = min(BN, triton.next_power_of_2(D))                         # small D: one block
    _combine_kernel[(triton.cdiv(N, BM), triton.cdiv(D, BN))](
        out, pos, w, y, N, D, K, BM, BN, num_warps=num_warps)
    return y


if __name__ == "__main__":
    import statistics

    import moe_fast

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    N, k, D, E = (8192, 8, 2304, 256) if dev == "cuda" else (50, 8, 96, 16)
    g = torch.Generator(dev).manual_seed(0)
    ids = torch.rand(N, E, generator=g, device=dev).topk(k).indices     # [N, k] distinct experts
    order = ids.flatten().sort().indices
    pos = torch.empty_like(order)
    pos[order] = torch.arange(N * k, device=dev)
    pos = pos.view(N, k)
    out = torch.randn(N * k, D, generator=g, device=dev).bfloat16()     # [N*k, D] expert order
    w = torch.rand(N, k, generator=g, device=dev) * 2.446 / k
    y, ref = combine(out, pos, w), moe_fast.combine_ref(out, pos, w)
    ulps = ((y.float() - ref.float()).abs() / ref.float().abs().clamp(min=1e-30)).max() * 2 ** 8
    print(f"{dev}: N = {N}, k = {k}, D = {D}: kernel vs einsum, {(y != ref).float().mean():.2e} "
          f"of the bf16 outputs differ, by at most {ulps:.2f} units of 2^-8 relative")
    if dev == "cpu":
        print("no GPU: no timing")
        raise SystemExit

    def ms(fn, reps=50):
        for _ in range(3):
            fn()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(), fn(), end.record(), end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    def old():                  # before: scatter the rows back to (token, slot) order, einsum
        unsorted = torch.empty_like(out)
        unsorted[order] = out
        return torch.einsum("nk,nkd->nd", w, unsorted.view(N, k, D).float()).to(out.dtype)

    def inverse():              # pos, as moe_fast.sorted_experts makes it
        p = torch.empty_like(order)
        p[order] = torch.arange(N * k, device=dev)
        return p

    MB = (N * k + N) * D * 2 / 1e6                                      # read out, write y (bf16)
    for name, fn in (("old: index_put + einsum", old), ("pos (the inverse permutation)", inverse),
                     ("gather + einsum (combine_ref)", lambda: moe_fast.combine_ref(out, pos, w)),
                     (f"kernel {TILE}", lambda: combine(out, pos, w))):
        t = ms(fn)
        print(f"{name:45s} {t:7.3f} ms = {MB / t / 1e3:5.2f} TB/s over {MB:.0f} MB")
    print("tile sweep (the kernel alone):")
    for BM in (1, 2, 4, 8, 16):
        for BN in (256, 512, 1024):
            for warps in (2, 4, 8):
                if BM * BN // (32 * warps) > 64:                    # values a thread a slot
                    continue                                        # (register spills)
                t = ms(lambda: combine(out, pos, w, BM, BN, warps), reps=20)
                print(f"  BM = {BM:2d}, BN = {BN:4d}, {warps} warps: {t:7.3f} ms")
