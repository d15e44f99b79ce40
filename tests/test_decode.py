"""Tests for fast/decode.py: the fused decode step equals kimi.py's forward (its torch references
on the CPU, the kernels in Triton's CPU interpreter and on a GPU), and the add + RMSNorm kernel."""
import copy

import pytest
import torch

import kimi
from fast import decode, quantize
from fast import moe as fast_moe
from helpers import TINY, randomize, rel
from kimi import Transformer

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"     # kernels: compiled on a GPU, else the interpreter


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("delta_kind", ["none", "tensor", "parts", "weighted parts"])
def test_add_rmsnorm_kernel_equals_reference(dtype, delta_kind):
    """delta: none, a tensor, o_proj's fp32 parts (4 slices of its inputs) or the MoE's 9 slots
    in the model's dtype with fp32 weights, summed in the kernel."""
    gen = torch.Generator().manual_seed(0)
    norm = kimi.RMSNorm(200).to(DEV, dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(200, generator=gen) + 0.5)
    h = torch.randn(3, 200, generator=gen).to(DEV, dtype)
    delta = {"none": None, "tensor": torch.randn(3, 200, generator=gen).to(DEV, dtype),
             "parts": (torch.randn(3, 4, 200, generator=gen).to(DEV), None),
             "weighted parts": (torch.randn(3, 9, 200, generator=gen).to(DEV, dtype),
                                torch.rand(3, 9, generator=gen).to(DEV))}[delta_kind]
    with torch.no_grad():
        want = decode.add_rmsnorm_ref(h, delta, norm)
        got = decode.add_rmsnorm(h, delta, norm)
    ulp = torch.finfo(dtype).eps
    if isinstance(delta, tuple):
        # the same fp32 terms in the same order, but a GPU may fuse a product into its add
        # (FMA: one rounding fewer, at most one fp32 unit of w_j part_j each); the delta rounded
        # to the dtype, then h, may each move by one unit of the dtype
        parts, weights = delta
        terms = parts.float().abs() * (1.0 if weights is None else weights[..., None])
        total = decode.delta_ref(delta, torch.float32)
        bound = (torch.finfo(torch.float32).eps * terms.sum(1)
                 + ulp * (want[0].float().abs() + total.abs()))
        assert ((got[0].float() - want[0].float()).abs() <= bound).all()
    else:   # exact-rounded in both (one add in the dtype)
        assert torch.equal(got[0], want[0])
    # the norm's mean is a reduction in a different order: the normed output may differ by one
    # rounding of its dtype (two where h itself moved by one)
    assert (got[1].float() - want[1].float()).abs().max() <= 2 * ulp * want[1].float().abs().max()


def prefilled(dtype, device, seed=3):
    """A tiny random model after a left-padded prefill of 3 prompts (70, 9 and 131 tokens): the
    pad hides positions in MLA; 131 straddles two 64-token chunks."""
    model = randomize(Transformer(TINY), seed).to(device, dtype).eval()
    model.setup_cache(max_batch_size=3, max_seq_len=160)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, TINY.vocab_size, (3, 131 + 4), generator=gen).to(device)
    pad = torch.tensor([61, 122, 0], device=device)
    with torch.no_grad():
        model(tokens[:, :131], start_pos=0, pad=pad)
    return model, tokens[:, 131:]


def run_steps(model, tokens, step, start=131):
    """Logits of len(tokens[0]) decode steps continuing from position start, and the caches
    after."""
    out = [step(model, tokens[:, t:t + 1], start + t) for t in range(tokens.shape[1])]
    return torch.cat(out, dim=1), {n: b.clone() for n, b in model.named_buffers()}


def model_step(model, tokens, pos):
    with torch.no_grad():
        return model(tokens, start_pos=pos, last_only=True)


@pytest.mark.parametrize("fast", [False, True])
def test_step_equals_model_forward_fp32(fast):
    """fp32: every piece computes kimi's math in another order, so logits and caches agree to fp32
    rounding (rel 1e-5); fast=False checks the glue and the references, fast=True the kernels (on
    a GPU when there is one). In bf16 a tiny model's top-2-of-8 routing flips on 2^-8
    differences, so the kernels' bf16 rounding is checked per kernel (test_*_decode.py) at the
    48B sizes."""
    model, tokens = prefilled(torch.float32, DEV if fast else "cpu")
    fused = copy.deepcopy(model)
    decode.prepare(fused)
    want, want_caches = run_steps(model, tokens, model_step)
    got, got_caches = run_steps(fused, tokens, lambda m, t, p: decode.step(m, t, p, fast=fast))
    assert rel(got, want) < 1e-5
    for name, cache in want_caches.items():
        assert rel(got_caches[name], cache) < 1e-5 or name == "pad", name


@pytest.mark.parametrize("shared", [1, 2], ids=["stacked", "apart"])
def test_moe_step_equals_the_block(shared):
    """Both ways the shared expert joins the routed ones compute the block's forward: stacked as
    row E with its slot written by the route kernel, or (num_shared_experts = 2: twice the
    experts' width, not stacked) its own MLP. fp32, the same products summed in another order."""
    args = kimi.ModelArgs(**{**vars(TINY), "num_shared_experts": shared})
    block = randomize(kimi.SparseMoeBlock(args), 7).to(DEV).eval()
    x = torch.randn(3, TINY.hidden_size, generator=torch.Generator().manual_seed(7)).to(DEV)
    with torch.no_grad():
        want = block(x[:, None])[:, 0]                      # kimi's loop over the experts
        fast_moe.stack_experts(block)
        assert len(block.w13) == TINY.num_experts + (shared == 1)   # the shared one: row E
        got = decode.delta_ref(decode.moe_step(block, x, fast=True), x.dtype)  # stacked: parts
        assert rel(got, want) < 1e-5


def test_step_equals_model_forward_with_fp8_weights(tmp_path):
    """An FP8 model (e4m3 projections and experts, the shared expert stacked as row E) with its
    other parameters in fp32: the step's kernels (the FP8 expert kernels, _rows_kernel on a GPU)
    compute the model's forward from the same exact weights, up to fp32 rounding (rel 1e-5)."""
    randomize(Transformer(TINY), 4).save_pretrained(tmp_path)
    model = quantize.from_pretrained(tmp_path, DEV, max_batch_size=2, max_seq_len=16)
    for p in model.parameters():                            # activations in fp32
        if p.dtype == torch.bfloat16:
            p.data = p.data.float()
    model.setup_cache(2, 16)                                # caches in fp32 too
    moe = model.model.layers[1].block_sparse_moe
    assert len(moe.w13) == TINY.num_experts + 1             # routed + shared
    tokens = torch.randint(0, TINY.vocab_size, (2, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():       # 16 rows: on a GPU too the exact decode products, not scaled_mm
        model(tokens[:, :8].to(DEV), start_pos=0)
    fused = copy.deepcopy(model)
    decode.prepare(fused)
    want, want_caches = run_steps(model, tokens[:, 8:].to(DEV), model_step, start=8)
    got, got_caches = run_steps(fused, tokens[:, 8:].to(DEV), decode.step, start=8)
    assert rel(got, want) < 1e-5
    for name, cache in want_caches.items():
        assert rel(got_caches[name], cache) < 1e-5 or name == "pad", name


def test_step_with_more_rows_than_the_expert_kernels_take():
    """17 rows: the MoE falls back to the block itself (moe_decode's tiles hold 16 tokens)."""
    model = randomize(Transformer(TINY), 5).eval()
    model.setup_cache(max_batch_size=17, max_seq_len=8)
    tokens = torch.randint(0, TINY.vocab_size, (17, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        model(tokens[:, :5], start_pos=0)
    fused = copy.deepcopy(model)
    decode.prepare(fused)
    want = model_step(model, tokens[:, 5:], 5)
    assert rel(decode.step(fused, tokens[:, 5:], 5, fast=False), want) < 1e-5     # fp32 noise


def test_prepare_keeps_the_checkpoint_names_and_values():
    model, _ = prefilled(torch.float32, "cpu")
    fused = copy.deepcopy(model)
    decode.prepare(fused)
    decode.prepare(fused)                                   # twice: a no-op
    want, got = model.state_dict(), fused.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[n], t) for n, t in want.items())     # stored bytes: bitwise
    attn = fused.model.layers[0].self_attn
    assert attn.q_proj.weight.data_ptr() == attn.stacked[0].data_ptr()  # views of the stack


def test_step_refuses_a_new_sequence():
    model, tokens = prefilled(torch.float32, "cpu")
    decode.prepare(model)
    with pytest.raises(ValueError, match="start_pos >= 1"):
        decode.step(model, tokens[:, :1], 0)
