"""Tests for fast/pointwise.py: each kernel against its definition, kimi.py's torch code (Triton's
CPU interpreter at small sizes; compiled on a GPU, and there at the 48B model's sizes), and
kimi.py's choice of them."""
import contextlib

import pytest
import torch
from hypothesis import given, settings, strategies as st

import kda_ref
import kimi
from fast import pointwise
from fast.fp8 import quantize_rows, quantize_rows_triton

CUDA = torch.cuda.is_available()
FP8_GPU = CUDA and torch.cuda.get_device_capability() >= (8, 9)
DEV = "cuda" if CUDA else "cpu"     # kernels: compiled on a GPU, else the interpreter
# How far a kernel's output may lie from kimi's, relative to the value. Both compute the same
# fp32 formula (four or five rounded operations) with the sum of squares added in another order.
# Compiled for a GPU, Triton's rsqrt and exp (in sigmoid) are the hardware's approximate
# instructions (rsqrt.approx, ex2.approx: up to about 2 units in the last place each, where torch's
# are correctly rounded to within one), so the two fp32 results may lie up to about 10 units apart
# (the gated norm chains both and three products): 16 allowed (spacing 2^-23). In bf16 that can
# move a value near a rounding boundary to its neighbour: one bf16 unit (2^-7), never more.
TOL = {torch.bfloat16: 2.0 ** -7, torch.float32: 16 * 2.0 ** -23}
# The gate: the same fp32 formula, softplus's log1p by its atanh series (fast.softplus, a few units
# in the last place). exp(-|z|) is the hardware's ex2.approx of -|z| log2(e) when compiled, and
# rounding that product costs |z| 2^-24 of relative error: (16 + |z|) units (2^-23) allowed.
def gate_tol(f, dt_bias):
    z = f.float() + dt_bias.view(f.shape[-2:])
    return (16 + z.abs()) * 2.0 ** -23


DTYPES = st.sampled_from([torch.float32, torch.bfloat16])


def close(y, ref):
    """y equals kimi's ref but for the rounding differences TOL describes."""
    assert y.dtype == ref.dtype and y.shape == ref.shape
    tol = TOL[y.dtype] * ref.float().abs().clamp_min(torch.finfo(y.dtype).tiny)
    assert ((y.float() - ref.float()).abs() <= tol).all()


@contextlib.contextmanager
def torch_code():
    """kimi.py's torch code, as on a CPU (on a GPU these kernels would answer)."""
    kernels, kimi.KERNELS = kimi.KERNELS, False
    try:
        with torch.no_grad():
            yield
    finally:
        kimi.KERNELS = kernels


def rand(*shape, dtype, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(DEV, dtype)


def norm_module(cls, N, dtype, seed):
    norm = cls(N, eps=1e-5).to(DEV, dtype).requires_grad_(False)
    norm.weight.copy_(rand(N, dtype=dtype, seed=seed + 1).abs() + 0.5)
    return norm


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), rows=st.integers(1, 40), N=st.sampled_from([16, 48, 200]),
       dtype=DTYPES)
def test_rms_norm_equals_kimi(seed, rows, N, dtype):
    norm = norm_module(kimi.RMSNorm, N, dtype, seed)
    x = rand(2, rows, N, dtype=dtype, seed=seed, scale=3.0)
    with torch_code():
        ref = norm(x)
    close(pointwise.rms_norm(x, norm.weight, norm.eps), ref)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), T=st.integers(1, 30), H=st.integers(1, 3),
       K=st.sampled_from([16, 32]), dtype=DTYPES)
def test_gated_rms_norm_equals_kimi(seed, T, H, K, dtype):
    norm = norm_module(kimi.GatedRMSNorm, K, dtype, seed)
    x = rand(1, T, H, K, dtype=dtype, seed=seed)
    gate = rand(1, T, H, K, dtype=dtype, seed=seed + 2, scale=4.0)
    with torch_code():
        ref = norm(x, gate)
    close(pointwise.gated_rms_norm(x, gate, norm.weight, norm.eps), ref)


@pytest.mark.skipif(CUDA and not FP8_GPU, reason="e4m3 needs a GPU with FP8 (compute capability "
                    ">= 8.9), or no GPU: the interpreter")
@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), T=st.integers(1, 20), H=st.integers(1, 3),
       N=st.sampled_from([16, 48]))
def test_norms_quantise_their_output_as_fp8_does(seed, T, H, N):
    """quantize=True (FP8 prefill): the same y, and q, scale equal, bit for bit, to the FP8
    quantisation kernel's of y, a token a row (rms_norm: its N values; the gated norm: its H * N).
    In the interpreter e4m3's rounding is its own, the same in both (test_quantize.py); on an FP8
    GPU both equal fast.fp8.quantize_rows too."""
    rms, gated = (norm_module(m, N, torch.bfloat16, seed)
                  for m in (kimi.RMSNorm, kimi.GatedRMSNorm))
    x = rand(1, T, H, N, dtype=torch.bfloat16, seed=seed, scale=3.0)
    gate = rand(1, T, H, N, dtype=torch.bfloat16, seed=seed + 2, scale=4.0)
    x2 = x.flatten(1, 2)                                          # [1, T * H, N]: H * T tokens
    for (y, q, scale), ref in (
            (pointwise.rms_norm(x2, rms.weight, rms.eps, quantize=True),
             pointwise.rms_norm(x2, rms.weight, rms.eps)),
            (pointwise.gated_rms_norm(x, gate, gated.weight, gated.eps, quantize=True),
             pointwise.gated_rms_norm(x, gate, gated.weight, gated.eps))):
        assert torch.equal(y, ref)
        rows = ref.reshape(len(scale), -1)                        # [tokens, values a token]
        for q_ref, scale_ref in [quantize_rows_triton(rows)] + (
                [quantize_rows(rows)] if FP8_GPU else []):
            assert torch.equal(scale, scale_ref)
            assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), T=st.integers(1, 30), K=st.sampled_from([16, 64]),
       dtype=DTYPES, out=DTYPES)
def test_l2norm_equals_the_reference(seed, T, K, dtype, out):
    x = rand(2, T, 2, K, dtype=dtype, seed=seed, scale=2.0)
    x[0, 0, 0] = 0                                  # a zero row: eps keeps it finite (0, not NaN)
    close(pointwise.l2norm(x, out), kda_ref.l2norm(x.float()).to(out))


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), T=st.integers(1, 30), H=st.integers(1, 3),
       K=st.sampled_from([16, 32]), dtype=DTYPES)
def test_kda_gate_equals_the_reference(seed, T, H, K, dtype):
    # f over softplus's three regimes: z > 20 (returned as is), moderate, and very negative
    # (softplus ~ exp(z), where log(1 + exp(z)) alone would round to 0)
    f = rand(1, T, H, K, dtype=dtype, seed=seed, scale=12.0)
    A_log = rand(H, dtype=torch.float32, seed=seed + 1).abs()
    dt_bias = rand(H * K, dtype=torch.float32, seed=seed + 2, scale=5.0)
    g = pointwise.kda_gate(f, A_log.view(1, 1, H, 1), dt_bias)
    ref = kda_ref.kda_gate(f, A_log.view(1, 1, H, 1), dt_bias)
    assert g.dtype == torch.float32 and (g <= 0).all()
    assert ((g - ref).abs() <= gate_tol(f, dt_bias) * ref.abs()).all()


def test_bad_input_is_one_line():
    x = torch.zeros(2, 3, 4, 16, device=DEV)
    with pytest.raises(ValueError, match="gate"):
        pointwise.gated_rms_norm(x, x[:, :2], torch.ones(16, device=DEV), 1e-5)
    with pytest.raises(ValueError, match="dt_bias"):
        pointwise.kda_gate(x, torch.zeros(4, device=DEV), torch.zeros(16, device=DEV))


@pytest.mark.skipif(not CUDA, reason="the 48B sizes, compiled: needs a CUDA GPU")
def test_at_the_48b_sizes_on_gpu():
    """kimi's KDA layer norms at their sizes: RMSNorm over D = 2304, the per-head ones over K = 128
    (H = 32), the gate over [T, 32, 128], T = 1024, bf16 as loaded."""
    D, H, K, T, bf = 2304, 32, 128, 1024, torch.bfloat16
    norm = norm_module(kimi.RMSNorm, D, bf, 0)
    onorm = norm_module(kimi.GatedRMSNorm, K, bf, 1)
    x = rand(1, T, D, dtype=bf, seed=2)
    o, gate = rand(1, T, H, K, dtype=bf, seed=3), rand(1, T, H, K, dtype=bf, seed=4)
    with torch_code():
        refs = norm(x), onorm(o, gate)
    close(pointwise.rms_norm(x, norm.weight, norm.eps), refs[0])
    close(pointwise.gated_rms_norm(o, gate, onorm.weight, onorm.eps), refs[1])
    close(pointwise.l2norm(o, bf), kda_ref.l2norm(o.float()).to(bf))
    A_log = rand(H, dtype=torch.float32, seed=5).abs()
    dt_bias = rand(H * K, dtype=torch.float32, seed=6)
    g, ref = pointwise.kda_gate(gate, A_log, dt_bias), kda_ref.kda_gate(gate, A_log, dt_bias)
    assert ((g - ref).abs() <= gate_tol(gate, dt_bias) * ref.abs()).all()


@pytest.mark.skipif(not CUDA, reason="kimi.py chooses these kernels on a CUDA GPU only")
def test_kimi_uses_them_without_gradients_only(monkeypatch):
    calls = []
    monkeypatch.setattr(pointwise, "_norm", lambda *a: calls.append(a) or a[0])
    norm = norm_module(kimi.RMSNorm, 16, torch.bfloat16, 0)
    x = rand(1, 3, 16, dtype=torch.bfloat16, seed=0)
    with torch.no_grad():
        norm(x)
    assert len(calls) == 1
    norm(x.requires_grad_())                       # training: the differentiable torch code
    assert len(calls) == 1


def test_rms_norm_with_an_fp32_weight_rounds_as_kimi():
    """bf16 x, fp32 weight: kimi rounds x r to bf16, then the fp32 product is not rounded again.
    The bf16 rounding of x r may fall on the other side in one of the two (TOL's reason): one bf16
    unit of x r, carried into the fp32 product."""
    norm = norm_module(kimi.RMSNorm, 48, torch.float32, 3)
    x = rand(5, 48, dtype=torch.bfloat16, seed=4, scale=3.0)
    with torch_code():
        ref = norm(x)
    y = pointwise.rms_norm(x, norm.weight, norm.eps)
    assert y.dtype == ref.dtype == torch.float32
    assert ((y - ref).abs() <= TOL[torch.bfloat16] * ref.abs() + TOL[torch.float32]).all()
