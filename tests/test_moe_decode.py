"""Tests for moe_decode.py: the torch references against kimi's MoEGate and SparseMoeBlock (bf16
and FP8 experts), the kernels against the references in Triton's CPU interpreter at the tiny
config, and on a GPU at the 48B sizes (bf16 and FP8, N in {1, 16}, the same bits every run)."""
import itertools

import pytest
import torch
from hypothesis import given, settings, strategies as st

import fast
from fast import moe_decode
from fast.moe_decode import experts, experts_ref, route, route_ref, router_logits
import kimi
from fast.fp8 import dequantize, quantize_rows
import triton
import triton.language as tl
CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"     # kernels: compiled on a GPU, else the interpreter
TINY = kimi.CONFIGS["tiny"]
U_BF16 = 2.0 ** -8      # bf16's unit roundoff


def by_id(ids, w):
    """Rows sorted by expert id: the order of the k ids is free, so compare (id, weight) sets."""
    ids, order = ids.sort(-1)
    return ids, w.gather(-1, order)


def tiny_block(seed):
    """A bf16 kimi block with random weights and bias, and its experts stacked (+ the shared one,
    whose gate_proj / up_proj / down_proj have the experts' shapes, as row E)."""
    torch.manual_seed(seed)
    block = kimi.SparseMoeBlock(TINY).bfloat16()
    with torch.no_grad():
        block.gate.e_score_correction_bias.uniform_(-0.5, 0.5)
    ex, sh = block.experts, block.shared_experts
    w13 = torch.stack([torch.cat([e.w1.weight, e.w3.weight]) for e in ex]
                      + [torch.cat([sh.gate_proj.weight, sh.up_proj.weight])]).detach()
    w2 = torch.stack([e.w2.weight for e in ex] + [sh.down_proj.weight]).detach()
    return block, w13, w2


def close(y, ref, x, ids, w, *weights):
    """|y - ref| <= U (|ref| + 4 sum_j |w[n, j] out[n, j]|): y's own bf16 rounding, plus out[n, j]
    rounded the other way (one ulp, 2U of it) where an fp32 sum in another order lands across a
    rounding point, doubled for the rarer such flips upstream (gate, up, silu, h) that out carries.
    (48B sizes, fp32 vs fp64 sums on a CPU: the largest error is 0.32 of this bound.)"""
    one = torch.ones_like(w[:, :1])
    terms = sum(w[:, j, None].abs().double() * experts_ref(x, ids[:, j, None], one, *weights)
                .double().abs() for j in range(ids.shape[1]))         # [N, D]
    y, ref = y.double(), ref.double()
    assert ((y - ref).abs() <= U_BF16 * (ref.abs() + 4 * terms)).all(), (y - ref).abs().max()


# -------------------------------------------------------------------------------------------------
# The references against kimi.py

@pytest.mark.parametrize("biased", [True, False])
@torch.no_grad()
def test_route_ref_equals_moe_gate(biased):
    """On a GPU MoEGate routes in route's kernel (any number of tokens): the same again."""
    block, _, _ = tiny_block(0)
    gate, a = block.gate, TINY
    gate.args = kimi.ModelArgs(**{**vars(TINY), "routing_weights_biased": biased})
    gate, x = gate.to(DEV), torch.randn(40, a.hidden_size).bfloat16().to(DEV)
    if CUDA:                                                # as MoEGate computes them
        logits = torch.mm(x, gate.weight.T, out_dtype=torch.float32)
    else:
        logits = torch.nn.functional.linear(x.float(), gate.weight.float())
    ids, w = by_id(*route_ref(logits, gate.e_score_correction_bias, a.num_experts_per_token,
                              a.moe_renormalize, a.routed_scaling_factor, biased))
    ids_kimi, w_kimi = by_id(*gate(x))
    assert torch.equal(ids, ids_kimi)
    torch.testing.assert_close(w, w_kimi, rtol=2**-20, atol=0)     # fp32 (2^-24), the same ops


@pytest.mark.parametrize("fp8", [False, True])
def test_experts_ref_equals_kimi_block(fp8):
    """run_experts (nn.Linear in bf16) + forward's fp32 sum; FP8: the block holds the dequantised
    weights (exact in bf16: 4 significant bits times a power of two)."""
    block, w13, w2 = tiny_block(1)
    s13 = s2 = None
    if fp8:
        (w13, s13), (w2, s2) = quantize_rows(w13), quantize_rows(w2)
        deq13, deq2 = dequantize(w13, s13, torch.bfloat16), dequantize(w2, s2, torch.bfloat16)
        with torch.no_grad():
            sh = block.shared_experts
            for e, (w1, w3, w2_) in enumerate([(m.w1, m.w3, m.w2) for m in block.experts]
                                               + [(sh.gate_proj, sh.up_proj, sh.down_proj)]):
                w1.weight[:], w3.weight[:] = deq13[e].chunk(2)
                w2_.weight[:] = deq2[e]
    x = torch.randn(16, TINY.hidden_size).bfloat16()
    with torch.no_grad():
        ids, w = block.gate(x)
        ref = torch.einsum("nk,nkd->nd", w, block.run_experts(x, ids).float()).bfloat16()
        shared = block.shared_experts(x)
    close(experts_ref(x, ids, w, w13, w2, s13, s2), ref, x, ids, w, w13, w2, s13, s2)
    ids, w = torch.full((16, 1), TINY.num_experts), torch.ones(16, 1)     # the shared one: row E
    close(experts_ref(x, ids, w, w13, w2, s13, s2), shared, x, ids, w, w13, w2, s13, s2)


# -------------------------------------------------------------------------------------------------
# The kernels against the references (Triton's CPU interpreter without a GPU)

@settings(max_examples=6, deadline=None)
@given(N=st.sampled_from([1, 3, 16, 300]), renormalize=st.booleans(), biased=st.booleans(),
       shared=st.sampled_from([None, (256, 1.0), (300, 0.5)]), seed=st.integers(0, 2**16))
def test_route_kernel_equals_ref(N, renormalize, biased, shared, seed):
    """With shared = (id, weight), the kernel writes that slot after the k routed ones."""
    gen = torch.Generator().manual_seed(seed)
    logits, bias = torch.randn(N, 256, generator=gen), torch.randn(256, generator=gen) * 0.1
    logits, bias = logits.to(DEV), bias.to(DEV)
    args = (bias.bfloat16(), 8, renormalize, 2.446, biased, shared)
    ids, w = route(logits, *args)
    assert ids.shape == (N, 8 + (shared is not None))
    if shared is not None:          # stored values, copied: exact
        assert (ids[:, 8] == shared[0]).all() and (w[:, 8] == shared[1]).all()
    ids, w = by_id(ids, w)
    ids_ref, w_ref = by_id(*route_ref(logits, *args))
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref, rtol=2**-20, atol=0)      # fp32 (2^-24): a few roundings


def in_order(parts):
    """parts[0] + parts[1] + ..., in that order (route's sum of router_logits' slices)."""
    total = parts[0].clone()
    for part in parts[1:]:
        total += part
    return total


@settings(max_examples=6, deadline=None)
@given(N=st.integers(1, 16), E=st.integers(1, 40), D=st.integers(1, 300),
       slices=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_router_logits_equal_linear(N, E, D, slices, seed):
    """The partial sums add up to F.linear's fp32 logits, ragged E and D included, and route on
    them chooses as route_ref on their in-order sum."""
    gen = torch.Generator().manual_seed(seed)
    x, weight = torch.randn(N, D, generator=gen), torch.randn(E, D, generator=gen) * D ** -0.5
    # logits ~ N(0, 1): sigmoid does not saturate to ties at 1.0 (which route_ref breaks freely)
    x, weight = x.bfloat16().to(DEV), weight.bfloat16().to(DEV)
    parts = router_logits(x, weight, slices)
    assert parts.shape == (slices, N, E) and parts.dtype == torch.float32
    ref = torch.nn.functional.linear(x.double(), weight.double())
    # bf16 products are exact in fp32 (and fp64); only fp32's sums round: at most D + slices
    # roundings of u = 2^-24 each, relative to the sum of |products|
    bound = (D + slices) * 2.0 ** -24 * (x.double().abs() @ weight.double().abs().T)
    assert ((in_order(parts).double() - ref).abs() <= bound).all()
    k = min(E, 4)
    bias = torch.zeros(E, device=DEV)
    ids, w = by_id(*route(parts, bias, k, True, 1.0, True))
    ids_ref, w_ref = by_id(*route_ref(in_order(parts), bias, k, True, 1.0, True))
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref, rtol=2**-20, atol=0)      # fp32 (2^-24): a few roundings


def test_route_kernel_ties_lowest_index_first():
    zeros = torch.zeros(257, device=DEV)
    ids, _ = route(zeros[None, :256], zeros[:256], 8, True, 1.0, True)
    assert ids.tolist() == [list(range(8))]


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("swap", [True, False], ids=["swap", "rows"])
@pytest.mark.parametrize("N", [1, 3, 16])
def test_experts_kernel_equals_ref(N, swap, fp8, monkeypatch):
    """Tiny config, routed ids + the shared expert's column, both forms of the products (SWAP):
    the interpreter's kernels round at kimi's points as the reference does; only the fp32 sums'
    order differs."""
    monkeypatch.setattr(moe_decode, "SWAP", dict(gate_up=swap, down=swap))
    block, w13, w2 = tiny_block(N)
    s13 = s2 = None
    if fp8:
        (w13, s13), (w2, s2) = quantize_rows(w13), quantize_rows(w2)
    x = torch.randn(N, TINY.hidden_size).bfloat16()
    with torch.no_grad():
        ids, w = block.gate(x)
    ids = torch.cat([ids, torch.full((N, 1), TINY.num_experts)], 1)          # [N, k + 1]
    w = torch.cat([w, torch.ones(N, 1)], 1)                                 # shared: weight 1
    on = [t if t is None else t.to(DEV) for t in (x, ids, w, w13, w2, s13, s2)]
    y = experts(*on).cpu()
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    close(y, experts_ref(x, ids, w, w13, w2, s13, s2), x, ids, w, w13, w2, s13, s2)


@triton.jit
def _operand_kernel(w_ptr, out_ptr):
    i = tl.arange(0, 256)
    tl.store(out_ptr + i, fast.operand(tl.load(w_ptr + i), tl.bfloat16))


def test_e4m3_to_bf16_through_the_bits_is_the_cast():
    """Every e4m3 code but the two NaNs (0x7F, 0xFF: no weight holds one; the interpreter's e4m3
    -> fp32 gives them 480) as bf16 through fp32's top half: the same bits as torch's exact cast
    (the interpreter on a CPU; the kernels use it only where tl.dot takes bf16, on a GPU)."""
    codes = torch.arange(256, dtype=torch.uint8)
    w = codes.view(torch.float8_e4m3fn).to(DEV)
    out = torch.empty(256, dtype=torch.bfloat16, device=DEV)
    _operand_kernel[(1,)](w, out)
    numbers = (codes & 0x7F) != 0x7F
    want = w.cpu().to(torch.bfloat16)
    assert torch.equal(out.cpu()[numbers].view(torch.int16), want[numbers].view(torch.int16))


# -------------------------------------------------------------------------------------------------
# The 48B sizes on a GPU

@pytest.mark.skipif(not CUDA, reason="needs a GPU (the 48B expert sizes; bf16 tl.dot)")
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("N", [1, 16])
def test_experts_on_gpu_at_48b_sizes(N, fp8, monkeypatch):
    """route and experts (+ the shared expert as row E) against the references, bf16 tl.dot on the
    GPU, each kernel in both forms (SWAP); twice, bit for bit (fixed summation order)."""
    if fp8 and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("e4m3 loads need compute capability >= 8.9")
    torch.manual_seed(N)
    E, D, F_, k = 256, 2304, 1024, 8
    w13 = (torch.randn(E + 1, 2 * F_, D, device="cuda") * D ** -0.5).bfloat16()
    w2 = (torch.randn(E + 1, D, F_, device="cuda") * F_ ** -0.5).bfloat16()
    s13 = s2 = None
    if fp8:
        (w13, s13), (w2, s2) = quantize_rows(w13), quantize_rows(w2)
    x = torch.randn(N, D, device="cuda").bfloat16()
    logits, bias = torch.randn(N, E, device="cuda"), torch.randn(E, device="cuda") * 0.1
    args = (logits, bias, k, True, 2.446, True)
    ids, w = route(*args)
    (ids_s, w_s), (ids_r, w_r) = by_id(ids, w), by_id(*route_ref(*args))
    assert torch.equal(ids_s, ids_r)
    # fp32; Triton's exp on a GPU is ex2.approx (~2^-22 relative): a few 2^-20 after renormalising
    torch.testing.assert_close(w_s, w_r, rtol=2**-16, atol=0)
    ids, w = route(*args, shared=(E, 1.0))                          # + the shared expert, row E
    ref = experts_ref(x, ids, w, w13, w2, s13, s2)
    for up, down in itertools.product((True, False), repeat=2):     # each kernel in either form
        monkeypatch.setattr(moe_decode, "SWAP", dict(gate_up=up, down=down))
        y = experts(x, ids, w, w13, w2, s13, s2)
        close(y, ref, x, ids, w, w13, w2, s13, s2)
        assert torch.equal(y, experts(x, ids, w, w13, w2, s13, s2))    # no atomics: same bits
