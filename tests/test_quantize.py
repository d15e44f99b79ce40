"""Tests for fast/fp8.py and fast/quantize.py (FP8 weights): e4m3's error bound, the products
against references with outlier channels, the kernels (Triton's CPU interpreter; bf16 and the FP8
GEMMs on a GPU), loading a tiny checkpoint in FP8, the FP8 folder round trip and broken FP8
folders."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from safetensors.torch import load_file, save_file

import kimi
from fast import fp8 as fast_fp8, moe as fast_moe, quantize
from fast.fp8 import (DECODE_ROWS, FP8, dequantize, fp8_experts, fp8_linear, fp8_rows,
                      fp8_sorted_experts, quantize_once, quantize_rows, quantize_rows_triton,
                      scaled_linear)
from fast.quantize import SCALE
from helpers import ROOT, randomize
from kimi import CheckpointError, Transformer

CUDA = torch.cuda.is_available()
FP8_GPU = CUDA and torch.cuda.get_device_capability() >= (8, 9)
NEEDS_FP8_GPU = "needs a GPU with FP8 (compute capability >= 8.9)"
U = 2.0 ** -4           # e4m3's unit roundoff: 3 stored mantissa bits, round to nearest
SUB = 2.0 ** -10        # half of e4m3's subnormal step 2^-9, in units of the scale
U_BF16 = 2.0 ** -8      # bf16's unit roundoff (the outputs' last rounding)
TINY = kimi.CONFIGS["tiny"]


def with_outliers(shape, channels, magnitude, seed):
    """Normal values whose last-dim channels `channels` (a few) are `magnitude` times larger, as
    real activations and weights have; rounded to bf16 like a checkpoint's weights."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=gen)
    t[..., channels] *= magnitude
    return t.bfloat16()


def e4m3_error(v, scale):
    """Largest |dequantize(quantize(v)) - v|: 2^-4 |v| in e4m3's normal range, else 2^-10 scale."""
    return torch.maximum(U * v.double().abs(), SUB * scale.double())


def product_bound(x, w, dx, dw, out_unit):
    """Bound on |out - x @ w.T| when out sums (x + ex)(w + ew) over K, |ex| <= dx, |ew| <= dw, in
    fp32 (K 2^-24 of the sum of |terms|) and is then rounded with unit roundoff out_unit."""
    x, w = x.double().abs(), w.double().abs()
    rounding = dx @ (w + dw).T + x @ dw.T                           # the operands' e4m3 rounding
    terms = (x + dx) @ (w + dw).T
    accumulate = x.shape[-1] * 2.0 ** -24 * terms
    return rounding + accumulate + out_unit * (x @ w.T + rounding + accumulate)


# -------------------------------------------------------------------------------------------------
# The format

@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 300), magnitude=st.sampled_from([1, 20, 100]),
       zero_row=st.booleans(), seed=st.integers(0, 2**16))
def test_round_trip_within_e4m3_bound(rows, cols, magnitude, zero_row, seed):
    w = with_outliers((rows, cols), [seed % cols], magnitude, seed).float()
    if zero_row:
        w[0] = 0
    q, scale = quantize_rows(w)
    assert q.dtype == FP8 and scale.shape == (rows, 1) and scale.dtype == torch.float32
    mantissa, _ = torch.frexp(scale)
    assert (mantissa == 0.5).all()                                  # powers of two
    top = q.float().abs().amax(-1)
    # the largest |w| of a row lands in (224, 448] before rounding: the top binade is used
    assert (top <= 448).all() and (top[w.abs().amax(-1) > 0] >= 224).all()
    back = dequantize(q, scale)
    assert ((back.double() - w.double()).abs() <= e4m3_error(w, scale)).all()
    assert torch.equal(dequantize(q, scale, torch.bfloat16).float(), back)   # exact in bf16 too


# -------------------------------------------------------------------------------------------------
# Products against an fp64 reference, on inputs with outlier channels

OUTLIERS = [3, 17, 40]          # input channels at 20-100x, in both x and w (as real layers)


def outlier_inputs(M, K, N, seed):
    mags = torch.tensor([20.0, 60.0, 100.0])
    x = with_outliers((M, K), OUTLIERS, mags, seed)
    w = with_outliers((N, K), OUTLIERS[::-1], mags, seed + 1) * K ** -0.5
    return x, w


@pytest.mark.parametrize("path", ["dequantise", "scaled_mm"])
def test_fp8_linear_matches_reference_within_e4m3_bound(path):
    """The two products: dequantised weights (the model on a CPU), and F.scaled_mm with x
    quantised per token (the prefill's arithmetic; CPU builds of torch 2.13 have it too)."""
    x, w = outlier_inputs(24, 96, 80, seed=1)
    q, scale = quantize_rows(w)
    dw = e4m3_error(w, scale)
    if path == "dequantise":
        out = fp8_linear(x, q, scale)
        dx = torch.zeros_like(x, dtype=torch.float64)
    else:                                   # on the FP8 GPU if there is one, else on the CPU
        dev = "cuda" if FP8_GPU else "cpu"
        try:
            out = scaled_linear(x.to(dev), q.to(dev), scale.to(dev)).cpu()
        except NotImplementedError:         # CUDA builds of torch 2.11 have no CPU F.scaled_mm
            pytest.skip("this torch build has no F.scaled_mm on the CPU")
        dx = e4m3_error(x, quantize_rows(x)[1])
    assert out.dtype == torch.bfloat16
    error = (out.double() - x.double() @ w.double().T).abs()
    assert (error <= product_bound(x, w, dx, dw, U_BF16)).all()
    # and the outliers did not cost the other channels their precision: relative error ~ e4m3's
    assert error.norm() / (x.double() @ w.double().T).norm() < U


@pytest.mark.skipif(not FP8_GPU, reason=NEEDS_FP8_GPU)
@pytest.mark.parametrize("M", [1, 4, 16, 64, 300])
@pytest.mark.parametrize("layout", ["rows", "columns"])
def test_fp8_linear_on_gpu_within_e4m3_bound(M, layout):
    """M <= 16: the decode kernel (bf16 x, exact bf16 tl.dot of e4m3 weights: _rows_kernel); more:
    scaled_mm. x in either layout: attention outputs arrive as transposes, with strided columns."""
    x, w = outlier_inputs(M, 2304, 512, seed=M)
    q, scale = quantize_rows(w)
    x_gpu = x.cuda() if layout == "rows" else x.T.contiguous().cuda().T
    out = fp8_linear(x_gpu, q.cuda(), scale.cuda()).cpu()
    dx = torch.zeros_like(x, dtype=torch.float64)
    if M > DECODE_ROWS:
        dx = e4m3_error(x, quantize_rows(x)[1])
    error = (out.double() - x.double() @ w.double().T).abs()
    assert (error <= product_bound(x, w, dx, e4m3_error(w, scale), U_BF16)).all()


# -------------------------------------------------------------------------------------------------
# Kernels against their torch references

@pytest.mark.skipif(CUDA and not FP8_GPU, reason=NEEDS_FP8_GPU)
def test_rows_kernel_matches_dequantised_product():
    """fp32 x (the interpreter's bf16 conversions truncate; fp32 tl.dot is 'ieee'): groups of 17
    rows (more than BM), of 3 and empty ones; N, K not multiples of the tiles. The kernel sums
    exact products in fp32."""
    gen = torch.Generator().manual_seed(0)
    E, N, K = 4, 80, 96
    q, scale = quantize_rows(torch.randn(E, N, K, generator=gen))
    x = torch.randn(20, K, generator=gen)
    experts = torch.tensor([1] * 17 + [2] * 3)
    w = dequantize(q, scale)[experts]                               # [M, N, K]
    ref = torch.einsum("mk,mnk->mn", x.double(), w.double())
    bound = K * 2.0 ** -24 * torch.einsum("mk,mnk->mn", x.double().abs(), w.double().abs())
    dev = "cuda" if CUDA else "cpu"
    out = fp8_rows(x.to(dev), q.to(dev), scale.to(dev), experts.to(dev)).cpu()
    assert ((out.double() - ref).abs() <= bound).all()
    ref = x[:5].double() @ dequantize(q[0], scale[0]).double().T                 # ungrouped
    bound = K * 2.0 ** -24 * (x[:5].double().abs() @ dequantize(q[0], scale[0]).double().abs().T)
    out = fp8_rows(x[:5].to(dev), q[:1].to(dev), scale[:1].to(dev)).cpu()
    assert ((out.double() - ref).abs() <= bound).all()


@pytest.mark.skipif(CUDA and not FP8_GPU, reason=NEEDS_FP8_GPU)
def test_fp8_rows_split_parts_sum_to_the_product():
    """split: K = 600 in slices of whole 256-input steps (256, 256, 88 and one past K), one fp32
    part each. Their sum is the product within the rounding of K products and split more adds;
    the slice past K is exactly zero. Experts cannot be split, nor K into no slices."""
    gen = torch.Generator().manual_seed(1)
    N, K = 70, 600
    q, scale = quantize_rows(torch.randn(1, N, K, generator=gen))
    x = torch.randn(3, K, generator=gen)
    w = dequantize(q[0], scale[0]).double()                                     # [N, K]
    ref, size = x.double() @ w.T, x.double().abs() @ w.abs().T
    dev = "cuda" if CUDA else "cpu"
    parts = fp8_rows(x.to(dev), q.to(dev), scale.to(dev), split=4).cpu()       # [3, 4, N]
    assert parts.shape == (3, 4, N) and parts.dtype == torch.float32
    assert torch.equal(parts[:, 3], torch.zeros(3, N))
    assert ((parts.double().sum(1) - ref).abs() <= (K + 4) * 2.0 ** -24 * size).all()
    with pytest.raises(ValueError, match="split = 2"):
        fp8_rows(x.to(dev), q.to(dev), scale.to(dev), torch.zeros(3, dtype=torch.long).to(dev),
                 split=2)
    with pytest.raises(ValueError, match="split = 0"):
        fp8_rows(x.to(dev), q.to(dev), scale.to(dev), split=0)


@pytest.mark.skipif(not FP8_GPU, reason=NEEDS_FP8_GPU + "; Triton 3.9's interpreter rounds fp32 "
                    "to e4m3 wrongly when rounding carries into the exponent (31.625 -> 16)")
def test_quantize_kernel_equals_quantize_rows():
    x = with_outliers((300, 2304), OUTLIERS, 100.0, seed=5).cuda()
    x[7] = 0
    q, scale = quantize_rows_triton(x)
    q_ref, scale_ref = quantize_rows(x)
    assert torch.equal(scale, scale_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.skipif(CUDA and not FP8_GPU, reason=NEEDS_FP8_GPU + " (or no GPU: the interpreter)")
def test_quantize_kernel_fuses_silu_mul():
    """gated: quantize_rows_triton(silu_mul(gu)) in one kernel, bit for bit, and on an FP8 GPU
    quantize_rows(silu_mul(gu)) (silu_mul's rounding is checked against torch in
    tests/test_moe.py). The interpreter's e4m3 rounding is its own (the skip reason above, and
    ties away from zero), the same in both kernels, so there the comparison is kernel to kernel."""
    gu = with_outliers((70, 2 * 1024), OUTLIERS, 100.0, seed=6)                 # [M, 2F]
    gu[3] = 0
    gu = gu.cuda() if FP8_GPU else gu
    h = fast_moe.silu_mul(gu)                                                   # [M, F]
    q, scale = quantize_rows_triton(gu, gated=True)
    refs = [quantize_rows_triton(h)] + ([quantize_rows(h)] if FP8_GPU else [])
    for q_ref, scale_ref in refs:
        assert torch.equal(scale, scale_ref)
        assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


def test_quantize_once_reuses_its_result_while_the_input_lives_unchanged():
    x = torch.randn(2, 5, 64)                                        # [B, T, K]
    q, scale = quantize_once(x)
    q_ref, scale_ref = quantize_rows(x.reshape(-1, 64))
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(scale, scale_ref)
    assert quantize_once(x)[0] is q                 # the same tensor again: nothing recomputed
    assert quantize_once(x.clone())[0] is not q     # equal values in another tensor: computed
    x.mul_(2)                                       # written in place: computed again
    q2, scale2 = quantize_once(x)
    assert q2 is not q and torch.equal(scale2, 2 * scale)
    key = id(x)
    del x                                           # the entry goes with its input
    assert key not in fast_fp8._quantised


def test_quantize_once_finds_what_a_norm_remembered_through_views():
    """A norm kernel's quantisation (remember) serves quantize_once for its output and for a view
    of all of it with the same rows (the MoE's flattened input); other rows are computed."""
    y = torch.randn(2, 5, 64)                                        # [B, T, K]
    q, scale = quantize_rows(y.reshape(-1, 64))
    fast_fp8.remember(y, q, scale)
    assert quantize_once(y)[0] is q and quantize_once(y.flatten(0, 1))[0] is q
    heads = quantize_once(y.view(2, 5, 2, 32))[0]                   # rows of 32: computed
    assert heads.shape == (20, 32)
    assert quantize_once(y[:, :3])[0].shape == (6, 64)              # part of y: computed
    o = torch.randn(2, 5, 4, 16)                                    # [B, T, H, V] as o_norm's
    q, scale = quantize_rows(o.reshape(10, 64))
    fast_fp8.remember(o, q, scale)
    assert quantize_once(o.view(2, 5, 64))[0] is q                  # o_proj's input


def moe_with_dequantised_twin(N, seed, device):
    """An Fp8MoE loaded from a random bf16 block through prepare's loader, and the plain block with
    the dequantised weights (exactly representable in fp32)."""
    gen = torch.Generator().manual_seed(seed)
    args = TINY
    plain = kimi.SparseMoeBlock(args)
    state = {n: (torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5).bfloat16()
             for n, p in plain.state_dict().items()}
    with torch.device("meta"):
        holder = torch.nn.ModuleDict(dict(moe=kimi.SparseMoeBlock(args)))
    load = quantize.prepare(holder, device)
    holder.load_state_dict({m: u for n, t in state.items() for m, u in
                            load(f"moe.{n}", t.to(device)).items()}, assign=True)
    fp8 = holder.moe
    twin = {n.removeprefix("moe."): t for n, t in holder.state_dict().items()}
    deq = {n: dequantize(t, twin[n.removesuffix("weight") + SCALE]) if t.dtype == FP8 else t.float()
           for n, t in twin.items() if not n.endswith(SCALE)}
    plain.load_state_dict({n: t.cpu() for n, t in deq.items()})
    x = torch.randn(N, args.hidden_size, generator=gen)
    return fp8, plain, x


def test_fp8_moe_equals_its_dequantised_twin_on_cpu():
    """On a CPU the FP8 block dequantises: the same sums as the plain block, fp32 rounding only."""
    fp8, plain, x = moe_with_dequantised_twin(40, seed=3, device="cpu")
    with torch.no_grad():
        out, ref = fp8(x[None]), plain(x[None])
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5


@pytest.mark.skipif(CUDA, reason="the GPU's path is test_fp8_experts_on_gpu's")
def test_fp8_sorted_experts_and_combine_equal_the_loop_on_cpu():
    """Fp8MoE's GPU path for decode-sized N, each kernel in the interpreter: the rows sorted by
    expert (fp8_rows, silu_mul), then combine = the loop and einsum of the dequantised twin. All
    fp32 and the weights exact: fp32 rounding only."""
    fp8, plain, x = moe_with_dequantised_twin(DECODE_ROWS, seed=4, device="cpu")
    with torch.no_grad():
        ids, w = fp8.gate(x)
        y = fast_moe.combine(*fp8_sorted_experts(x, ids, fp8), w)
        ref = torch.einsum("nk,nkd->nd", w, plain.run_experts(x, ids))
    assert ((y - ref).norm() / ref.norm()).item() < 1e-5


@pytest.mark.skipif(not FP8_GPU, reason=NEEDS_FP8_GPU)
@pytest.mark.parametrize("N", [1, 16, 200])
def test_fp8_experts_on_gpu(N):
    """N <= 16 tokens: the grouped decode kernel (weights exact, bf16 activations and outputs);
    more: scaled_grouped_mm, activations rounded to e4m3 before each of the two products, so the
    relative error is about e4m3's RMS rounding (U / sqrt(3) ~ 0.036, twice): 2U covers it."""
    fp8, plain, x = moe_with_dequantised_twin(N, seed=N, device="cuda")
    with torch.no_grad():
        ids = fp8.gate(x.cuda().bfloat16())[0]
        out = fp8_experts(x.cuda().bfloat16(), ids, fp8).float().cpu()
        ref = plain.run_experts(x.bfloat16().float(), ids.cpu())
    tolerance = 8 * U_BF16 if N <= DECODE_ROWS else 2 * U
    assert ((out - ref).norm() / ref.norm()).item() < tolerance
    if N > DECODE_ROWS:         # prefill's shared expert from its stacked row (E), the same bound
        assert len(fp8.w13) == len(fp8.experts) + 1
        with torch.no_grad():
            out = fast_fp8.fp8_stacked_expert(x.cuda().bfloat16(), fp8, len(fp8.experts))
            ref = plain.shared_experts(x.bfloat16().float())
        assert ((out.float().cpu() - ref).norm() / ref.norm()).item() < tolerance


# -------------------------------------------------------------------------------------------------
# Loading and saving a tiny checkpoint

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("bf16")
    randomize(Transformer(TINY)).save_pretrained(path, num_shards=3)
    return path


@pytest.fixture(scope="module")
def fp8_ckpt(ckpt, tmp_path_factory):
    path = tmp_path_factory.mktemp("fp8")
    quantize.from_pretrained(ckpt, "cpu").save_pretrained(path, num_shards=2)
    return path


def test_fp8_model_equals_its_dequantised_twin(ckpt):
    """Every projection reads its own weight and scale: the FP8 model in fp32 (dequantising on a
    CPU) computes what a plain fp32 model with the dequantised weights computes, up to fp32
    rounding (a wrong scale or expert would be O(1)). Quantised are exactly the layers named."""
    model = quantize.from_pretrained(ckpt, "cpu", max_seq_len=64)
    state = model.state_dict()
    quantised = {n for n, t in state.items() if t.dtype == FP8}
    assert all(n.removesuffix("weight") + SCALE in state for n in quantised)
    kept = {n for n in state if n.endswith("weight") and n not in quantised}
    assert {n.split(".")[-2] for n in kept} == {
        "embed_tokens", "input_layernorm", "post_attention_layernorm", "norm", "lm_head",
        "q_conv1d", "k_conv1d", "v_conv1d", "o_norm", "kv_a_layernorm", "kv_b_proj", "gate"}
    twin = Transformer(TINY)
    twin.load_state_dict({n: dequantize(t, state[n.removesuffix("weight") + SCALE])
                          if t.dtype == FP8 else t.float()
                          for n, t in state.items() if not n.endswith(SCALE)})
    for p in model.parameters():                                    # the rest to fp32
        if p.dtype == torch.bfloat16:
            p.data = p.data.float()
    tokens = torch.randint(0, TINY.vocab_size, (2, 70), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out, ref = model(tokens), twin(tokens)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5


def test_fp8_model_norms_quantise_for_the_products(ckpt):
    """The FP8 model's layer norms and o_norm are their quantising twins (same names and weights);
    on an FP8 GPU, with prefill's rows, they change no bit of the logits (their q is the bits
    quantize_once would compute: tests/test_pointwise.py)."""
    dev = "cuda" if FP8_GPU else "cpu"
    model = quantize.from_pretrained(ckpt, dev, max_seq_len=64)
    kinds = {type(m) for n, m in model.named_modules() if n.split(".")[-1] in quantize.NORMS}
    assert kinds == {quantize.Fp8RMSNorm, quantize.Fp8GatedRMSNorm}
    assert type(model.model.norm) is kimi.RMSNorm                   # lm_head stays bf16
    if not FP8_GPU:
        return
    tokens = torch.randint(0, TINY.vocab_size, (2, 40), device=dev)
    with torch.no_grad():
        fused = model(tokens)
        for m in model.modules():                                   # back to kimi's own
            if isinstance(m, (quantize.Fp8RMSNorm, quantize.Fp8GatedRMSNorm)):
                m.__class__ = m.__class__.__bases__[0]
        assert torch.equal(model(tokens), fused)


def greedy(model, prompt, steps):
    """Greedy tokens through the caches: a prefill, then one token at a time."""
    model.setup_cache(1, prompt.shape[1] + steps)
    tokens = []
    with torch.no_grad():
        logits = model(prompt, start_pos=0)
        for pos in range(prompt.shape[1], prompt.shape[1] + steps):
            tokens.append(logits[0, -1].argmax().item())
            logits = model(torch.tensor([tokens[-1:]]), start_pos=pos)
    return tokens


def test_trained_tiny_model_generates_the_same_tokens_in_fp8(tmp_path):
    """A random tiny model is chaotic (its logits move by 20 % under e4m3 rounding, its top-2
    margins are tiny), so train it for 40 steps on a repeating sequence first, as test_kimi does:
    then greedy decoding continues the pattern, and must do so identically in bf16 and in FP8."""
    torch.manual_seed(0)
    model = Transformer(TINY)
    seq = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(6)).repeat(1, 6)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):
        loss = F.cross_entropy(model(seq[:, :-1])[0], seq[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(tmp_path)
    bf16 = greedy(Transformer.from_pretrained(tmp_path, "cpu", torch.bfloat16), seq[:, :5], 16)
    fp8 = greedy(quantize.from_pretrained(tmp_path, "cpu"), seq[:, :5], 16)
    assert bf16 == seq[0, 5:21].tolist() and fp8 == bf16


@pytest.mark.skipif(not FP8_GPU, reason=NEEDS_FP8_GPU)
@pytest.mark.parametrize("fused", [False, True])
def test_cuda_graph_decode_equals_eager_in_fp8(ckpt, fused):
    """The FP8 decode paths capture into fast.decode's CUDA graph: a replay gives the logits of the
    same step run eagerly (a tensor position: the same kernels on the same shapes, so equal bits),
    for kimi.py's forward and for the fused step (whose FP8 experts test_moe_decode checks)."""
    from fast import decode
    model = quantize.from_pretrained(ckpt, "cuda", max_seq_len=64)
    prompt = torch.randint(0, TINY.vocab_size, (1, 20), device="cuda")
    graph = decode.cuda_graph_decoder(model, 1, None if fused else model)
    pos = torch.tensor(20, device="cuda")
    with torch.no_grad():
        model(prompt, start_pos=0)
        token = prompt[:, -1:]
        replayed = graph(token, 20).clone()
        model(prompt, start_pos=0)
        if fused:
            eager = decode.step(model, token, pos)
        else:
            eager = model(token, start_pos=pos, last_only=True)
    assert torch.equal(replayed, eager)


@pytest.mark.skipif(not FP8_GPU, reason=NEEDS_FP8_GPU)
def test_stateless_forward_equals_cached_prefill_in_fp8(ckpt):
    """model(tokens) (no cache; MLA's output reaches o_proj transposed) and a cached prefill run
    the same FP8 prefill products on the same bf16 values: equal up to bf16 rounding of the
    attention's different layout, far below e4m3's 2^-4 (a dropped scale would be O(1))."""
    model = quantize.from_pretrained(ckpt, "cuda", max_batch_size=2, max_seq_len=64)
    prompt = torch.randint(0, TINY.vocab_size, (2, 40), device="cuda")
    with torch.no_grad():
        stateless, cached = model(prompt), model(prompt, start_pos=0)
    assert ((stateless - cached).norm() / cached.norm()).item() < 2 ** -7


def test_fp8_folder_round_trip(fp8_ckpt, tmp_path):
    """save_pretrained of an FP8 model writes e4m3 weights, fp32 scales and a quantization_config;
    quantize.from_pretrained reads it back as it is, every stored byte equal; kimi's own
    from_pretrained refuses it in one line that says how to load it."""
    config = json.loads((fp8_ckpt / "config.json").read_text())
    assert config["quantization_config"] == quantize.FORMAT and config["dtype"] == "bfloat16"
    index = json.loads((fp8_ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    stored = {}
    for shard in set(index.values()):
        stored.update(load_file(fp8_ckpt / shard))
    with pytest.raises(CheckpointError, match="holds FP8 weights: .*fast.quantize") as e:
        Transformer.from_pretrained(fp8_ckpt, "cpu")
    assert "\n" not in str(e.value)
    model = quantize.from_pretrained(fp8_ckpt, "cpu")
    state = model.state_dict()
    assert state.keys() == stored.keys()
    for name, t in state.items():
        assert t.dtype == stored[name].dtype, name
        assert torch.equal(t.view(torch.uint8), stored[name].view(torch.uint8)), name
    assert stored["model.layers.0.mlp.gate_proj.weight_scale"].dtype == torch.float32
    moe = model.model.layers[1].block_sparse_moe                    # experts: views of w13, w2
    assert moe.experts[3].w3.weight.data_ptr() == moe.w13[3, TINY.moe_intermediate_size:].data_ptr()
    shared = moe.shared_experts.up_proj.weight                     # the shared expert: row E
    assert shared.data_ptr() == moe.w13[TINY.num_experts, TINY.moe_intermediate_size:].data_ptr()
    model.save_pretrained(tmp_path, num_shards=2)
    for shard in set(index.values()):
        assert (tmp_path / shard).read_bytes() == (fp8_ckpt / shard).read_bytes()


def rewrite(folder, tmp_path, edit_tensors=None, edit_config=None):
    """A copy of an FP8 folder with its tensors (one dict over all shards) or config edited."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(folder / shard))
    config = json.loads((folder / "config.json").read_text())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(config)
    save_file(tensors, tmp_path / "model-00001-of-00001.safetensors")
    index["weight_map"] = dict.fromkeys(tensors, "model-00001-of-00001.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


NAME = "model.layers.2.self_attn.q_proj"


def drop_scale(tensors):
    del tensors[f"{NAME}.weight_scale"]


def misshape_scale(tensors):
    tensors[f"{NAME}.weight_scale"] = torch.ones(3, 1)


def bf16_scale(tensors):
    tensors[f"{NAME}.weight_scale"] = tensors[f"{NAME}.weight_scale"].bfloat16()


def bf16_weight(tensors):
    tensors[f"{NAME}.weight"] = tensors[f"{NAME}.weight"].bfloat16()


def drop_all_scales(tensors):
    for name in [n for n in tensors if n.endswith(SCALE)]:
        del tensors[name]


def other_method(config):
    config["quantization_config"]["quant_method"] = "fp8"


def no_config(config):
    del config["quantization_config"]


@pytest.mark.parametrize("edit_tensors, edit_config, message", [
    (drop_scale, None, f"lacks tensors this model needs: {NAME}.weight_scale$"),
    (misshape_scale, None,
     rf"has tensors of the wrong shape: {NAME}.weight_scale \[3, 1\] \(expected \[32, 1\]\)"),
    (bf16_scale, None, f"{NAME}.weight_scale: stored as bfloat16, expected float32 in an FP8"),
    (bf16_weight, None, f"{NAME}.weight: stored as bfloat16, expected float8_e4m3fn in an FP8"),
    (None, other_method, "quantization_config .* is not this project's FP8 format"),
    (None, no_config, "lists tensors this model does not have: .*weight_scale"),
    (drop_all_scales, no_config, "weight: stored as float8_e4m3fn, but config.json has no quantiz"),
])
def test_broken_fp8_folders_raise_one_line(fp8_ckpt, tmp_path, edit_tensors, edit_config, message):
    broken = rewrite(fp8_ckpt, tmp_path, edit_tensors, edit_config)
    with pytest.raises(CheckpointError, match=message) as e:
        quantize.from_pretrained(broken, "cpu")
    assert "\n" not in str(e.value)


# -------------------------------------------------------------------------------------------------
# The command line

def test_dtype_fp8_on_the_cli(tmp_path):
    """sample.py --dtype fp8 quantises while loading and generates (the demo checkpoint); a dtype
    it does not know is one error line."""
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    command = [sys.executable, "sample.py", "--demo", "--max-new-tokens", "4", "The answer is"]
    r = subprocess.run(command + ["--dtype", "fp8"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The answer is") and "tok/s" in r.stderr
    r = subprocess.run(command + ["--dtype", "fp4"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "invalid choice: 'fp4'" in r.stderr
