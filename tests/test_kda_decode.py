"""Tests for kda_decode.py: the torch reference against kimi.KimiDeltaAttention's own decode step,
the fused kernel against the reference (Triton's CPU interpreter, K = 16 and 32), and the kernel at
the 48B sizes in bf16 on a GPU."""
import pytest
import torch

from fast import kda_decode
import kimi
from fast.kda_decode import kda_decode_ref, random_step
CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"     # kernels: compiled on a GPU, else the interpreter
U_BF16 = 2.0 ** -8          # bf16's unit roundoff
U_FP32 = 2.0 ** -24         # fp32's


def module_step(dtype, B=2, n=3, seed=0):
    """A tiny KimiDeltaAttention after an n-token prefill, and one decode token x [B, D]."""
    torch.manual_seed(seed)
    attn = kimi.KimiDeltaAttention(kimi.CONFIGS["tiny"]).to(DEV, dtype)
    with torch.no_grad():                   # fla's init leaves o_norm at ones: make it matter
        attn.o_norm.weight.uniform_(0.5, 1.5)
    attn.setup_cache(B, 16, dtype, DEV)
    D = attn.q_proj.in_features
    attn(torch.randn(B, n, D, dtype=dtype, device=DEV), start_pos=0)
    return attn, torch.randn(B, D, dtype=dtype, device=DEV)


def ref_args(attn, x, B):
    """kda_decode's arguments from the module's own Linear layers and copies of its caches."""
    return (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x), attn.f_a_proj(x), attn.g_a_proj(x),
            attn.b_proj(x), attn.conv_state[:, :B].clone(),
            (attn.q_conv1d.weight, attn.k_conv1d.weight, attn.v_conv1d.weight),
            attn.f_b_proj.weight, attn.g_b_proj.weight, attn.A_log, attn.dt_bias,
            attn.o_norm.weight, attn.o_norm.eps, attn.recurrent_state[:B].clone())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_reference_equals_module(dtype):
    B, n = 2, 3
    attn, x = module_step(dtype, B, n)
    args = ref_args(attn, x, B)
    o = kda_decode_ref(*args)
    want = attn(x[:, None], start_pos=n)[:, 0]          # the module updates its caches
    conv, S = args[6], args[14]
    # the conv state holds copies of inputs: exact
    assert torch.equal(conv, attn.conv_state[:, :B])
    # Same operations in the same order except the short conv's fp32 sum (conv1d's order vs ours):
    # a few fp32 ulps in fp32; in bf16 that can flip one rounding of q, k or v by one bf16 ulp,
    # which moves S by about that much relative to its largest entries.
    tol = 64 * U_FP32 if dtype == torch.float32 else 2 * U_BF16
    S_want = attn.recurrent_state[:B]
    assert (S - S_want).abs().max() <= tol * S_want.abs().max()
    # o_proj's output: the same up to the rounding of o_proj's own sum (fp32 exact up to ulps;
    # bf16: one rounding of o, one of the product, each 2^-8 relative of the largest output)
    got = attn.o_proj(o)
    tol = 64 * U_FP32 if dtype == torch.float32 else 4 * U_BF16
    assert (got.float() - want.float()).abs().max() <= tol * want.float().abs().max()


def kernel_vs_ref(args, dtype, splits=None):
    """Runs both on copies of the same caches; returns (o, conv, S) of the reference and of the
    kernel."""
    copies = [[a.clone() if torch.is_tensor(a) else a for a in args] for _ in range(2)]
    for c in copies:                        # keep conv_state a strided [:, :B] view of a cache
        base = torch.zeros(3, c[6].shape[1] + 2, *c[6].shape[2:], dtype=dtype, device=c[6].device)
        base[:, :c[6].shape[1]] = c[6]
        c[6] = base[:, :c[6].shape[1]]
    o_ref = kda_decode_ref(*copies[0])
    o = kda_decode.kda_decode(*copies[1], splits=splits)
    return (o_ref, copies[0][6], copies[0][14]), (o, copies[1][6], copies[1][14])


def check(ref, got, dtype):
    (o_ref, conv_ref, S_ref), (o, conv, S) = ref, got
    assert o.dtype == o_ref.dtype == dtype and o.shape == o_ref.shape
    assert torch.equal(conv, conv_ref)      # copies of inputs: exact
    # fp32 sums in another order: a few fp32 ulps, times the K-long reductions' growth (K <= 128)
    # for fp32 inputs. For bf16 inputs a conv output, f or the recurrence's o can round to the
    # other neighbour (one bf16 ulp, 2^-8) when the two orders straddle a rounding boundary;
    # that reaches S and then o (plus o's own last rounding): 2 ulps of the largest value.
    tol = 512 * U_FP32 if dtype == torch.float32 else 2 * U_BF16
    assert (S - S_ref).abs().max() <= tol * S_ref.abs().max()
    tol = 512 * U_FP32 if dtype == torch.float32 else 4 * U_BF16
    assert (o.float() - o_ref.float()).abs().max() <= tol * o_ref.float().abs().max()


@pytest.mark.parametrize("K", [16, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits", [1, 4])
def test_kernel_equals_reference(K, dtype, splits):
    """splits > 1: programs share a head, the last to finish norms it and shifts q's, k's states."""
    args = random_step(3, 2, K, 4, dtype, DEV, seed=K)
    check(*kernel_vs_ref(args, dtype, splits), dtype)
    assert not kda_decode.counters(args[0].device).any()     # the counters ready for the next step


def test_num_splits_fill_the_sms_at_small_batches():
    assert [kda_decode.num_splits(B, 32, "cpu") for B in (1, 2, 3, 16)] == [2, 2, 1, 1]


def test_counters_outlive_each_batch_size():
    """A CUDA graph keeps the counters' address: one tensor a device, whatever B comes next."""
    args = random_step(2, 2, 16, 4, torch.float32, DEV)
    first = kda_decode.counters(args[0].device)
    kda_decode.kda_decode(*args, splits=2)
    kda_decode.kda_decode(*random_step(16, 2, 16, 4, torch.float32, DEV), splits=2)
    assert kda_decode.counters(args[0].device) is first


def test_too_many_heads_for_the_counters_is_one_line():
    args = random_step(67, 2, 16, 4, torch.float32, DEV)                # 134 heads > 132
    with pytest.raises(ValueError, match=r"^kda_decode: 2 programs a head need B\*H <= 132"):
        kda_decode.kda_decode(*args, splits=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_extreme_gates(dtype):
    """softplus's linear branch (z > 20, a huge decay: exp(g) = 0, the state restarts) in head 0,
    and z = -30 in head 1 (softplus ~ 1e-13, no decay), where log(1 + exp(z)) would give 0."""
    args = list(random_step(2, 2, 16, 4, dtype, DEV, seed=1))
    args[11] = args[11] + torch.tensor([30.0, -30.0], device=DEV).repeat_interleave(16)
    check(*kernel_vs_ref(args, dtype), dtype)


@torch.no_grad()
def test_kernel_on_module():
    """The kernel on a tiny module's real caches, through o_proj, in fp32."""
    B, n = 2, 3
    attn, x = module_step(torch.float32, B, n, seed=1)
    args = ref_args(attn, x, B)
    got = attn.o_proj(kda_decode.kda_decode(*args))
    want = attn(x[:, None], start_pos=n)[:, 0]
    assert torch.equal(args[6], attn.conv_state[:, :B])
    # fp32 throughout, sums in other orders: a few hundred fp32 ulps of the largest value at most
    assert (got - want).abs().max() <= 512 * U_FP32 * want.abs().max()
    assert (args[14] - attn.recurrent_state[:B]).abs().max() <= 512 * U_FP32


@pytest.mark.skipif(not CUDA, reason="needs a GPU: the 48B sizes in bf16 on Triton's compiler")
@pytest.mark.parametrize("B", [1, 16])            # 2 programs a head, and 1, on 132 SMs
def test_kernel_gpu_48b(B):
    args = random_step(B, 32, 128, 4, torch.bfloat16, "cuda", Bmax=64, seed=B)
    for _ in range(3):                      # a few steps: the caches written by one are read next
        ref, got = kernel_vs_ref(args, torch.bfloat16)
        check(ref, got, torch.bfloat16)
        args = list(args)
        args[6], args[14] = got[1], got[2]
    assert not kda_decode.counters(args[0].device).any()
