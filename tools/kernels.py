"""The Triton kernels timed on one GPU, each next to the torch code it replaces (README's tables).

    python -m tools.kernels [NAME ...]      # no NAME: every kernel, in this order

    kda          kda_triton.chunk_kda at the 48B layer's shapes, beside fla's chunk_kda when fla
                 imports; one fused_recurrent_kda decode step
    kda_bwd      chunk_kda's forward + backward (kda_backward): first the time of each kernel,
                 then at the 48B layer's shapes, beside fla's chunk_kda when fla imports
    short_conv   fast.short_conv at a T = 8192 prefill, against kimi.ShortConv's torch code; a tile
                 sweep
    pointwise    fast.pointwise's norms and gate at a T = 8192 prefill, against kimi.py's torch code
    kda_decode   fast.kda_decode, a KDA layer's decode step, against kda_decode_ref
    mla_decode   fast.mla_decode on 4K to 1M-token caches, in a few configurations, against
                 kimi.latent_attention
    moe_decode   fast.moe_decode's router and experts of a decode step, in SWAP's forms,
                 against the torch path
    moe_combine  fast.moe.combine, the MoE's weighted sum at N = 8192 tokens, against combine_ref;
                 fast.moe.silu_mul against torch's SiLU and product

Every time is tools.timing.cuda_time's: CUDA events, the median of several runs after warm-up.
kda, kda_bwd, short_conv, pointwise and moe_decode start each run on a flushed L2 cache; the decode
kernels replay from a CUDA graph, as fast.decode runs them. Without a GPU there is nothing to time:
the tests check every kernel against its reference in Triton's CPU interpreter (python -m pytest).
"""
import itertools
import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import kda_triton           # (imports fast first: without a GPU that chooses Triton's interpreter)
import kimi
from fast import kda_decode as fast_kda_decode
from fast import mla_decode as fast_mla_decode
from fast import moe as fast_moe
from fast import moe_decode as fast_moe_decode
from fast.fp8 import fp8_experts, quantize_rows
from fast import pointwise as fast_pointwise
from fast import short_conv as fast_short_conv
from kda_ref import kda_gate, l2norm, random_inputs, recurrent_kda
from sample import Parser
from tools.timing import cuda_time, l2_flusher

H, K = 32, 128                  # Kimi-Linear-48B-A3B's KDA heads and head dim (K = V)


def kda():
    """chunk_kda over bf16 inputs, H = 32, K = V = 128: ms, GB/s of the bytes that cannot be
    avoided, errors against the fp32 recurrence, fla's chunk_kda on the same inputs if it imports;
    then one decode step of fused_recurrent_kda at B = 16."""
    try:                        # fla is optional: only the comparison columns need it
        from fla.ops.kda import chunk_kda as fla
    except ImportError:
        fla = None
    flush = l2_flusher()

    def median_ms(fn):
        return cuda_time(fn, runs=50, warmup=5, before=flush)

    print(f"{torch.cuda.get_device_name()}, bf16 inputs, H={H}, K=V={K}; error = ||x - ref|| / "
          "||ref|| vs the fp32 recurrence on the same bf16 inputs, over the whole sequence")
    print(f"{'shape':>16} {'ms':>7} {'GB/s':>6} {'err o':>8} {'err S':>8} {'fla ms':>7} "
          f"{'ours/fla':>8}", flush=True)
    for B, T in [(1, 4096), (1, 16384), (1, 65536), (8, 4096)]:
        q, k, v, g, beta = inputs = random_inputs(B, T, H, K, K, torch.bfloat16, "cuda")
        ms = median_ms(lambda: kda_triton.chunk_kda(*inputs))
        io = B * T * H * (2 * K * 2 + K * 2 * 2 + K * 4 + 4)  # q, k, v, o in bf16; g, beta fp32
        fla_ms = fla and median_ms(lambda: fla(q=q, k=k, v=v, g=g, beta=beta, scale=K ** -0.5))
        err_o, err_S = kda_errors(inputs)
        print(f"{f'B={B} T={T}':>16} {ms:7.3f} {io / ms / 1e6:6.0f} {err_o:8.1e} {err_S:8.1e} "
              + (f"{fla_ms:7.3f} {ms / fla_ms:8.2f}" if fla else f"{'-':>7} {'-':>8}"),
              flush=True)
    x = random_inputs(16, 1, H, K, K, torch.bfloat16, "cuda")  # one decode step reads, writes
    h0 = torch.randn(16, H, K, K, device="cuda")                # the [K, V] state once a head
    ms = median_ms(lambda: kda_triton.fused_recurrent_kda(*x, initial_state=h0,
                                                          output_final_state=True))
    tbs = 8 * h0.numel() / ms / 1e9                             # fp32 state, read and written
    print(f"decode step B=16, fused_recurrent_kda: {ms:.3f} ms ({tbs:.2f} TB/s)")


def kda_errors(inputs):
    """Relative L2 errors of chunk_kda's (o, final state) vs the fp32 recurrence on the inputs."""
    o, S = kda_triton.chunk_kda(*inputs, output_final_state=True)
    o_ref, S_ref = recurrent_kda(*(x.float() for x in inputs), output_final_state=True)
    return [((a.float() - b).norm() / b.norm()).item() for a, b in ((o, o_ref), (S, S_ref))]


def kda_bwd():
    """chunk_kda's forward + backward over bf16 inputs, H = 32, K = V = 128, an initial state and
    gradients for o and the final state, beside fla's chunk_kda on the same inputs if it imports;
    for both, the largest error of the six gradients against our fp32 path on fp32 copies. First,
    our time per kernel at B = 1, T = 16384 (fla's first call autotunes its kernels for minutes)."""
    try:                        # fla is optional: only the comparison columns need it
        from fla.ops.kda import chunk_kda as fla
    except ImportError:
        fla = None
    flush = l2_flusher()
    kda_bwd_kernels(1, 16384)
    print(f"{torch.cuda.get_device_name()}, bf16 inputs, H={H}, K=V={K}, forward + backward; err = "
          "max over dq dk dv dg dbeta dh0 of ||x - ref|| / ||ref||, ref = chunk_kda in fp32")
    print(f"{'shape':>16} {'ms':>7} {'err':>8} {'fla ms':>7} {'fla err':>8} {'ours/fla':>8}",
          flush=True)
    for B, T in [(1, 4096), (1, 16384), (8, 4096)]:
        h0 = torch.randn(B, H, K, K, device="cuda")
        x = [*random_inputs(B, T, H, K, K, torch.bfloat16, "cuda"), h0]     # q, k, v, g, beta, h0
        do, dht = torch.randn_like(x[2]), torch.randn_like(h0)

        def grads(fn, xs):                                      # the six gradients of one pass
            xs = [t.detach().requires_grad_() for t in xs]
            o, S = fn(*xs[:5], initial_state=xs[5], output_final_state=True)
            return torch.autograd.grad((o, S), xs, (do.to(o.dtype), dht))

        def fla_kda(*args, **kwargs):
            return fla(*args, scale=K ** -0.5, **kwargs)

        with torch.enable_grad():                               # main() runs under no_grad
            ref = grads(kda_triton.chunk_kda, [t.float() for t in x])
            times = []
            for fn in [kda_triton.chunk_kda] + ([fla_kda] if fla else []):
                times.append(cuda_time(lambda fn=fn: grads(fn, x), runs=20, warmup=3,
                                       before=flush))
                err = max(((a.float() - r).norm() / r.norm()).item()
                          for a, r in zip(grads(fn, x), ref))
                # ours first, as soon as it is known (fla's first call compiles and autotunes)
                print(f"{f'B={B} T={T}':>16} {times[0]:7.3f} {err:8.1e}" if len(times) == 1 else
                      f" {times[1]:7.3f} {err:8.1e} {times[0] / times[1]:8.2f}", end="", flush=True)
        print("" if fla else f" {'-':>7} {'-':>8} {'-':>8}")


def kda_bwd_kernels(B, T, passes=5):
    """GPU time per Triton kernel of chunk_kda's forward + backward (torch.profiler, the mean over
    `passes` passes after one warm-up), the forward's and the backward's kernels and the rest."""
    h0 = torch.randn(B, H, K, K, device="cuda", requires_grad=True)
    x = [t.requires_grad_() for t in random_inputs(B, T, H, K, K, torch.bfloat16, "cuda")]

    def fwd_bwd():
        o, S = kda_triton.chunk_kda(*x, initial_state=h0, output_final_state=True)
        torch.autograd.grad((o, S), x + [h0], (torch.ones_like(o), torch.ones_like(S)))

    with torch.enable_grad():                                   # main() runs under no_grad
        fwd_bwd()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(passes):
                fwd_bwd()
            torch.cuda.synchronize()
    rows = sorted(((e.device_time_total / passes / 1e3, e.count // passes, e.key)
                   for e in prof.key_averages() if e.device_time_total > 0), reverse=True)
    print(f"per kernel, B={B} T={T}: {sum(r[0] for r in rows):.3f} ms of GPU time a pass")
    for ms, calls, name in rows[:12]:
        print(f"  {ms:7.3f} ms  {calls:3d} x  {name[:80]}")
    print(flush=True)


def short_conv(B=1, T=8192, C=4096, W=4):
    """short_conv at the 48B prefill's size against kimi.ShortConv's torch code (kimi.KERNELS
    off), both on a flushed L2; the largest difference of their outputs."""
    conv = kimi.ShortConv(C, W).to("cuda", torch.bfloat16).requires_grad_(False)
    x = torch.randn(B, T, C, device="cuda", dtype=torch.bfloat16)
    state = torch.randn(B, C, W - 1, device="cuda", dtype=torch.bfloat16)
    flush, kernels = l2_flusher(), kimi.KERNELS
    try:
        kimi.KERNELS = False                                    # kimi's torch code, as on a CPU
        ref = conv(x, state.clone())
        y = fast_short_conv.short_conv(x, conv.weight, state.clone())   # the same state
        t_ref = cuda_time(lambda: conv(x, state), runs=50, warmup=5, before=flush)  # (updates it)
    finally:
        kimi.KERNELS = kernels
    err = (y.float() - ref.float()).abs().max().item()
    t_ker = cuda_time(lambda: fast_short_conv.short_conv(x, conv.weight, state), runs=50,
                      warmup=5, before=flush)       # (timed after the check: it updates state)
    moved = 2 * B * T * C * 2                           # bytes: x read once, y written once
    print(f"B={B} T={T} C={C} W={W} bf16: short_conv {t_ker * 1e3:.1f} us "
          f"({moved / t_ker / 1e6:.0f} GB/s), kimi.ShortConv torch path {t_ref * 1e3:.1f} us, "
          f"x{t_ref / t_ker:.1f}; max |difference| {err:.1e}")
    tiles = {}                                  # the tile: a sweep (the launcher reads these)
    fixed = fast_short_conv.BT, fast_short_conv.BC, fast_short_conv.WARPS
    try:
        for tile in itertools.product((16, 32, 64), (32, 64, 128, 256), (4, 8)):
            fast_short_conv.BT, fast_short_conv.BC, fast_short_conv.WARPS = tile
            tiles[tile] = cuda_time(lambda: fast_short_conv.short_conv(x, conv.weight, state),
                                    runs=30, warmup=3, before=flush)
    finally:
        fast_short_conv.BT, fast_short_conv.BC, fast_short_conv.WARPS = fixed
    print("tiles (BT, BC, warps), fastest first: " + ", ".join(
        f"{t} {ms * 1e3:.1f} us" for t, ms in sorted(tiles.items(), key=lambda i: i[1])[:6]))


def pointwise(T=8192, D=2304, H=32, K=128):
    """fast.pointwise's kernels at a T = 8192 prefill's sizes against kimi.py's torch code (the
    norms with kimi.KERNELS off), each on a flushed L2; GB/s over the bytes each must move."""
    bf, gen = torch.bfloat16, torch.Generator("cuda").manual_seed(0)
    x = torch.randn(T, D, generator=gen, device="cuda").to(bf)
    o, z = (torch.randn(T, H, K, generator=gen, device="cuda").to(bf) for _ in range(2))
    norm = kimi.RMSNorm(D).to("cuda", bf).requires_grad_(False)
    onorm = kimi.GatedRMSNorm(K).to("cuda", bf).requires_grad_(False)
    A_log, dt_bias = torch.rand(H, device="cuda"), torch.randn(H * K, device="cuda")
    rows = [("RMSNorm [T, D]", lambda: norm(x), 2 * x.nbytes),
            ("GatedRMSNorm [T, H, K]", lambda: onorm(o, z), 3 * o.nbytes),
            ("l2norm -> bf16 [T, H, K]", lambda: l2norm(o.float()).to(bf), 2 * o.nbytes),
            ("kda_gate [T, H, K]", lambda: kda_gate(z, A_log, dt_bias), 3 * z.nbytes)]
    fused = [lambda: fast_pointwise.rms_norm(x, norm.weight, norm.eps),
             lambda: fast_pointwise.gated_rms_norm(o, z, onorm.weight, onorm.eps),
             lambda: fast_pointwise.l2norm(o, bf),
             lambda: fast_pointwise.kda_gate(z, A_log, dt_bias)]
    flush, kernels = l2_flusher(), kimi.KERNELS
    for (name, torch_fn, moved), fn in zip(rows, fused):
        try:
            kimi.KERNELS = False                                # kimi's torch code, as on a CPU
            t_ref = cuda_time(torch_fn, runs=30, warmup=3, before=flush)
        finally:
            kimi.KERNELS = kernels
        t = cuda_time(fn, runs=30, warmup=3, before=flush)
        print(f"{name:26s} kernel {t * 1e3:7.1f} us ({moved / t / 1e6:5.0f} GB/s), torch "
              f"{t_ref * 1e3:7.1f} us, x{t_ref / t:.1f}", flush=True)


def kda_decode(W=4):
    """One KDA layer's decode step, kda_decode against kda_decode_ref, each 50 calls in a CUDA
    graph; GB/s over the bytes a step must move."""
    for B in (1, 16):
        args = fast_kda_decode.random_step(B, H, K, W, torch.bfloat16, "cuda", Bmax=64)
        P = H * K
        # bytes that must move: S read and written, the conv state read and written, the weights
        # (two [P, K] low-rank, three convs, the small vectors), inputs and output
        moved = (2 * B * H * K * K * 4 + 2 * 3 * B * P * (W - 1) * 2 + 2 * P * K * 2
                 + 3 * P * W * 2 + P * 4 + (B * (4 * P + 2 * K + H)) * 2)
        t_ker = 1e3 * cuda_time(lambda: fast_kda_decode.kda_decode(*args), runs=10, warmup=3,
                                graph=50)
        t_ref = 1e3 * cuda_time(lambda: fast_kda_decode.kda_decode_ref(*args), runs=10,
                                warmup=3, graph=50)
        print(f"B={B:3d}: kda_decode {t_ker:7.2f} us ({moved / t_ker / 1e3:6.0f} GB/s of "
              f"{moved / 1e6:.2f} MB)   kda_decode_ref {t_ref:7.2f} us   x{t_ref / t_ker:.1f}")


# fast.mla_decode.SPLIT candidates, each within an H100 / H200 block's 227 KB of shared memory
# (sm_90 compiles: about 184, 112, 146, 180 and 216 KB): more tiles in flight, or the query rows
# padded to 64 so that both products run as the warpgroup MMA
MLA_CONFIGS = {
    "64 keys, 3 stages": dict(BL=64, HEADS=16, num_warps=8, num_stages=3),
    "64 keys, 2 stages": dict(BL=64, HEADS=16, num_warps=8, num_stages=2),
    "32 keys, 4 stages": dict(BL=32, HEADS=16, num_warps=8, num_stages=4),
    "64 heads, 32 keys, 3 stages": dict(BL=32, HEADS=64, num_warps=8, num_stages=3),
    "64 heads, 64 keys, 2 stages": dict(BL=64, HEADS=64, num_warps=8, num_stages=2),
}


def mla_decode(R=512, PE=64):
    """The absorbed latent attention of one decode step, mla_decode (each of MLA_CONFIGS; the
    first is the default) against kimi.latent_attention, each replayed from a CUDA graph (as
    fast.decode runs it); TB/s over the cache, read once."""
    default = dict(fast_mla_decode.SPLIT)
    print(f"{torch.cuda.get_device_name()}: H = {H}, R = {R}, PE = {PE}, bf16; default "
          f"SPLIT = {default}")
    for B, L in ((1, 4096), (1, 131072), (1, 1048576), (8, 131072)):
        q = torch.randn(B, H, R + PE, device="cuda", dtype=torch.bfloat16)
        cache = torch.randn(B, L, R + PE, device="cuda", dtype=torch.bfloat16)
        pos = torch.tensor(L - 1, device="cuda")
        nbytes = B * L * (R + PE) * 2
        S = fast_mla_decode.num_splits(L, B, q.device)
        print(f"B={B} L={L:>7} S={S:>3} cache {nbytes / 1e9:.3f} GB"
              + ("  (fits in L2)" if nbytes < 50e6 else ""))
        want = kimi.latent_attention(q, cache, pos, 192 ** -0.5, kv_lora_rank=R).float()
        runs = [("kimi.latent_attention", kimi.latent_attention, None)]
        runs += [(name, fast_mla_decode.mla_decode, config) for name, config in MLA_CONFIGS.items()]
        for name, fn, config in runs:
            fast_mla_decode.SPLIT = config or default
            try:
                out = fn(q, cache, pos, 192 ** -0.5, kv_lora_rank=R).float()
                ms = cuda_time(lambda fn=fn: fn(q, cache, pos, 192 ** -0.5, kv_lora_rank=R),
                               runs=20, warmup=3, graph=1)
            except Exception as e:                          # e.g. out of shared memory
                print(f"    {name:30s} failed: {str(e).splitlines()[0][:80]}")
                continue
            finally:
                fast_mla_decode.SPLIT = default
            err = ((out - want).norm() / want.norm()).item()
            print(f"    {name:30s} {ms:7.3f} ms {nbytes / ms / 1e9:5.2f} TB/s  "
                  f"rel. error {err:.1e}")


def moe_decode(E=256, D=2304, F=1024, k=8):
    """The 48B MoE of a decode step, routing included (the route kernel writes the shared
    expert's slot): moe_decode's kernels (the default SWAP, and either form for both) against the
    torch path (route_ref, grouped_experts or fp8_experts, the einsum), replayed from a CUDA graph
    after an L2 flush; TB/s over the bytes of the distinct selected experts (+ the shared one)."""
    torch.manual_seed(0)
    md = fast_moe_decode
    flush = l2_flusher()
    w13 = (torch.randn(E + 1, 2 * F, D, device="cuda") * D ** -0.5).bfloat16()    # + shared
    w2 = (torch.randn(E + 1, D, F, device="cuda") * F ** -0.5).bfloat16()
    (q13, s13), (q2, s2) = quantize_rows(w13), quantize_rows(w2)
    fp8_moe = SimpleNamespace(w13=q13, s13=s13, w2=q2, s2=s2)      # what fp8_experts reads
    bias = torch.randn(E, device="cuda") / 10
    print(f"{torch.cuda.get_device_name()}: E = {E} + 1 shared, k = {k} + 1, D = {D}, F = {F}")

    def torch_path(fp8, x, logits):
        ids, w = md.route_ref(logits, bias, k, True, 2.446, True, (E, 1.0))    # [N, k + 1]
        out = (fp8_experts(x, ids, fp8_moe) if fp8 else
               fast_moe.grouped_experts(x, ids, w13, w2))          # [N, k + 1, D]
        return torch.einsum("nk,nkd->nd", w, out.float()).to(x.dtype)

    def kernels(fp8, x, logits):
        ids, w = md.route(logits, bias, k, True, 2.446, True, (E, 1.0))
        return md.experts(x, ids, w, *((q13, q2, s13, s2) if fp8 else (w13, w2)))

    cases = [(1, False), (1, True), (16, False), (16, True)]
    inputs = {}
    header = f"{'us (TB/s)':38s}"
    for N, fp8 in cases:
        x = torch.randn(N, D, device="cuda").bfloat16()
        logits = torch.randn(N, E, device="cuda")
        n = len(md.route(logits, bias, k, True, 2.446, True)[0].unique()) + 1    # + shared
        MB = n * (3 * D * F * (1 if fp8 else 2) + fp8 * (2 * F + D) * 4) / 1e6   # + scales
        inputs[N, fp8] = x, logits, MB
        header += f" {f'N={N} ' + ('fp8' if fp8 else 'bf16') + f' {MB:.0f} MB':>18s}"
    print(header)
    default = md.SWAP
    rows = {"torch path": None, "kernels, w13 rows, w2 SWAP (default)": default,
            "kernels, both SWAP": dict(gate_up=True, down=True),
            "kernels, both rows (no SWAP)": dict(gate_up=False, down=False)}
    for name, swap in rows.items():
        line = f"{name:38s}"
        for N, fp8 in cases:
            x, logits, MB = inputs[N, fp8]
            if swap is None:
                fn = lambda: torch_path(fp8, x, logits)                 # noqa: E731
            else:
                md.SWAP = swap
                fn = lambda: kernels(fp8, x, logits)                    # noqa: E731
            try:
                us = 1e3 * cuda_time(fn, runs=25, warmup=3, graph=1, before=flush)
            finally:
                md.SWAP = default
            line += f" {f'{us:6.1f} ({MB / us:4.2f})':>18s}"
        print(line, flush=True)


def moe_combine(N=8192, k=8, D=2304, E=256):
    """The MoE's weighted sum over the grouped matmuls' expert-sorted rows: fast.moe.combine
    against combine_ref (a gather, then the einsum), and the inverse permutation both read."""
    g = torch.Generator("cuda").manual_seed(0)
    ids = torch.rand(N, E, generator=g, device="cuda").topk(k).indices  # [N, k] distinct experts
    order = ids.flatten().sort().indices
    pos = torch.empty_like(order)
    pos[order] = torch.arange(N * k, device="cuda")
    pos = pos.view(N, k)
    out = torch.randn(N * k, D, generator=g, device="cuda").bfloat16()  # [N*k, D] expert order
    w = torch.rand(N, k, generator=g, device="cuda") * 2.446 / k
    y, ref = fast_moe.combine(out, pos, w), fast_moe.combine_ref(out, pos, w)
    ulps = ((y.float() - ref.float()).abs() / ref.float().abs().clamp(min=1e-30)).max() * 2 ** 8
    print(f"cuda: N = {N}, k = {k}, D = {D}: kernel vs einsum, {(y != ref).float().mean():.2e} "
          f"of the bf16 outputs differ, by at most {ulps:.2f} units of 2^-8 relative")

    def inverse():              # pos, as fast.moe.sorted_experts makes it
        p = torch.empty_like(order)
        p[order] = torch.arange(N * k, device="cuda")
        return p

    MB = (N * k + N) * D * 2 / 1e6                                      # read out, write y (bf16)
    for name, fn in (("pos (the inverse permutation)", inverse),
                     ("gather + einsum (combine_ref)", lambda: fast_moe.combine_ref(out, pos, w)),
                     (f"kernel {fast_moe.TILE}", lambda: fast_moe.combine(out, pos, w))):
        t = cuda_time(fn, runs=50, warmup=3)
        print(f"{name:45s} {t:7.3f} ms = {MB / t / 1e3:5.2f} TB/s over {MB:.0f} MB")
    gu = torch.randn(N * k, 2 * 1024, generator=g, device="cuda").bfloat16()   # [N*k, 2F]
    MB = gu.numel() * 3 / 1e6                          # read gu, write h [N*k, F] (bf16)
    for name, fn in (("F.silu(gate) * up", lambda: F.silu(gu[:, :1024]) * gu[:, 1024:]),
                     (f"silu_mul {fast_moe.SILU_TILE}", lambda: fast_moe.silu_mul(gu))):
        t = cuda_time(fn, runs=50, warmup=3)
        print(f"{name:45s} {t:7.3f} ms = {MB / t / 1e3:5.2f} TB/s over {MB:.0f} MB")


TIMERS = {"kda": kda, "kda_bwd": kda_bwd, "short_conv": short_conv, "pointwise": pointwise,
          "kda_decode": kda_decode, "mla_decode": mla_decode, "moe_decode": moe_decode,
          "moe_combine": moe_combine}


@torch.no_grad()
def main(argv=()):
    ap = Parser(prog="python -m tools.kernels", description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", metavar="NAME",
                    help="kernels to time: " + ", ".join(TIMERS) + " (default: all)")
    names = ap.parse_args(argv).names or list(TIMERS)
    unknown = [n for n in names if n not in TIMERS]
    if unknown:
        ap.error(f"no kernel named {unknown[0]!r}: choose among {', '.join(TIMERS)}")
    if not torch.cuda.is_available():
        print("no GPU: nothing to time (the tests check the kernels on a CPU: python -m pytest)")
        return
    for i, name in enumerate(names):
        if i:
            print()
        print(f"== {name} ==", flush=True)
        TIMERS[name]()


if __name__ == "__main__":
    main(sys.argv[1:])
