"""Tests for fast_moe.py's prefill path and fast_moe.py's kernel: the weighted sum of the
expert-sorted rows against kimi.SparseMoeBlock.forward's einsum (Triton's CPU interpreter, k in
{1, 2, 8}, experts left without rows), the stacked block against the unstacked one, and the kernel
at the 48B prefill sizes on a GPU."""
import copy

import pytest
import torch
import torch.nn.functional as F

import kimi
from fast import moe as fast_moe

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"     # kernels: compiled on a GPU, else the interpreter
U_BF16 = 2.0 ** -8          # bf16's unit roundoff
U_FP32 = 2.0 ** -24         # fp32's
EMPTY = (0, 5, 11)          # experts that get no rows: the first, one inside, the last


def routed(N, k, dtype, E=12, D=80, F_=24, seed=0):
    """x [N, D], ids [N, k] (distinct in a row, never an EMPTY expert), w fp32 [N, k], and stacked
    experts w13 [E, 2F, D], w2 [E, D, F], on DEV."""
    g = torch.Generator().manual_seed(seed)
    used = torch.tensor([e for e in range(E) if e not in EMPTY])          # 9 experts
    ids = used[torch.rand(N, len(used), generator=g).topk(k).indices]      # [N, k]
    w = torch.rand(N, k, generator=g) * 2.446 / k                           # as the router's
    x = torch.randn(N, D, generator=g)
    w13 = torch.randn(E, 2 * F_, D, generator=g) * D ** -0.5
    w2 = torch.randn(E, D, F_, generator=g) * F_ ** -0.5
    return (x.to(DEV, dtype), ids.to(DEV), w.to(DEV), w13.to(DEV, dtype), w2.to(DEV, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 2, 8])
@torch.no_grad()
def test_combine_kernel_equals_einsum(k, dtype):
    """fast_moe.combine (interpreter without a GPU) = combine_ref, on sorted_experts' rows."""
    x, ids, w, w13, w2 = routed(37, k, dtype)
    out, pos = fast_moe.sorted_experts(x, ids, w13, w2)             # [N*k, D], [N, k]
    assert sorted(pos.flatten().tolist()) == list(range(37 * k))    # a permutation
    ref = fast_moe.combine_ref(out, pos, w)
    for tile in (dict(BM=4, BN=32), {}):    # 10 x 3 programs, partial in both; the default tile
        y = fast_moe.combine(out, pos, w, **tile)
        assert_sum_close(y, ref, out[pos], w)
        assert torch.equal(fast_moe.combine(out, pos, w, **tile), y)     # the same bits


def assert_sum_close(y, ref, rows, w):
    """y, ref [N, D]: the same fp32 sums sum_j w[n, j] rows[n, j] in two orders, each rounded once
    to the rows' dtype. rows [N, k, D] (the exact inputs), w fp32 [N, k]."""
    assert y.dtype == ref.dtype == rows.dtype and y.shape == ref.shape
    k = w.shape[1]
    S = torch.einsum("nk,nkd->nd", w.double().abs(), rows.double().abs())     # sum_j |w_j o_j|
    # Each fp32 sum of k products, in any order, is within gamma_k S of the exact one, gamma_k =
    # k U / (1 - k U) < (k + 1) U (Higham, Accuracy and Stability of Numerical Algorithms, 3.1)
    gap = 2 * (k + 1) * U_FP32 * S                                  # between the two fp32 sums
    err = (y.double() - ref.double()).abs()
    if y.dtype == torch.float32:
        assert (err <= gap).all()
        return
    # bf16: each side is its fp32 sum a rounded once, |round(a) - a| <= U |a| <= U / (1 - U)
    # |round(a)|, so |y - ref| <= U / (1 - U) (|y| + |ref|) + the fp32 gap
    assert (err <= U_BF16 / (1 - U_BF16) * (y.double().abs() + ref.double().abs()) + gap).all()
    # and they differ only where the two fp32 sums straddle a rounding boundary: ~k 2^-24 / 2^-8
    # of the outputs (truncating instead of rounding, as the interpreter's cast does, ~half)
    assert (y != ref).float().mean() < 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 2, 8])
@torch.no_grad()
def test_grouped_moe_equals_definition(k, dtype):
    """grouped_experts = run_experts (here: each pair's own matmuls), grouped_moe = the einsum of
    w and grouped_experts' rows, rounded once (the kernel on a GPU, combine_ref on a CPU)."""
    x, ids, w, w13, w2 = routed(37, k, dtype)
    rows = fast_moe.grouped_experts(x, ids, w13, w2)                # [N, k, D]
    if dtype == torch.float32:      # fp32 rounding, 6e-8 an op in sums of <= 80 terms: < 1e-5
        gate, up = torch.einsum("nd,nkfd->nkf", x, w13[ids]).chunk(2, dim=-1)     # [N, k, F]
        pairs = torch.einsum("nkf,nkdf->nkd", F.silu(gate) * up, w2[ids])          # [N, k, D]
        assert ((rows - pairs).norm() / pairs.norm()).item() < 1e-5
    ref = torch.einsum("nk,nkd->nd", w, rows.float()).to(dtype)    # SparseMoeBlock.forward
    assert_sum_close(fast_moe.grouped_moe(x, ids, w, w13, w2), ref, rows, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stacked_block_equals_unstacked_block(dtype):
    """The whole SparseMoeBlock: stacked experts (grouped_moe) = the loop and the einsum. Same
    routing (the gate is shared); the experts' rows differ by rounding only (fp32: < 1e-5; bf16:
    other matmul kernels, one bf16 ulp here and there), the sums as in assert_sum_close. With
    gradients asked for, the stacked block takes the torch path and they reach the router."""
    torch.manual_seed(0)
    block = kimi.SparseMoeBlock(kimi.CONFIGS["tiny"]).to(DEV, dtype)
    stacked = copy.deepcopy(block)
    fast_moe.stack_experts(stacked)
    x = torch.randn(2, 20, block.gate.weight.shape[1], device=DEV, dtype=dtype)
    with torch.no_grad():
        want, got = block(x), stacked(x)
    assert (got - want).float().norm() / want.float().norm() < (1e-5 if dtype == torch.float32
                                                                 else 4 * U_BF16)
    stacked(x).float().square().sum().backward()
    assert stacked.gate.weight.grad is not None and stacked.gate.weight.grad.abs().sum() > 0


@pytest.mark.skipif(not CUDA, reason="needs CUDA: the kernel compiled, at the 48B prefill sizes")
@torch.no_grad()
def test_combine_kernel_at_48b_prefill_sizes():
    """N = 8192 tokens (a T = 8192 prefill), k = 8 of E = 256 experts (the first 16 get no rows),
    D = 2304, bf16 rows: the kernel = combine_ref, the same bits every run."""
    N, k, D, E = 8192, 8, 2304, 256
    g = torch.Generator(DEV).manual_seed(0)
    ids = 16 + torch.rand(N, E - 16, generator=g, device=DEV).topk(k).indices     # [N, k]
    order = ids.flatten().sort().indices
    pos = torch.empty_like(order)
    pos[order] = torch.arange(N * k, device=DEV)
    pos = pos.view(N, k)
    out = torch.randn(N * k, D, generator=g, device=DEV).bfloat16()        # [N*k, D]
    w = torch.rand(N, k, generator=g, device=DEV) * 2.446 / k
    y = fast_moe.combine(out, pos, w)
    assert_sum_close(y, fast_moe.combine_ref(out, pos, w), out[pos], w)
    assert torch.equal(fast_moe.combine(out, pos, w), y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_silu_mul_kernel_equals_torch(dtype):
    """silu_mul (interpreter without a GPU) = F.silu(gate) * up, partial tiles in both directions.
    Both compute silu in fp32 and round it to the dtype, then round the product. torch's silu may
    be x sigmoid(x) rather than x / (1 + exp(-x)), and exp's last bit is the platform's: in fp32
    the two differ by a few units (2^-23 each); in bf16 only where that moves a value across a
    rounding boundary, by one unit (2^-7) there, for a small fraction of the outputs."""
    g = torch.Generator().manual_seed(0)
    gu = (torch.randn(37, 2 * 48, generator=g) * 4).to(DEV, dtype)             # M = 37, F = 48
    gate, up = gu.chunk(2, dim=-1)
    ref = F.silu(gate) * up
    for tile in (dict(BM=4, BN=32), {}):
        h = fast_moe.silu_mul(gu, **tile)
        assert h.dtype == dtype and h.shape == ref.shape
        # fp32: compiled, Triton's exp is ex2.approx(x log2 e) (2 units, plus |x| 2^-24 from
        # rounding its argument) and its division div.full (2 units); 4 more for the roundings of
        # 1 + e, the product and torch's own. The interpreter uses numpy's exp: well inside.
        units = 2.0 ** -7 if dtype == torch.bfloat16 else (8 + gate.abs() / 2) * 2.0 ** -23
        assert ((h - ref).abs() <= units * ref.abs() + torch.finfo(dtype).tiny).all()
        if dtype == torch.bfloat16:
            assert (h != ref).float().mean() < 0.01
