"""Tests for short_conv.py: the fused kernel against its definition, kimi.ShortConv.forward's torch
code (Triton's CPU interpreter at tiny sizes; compiled on a GPU, and there at the 48B layer's size),
and kimi.ShortConv's choice of it."""
import pytest
import torch
import torch.nn.functional as F

from fast import short_conv
import kimi

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"     # kernels: compiled on a GPU, else the interpreter
U32 = 2.0 ** -24                    # unit roundoff of fp32, and of each output dtype
U = {torch.float32: U32, torch.bfloat16: 2.0 ** -8}


@pytest.fixture
def reference(monkeypatch):
    """kimi.ShortConv.forward's torch code (on a GPU its fast path, this kernel, would answer)."""
    monkeypatch.setattr(kimi, "KERNELS", False)

    def run(conv, x, state):
        with torch.no_grad():
            return conv(x, state)
    return run


def make(B, T, C, W, dtype, state=True, seed=0, wide=0):
    """A ShortConv with random weights in dtype (as loaded), x [B, T, C] (a column slice of a
    [B, T, C + wide] projection output when wide > 0) and a state [B, C, W-1] or None."""
    gen = torch.Generator(DEV).manual_seed(seed)
    conv = kimi.ShortConv(C, W).to(DEV, dtype).requires_grad_(False)
    conv.weight.copy_(torch.randn(C, 1, W, generator=gen, device=DEV) * W ** -0.5)
    x = torch.randn(B, T, C + wide, generator=gen, device=DEV).to(dtype)[..., wide // 2:][..., :C]
    s = torch.randn(B, C, W - 1, generator=gen, device=DEV).to(dtype) if state else None
    return conv, x, s


def magnitude(x, w, state):
    """sum_j |x_j w_j| for each output, [B, T, C] fp64: what the conv sum's rounding scales with."""
    B, T, C = x.shape
    left = state if state is not None else x.new_zeros(B, C, w.shape[-1] - 1)
    xs = torch.cat([left, x.transpose(1, 2)], dim=-1).double().abs()
    return F.conv1d(xs, w.double().abs(), groups=C).transpose(1, 2)


def check(got, want, mag, W):
    """Elementwise. Each fp32 sum of the W products (any order, fused multiply-adds or not) lies
    within W*u32*mag of the exact sum, so two such sums differ by <= 2*W*u32*mag, and SiLU's slope
    is <= 1.1. SiLU's exp and division add a few fp32 ulps relative (the GPU's exp is ex2.approx of
    y*log2e, whose error grows with |y| u32; |y| < 8 here): 16 u32. Then each side rounds once to
    the output dtype, which moves it by <= u of that dtype relative: in bf16 that is the bound
    that matters, as two fp32 values a few ulps apart can round to neighbouring bf16 values (one
    bf16 ulp apart). That takes a rounding boundary between them, a few fp32 ulps in 2^16: rare.
    So at most 1% of bf16 outputs (+ 2) may differ at all; a cast that truncates moves half."""
    assert got.dtype == want.dtype and got.shape == want.shape and got.is_contiguous()
    if want.dtype == torch.bfloat16:
        assert (got != want).sum() <= 2 + 0.01 * want.numel()
    u = U[want.dtype]
    got, want = got.double(), want.double()
    tol = 2.2 * W * U32 * mag + 16 * U32 * want.abs() + u * (got.abs() + want.abs())
    err = (got - want).abs()
    assert (err <= tol).all(), f"{int((err > tol).sum())} outputs off, max |diff| {err.max():.2e}"


def kernel_vs_reference(reference, conv, x, state):
    """Runs both, each on its own copy of the state; checks the outputs, and the states for
    equality (copies of inputs: exact). Returns the kernel's output and state."""
    s_ker = s_ref = None
    if state is not None:               # (clone keeps the layout)
        s_ker, s_ref = state.clone(), state.clone()
    mag = magnitude(x, conv.weight, state)
    got = short_conv.short_conv(x, conv.weight, s_ker)
    want = reference(conv, x, s_ref)
    check(got, want, mag, conv.weight.shape[-1])
    if state is not None:
        assert torch.equal(s_ker, s_ref)
    return got, s_ker


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("W", [2, 4])
@pytest.mark.parametrize("C", [16, 48])
@pytest.mark.parametrize("T", [1, 2, 5, 37])    # 1, 2 < W-1 = 3: the new state mixes old and x
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_module(reference, dtype, T, C, W, with_state):
    conv, x, state = make(2, T, C, W, dtype, with_state, seed=T * C + W)
    kernel_vs_reference(reference, conv, x, state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_inputs(reference, dtype):
    """x a column slice of a wider projection output, state and weight in other layouts; 70
    tokens: two token blocks of 64 (the second reads no state)."""
    conv, x, state = make(2, 70, 48, 4, dtype, seed=3, wide=40)
    state = state.transpose(1, 2).contiguous().transpose(1, 2)      # [B, C, W-1], channel stride 1
    assert x.stride() == (70 * 88, 88, 1) and state.stride() == (48 * 3, 1, 48)
    wide = torch.zeros(48, 1, 8, device=DEV, dtype=dtype)
    wide[..., ::2] = conv.weight
    conv.weight = torch.nn.Parameter(wide[..., ::2], requires_grad=False)      # stride 2 in W
    kernel_vs_reference(reference, conv, x, state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pieces_carry_the_state(reference, dtype):
    """A sequence in pieces of 1, 2, 5 and 29 tokens (W = 4: the first two shorter than W-1), the
    state carried from piece to piece, equals the whole in one call from the same start state."""
    conv, x, state = make(2, 37, 16, 4, dtype, seed=5)
    whole, s_whole = kernel_vs_reference(reference, conv, x, state)
    s, pieces = state.clone(), []
    for a, b in [(0, 1), (1, 3), (3, 8), (8, 37)]:
        y, s = kernel_vs_reference(reference, conv, x[:, a:b], s)
        pieces.append(y)
    assert torch.equal(s, s_whole)
    check(torch.cat(pieces, dim=1), whole, magnitude(x, conv.weight, state), 4)


def test_bad_inputs_raise_one_line():
    conv, x, state = make(2, 5, 16, 4, torch.float32)
    w = conv.weight
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)          # [B, T, C], channel stride T
    for args, words in [((xt, w, state), "unit channel stride"),
                        ((x[0], w, state), "[B, T, C]"),
                        ((x, w[:8], state), "weight must be [C, 1, W]"),
                        ((x, w[:, 0], state), "weight must be [C, 1, W]"),
                        ((x, w, state[..., :2]), "state must be [B, C, W-1]"),
                        ((x, w, state[:1]), "state must be [B, C, W-1]")]:
        with pytest.raises(ValueError) as e:
            short_conv.short_conv(*args)
        assert words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("grad", [False, True])
def test_module_chooses_kernel_on_gpu_without_grad(grad):
    """kimi.ShortConv.forward: the kernel (bit for bit) on a GPU when no gradient is asked for;
    its torch code, differentiable, otherwise (and always on a CPU)."""
    conv, x, state = make(2, 5, 16, 4, torch.float32, seed=7)
    conv.requires_grad_(grad)
    y = conv(x, state.clone())
    fast = CUDA and not grad
    if fast:
        assert torch.equal(y, short_conv.short_conv(x, conv.weight, state.clone()))
    assert y.requires_grad == grad and y.is_contiguous() == fast     # torch: a transposed view


@pytest.mark.skipif(not CUDA, reason="needs a GPU: the 48B prefill's size in bf16, compiled")
@pytest.mark.parametrize("with_state", [False, True])
def test_kernel_gpu_48b(reference, with_state):
    """C = P = 4096, T = 8192, W = 4, bf16; x a column slice of a q|k|v projection output."""
    conv, x, state = make(1, 8192, 4096, 4, torch.bfloat16, with_state, wide=8192)
    kernel_vs_reference(reference, conv, x, state)
