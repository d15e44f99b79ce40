"""
Property tests for KDA: kda_triton.chunk_kda, kda_triton.fused_recurrent_kda and kda_ref.chunk_kda_ref
against kda_ref.recurrent_kda.

Without a GPU the Triton kernels run in the CPU interpreter (importing kda_triton sets TRITON_INTERPRET=1),
which costs ~0.2 ms per 64x128 @ 128x64 dot, so CPU shapes stay small. Errors are relative L2 norms.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from kda_triton import chunk_kda, fused_recurrent_kda  # first: chooses the interpreter without a GPU
from kda_ref import chunk_kda_ref, kda_gate, l2norm, recurrent_kda

CUDA = torch.cuda.is_available()
DEV = 'cuda' if CUDA else 'cpu'
DIMS = [16, 128, 256] if CUDA else [16, 32, 64]   # K and V (few on GPU: each pair compiles)
MAX_T = 600 if CUDA else 150
GATES = ['logsigmoid', 'bounded', 'softplus']
# T = 1, T < 16, around one chunk, and ragged multi-chunk lengths
T_VALUES = st.one_of(st.sampled_from([1, 5, 15, 63, 64, 65, 128]), st.integers(1, MAX_T))


def ratio(out, ref):
    """||out - ref|| / ||ref||, in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_inputs(seed, B, T, H, K, V, gate, dtype=torch.float32, device=DEV):
    """L2-normalised q, k; a gate from one of three regimes; sigmoid beta. Returns q, k, v, g, beta."""
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    q, k = l2norm(randn(B, T, H, K)), l2norm(randn(B, T, H, K))
    v = randn(B, T, H, V)
    if gate == 'logsigmoid':        # mild: fla's test gate
        g = F.logsigmoid(randn(B, T, H, K))
    elif gate == 'bounded':         # lower bound -5 nats per token
        g = -5 * torch.sigmoid(randn(B, T, H, K))
    else:                           # Kimi's unbounded softplus gate, exp(A_log) up to 16 (g to about -85)
        A_log = torch.rand(H, generator=gen) * math.log(16)
        A_log[-1] = math.log(16)
        g = kda_gate(2 * randn(B, T, H, K), A_log, randn(H * K))
    beta = torch.sigmoid(randn(B, T, H))
    return [x.to(device) for x in (q.to(dtype), k.to(dtype), v.to(dtype), g, beta)]


def check(o, S, o_ref, S_ref, tol_o, tol_S):
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    assert S.shape == S_ref.shape and S.dtype == torch.float32 and o.shape == o_ref.shape
    assert ratio(o, o_ref) < tol_o, f'o: {ratio(o, o_ref):.2e}'
    assert ratio(S, S_ref) < tol_S, f'S: {ratio(S, S_ref):.2e}'


@settings(deadline=None, max_examples=25)
@given(seed=st.integers(0, 2**31), B=st.integers(1, 2), T=T_VALUES, H=st.integers(1, 2),
       K=st.sampled_from(DIMS), V=st.sampled_from(DIMS), gate=st.sampled_from(GATES),
       has_h0=st.booleans())
def test_chunk_kda_matches_recurrence(seed, B, T, H, K, V, gate, has_h0):
    q, k, v, g, beta = make_inputs(seed, B, T, H, K, V, gate)
    h0 = torch.randn(B, H, K, V, device=DEV) if has_h0 else None
    o, S = chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    o_ref, S_ref = recurrent_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    check(o, S, o_ref, S_ref, 1e-4, 1e-4)
    assert o.dtype == v.dtype
    assert chunk_kda(q, k, v, g, beta, initial_state=h0)[1] is None


@settings(deadline=None, max_examples=25)
@given(seed=st.integers(0, 2**31), T=T_VALUES, H=st.integers(1, 3), K=st.sampled_from([8, 16]),
       gate=st.sampled_from(GATES), has_h0=st.booleans(), chunk_size=st.sampled_from([16, 64]))
def test_chunk_ref_matches_recurrence_fp64(seed, T, H, K, gate, has_h0, chunk_size):
    x = [t.cpu().double() for t in make_inputs(seed, 2, T, H, K, K, gate)]
    h0 = torch.randn(2, H, K, K, dtype=torch.float64) if has_h0 else None
    o, S = chunk_kda_ref(*x, initial_state=h0, output_final_state=True, chunk_size=chunk_size)
    o_ref, S_ref = recurrent_kda(*x, initial_state=h0, output_final_state=True)
    assert ratio(o, o_ref) < 1e-10 and ratio(S, S_ref) < 1e-10


@settings(deadline=None, max_examples=15)
@given(seed=st.integers(0, 2**31), T=st.integers(2, MAX_T), data=st.data(), gate=st.sampled_from(GATES))
def test_split_and_carry_state(seed, T, data, gate):
    split = data.draw(st.integers(1, T - 1), label='split')
    q, k, v, g, beta = make_inputs(seed, 1, T, 2, 16, 32, gate)
    o, S = chunk_kda(q, k, v, g, beta, output_final_state=True)
    first = [x[:, :split] for x in (q, k, v, g, beta)]
    second = [x[:, split:] for x in (q, k, v, g, beta)]   # non-contiguous views: the launcher copies them
    o1, S1 = chunk_kda(*first, output_final_state=True)
    o2, S2 = chunk_kda(*second, initial_state=S1, output_final_state=True)
    check(torch.cat([o1, o2], 1), S2, o, S, 1e-4, 1e-4)


@settings(deadline=None, max_examples=8)
@given(seed=st.integers(0, 2**31), N=st.integers(1, 32))
def test_delta_rule_retrieval(seed, N):
    """Orthonormal keys, beta = 1, g = 0: after writing (k_i, v_i), reading with k_i returns v_i."""
    gen = torch.Generator().manual_seed(seed)
    K = V = 32
    keys = torch.linalg.qr(torch.randn(K, K, generator=gen))[0][:N]      # [N, K] orthonormal rows
    values = torch.randn(N, V, generator=gen)
    # N writing tokens (q = 0), then N reading tokens (k = 0, beta = 0: they write nothing)
    q = torch.cat([torch.zeros(N, K), keys])[None, :, None]              # [1, 2N, 1, K]
    k = torch.cat([keys, torch.zeros(N, K)])[None, :, None]
    v = torch.cat([values, torch.zeros(N, V)])[None, :, None]
    beta = torch.cat([torch.ones(N), torch.zeros(N)])[None, :, None]
    g = torch.zeros_like(k)
    o, _ = chunk_kda(*(x.to(DEV) for x in (q, k, v, g, beta)), scale=1.0)
    torch.testing.assert_close(o[0, N:, 0].cpu(), values, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('kernel', [chunk_kda, fused_recurrent_kda])
@pytest.mark.parametrize('g_value', [0.0, -85.0, -1e4, -math.inf])
def test_extreme_gates_stay_finite(kernel, g_value):
    q, k, v, g, beta = make_inputs(0, 1, 100, 2, 16, 16, 'softplus')
    g = g.clone()
    g[:, ::3] = g_value                        # mixes the extreme value with Kimi gates near -85
    h0 = torch.randn(1, 2, 16, 16, device=DEV)
    o, S = kernel(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    o_ref, S_ref = recurrent_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    check(o, S, o_ref, S_ref, 1e-4, 1e-4)


@pytest.mark.skipif(not CUDA, reason='bf16 kernels need CUDA: the interpreter has no correct bf16 dot')
@settings(deadline=None, max_examples=6)
@given(seed=st.integers(0, 2**31), T=st.integers(1, 2048), gate=st.sampled_from(GATES),
       has_h0=st.booleans())
def test_bf16_on_gpu(seed, T, gate, has_h0):
    q, k, v, g, beta = make_inputs(seed, 2, T, 4, 128, 128, gate, dtype=torch.bfloat16)
    h0 = torch.randn(2, 4, 128, 128, device=DEV) if has_h0 else None
    o, S = chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    # the reference sees the same bf16-rounded inputs, upcast to fp32
    o_ref, S_ref = recurrent_kda(q.float(), k.float(), v.float(), g, beta, initial_state=h0,
                                 output_final_state=True)
    assert o.dtype == torch.bfloat16
    check(o, S, o_ref, S_ref, 5e-3, 1e-2)


@settings(deadline=None, max_examples=25)
@given(seed=st.integers(0, 2**31), B=st.integers(1, 2), T=st.integers(1, 8), H=st.integers(1, 2),
       K=st.sampled_from(DIMS), V=st.sampled_from(DIMS), gate=st.sampled_from(GATES),
       has_h0=st.booleans())
def test_fused_recurrent_matches_recurrence(seed, B, T, H, K, V, gate, has_h0):
    q, k, v, g, beta = make_inputs(seed, B, T, H, K, V, gate)
    h0 = torch.randn(B, H, K, V, device=DEV) if has_h0 else None
    h0_before = None if h0 is None else h0.clone()
    o, S = fused_recurrent_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    o_ref, S_ref = recurrent_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    check(o, S, o_ref, S_ref, 1e-5, 1e-5)      # the same arithmetic, token by token
    assert o.dtype == v.dtype
    assert h0 is None or torch.equal(h0, h0_before)          # functional, like recurrent_kda: h0 untouched
    assert fused_recurrent_kda(q, k, v, g, beta, initial_state=h0)[1] is None


@settings(deadline=None, max_examples=10)
@given(seed=st.integers(0, 2**31), T=st.integers(2, 24), data=st.data(), gate=st.sampled_from(GATES))
def test_decode_steps_match_one_pass(seed, T, data, gate):
    """Prefill with chunk_kda, then T = 1 steps carrying the state == one call over the whole sequence."""
    prefill = data.draw(st.integers(0, T - 1), label='prefill')
    x = make_inputs(seed, 2, T, 2, 16, 32, gate)
    h0 = torch.randn(2, 2, 16, 32, device=DEV)
    o, S = fused_recurrent_kda(*x, initial_state=h0, output_final_state=True)
    o_chunk, S_chunk = chunk_kda(*x, initial_state=h0, output_final_state=True)
    check(o_chunk, S_chunk, o, S, 1e-4, 1e-4)
    outs, state = [], h0
    if prefill:
        o_p, state = chunk_kda(*(t[:, :prefill] for t in x), initial_state=h0, output_final_state=True)
        outs.append(o_p)
    for t in range(prefill, T):
        o_t, state = fused_recurrent_kda(*(y[:, t:t + 1] for y in x), initial_state=state,
                                         output_final_state=True)
        outs.append(o_t)
    check(torch.cat(outs, 1), state, o, S, 1e-4 if prefill else 1e-6, 1e-4 if prefill else 1e-6)


@pytest.mark.skipif(not CUDA, reason='bf16 kernels need CUDA: the interpreter has no correct bf16 dot')
@settings(deadline=None, max_examples=6)
@given(seed=st.integers(0, 2**31), B=st.integers(1, 16), T=st.integers(1, 64), gate=st.sampled_from(GATES),
       has_h0=st.booleans())
def test_fused_recurrent_bf16_on_gpu(seed, B, T, gate, has_h0):
    q, k, v, g, beta = make_inputs(seed, B, T, 4, 128, 128, gate, dtype=torch.bfloat16)
    h0 = torch.randn(B, 4, 128, 128, device=DEV) if has_h0 else None
    o, S = fused_recurrent_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    o_ref, S_ref = recurrent_kda(q.float(), k.float(), v.float(), g, beta, initial_state=h0,
                                 output_final_state=True)
    assert o.dtype == torch.bfloat16
    check(o, S, o_ref, S_ref, 5e-3, 1e-2)


@pytest.mark.parametrize('kernel', [chunk_kda, fused_recurrent_kda])
@pytest.mark.parametrize('K, V', [(48, 32), (32, 512), (8, 16), (16, 100)])
def test_unsupported_dims_raise(kernel, K, V):
    q, k, v, g, beta = make_inputs(0, 1, 4, 1, K, V, 'logsigmoid')
    with pytest.raises(ValueError, match='powers of two from 16 to 256'):
        kernel(q, k, v, g, beta)
