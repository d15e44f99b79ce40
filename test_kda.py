"""
Property tests for KDA: kda_triton.chunk_kda, kda_triton.fused_recurrent_kda and
kda_ref.chunk_kda_ref against kda_ref.recurrent_kda.

Without a GPU the Triton kernels run in the CPU interpreter (importing kda_triton sets
TRITON_INTERPRET=1), which costs ~0.2 ms per 64x128 @ 128x64 dot, so CPU shapes stay small.
Errors are relative L2 norms, bounded in units of the dtype's rounding error u (docs/kda.md §7):
computed floats are never compared bit for bit, since another summation order, machine or thread
count changes the last bits.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings, strategies as st

# kda_triton first: without a GPU it selects the Triton interpreter before anything is compiled
from kda_triton import chunk_kda, fused_recurrent_kda
from kda_ref import chunk_kda_ref, kda_gate, l2norm, recurrent_kda

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
DIMS = [16, 128, 256] if CUDA else [16, 32, 64]   # K and V (few on GPU: each pair compiles)
CHUNK_K_FP32 = [16, 128] if CUDA else DIMS        # fp32 chunk_kda on a GPU: K <= 128 (see below)
MAX_T = 600 if CUDA else 150
# On a GPU nearly all the time is Triton compiling: every (K, V, dtype, initial state) draw compiles
# its own kernels, about 10 s each from a cold cache, so the fp32 sweep draws fewer examples there.
SWEEP = 10 if CUDA else 25
GATES = ["logsigmoid", "bounded", "softplus"]
NO_BF16_DOT = "bf16 kernels need CUDA: the interpreter has no correct bf16 dot"
# T = 1, T < 16, around one chunk, and ragged multi-chunk lengths
T_VALUES = st.one_of(st.sampled_from([1, 5, 15, 63, 64, 65, 128]), st.integers(1, MAX_T))


def unit_roundoff(dtype):
    """u: the largest relative error of one rounding to dtype (half its machine epsilon)."""
    return torch.finfo(dtype).eps / 2


U32 = unit_roundoff(torch.float32)              # 6.0e-8
U64 = unit_roundoff(torch.float64)              # 1.1e-16
U_BF16 = unit_roundoff(torch.bfloat16)          # 3.9e-3
# Chunked and token-by-token KDA add the same terms in different orders. Measured on CPU: at most
# ~40 u in fp32 and ~230 u in fp64; the bounds below leave room for GPU shapes (K 256, T 600).
REORDERED_32 = 2 ** 10 * U32                    # 6.1e-5
REORDERED_64 = 2 ** 14 * U64                    # 1.8e-12


def ratio(out, ref):
    """||out - ref|| / ||ref||, in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_inputs(seed, B, T, H, K, V, gate, dtype=torch.float32, device=DEV):
    """L2-normalised q, k; a gate from one of three regimes; sigmoid beta -> q, k, v, g, beta."""
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    q, k = l2norm(randn(B, T, H, K)), l2norm(randn(B, T, H, K))
    v = randn(B, T, H, V)
    if gate == "logsigmoid":        # mild: fla's test gate
        g = F.logsigmoid(randn(B, T, H, K))
    elif gate == "bounded":         # lower bound -5 nats per token
        g = -5 * torch.sigmoid(randn(B, T, H, K))
    else:                           # Kimi's unbounded softplus gate, exp(A_log) up to 16 (g ~ -85)
        A_log = torch.rand(H, generator=gen) * math.log(16)
        A_log[-1] = math.log(16)
        g = kda_gate(2 * randn(B, T, H, K), A_log, randn(H * K))
    beta = torch.sigmoid(randn(B, T, H))
    return [x.to(device) for x in (q.to(dtype), k.to(dtype), v.to(dtype), g, beta)]


def check(o, S, o_ref, S_ref, tol_o, tol_S):
    """Finite outputs, the reference's shapes, fp32 state, relative errors below the bounds."""
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    assert S.shape == S_ref.shape and S.dtype == torch.float32 and o.shape == o_ref.shape
    assert ratio(o, o_ref) < tol_o, f"o: {ratio(o, o_ref):.2e}"
    assert ratio(S, S_ref) < tol_S, f"S: {ratio(S, S_ref):.2e}"


@settings(deadline=None, max_examples=SWEEP)
@given(seed=st.integers(0, 2**31), B=st.integers(1, 2), T=T_VALUES, H=st.integers(1, 2),
       K=st.sampled_from(CHUNK_K_FP32), V=st.sampled_from(DIMS), gate=st.sampled_from(GATES),
       has_h0=st.booleans())
def test_chunk_kda_matches_recurrence(seed, B, T, H, K, V, gate, has_h0):
    q, k, v, g, beta = make_inputs(seed, B, T, H, K, V, gate)
    h0 = torch.randn(B, H, K, V, device=DEV) if has_h0 else None
    o, S = chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    o_ref, S_ref = recurrent_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    # fp32 in, fp32 (ieee) dots: only the summation order differs from the recurrence
    check(o, S, o_ref, S_ref, REORDERED_32, REORDERED_32)
    assert o.dtype == v.dtype


def test_chunk_kda_without_the_final_state():
    """output_final_state=False (the default): no state returned, the same output. One ragged
    two-chunk case with an initial state: the flag only skips the state's store, and each example
    of the sweep above would otherwise run the interpreter twice."""
    q, k, v, g, beta = make_inputs(0, 2, 100, 2, 16, 32, "softplus")
    h0 = torch.randn(2, 2, 16, 32, device=DEV)
    o, S = chunk_kda(q, k, v, g, beta, initial_state=h0)
    o_ref, _ = recurrent_kda(q, k, v, g, beta, initial_state=h0)
    assert S is None
    assert ratio(o, o_ref) < REORDERED_32       # fp32 throughout: only the summation order differs


@settings(deadline=None, max_examples=25)
@given(seed=st.integers(0, 2**31), T=T_VALUES, H=st.integers(1, 3), K=st.sampled_from([8, 16]),
       gate=st.sampled_from(GATES), has_h0=st.booleans(), chunk_size=st.sampled_from([16, 64]))
def test_chunk_ref_matches_recurrence_fp64(seed, T, H, K, gate, has_h0, chunk_size):
    x = [t.cpu().double() for t in make_inputs(seed, 2, T, H, K, K, gate)]
    h0 = torch.randn(2, H, K, K, dtype=torch.float64) if has_h0 else None
    o, S = chunk_kda_ref(*x, initial_state=h0, output_final_state=True, chunk_size=chunk_size)
    o_ref, S_ref = recurrent_kda(*x, initial_state=h0, output_final_state=True)
    # fp64 throughout: the WY/UT form is exact algebra, so only fp64 rounding in another order
    assert ratio(o, o_ref) < REORDERED_64, f"o: {ratio(o, o_ref):.2e}"
    assert ratio(S, S_ref) < REORDERED_64, f"S: {ratio(S, S_ref):.2e}"


# 8 examples: three chunk_kda calls each, the slowest test of the suite in the interpreter, and
# the sweep above already draws initial states at every length
@settings(deadline=None, max_examples=8)
@given(seed=st.integers(0, 2**31), T=st.integers(2, MAX_T), data=st.data(),
       gate=st.sampled_from(GATES))
def test_split_and_carry_state(seed, T, data, gate):
    split = data.draw(st.integers(1, T - 1), label="split")
    q, k, v, g, beta = make_inputs(seed, 1, T, 2, 16, 32, gate)
    o, S = chunk_kda(q, k, v, g, beta, output_final_state=True)
    first = [x[:, :split] for x in (q, k, v, g, beta)]
    # non-contiguous views: the launcher copies them
    second = [x[:, split:] for x in (q, k, v, g, beta)]
    o1, S1 = chunk_kda(*first, output_final_state=True)
    o2, S2 = chunk_kda(*second, initial_state=S1, output_final_state=True)
    # other chunk boundaries, so other summation orders (fp32 throughout)
    check(torch.cat([o1, o2], 1), S2, o, S, REORDERED_32, REORDERED_32)


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
    # exact in real arithmetic; fp32 sums over N <= 32 writes and K = 32 channels
    torch.testing.assert_close(o[0, N:, 0].cpu(), values, atol=REORDERED_32, rtol=REORDERED_32)


@pytest.mark.parametrize("kernel", [chunk_kda, fused_recurrent_kda])
@pytest.mark.parametrize("g_value", [0.0, -85.0, -1e4, -math.inf])
def test_extreme_gates_stay_finite(kernel, g_value):
    q, k, v, g, beta = make_inputs(0, 1, 100, 2, 16, 16, "softplus")
    g = g.clone()
    g[:, ::3] = g_value                        # mixes the extreme value with Kimi gates near -85
    h0 = torch.randn(1, 2, 16, 16, device=DEV)
    o, S = kernel(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    o_ref, S_ref = recurrent_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    # fp32 throughout; decays to exactly 0 must stay 0, not NaN (docs/kda.md §4)
    check(o, S, o_ref, S_ref, REORDERED_32, REORDERED_32)


@pytest.mark.skipif(not CUDA, reason="the shared-memory limit is a GPU one")
def test_fp32_chunk_with_k_256_is_refused_on_gpu():
    """fp32 tiles of K = 256 exceed a block's shared memory (H200: 278,528 of 232,448 bytes):
    a clear ValueError, not Triton's OutOfResources. bf16 at K = 256 fits (test_bf16_on_gpu)."""
    with pytest.raises(ValueError, match="pass bf16 ones, or use kda_ref"):
        chunk_kda(*make_inputs(0, 1, 64, 1, 256, 128, "logsigmoid"))


@pytest.mark.skipif(not CUDA, reason=NO_BF16_DOT)
@settings(deadline=None, max_examples=6)
@given(seed=st.integers(0, 2**31), T=st.integers(1, 2048), gate=st.sampled_from(GATES),
       has_h0=st.booleans(), K=st.sampled_from([16, 32, 128, 256]))
@example(seed=0, T=300, gate="softplus", has_h0=True, K=256)
@example(seed=0, T=100, gate="softplus", has_h0=True, K=16)     # these two once faulted
@example(seed=0, T=64, gate="softplus", has_h0=True, K=32)
def test_bf16_on_gpu(seed, T, gate, has_h0, K):
    V = K if K < 128 else 128           # K = V = 16, 32: the tiny and demo models' heads
    q, k, v, g, beta = make_inputs(seed, 2, T, 4, K, V, gate, dtype=torch.bfloat16)
    h0 = torch.randn(2, 4, K, V, device=DEV) if has_h0 else None
    o, S = chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    # the reference sees the same bf16-rounded inputs, upcast to fp32
    o_ref, S_ref = recurrent_kda(q.float(), k.float(), v.float(), g, beta, initial_state=h0,
                                 output_final_state=True)
    assert o.dtype == torch.bfloat16
    # w, u, qg, kg, Aqk and the dot operands of kernel 2's steps 2b and 4 and of the scan are
    # rounded to bf16 (each <= u): measured 0.85 u on o and 0.6 u on S (README); bounds 1.25 u and
    # 2.5 u
    check(o, S, o_ref, S_ref, 1.25 * U_BF16, 2.5 * U_BF16)


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
    # the same fp32 steps token by token; only the sums over K run in another order (measured 3 u)
    check(o, S, o_ref, S_ref, 2 ** 7 * U32, 2 ** 7 * U32)
    assert o.dtype == v.dtype
    # stored bytes, so bitwise: the kernel is functional like recurrent_kda and leaves h0 untouched
    assert h0 is None or torch.equal(h0, h0_before)
    assert fused_recurrent_kda(q, k, v, g, beta, initial_state=h0)[1] is None


@settings(deadline=None, max_examples=10)
@given(seed=st.integers(0, 2**31), T=st.integers(2, 24), data=st.data(),
       gate=st.sampled_from(GATES))
def test_decode_steps_match_one_pass(seed, T, data, gate):
    """Prefill with chunk_kda, then T = 1 steps carrying the state == one call over the sequence."""
    prefill = data.draw(st.integers(0, T - 1), label="prefill")
    x = make_inputs(seed, 2, T, 2, 16, 32, gate)
    h0 = torch.randn(2, 2, 16, 32, device=DEV)
    o, S = fused_recurrent_kda(*x, initial_state=h0, output_final_state=True)
    o_chunk, S_chunk = chunk_kda(*x, initial_state=h0, output_final_state=True)
    check(o_chunk, S_chunk, o, S, REORDERED_32, REORDERED_32)     # chunked vs token order, fp32
    outs = []
    state = h0
    if prefill:
        head = [t[:, :prefill] for t in x]
        o_p, state = chunk_kda(*head, initial_state=h0, output_final_state=True)
        outs.append(o_p)
    for t in range(prefill, T):
        o_t, state = fused_recurrent_kda(*(y[:, t:t + 1] for y in x), initial_state=state,
                                         output_final_state=True)
        outs.append(o_t)
    # without a prefill: the same kernel and operations, the state stored between steps in fp32 (an
    # exact round trip); 16 u allows for the compiler contracting differently (FMA). With a prefill:
    # chunked vs token order again.
    tol = REORDERED_32 if prefill else 2 ** 4 * U32
    check(torch.cat(outs, 1), state, o, S, tol, tol)


@pytest.mark.skipif(not CUDA, reason=NO_BF16_DOT)
@settings(deadline=None, max_examples=6)
@given(seed=st.integers(0, 2**31), B=st.integers(1, 16), T=st.integers(1, 64),
       gate=st.sampled_from(GATES), has_h0=st.booleans())
def test_fused_recurrent_bf16_on_gpu(seed, B, T, gate, has_h0):
    q, k, v, g, beta = make_inputs(seed, B, T, 4, 128, 128, gate, dtype=torch.bfloat16)
    h0 = torch.randn(B, 4, 128, 128, device=DEV) if has_h0 else None
    o, S = fused_recurrent_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    o_ref, S_ref = recurrent_kda(q.float(), k.float(), v.float(), g, beta, initial_state=h0,
                                 output_final_state=True)
    assert o.dtype == torch.bfloat16
    # fp32 arithmetic on the same rounded inputs; o is rounded to bf16 once at the store (<= u per
    # entry, so <= u in norm) and the state stays fp32
    check(o, S, o_ref, S_ref, U_BF16 + REORDERED_32, REORDERED_32)


@pytest.mark.parametrize("kernel", [chunk_kda, fused_recurrent_kda])
@pytest.mark.parametrize("K, V", [(48, 32), (32, 512), (8, 16), (16, 100)])
def test_unsupported_dims_raise(kernel, K, V):
    q, k, v, g, beta = make_inputs(0, 1, 4, 1, K, V, "logsigmoid")
    with pytest.raises(ValueError, match="powers of two from 16 to 256"):
        kernel(q, k, v, g, beta)


# ---- the backward: gradients of chunk_kda against fp64 autograd through the recurrence ----
BWD_K = [16, 128] if CUDA else [16, 32]           # K = 128 on CPU: one @example (interpreter time)
BWD_SWEEP = 6 if CUDA else 12
GRADS = ["dq", "dk", "dv", "dg", "dbeta", "dh0"]


def kda_grads(fn, inputs, h0, do, dht, dtype=None):
    """Gradients of (o * do).sum() + (ht * dht).sum() through fn, in dtype (None: as given) ->
    [dq, dk, dv, dg, dbeta] (+ dh0 with an initial state). dht None: o alone, no final state."""
    # fresh leaves: x.to(its own dtype) would be x itself, and gradients would accumulate there
    xs = [x.detach().to(dtype or x.dtype).clone() for x in inputs]
    if h0 is not None:
        xs.append(h0.detach().to(dtype or h0.dtype).clone())
    for x in xs:
        x.requires_grad_()
    o, S = fn(*xs[:5], initial_state=xs[5] if h0 is not None else None,
              output_final_state=dht is not None)
    loss = (o * do.to(o.dtype)).sum()
    if dht is not None:
        loss = loss + (S * dht.to(S.dtype)).sum()
    loss.backward()
    return [x.grad for x in xs]


def unsigned(x):
    """|x|, or None for None."""
    return None if x is None else x.abs()


def random_cotangents(seed, B, T, H, K, V, has_h0, final):
    """(h0, do, dht): random initial state (or None), output gradient, final-state gradient."""
    gen = torch.Generator().manual_seed(seed + 1)
    h0 = torch.randn(B, H, K, V, generator=gen) if has_h0 else None
    do = torch.randn(B, T, H, V, generator=gen)
    dht = torch.randn(B, H, K, V, generator=gen) if final else None
    return [None if x is None else x.to(DEV) for x in (h0, do, dht)]


@settings(deadline=None, max_examples=BWD_SWEEP)
@given(seed=st.integers(0, 2**31), T=st.sampled_from([1, 5, 15, 63, 64, 65, 100, 130]),
       H=st.integers(1, 2), K=st.sampled_from(BWD_K), V=st.sampled_from([16, 32]),
       gate=st.sampled_from(GATES), has_h0=st.booleans(), final=st.booleans())
@example(seed=1, T=70, H=1, K=128, V=16, gate="softplus", has_h0=True, final=True)
# a chunk ending in a mild gate after strong ones: exponents taken as differences of cumsums
# lost 1e-4 here (dv 34x chunk_kda_ref's error, docs/kda.md §5a)
@example(seed=1950, T=15, H=1, K=16, V=16, gate="softplus", has_h0=False, final=True)
# ill-conditioned sums: dbeta = scale (q . k)(do . v), whose terms cancel (see the bound)
@example(seed=551567, T=1, H=1, K=16, V=16, gate="logsigmoid", has_h0=False, final=False)
@example(seed=127818190, T=1, H=1, K=16, V=16, gate="logsigmoid", has_h0=False, final=False)
def test_chunk_kda_backward_matches_fp64(seed, T, H, K, V, gate, has_h0, final):
    inputs = make_inputs(seed, 1, T, H, K, V, gate)
    h0, do, dht = random_cotangents(seed, 1, T, H, K, V, has_h0, final)
    ours = kda_grads(chunk_kda, inputs, h0, do, dht)
    ref = kda_grads(recurrent_kda, inputs, h0, do, dht, torch.float64)
    chunked = kda_grads(chunk_kda_ref, inputs, h0, do, dht, torch.float32)
    recurrent = kda_grads(recurrent_kda, inputs, h0, do, dht, torch.float32)
    # the size of each gradient's terms: fp64 gradients with the signs of q, k, v, the initial
    # state and the cotangents removed (g <= 0 and beta > 0 already), so that nothing cancels
    q, k, v, g, beta = inputs
    terms = kda_grads(recurrent_kda, [q.abs(), k.abs(), v.abs(), g, beta], unsigned(h0),
                      do.abs(), unsigned(dht), torch.float64)
    for name, x, c, c2, r, a in zip(GRADS, ours, chunked, recurrent, ref, terms):
        assert torch.isfinite(x).all(), name
        assert x.dtype == torch.float32 and x.shape == r.shape, name
        if r.norm() == 0:
            # dg with T = 1 and no initial state: the gate decays a zero state. The kernel's terms
            # cancel exactly there (a - a), so its gradient is 0 too.
            assert x.norm() == 0, name
            continue
        # The kernel against fp32 forms of the same math: its exponents are direct sums of
        # gates where chunk_kda_ref subtracts cumulative sums (docs/kda.md §5a); it measured
        # 0.01-1.3x chunk_kda_ref's error, above 1x only where both sit at fp32's rounding floor
        # (~1e-7, where which is lower is chance). Hence 2x the fp32 forms' error plus that
        # floor: 2^5 u (1.9e-6; the worst of 40 random draws used 0.43 of it with 2^4 u), or
        # 2 u per unit of cond = |terms| / |gradient| where it passes 16: rounding errors scale
        # with the terms, not with what is left after they cancel, and any fp32 form can be
        # lucky there. 30 random draws: cond 0.7 to 7, dbeta's 2 to 77. At T = 1, dbeta =
        # scale (q . k)(do . v): cond 431 and 105 for the two draws above, the kernel's error
        # 5.1e-6 and 4.2e-6 where the fp32 forms erred by 4.2e-7 / 5.9e-6 and 1.4e-7 / 8.9e-7.
        cond = (a.norm() / r.norm()).item()
        floor = max(ratio(c, r), ratio(c2, r))
        assert ratio(x, r) <= 2 * floor + 2 * U32 * max(16, cond), \
            f"{name}: {ratio(x, r):.2e} vs the fp32 forms' {ratio(c, r):.2e}, " \
            f"{ratio(c2, r):.2e}, cond {cond:.0f}"


@pytest.mark.parametrize("g_value", [-1e4, -math.inf])
def test_backward_extreme_gates(g_value):
    q, k, v, g, beta = make_inputs(0, 1, 100, 2, 16, 16, "softplus")
    g = g.clone()
    g[:, ::3] = g_value                        # mixes the extreme value with Kimi gates near -85
    h0, do, dht = random_cotangents(0, 1, 100, 2, 16, 16, True, True)
    ours = kda_grads(chunk_kda, [q, k, v, g, beta], h0, do, dht)
    ref = kda_grads(recurrent_kda, [q, k, v, g, beta], h0, do, dht, torch.float64)
    # (chunk_kda_ref's gradients are NaN here: it subtracts -inf from -inf.) The kernel's g is
    # clamped at G_FLOOR, whose derivative is 0 below it, as exp(g) makes the true one. fp32 in
    # another order than the recurrence's, exponents summed directly: measured at most 5 u (dg);
    # bound 2^6 u.
    for name, x, r in zip(GRADS, ours, ref):
        assert torch.isfinite(x).all(), name
        assert ratio(x, r) < 2 ** 6 * U32, f"{name}: {ratio(x, r):.2e}"


def test_backward_of_the_final_state_alone():
    """Only ht in the loss (o's gradient is None), an initial state that needs no gradient."""
    q, k, v, g, beta = x = [t.requires_grad_() for t in make_inputs(0, 1, 40, 1, 16, 16, "bounded")]
    h0, _, dht = random_cotangents(0, 1, 40, 1, 16, 16, True, True)
    (chunk_kda(*x, initial_state=h0, output_final_state=True)[1] * dht).sum().backward()
    ours = [t.grad for t in x]
    ref = kda_grads(recurrent_kda, x, h0, torch.zeros_like(v), dht, torch.float64)
    for name, a, r in zip(GRADS, ours, ref):     # fp32, as above: measured 16 u (dg)
        assert ratio(a, r) < 2 ** 6 * U32, f"{name}: {ratio(a, r):.2e}"


def test_scratch_memory_is_never_read_unwritten(monkeypatch):
    """torch.empty's memory holds whatever was there (on a GPU, another kernel's NaNs, say). With
    every tensor the forward and the backward allocate filled with NaN, a ragged last chunk
    (T = 70: 58 padded rows, which kernel 1 has no program for) gives the gradients, output and
    state of the same call on ordinary memory."""
    inputs = make_inputs(3, 1, 70, 2, 16, 16, "softplus")
    h0, do, dht = random_cotangents(3, 1, 70, 2, 16, 16, True, True)
    want = kda_grads(chunk_kda, inputs, h0, do, dht)
    with torch.no_grad():
        o_want, S_want = chunk_kda(*inputs, initial_state=h0, output_final_state=True)
    for name in ("empty", "empty_like"):
        alloc = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, alloc=alloc, **kw: nan_filled(alloc(*a, **kw)))
    got = kda_grads(chunk_kda, inputs, h0, do, dht)
    with torch.no_grad():
        o, S = chunk_kda(*inputs, initial_state=h0, output_final_state=True)
    monkeypatch.undo()
    # the same kernels on the same inputs: only a read of unwritten memory could tell them apart
    # (as NaN); 16 u for FMA contraction differing between compiled variants
    check(o, S, o_want, S_want, 2 ** 4 * U32, 2 ** 4 * U32)
    for name, a, r in zip(GRADS, got, want):
        assert torch.isfinite(a).all(), name
        assert ratio(a, r) < 2 ** 4 * U32, f"{name}: {ratio(a, r):.2e}"


def nan_filled(t):
    """t with every float element NaN (integer tensors as they are)."""
    return t.fill_(math.nan) if t.is_floating_point() else t


def test_inference_path_builds_no_graph():
    x = [t.requires_grad_() for t in make_inputs(0, 1, 70, 2, 16, 16, "softplus")]
    with torch.no_grad():
        o, S = chunk_kda(*x, output_final_state=True)
    assert o.grad_fn is None and S.grad_fn is None      # the plain forward: nothing kept for later
    o_grad, S_grad = chunk_kda(*x, output_final_state=True)
    assert o_grad.grad_fn is not None and S_grad.grad_fn is not None
    # the same arithmetic either way (the stores for the backward change none of it); 16 u allows
    # for the compiler contracting otherwise (FMA) in the two compiled variants
    check(o_grad.detach(), S_grad.detach(), o, S, 2 ** 4 * U32, 2 ** 4 * U32)


@pytest.mark.skipif(not CUDA, reason=NO_BF16_DOT)
@settings(deadline=None, max_examples=4)
@given(seed=st.integers(0, 2**31), T=st.integers(1, 1024), gate=st.sampled_from(GATES),
       has_h0=st.booleans(), K=st.sampled_from([128, 256]))
@example(seed=0, T=1000, gate="softplus", has_h0=True, K=128)
def test_backward_bf16_on_gpu(seed, T, gate, has_h0, K):
    inputs = make_inputs(seed, 2, T, 4, K, 128, gate, dtype=torch.bfloat16)
    h0, do, dht = random_cotangents(seed, 2, T, 4, K, 128, has_h0, True)
    ours = kda_grads(chunk_kda, inputs, h0, do.bfloat16(), dht)
    # the reference sees the same bf16-rounded inputs and do, upcast to fp64
    ref = kda_grads(recurrent_kda, inputs, h0, do.bfloat16(), dht, torch.float64)
    assert [x.dtype for x in ours[:3]] == [torch.bfloat16] * 3
    # w, qg, kg, Aqk, the states, v_new and dS' are stored in bf16 and both scans multiply bf16
    # operands (each rounding <= u), as the forward does (0.8 u on o); dq, dk, dv are rounded to
    # bf16 once more at the store: 2 u (7.8e-3, fla's bar for them is 8e-3). dg and dbeta are
    # differences of larger terms: 5 u (2.0e-2, fla's is 2e-2).
    bounds = [2 * U_BF16] * 3 + [5 * U_BF16] * 2 + [2 * U_BF16]
    for name, x, r, tol in zip(GRADS, ours, ref, bounds):
        assert torch.isfinite(x).all(), name
        assert ratio(x, r) < tol, f"{name}: {ratio(x, r):.2e}"
