"""Tests for mla_decode.py: the reference and absorbed_attention against
kimi.MLAAttention.attend_absorbed (a tiny module, fp32), the cache write and the per-head products
against kimi's torch code, the split-K kernel against the reference in Triton's CPU interpreter
(tiny sizes, int and tensor pos, left padding, empty splits), and on a GPU at the 48B sizes in
bf16, in a CUDA graph."""
import pytest
import torch
from hypothesis import example, given, settings, strategies as st

from fast import mla_decode
import kimi
from kimi import latent_attention
CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"     # kernels: compiled on a GPU, else the interpreter
TINY = kimi.CONFIGS["tiny"]
U_BF16 = 2.0 ** -8          # bf16's unit roundoff: 8 significant bits, round to nearest
FP32_SLACK = 2.0 ** -14     # fp32 accumulation noise beside a bf16 bound (~1e-2 here)


def inputs(B, H, R, PE, L, pos, with_pad, dtype, device="cpu", seed=0):
    """q [B, H, R + PE], cache [B, L, R + PE], pad [B] with pad[b] <= pos (or None)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, R + PE, generator=gen)
    cache = torch.randn(B, L, R + PE, generator=gen)
    pad = torch.randint(0, pos + 1, (B,), generator=gen) if with_pad else None
    move = dict(device=device)
    return (q.to(dtype=dtype, **move), cache.to(dtype=dtype, **move),
            None if pad is None else pad.to(**move))


@pytest.mark.parametrize("pos_tensor", [False, True])
@pytest.mark.parametrize("with_pad", [False, True])
def test_reference_equals_attend_absorbed(pos_tensor, with_pad):
    """A tiny MLA module: prefill 9 tokens (left-padded rows), then one decode step at pos 9."""
    torch.manual_seed(0)
    B, T, Lmax = 3, 9, 16
    attn = kimi.MLAAttention(TINY)
    attn.setup_cache(B, Lmax, torch.float32, "cpu")
    x = torch.randn(B, T + 1, TINY.hidden_size)
    pad = torch.tensor([0, 3, 8]) if with_pad else None
    with torch.no_grad():
        attn(x[:, :T], start_pos=0, pad=pad)                       # fills the cache
        H, nope, pe, R = attn.H, attn.nope, attn.pe, attn.R
        q = attn.q_proj(x[:, T]).view(B, H, nope + pe)
        c, k_pe = attn.kv_a_proj_with_mqa(x[:, T:]).split([R, pe], dim=-1)
        ckv = torch.cat([attn.kv_a_layernorm(c), k_pe], dim=-1)    # [B, 1, R + pe]
        pos = torch.tensor(T) if pos_tensor else T
        want = attn.attend_absorbed(q, ckv, pos, pad)              # [B, 1, H, 128]; writes ckv
        w_uk, w_uv = attn.kv_b_proj.weight.view(H, nope + attn.v, R).split([nope, attn.v], 1)
        q_nope, q_pe = q.split([nope, pe], dim=-1)
        q_lat = torch.einsum("bhd,hdr->bhr", q_nope, w_uk)         # absorbed, as the module does
        o_lat = latent_attention(torch.cat([q_lat, q_pe], -1), attn.kv_cache[:B], pos, attn.scale,
                               pad, kv_lora_rank=R)
        got = torch.einsum("bhr,hdr->bhd", o_lat, w_uv)[:, None]
        on = lambda t: t.to(DEV) if torch.is_tensor(t) else t                   # noqa: E731
        fused = mla_decode.absorbed_attention(on(q), on(attn.kv_b_proj.weight),
                                              on(attn.kv_cache[:B]), on(pos), attn.scale, on(pad),
                                              v_head_dim=attn.v).cpu()               # kernels
    # fp32, the same operations up to a buffer that ends at pos vs one masked after it (and the
    # kernels' sums in another order): a few fp32 roundings of O(1) values
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused[:, None], want, rtol=1e-5, atol=1e-5)


@settings(max_examples=10, deadline=None)
@given(B=st.integers(1, 3), sizes=st.sampled_from([(32, 8), (512, 64)]), pos_tensor=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2 ** 16))
def test_write_latent_equals_the_cache_write(B, sizes, pos_tensor, dtype, seed):
    """write_latent = attend_absorbed's write of cat([kv_a_layernorm(c), k_pe]) at pos, c and k_pe
    column slices of one projection output (as the step has them); nothing else written. The tiny
    and the 48B sizes, compiled on a GPU, in the interpreter on a CPU."""
    R, PE = sizes
    gen = torch.Generator().manual_seed(seed)
    norm = kimi.RMSNorm(R, eps=1e-6)
    norm.weight.data = torch.rand(R, generator=gen) + 0.5
    norm = norm.to(dtype)
    kv = torch.randn(B, 7 + R + PE, generator=gen).to(dtype)              # [.. | c | k_pe]
    c, k_pe = kv[:, 7:7 + R], kv[:, 7 + R:]
    cache = torch.randn(B, 20, R + PE, generator=gen).to(dtype)
    with torch.no_grad():
        want = torch.cat([norm(c), k_pe], dim=-1)                       # kimi's torch path (CPU)
    pos = 11
    got = cache.to(DEV)
    mla_decode.write_latent(c.to(DEV), k_pe.to(DEV), norm.weight.data.to(DEV), norm.eps, got,
                            torch.tensor(pos, device=DEV) if pos_tensor else pos)
    got = got.cpu()
    others = torch.ones(20, dtype=torch.bool)
    others[pos] = False
    assert torch.equal(got[:, others], cache[:, others])                # stored bytes: untouched
    assert torch.equal(got[:, pos, R:], k_pe)                           # copied
    # fp32 arithmetic in another order: the sum of R squares (at most R 2^-24 relative, halved by
    # the square root), rsqrt and the two products on either side (a few 2^-24 each); in bf16 each
    # of the two roundings to bf16 may then tip one unit (2^-8 relative)
    fp32 = (R / 2 + 6) * 2.0 ** -24
    rtol = fp32 if dtype == torch.float32 else fp32 + 2 * U_BF16
    torch.testing.assert_close(got[:, pos, :R].float(), want[:, :R].float(), rtol=rtol, atol=0)
    with pytest.raises(ValueError, match="position 20 outside the cache's 20"):
        mla_decode.write_latent(c.to(DEV), k_pe.to(DEV), norm.weight.data.to(DEV), norm.eps,
                                cache.to(DEV), 20)


@settings(max_examples=12, deadline=None)
@given(B=st.sampled_from([1, 3, 17]), H=st.integers(1, 3), K=st.integers(1, 150),
       N=st.integers(1, 70), transposed=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_heads_matmul_matches_einsum(B, H, K, N, transposed, seed):
    """fp32 in the interpreter: ragged K and N, more rows than one 16-row block (B = 17), and the
    weight as a transposed view (W_uv's [H, R, V] from kv_b_proj's [H, V, R] rows)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, H, K, generator=gen).to(DEV)
    w = torch.randn(H, N, K, generator=gen).to(DEV).transpose(1, 2) if transposed else \
        torch.randn(H, K, N, generator=gen).to(DEV)
    want = torch.einsum("bhk,hkn->bhn", x, w)
    # fp32 both: sums of <= 150 O(1) products in another order, ~sqrt(K) 2^-24 relative each
    torch.testing.assert_close(mla_decode.heads_matmul(x, w), want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (the 48B sizes in bf16)")
@pytest.mark.parametrize("B", [1, 16])
def test_heads_matmul_gpu_48b_bf16(B):
    """W_uk (x [B, 32, 128] times [32, 128, 512]) and W_uv (o_lat [B, 32, 512] times kv_b_proj's
    rows transposed) as absorbed_attention views them, against the fp64 product of the same bf16
    operands: the kernel sums in fp32 and rounds once to bf16."""
    H, nope, V, R = 32, 128, 128, 512
    gen = torch.Generator().manual_seed(B)
    kv_b = (torch.randn(H * (nope + V), R, generator=gen) * R ** -0.5).to("cuda", torch.bfloat16)
    w = kv_b.view(H, nope + V, R)
    for K, weight in ((nope, w[:, :nope]), (R, w[:, nope:].transpose(1, 2))):
        x = torch.randn(B, H, K, generator=gen).to("cuda", torch.bfloat16)
        got = mla_decode.heads_matmul(x, weight).double()
        exact = torch.einsum("bhk,hkn->bhn", x.double(), weight.double())
        mags = torch.einsum("bhk,hkn->bhn", x.double().abs(), weight.double().abs())
        # one rounding to bf16 (2^-8 relative) after fp32 sums (K 2^-24 of the magnitudes)
        bound = U_BF16 * exact.abs() + K * 2.0 ** -24 * mags
        assert ((got - exact).abs() <= bound).all(), f"K = {K}: beyond one bf16 rounding"


@settings(max_examples=25, deadline=None)
@given(B=st.sampled_from([1, 3]), H=st.sampled_from([2, 4]), L=st.integers(1, 300),
       pos_frac=st.floats(0, 1), pos_tensor=st.booleans(), with_pad=st.booleans(),
       seed=st.integers(0, 2 ** 16))
@example(B=3, H=2, L=300, pos_frac=0.0, pos_tensor=True, with_pad=True, seed=1)   # one key
@example(B=1, H=4, L=300, pos_frac=1.0, pos_tensor=False, with_pad=False, seed=2)  # all splits
def test_kernel_matches_reference_interpreter(B, H, L, pos_frac, pos_tensor, with_pad, seed):
    """Tiny config (R = 32, PE = 8) in fp32: heads and PE padded to 16, many splits of 32 keys
    (BL = 16 in the interpreter), empty splits when pos is far below the buffer's end."""
    R, PE = TINY.kv_lora_rank, TINY.qk_rope_head_dim
    pos = round(pos_frac * (L - 1))
    q, cache, pad = inputs(B, H, R, PE, L, pos, with_pad, torch.float32, DEV, seed=seed)
    pos = torch.tensor(pos, device=DEV) if pos_tensor else pos
    want = latent_attention(q, cache, pos, 0.2, pad, kv_lora_rank=R)
    got = mla_decode.mla_decode(q, cache, pos, 0.2, pad, kv_lora_rank=R)
    # fp32 both: sums of <= 40 products and an online softmax in another order, O(1) values;
    # a few hundred fp32 roundings (2^-24 each) stay far below 1e-5
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads", [16, 64])
def test_kernel_with_heads_padded_to_64(heads, monkeypatch):
    """SPLIT's HEADS = 64 pads the query rows to 64 (Hopper's warpgroup MMA): the padding rows
    (q = 0) stay finite and are never stored, so the result is the same attention (fp32, as the
    interpreter test above: 1e-5); every split of a 300-key buffer, left padding."""
    monkeypatch.setitem(mla_decode.SPLIT, "HEADS", heads)
    R, PE = TINY.kv_lora_rank, TINY.qk_rope_head_dim
    q, cache, pad = inputs(3, 4, R, PE, 300, 299, True, torch.float32, DEV, seed=5)
    want = latent_attention(q, cache, 299, 0.2, pad, kv_lora_rank=R)
    got = mla_decode.mla_decode(q, cache, 299, 0.2, pad, kv_lora_rank=R)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_kernel_bf16_interpreter_and_cache_view():
    """bf16 inputs (fp32 dots in the interpreter) on a view of a larger buffer (rows :B)."""
    R, PE = TINY.kv_lora_rank, TINY.qk_rope_head_dim
    q, buffer, pad = inputs(4, 2, R, PE, 100, 80, True, torch.bfloat16, DEV)
    cache = buffer[:3]                                              # batch stride of 4 rows' worth
    want = latent_attention(q[:3], cache, 80, 0.2, pad[:3], kv_lora_rank=R).float()
    got = mla_decode.mla_decode(q[:3], cache, 80, 0.2, pad[:3], kv_lora_rank=R).float()
    # bf16 output: the reference rounds the normalised p and o (2^-8 relative each), the kernel
    # only o here; |o| <= max |c| ~ 4, so 3 roundings of values <= 4 bound the difference
    torch.testing.assert_close(got, want, rtol=3 * U_BF16, atol=3 * U_BF16 * 4)


def gpu_bound(q, cache, pos, scale, pad, want):
    """|kernel - reference| allowed in bf16: both round p_j (2^-8 relative; the kernel its
    unnormalised 2^(s - m), the reference p itself) and o once: 2 * 2^-8 sum_j p_j |c_j| + |o|."""
    R = want.shape[-1]
    L = cache.shape[1]
    scores = torch.bmm(q.float(), cache.float().mT) * scale
    j = torch.arange(L, device=q.device)
    hidden = (j > pos) | (j < (pad[:, None] if pad is not None else 0))
    p = scores.masked_fill(hidden.view(-1, 1, L), float("-inf")).softmax(-1)
    return 2 * U_BF16 * (p @ cache[..., :R].float().abs()) + 2 * U_BF16 * want.float().abs()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (the 48B sizes in bf16)")
@pytest.mark.parametrize("L", [1, 4096, 100000])
@pytest.mark.parametrize("pos_tensor", [False, True])
@pytest.mark.parametrize("config", [{}, dict(BL=32, HEADS=64, num_stages=3)],
                         ids=["default", "64-heads"])
def test_kernel_gpu_48b(L, pos_tensor, config, monkeypatch):
    """H = 32, R = 512, PE = 64, bf16; a tensor pos reads a buffer 3000 keys longer than pos.
    config: SPLIT as it is, and with the query rows padded to 64 (the warpgroup MMA's path)."""
    monkeypatch.setattr(mla_decode, "SPLIT", dict(mla_decode.SPLIT, **config))
    H, R, PE, B = 32, 512, 64, 2
    Lmax = L + 3000 if pos_tensor else L
    q, cache, pad = inputs(B, H, R, PE, Lmax, L - 1, True, torch.bfloat16, "cuda")
    pos = torch.tensor(L - 1, device="cuda") if pos_tensor else L - 1
    want = latent_attention(q, cache, pos, 192 ** -0.5, pad, kv_lora_rank=R)
    got = mla_decode.mla_decode(q, cache, pos, 192 ** -0.5, pad, kv_lora_rank=R)
    bound = gpu_bound(q, cache, pos, 192 ** -0.5, pad, want)
    excess = ((got.float() - want.float()).abs() - bound).max().item()
    # FP32_SLACK: the fp32 sums under both (and the bound) over up to 1e5 keys, ~sqrt(L) 2^-24
    assert excess <= FP32_SLACK, f"bf16 error beyond the bound by {excess}"


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (CUDA graphs)")
def test_kernel_gpu_cuda_graph():
    """One captured call serves every pos: replays at other positions equal fresh calls."""
    H, R, PE, B, Lmax = 32, 512, 64, 1, 20000
    q, cache, _ = inputs(B, H, R, PE, Lmax, 0, False, torch.bfloat16, "cuda")
    pos = torch.tensor(0, device="cuda")
    mla_decode.mla_decode(q, cache, pos, 0.1, kv_lora_rank=R)     # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mla_decode.mla_decode(q, cache, pos, 0.1, kv_lora_rank=R)
    for p in (0, 5, 4095, 19999):
        pos.fill_(p)
        graph.replay()
        fresh = mla_decode.mla_decode(q, cache, p, 0.1, kv_lora_rank=R)
        # an int pos picks NUM_SPLITS from pos + 1, so the tiles' maxima and the roundings of p
        # differ from the replay's: the same bf16 bound as against the reference
        excess = ((out.float() - fresh.float()).abs() - gpu_bound(q, cache, p, 0.1, None, fresh))
        assert excess.max().item() <= FP32_SLACK, f"pos {p}: beyond the bf16 bound"
