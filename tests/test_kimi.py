"""Tests for kimi.py on a tiny random model (fp32, CPU), plus CUDA-only checks of the fast paths.
"§n" and "trap n" refer to docs/architecture.md, the repository's specification."""
import copy
import json
import math
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings, strategies as st
from safetensors.torch import load_file, save_file

import kda_ref
import kimi
from fast import moe as fast_moe
from fast.decode import cuda_graph_decoder
from helpers import ROOT, TINY, randomize, rel
from kimi import CheckpointError, KimiDeltaAttention, ModelArgs, SparseMoeBlock, Transformer

SEQ = 150       # > 2 chunks of 64, not a multiple of 64


@pytest.fixture(scope="module")
def model():
    m = randomize(Transformer(TINY)).eval()
    m.setup_cache(max_batch_size=2, max_seq_len=256)
    return m


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, TINY.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def full(model, tokens):
    return model(tokens[:1])


# ------------------------------------------------------------------------------------------------
# Caches: one prefill == prefill in pieces == one token at a time; batch == each alone

def test_token_by_token_equals_prefill(model, tokens, full):
    steps = torch.cat([model(tokens[:1, t:t + 1], start_pos=t) for t in range(SEQ)], dim=1)
    assert rel(steps, full) < 1e-4


# derandomize: a near-tie in top-k routing may flip under 1e-7 rounding; keep CI runs reproducible
@settings(deadline=None, max_examples=8, derandomize=True)
@given(cuts=st.lists(st.integers(1, SEQ - 1), max_size=3, unique=True))
@example(cuts=[5, 75])          # pieces of 70 and 75 tokens: chunked, continuing from a cache
@example(cuts=[64, 65])
def test_prefill_in_pieces_equals_prefill(model, tokens, full, cuts):
    bounds = [0, *sorted(cuts), SEQ]
    pieces = [model(tokens[:1, a:b], start_pos=a) for a, b in zip(bounds, bounds[1:])]
    assert rel(torch.cat(pieces, dim=1), full) < 1e-4


def test_batch_of_two_equals_each_alone(model, tokens):
    prompt, nxt = tokens[:, :100], tokens[:, 100:103]
    both = torch.cat([model(prompt, start_pos=0),
                      *(model(nxt[:, i:i + 1], start_pos=100 + i) for i in range(3))], 1)
    for b in range(2):
        alone = torch.cat([model(prompt[b:b + 1], start_pos=0),
                           *(model(nxt[b:b + 1, i:i + 1], start_pos=100 + i) for i in range(3))], 1)
        assert rel(both[b:b + 1], alone) < 1e-5


def test_decode_with_tensor_position_and_stacked_experts(model, tokens, full, tmp_path):
    """The CUDA-graph decode path, run eagerly: start_pos as a tensor (MLA reads the whole cache
    buffer, masked), the experts as two grouped matmuls over stacked weights, last logits only."""
    fast = copy.deepcopy(model)
    fast.stack_experts()
    assert fast.state_dict().keys() == model.state_dict().keys()
    stored = zip(fast.state_dict().values(), model.state_dict().values())
    assert all(torch.equal(a, b) for a, b in stored)
    out = [fast(tokens[:1, :100], start_pos=0, last_only=True)] + [
        fast(tokens[:1, t:t + 1], start_pos=torch.tensor(t), last_only=True)
        for t in range(100, SEQ)]
    assert rel(torch.cat(out, dim=1), full[:, 99:]) < 1e-4
    with pytest.raises(ValueError, match="one-token steps"):
        fast(tokens[:1, :2], start_pos=torch.tensor(3))
    fast.save_pretrained(tmp_path)                  # stacked experts share storage: still saves
    reloaded = Transformer.from_pretrained(tmp_path, device="cpu").state_dict()
    assert all(torch.equal(reloaded[n], t) for n, t in model.state_dict().items())


def test_left_padding_is_invisible(model):
    """Prompts of different lengths in one left-padded batch: each row's logits equal its prompt's
    alone, stateless, and through the cache (prefill, then decode steps that keep hiding the
    padding). The lengths differ by more than the conv window and straddle the 64-token chunk. fp32:
    chunk alignment and masked attention reorder sums, so equal within a few ulps per layer (rel
    1e-5), not bitwise; leaked padding would be O(1) (checked: without pad, rel > 1e-2)."""
    m = copy.deepcopy(model)
    m.setup_cache(max_batch_size=4, max_seq_len=140)
    gen = torch.Generator().manual_seed(5)
    lens, T = [3, 9, 70, 131], 131
    prompts = [torch.randint(0, TINY.vocab_size, (n,), generator=gen) for n in lens]
    nxt = torch.randint(0, TINY.vocab_size, (4, 3), generator=gen)
    tokens = torch.stack([F.pad(p, (T - len(p), 0)) for p in prompts])     # [4, T], left-padded
    pad = torch.tensor([T - n for n in lens])
    with torch.no_grad():
        stateless = m(tokens, pad=pad)
        cached = torch.cat([m(tokens, start_pos=0, pad=pad)] +
                           [m(nxt[:, i:i + 1], start_pos=T + i) for i in range(3)], dim=1)
        for b, p in enumerate(prompts):
            alone = m(torch.cat([p, nxt[b]])[None])                 # [1, n + 3, V]
            assert rel(stateless[b, pad[b]:], alone[0, :-3]) < 1e-5
            assert rel(cached[b, pad[b]:], alone[0]) < 1e-5
        assert rel(m(tokens)[0, pad[0]:], stateless[0, pad[0]:]) > 1e-2   # the control


def test_pad_is_checked(model, tokens):
    for kwargs, message in [(dict(pad=[0, 1], start_pos=5), "start_pos None or 0"),
                            (dict(pad=[0]), "one per row"), (dict(pad=[0.5, 1.0]), "one per row"),
                            (dict(pad=[0, 10]), "0 <= pad < 10"), (dict(pad=[-1, 0]), "0 <= pad")]:
        with pytest.raises(ValueError, match=message):
            model(tokens[:2, :10], **kwargs)


def test_cache_limits_raise_value_error(model, tokens):
    with pytest.raises(ValueError, match="max_seq_len"):
        model(tokens[:1, :10], start_pos=250)
    with pytest.raises(ValueError, match="max_batch_size"):
        model(tokens[[0, 1, 0], :10], start_pos=0)


# ------------------------------------------------------------------------------------------------
# Teaching API: a fresh model runs and trains with no setup; named configs; config validation

def test_fresh_model_forward_and_backward_without_setup():
    model = randomize(Transformer(TINY))                            # no setup_cache, no eval()
    tokens = torch.randint(0, TINY.vocab_size, (2, 80), generator=torch.Generator().manual_seed(4))
    logits = model(tokens)                                          # T = 80: the chunked KDA path
    assert logits.shape == (2, 80, TINY.vocab_size) and model.max_seq_len == 0
    F.cross_entropy(logits.flatten(0, 1), tokens.roll(-1, 1).flatten()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    # experts that no token was routed to get no gradient; everything else must
    assert all(".experts." in n for n in missing), missing


def test_stateless_forward_equals_cached_prefill(model, tokens, full):
    with torch.no_grad():
        stateless = model(tokens[:1])
    assert rel(stateless, full) < 1e-6     # the same ops in the same order: only fp32 reassociation


def test_chunked_reference_gradients_equal_the_recurrence():
    """Both torch KDA forms are differentiable and agree on gradients, in fp64 (rounding ~1e-16)."""
    gen = torch.Generator().manual_seed(5)
    B, T, H, K = 1, 70, 2, 8
    q, k = (kda_ref.l2norm(torch.randn(B, T, H, K, generator=gen, dtype=torch.float64))
            for _ in range(2))
    v = torch.randn(B, T, H, K, generator=gen, dtype=torch.float64)
    g = -torch.rand(B, T, H, K, generator=gen, dtype=torch.float64)
    beta = torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    grads = []
    for fn in (kda_ref.recurrent_kda, kda_ref.chunk_kda_ref):
        inputs = [t.clone().requires_grad_() for t in (q, k, v, g, beta)]
        o, S = fn(*inputs, output_final_state=True)
        (o.square().sum() + S.sum()).backward()
        grads.append([t.grad for t in inputs])
    for a, b in zip(*grads):
        assert rel(a, b) < 1e-10


def test_tiny_model_learns():
    """A few dozen Adam steps on a fixed repeating sequence: the loss must fall a lot."""
    torch.manual_seed(0)
    model = Transformer(kimi.CONFIGS["tiny"])
    seq = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(6)).repeat(1, 6)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        logits = model(seq[:, :-1])
        loss = F.cross_entropy(logits[0], seq[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"\ntiny model loss: {losses[0]:.2f} -> {losses[-1]:.3f} in 40 steps")
    assert losses[-1] < 0.2 * losses[0]


def train_copies(monkeypatch, steps, device):
    """A tiny fp32 model trained `steps` SGD steps three ways from the same weights on the same
    batches (T = 96 > 64: KDA's chunked form): KDA through kda_triton.chunk_kda and its backward
    (compiled on a GPU, the interpreter elsewhere; the other kernels have no backward and stay
    off), through kimi's torch code, and through kimi's torch code in fp64 (the truth).
    -> {way: (losses [steps], the first step's gradients)}."""
    if kimi.kda_triton is None:
        pytest.skip("chunk_kda needs Triton")
    torch.manual_seed(0)
    model = randomize(Transformer(TINY)).to(device)
    gen = torch.Generator().manual_seed(7)
    batches = [torch.randint(0, TINY.vocab_size, (2, 97), generator=gen).to(device)
                for _ in range(steps)]
    use_kernels, calls, chunk_kda = kimi.use_kernels, [], kimi.kda_triton.chunk_kda
    monkeypatch.setattr(kimi.kda_triton, "chunk_kda", lambda *a, **kw: calls.append(1) or
                        chunk_kda(*a, **kw))
    out = {}
    ways = (("kernels", torch.float32, True), ("torch", torch.float32, False),
            ("fp64", torch.float64, False))
    for way, dtype, backward_only in ways:
        m = copy.deepcopy(model).to(dtype)
        kernels = (lambda *t, backward=False: backward) if backward_only else use_kernels
        monkeypatch.setattr(kimi, "use_kernels", kernels)
        monkeypatch.setattr(kimi, "KERNELS", backward_only)
        opt, losses, grads = torch.optim.SGD(m.parameters(), lr=0.3), [], None
        for seq in batches:
            loss = F.cross_entropy(m(seq[:, :-1]).flatten(0, 1), seq[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            grads = grads or [p.grad.double() for p in m.parameters() if p.grad is not None]
            opt.step()
            losses.append(loss.item())
        out[way] = torch.tensor(losses, dtype=torch.float64), grads
    assert len(calls) == 2 * steps, "the two KDA layers did not run chunk_kda at every step"
    return out


def test_training_through_chunk_kda_gradients(monkeypatch):
    """One step: each parameter's gradient through chunk_kda is as close to fp64's as the fp32
    torch path's (at most twice its error, the bar test_kda.py sets the kernel alone, + 1e-7
    for gradients the torch path happens to get almost exactly)."""
    out = train_copies(monkeypatch, 1, "cuda" if torch.cuda.is_available() else "cpu")
    for a, b, c in zip(out["kernels"][1], out["torch"][1], out["fp64"][1]):
        assert rel(a, c) <= 2 * rel(b, c) + 1e-7


@pytest.mark.skipif(not torch.cuda.is_available(), reason="20 steps: compiled kernels, a GPU")
def test_training_through_chunk_kda_falls_as_the_torch_path(monkeypatch):
    """20 SGD steps: the loss falls, and stays as close to fp64's as the fp32 torch path's (twice
    its largest deviation, + 1e-6 of the loss for steps where both are exact)."""
    out = train_copies(monkeypatch, 20, "cuda")
    a, b, c = (out[way][0] for way in ("kernels", "torch", "fp64"))
    assert a[-1] < a[0]
    assert ((a - c).abs() <= 2 * (b - c).abs().max() + 1e-6 * c).all(), (a, b, c)


def test_named_configs():
    assert kimi.CONFIGS["kimi-linear-48b-a3b"] == ModelArgs()
    for name, args in kimi.CONFIGS.items():
        assert ModelArgs(**{f: getattr(args, f) for f in args.__dataclass_fields__}) == args, name
    assert kimi.CONFIGS["demo"].vocab_size == 163840 and kimi.CONFIGS["tiny"].vocab_size == 256


@pytest.mark.parametrize("field, value, message", [
    ("hidden_size", "64", "hidden_size must be an integer >= 1, not '64'"),
    ("hidden_size", 0, "hidden_size must be an integer >= 1, not 0"),
    ("kda_num_heads", True, "kda_num_heads must be an integer >= 1, not True"),
    ("rms_norm_eps", -1.0, "rms_norm_eps must be a positive finite number"),
    ("moe_renormalize", "yes", "moe_renormalize must be true or false"),
    ("num_experts_per_token", 20, "num_experts_per_token=20 exceeds num_experts=8"),
    ("full_attn_layers", (1, 9), "full_attn_layers must be distinct layer numbers below"),
    ("num_expert_group", 4, "num_expert_group, topk_group = \\(4, 1\\): only \\(1, 1\\)"),
])
def test_model_args_refuse_bad_values(field, value, message):
    with pytest.raises(ValueError, match=message) as e:
        replace(TINY, **{field: value})
    assert "\n" not in str(e.value)


def test_cache_bytes_equal_what_setup_cache_allocates():
    for dtype in (torch.float32, torch.bfloat16):
        model = Transformer(TINY).to(dtype)
        model.setup_cache(3, 50)
        allocated = sum(b.numel() * b.element_size() for b in model.buffers())
        assert TINY.cache_bytes(3, 50, dtype) == allocated


# ------------------------------------------------------------------------------------------------
# MoE routing against a hand computation, one token and one expert at a time

@pytest.mark.parametrize("biased", [True, False])
def test_moe_routing_matches_hand_computation(biased):
    args = replace(TINY, hidden_size=16, moe_intermediate_size=8, num_experts=8,
                   num_experts_per_token=3, routing_weights_biased=biased)
    moe = randomize(SparseMoeBlock(args), seed=2)
    with torch.no_grad():
        moe.gate.e_score_correction_bias.copy_(torch.linspace(-0.4, 0.4, 8))   # changes the choices
        x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(3))
        out = moe(x)
        ref = copy.deepcopy(moe).double()
        expected = []
        for xt in x.flatten(0, 1).double():
            s = [torch.sigmoid(xt @ w).item() for w in ref.gate.weight]
            sel = [si + b for si, b in zip(s, ref.gate.e_score_correction_bias.tolist())]
            top = sorted(range(8), key=lambda e: -sel[e])[:3]
            w = [(sel if biased else s)[e] for e in top]            # released code: biased weights
            w = [wi / sum(w) * 2.446 for wi in w]
            y = sum(wi * ref.experts[e](xt) for wi, e in zip(w, top))
            expected.append(y + ref.shared_experts(xt))
    assert rel(out.flatten(0, 1), torch.stack(expected)) < 1e-5


def test_biased_and_unbiased_routing_weights_differ():
    x = torch.randn(6, TINY.hidden_size)
    gate = randomize(kimi.MoEGate(TINY))
    ids_b, w_b = gate(x)
    gate.args = replace(TINY, routing_weights_biased=False)         # same weights, same scores
    ids_u, w_u = gate(x)
    # the ids come from the same tensors through the same ops, so they are equal exactly
    assert torch.equal(ids_b, ids_u) and not torch.allclose(w_b, w_u)      # same choice, other mix


# ------------------------------------------------------------------------------------------------
# Layers against references written from the spec (docs/architecture.md §2), in bf16 with its
# rounding points. The tests above compare the code with itself; these pin the formulas.

BF16 = torch.bfloat16


def bf16_module(module, seed):
    """randomize, then cast to bf16 but A_log and dt_bias, which stay fp32 (as from_pretrained)."""
    randomize(module, seed)
    for n, p in module.named_parameters():
        if not n.endswith(("A_log", "dt_bias")):
            p.data = p.data.to(BF16)
    return module


def linear(x, module):
    return x @ module.weight.T          # a bias-free nn.Linear, same dtype in and out


def kda_layer_ref(L, x, round_qk):
    """§2.3 step by step; x [B, T, D] bf16. round_qk: q̂, k̂ rounded to bf16 (chunked path)."""
    B, T, _ = x.shape
    H = L.A_log.numel()
    K = L.dt_bias.numel() // H

    def conv(u, w):     # y[t] = SiLU(sum_i w[:, 0, i] u[t - 3 + i]), zeros before t = 0, fp32
        W = w.shape[-1]
        u = torch.cat([u.new_zeros(B, W - 1, u.shape[-1]), u], 1).float()
        return F.silu(sum(w[:, 0, i].float() * u[:, i:i + T] for i in range(W))).to(BF16)

    q, k, v = (conv(linear(x, proj), c.weight).view(B, T, H, K) for proj, c in
               ((L.q_proj, L.q_conv1d), (L.k_proj, L.k_conv1d), (L.v_proj, L.v_conv1d)))
    z = (linear(linear(x, L.f_a_proj), L.f_b_proj).float() + L.dt_bias).view(B, T, H, K)
    g = -L.A_log.view(H, 1).exp() * torch.where(z > 20, z, torch.log1p(z.exp()))
    beta = linear(x, L.b_proj).float().sigmoid()                           # [B, T, H]

    def unit(u):        # L2 norm with eps on the sum of squares
        u = u.float() / (u.float().square().sum(-1, keepdim=True) + 1e-6).sqrt()
        return u.to(BF16).float() if round_qk else u

    q, k, v = unit(q) * K ** -0.5, unit(k), v.float()
    S = torch.zeros(B, H, K, K)
    o = torch.zeros(B, T, H, K)
    for t in range(T):  # decay, delta write on the decayed state, read the updated state
        S = S * g[:, t, :, :, None].exp()
        err = v[:, t] - torch.einsum("bhk,bhkv->bhv", k[:, t], S)
        S = S + k[:, t, :, :, None] * (beta[:, t, :, None] * err)[:, :, None]
        o[:, t] = torch.einsum("bhk,bhkv->bhv", q[:, t], S)
    o = o.to(BF16).float()
    r = linear(linear(x, L.g_a_proj), L.g_b_proj).view(B, T, H, K).float()
    y = o * torch.rsqrt(o.square().mean(-1, keepdim=True) + 1e-5)
    y = y * L.o_norm.weight.float() * r.sigmoid()
    return linear(y.to(BF16).view(B, T, H * K), L.o_proj), S


def mla_layer_ref(m, x):
    """§2.4 on a prompt, TINY's dims (scale (16 + 8)^-0.5); x [B, T, D] bf16. P stays fp32."""
    B, T, _ = x.shape
    H, R, nope, pe = (getattr(TINY, n) for n in ("num_attention_heads", "kv_lora_rank",
                                                  "qk_nope_head_dim", "qk_rope_head_dim"))
    q = linear(x, m.q_proj).view(B, T, H, nope + pe)
    ckv = linear(x, m.kv_a_proj_with_mqa)
    c, k_pe = ckv[..., :R], ckv[..., R:]
    c32 = c.float()
    c = (c32 * torch.rsqrt(c32.square().mean(-1, keepdim=True) + 1e-6)).to(BF16)
    c = c * m.kv_a_layernorm.weight
    kv = linear(c, m.kv_b_proj).view(B, T, H, -1)
    k_nope, v = kv[..., :nope], kv[..., nope:]
    k = torch.cat([k_nope, k_pe[:, :, None].expand(B, T, H, pe)], -1)
    s = torch.einsum("bihd,bjhd->bhij", q.float(), k.float()) * (nope + pe) ** -0.5
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -torch.inf)
    o = torch.einsum("bhij,bjhd->bihd", s.softmax(-1), v.float()).to(BF16)
    return linear(o.reshape(B, T, -1), m.o_proj)


def moe_block_ref(moe, x, k, scale=2.446):
    """§2.5 (released code: biased mixing weights); x [N, D] bf16."""
    s = torch.sigmoid(x.float() @ moe.gate.weight.float().T)
    s = s + moe.gate.e_score_correction_bias.float()   # the official in-place add aliases s, trap 1
    idx = s.topk(k, -1).indices
    w = s.gather(-1, idx)
    w = w / (w.sum(-1, keepdim=True) + 1e-20) * scale
    out = []
    for xt, ids, wt in zip(x, idx, w):
        experts = [moe.experts[e] for e in ids]
        y = sum(wj * linear(F.silu(linear(xt, e.w1)) * linear(xt, e.w3), e.w2).float()
                for wj, e in zip(wt, experts))
        out.append(y.to(BF16))
    sh = moe.shared_experts
    shared = linear(F.silu(linear(x, sh.gate_proj)) * linear(x, sh.up_proj), sh.down_proj)
    return torch.stack(out) + shared


@pytest.mark.parametrize("T", [40, 80])     # recurrent (fp32 q̂, k̂) and chunked (bf16 q̂, k̂)
def test_kda_layer_matches_spec_reference_in_bf16(T):
    layer = bf16_module(KimiDeltaAttention(TINY), seed=4)
    with torch.no_grad():       # slow decay (rates 0.05 and 0.5, not 1..16): a longer memory
        layer.A_log.copy_(torch.tensor([0.05, 0.5]).log().view(1, 1, 2, 1))
    layer.setup_cache(2, 128, BF16, "cpu")
    x = torch.randn(2, T, TINY.hidden_size, generator=torch.Generator().manual_seed(5)).to(BF16)
    with torch.no_grad():
        out = layer(x, 0)
        ref, S = kda_layer_ref(layer, x, round_qk=T > 64)
        wrong_rounding = kda_layer_ref(layer, x, round_qk=T <= 64)[0]
    # Bit-exact here (2e-5 on the chunked path). The other path's q̂/k̂ rounding (trap 13) alone:
    # ~4e-3; spec mutations give 4e-2 (β × 0.9) to 1.4 (conv taps reversed), SiLU for sigmoid 0.9.
    assert rel(wrong_rounding, ref) > 2e-3
    assert rel(out, ref) < 1e-3 and rel(layer.recurrent_state[:2], S) < 1e-3


def test_mla_layer_matches_spec_reference_in_bf16():
    m = bf16_module(kimi.MLAAttention(TINY), seed=7)
    with torch.no_grad():       # a small latent c (mean c² ~ 3e-5): kv_a_layernorm's eps matters
        m.kv_a_proj_with_mqa.weight[:TINY.kv_lora_rank] *= 0.01
    m.setup_cache(2, 64, BF16, "cpu")
    x = torch.randn(2, 30, TINY.hidden_size, generator=torch.Generator().manual_seed(8)).to(BF16)
    with torch.no_grad():
        assert rel(m(x, 0), mla_layer_ref(m, x)) < 1e-3


def test_absorbed_mla_decode_is_as_accurate_as_the_expanded_form_in_bf16():
    """A decode step folds kv_b_proj into q and the output, so it rounds other products to bf16 than
    the spec's expanded form: both are compared with the exact (fp64) layer on the same weights."""
    m = bf16_module(kimi.MLAAttention(TINY), seed=7)
    m64 = copy.deepcopy(m).double()
    m.setup_cache(2, 64, BF16, "cpu")
    m64.setup_cache(2, 64, torch.float64, "cpu")
    x = torch.randn(2, 30, TINY.hidden_size, generator=torch.Generator().manual_seed(8)).to(BF16)
    with torch.no_grad():
        exact, expanded = m64(x.double(), 0)[:, -1], mla_layer_ref(m, x)[:, -1]
        m(x[:, :29], 0)
        absorbed = m(x[:, 29:], 29)[:, 0]
    assert rel(absorbed, exact) < 1.5 * rel(expanded, exact)       # measured: 1.0-1.2x, both ~4e-3


def test_fast_paths_equal_their_definitions():
    """attend_absorbed = attend, grouped_experts = run_experts: exact algebra, so they agree to
    rounding; any real difference (a wrong split, a wrong order) is O(1)."""
    m = randomize(kimi.MLAAttention(TINY), seed=7).double()
    m.setup_cache(2, 40, torch.float64, "cpu")
    x = torch.randn(2, 30, TINY.hidden_size, generator=torch.Generator().manual_seed(8)).double()
    with torch.no_grad():
        expanded = m(x)[:, -1]                                      # stateless: attend
        m(x[:, :29], start_pos=0)
        absorbed = m(x[:, 29:], start_pos=29)[:, 0]                 # attend_absorbed
        absorbed_graph = m(x[:, 29:], start_pos=torch.tensor(29))[:, 0]    # whole buffer, masked
    assert rel(absorbed, expanded) < 1e-12 and rel(absorbed_graph, expanded) < 1e-12
    # grouped_mm has no fp64: fp32, whose rounding (6e-8 per op, sums of 64 terms) stays < 1e-5
    moe = randomize(SparseMoeBlock(TINY), seed=3)
    x = torch.randn(40, TINY.hidden_size, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ids = moe.gate(x)[0]
        loop = moe.run_experts(x, ids)
        fast_moe.stack_experts(moe)
        assert rel(fast_moe.grouped_experts(x, ids, moe.w13, moe.w2), loop) < 1e-5
        # Cast after stacking: the stacks are stale, said in one line; stacking again fixes it. Both
        # sides bf16 now (u = 2^-9 per rounding, a few deep): within 2^-6; stale weights: O(1).
        moe.bfloat16()
        xb = x.bfloat16()
        with pytest.raises(ValueError, match="call model.stack_experts"):
            moe(xb[None])
        fast_moe.stack_experts(moe)
        assert moe.w13.dtype == torch.bfloat16
        grouped = fast_moe.grouped_experts(xb, ids, moe.w13, moe.w2)
        assert rel(grouped, moe.run_experts(xb, ids)) < 2 ** -6


@pytest.mark.parametrize("stacked", [False, True])
def test_moe_block_matches_spec_reference_in_bf16(stacked):
    moe = bf16_module(SparseMoeBlock(TINY), seed=3)
    if stacked:
        fast_moe.stack_experts(moe)
    x = torch.randn(40, TINY.hidden_size, generator=torch.Generator().manual_seed(9)).to(BF16)
    with torch.no_grad():
        out, ref = moe(x[None])[0], moe_block_ref(moe, x, TINY.num_experts_per_token)
    # the order of the final sum shows only as 1-ulp bf16 differences, so count them
    assert rel(out, ref) < 1e-3 and (out != ref).float().mean() < 0.02


def test_rmsnorm_casts_to_bf16_before_the_weight_multiply():
    norm = bf16_module(kimi.RMSNorm(TINY.hidden_size), seed=10)
    x = torch.randn(64, TINY.hidden_size, generator=torch.Generator().manual_seed(11)).to(BF16)
    x32 = x.float()
    x_hat = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + 1e-5)
    with torch.no_grad():
        out = norm(x)
        right = x_hat.to(BF16) * norm.weight
        wrong = (x_hat * norm.weight.float()).to(BF16)
    # Computed floats: another CPU may sum the fp32 mean in another order and flip a rare bf16
    # rounding, so allow 1 % of elements to differ. The other rounding point differs in ~27 %.
    assert (out != right).float().mean() < 0.01 and (out != wrong).float().mean() > 0.1


def test_kda_gate_formula():
    H, K = 3, 4
    gen = torch.Generator().manual_seed(12)
    f = torch.randn(2, 5, H, K, generator=gen) * 4
    f[0, 0, 1] = torch.tensor([19.0, 25.0, 100.0, 1000.0])        # softplus(z) = z above 20: no inf
    A_log = torch.tensor([-1.0, 0.0, 2.0]).view(1, 1, H, 1)        # one per head
    dt_bias = torch.rand(H * K, generator=gen) - 0.5               # one per channel, c = h*K + d
    g = kda_ref.kda_gate(f, A_log, dt_bias)
    ref = []
    for i, fi in enumerate(f.flatten().tolist()):
        c = i % (H * K)                                             # channel c = h*K + d
        z = fi + dt_bias[c].item()
        softplus = z if z > 20 else math.log1p(math.exp(z))
        ref.append(-math.exp(A_log.flatten()[c // K].item()) * softplus)
    ref = torch.tensor(ref, dtype=torch.float64).view(f.shape)
    assert g.dtype == torch.float32 and torch.allclose(g.double(), ref, rtol=1e-6, atol=0)


def test_l2norm_formula_puts_eps_on_the_sum_of_squares():
    x = torch.randn(6, 128, generator=torch.Generator().manual_seed(13))
    x = x / x.norm(dim=-1, keepdim=True) * torch.logspace(-4, 0, 6)[:, None]    # norms 1e-4 .. 1
    ref = x.double() / (x.double().square().sum(-1, keepdim=True) + 1e-6).sqrt()
    assert torch.allclose(kda_ref.l2norm(x).double(), ref, rtol=1e-5, atol=0)


# ------------------------------------------------------------------------------------------------
# Config, parameter count, checkpoints

OFFICIAL_CONFIG = {
    "architectures": ["KimiLinearForCausalLM"], "model_type": "kimi_linear", "dtype": "bfloat16",
    "vocab_size": 163840, "hidden_size": 2304, "num_hidden_layers": 27, "num_attention_heads": 32,
    "num_key_value_heads": 32, "head_dim": 72, "hidden_act": "silu", "intermediate_size": 9216,
    "moe_intermediate_size": 1024, "num_experts": 256, "num_experts_per_token": 8,
    "num_shared_experts": 1, "first_k_dense_replace": 1, "moe_layer_freq": 1,
    "moe_renormalize": True, "moe_router_activation_func": "sigmoid",
    "routed_scaling_factor": 2.446, "use_grouped_topk": True,
    "num_expert_group": 1, "topk_group": 1, "kv_lora_rank": 512, "q_lora_rank": None,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "mla_use_nope": True,
    "rope_theta": 10000.0, "rope_scaling": None, "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False,
    "bos_token_id": 163584, "eos_token_id": 163586, "pad_token_id": 163839, "use_cache": True,
    "linear_attn_config": {
        "kda_layers": [1, 2, 3, 5, 6, 7, 9, 10, 11, 13, 14, 15, 17, 18, 19, 21, 22, 23, 25, 26],
        "full_attn_layers": [4, 8, 12, 16, 20, 24, 27],
        "head_dim": 128, "num_heads": 32, "short_conv_kernel_size": 4}}


def test_official_config_gives_default_args(tmp_path):
    cfg = copy.deepcopy(OFFICIAL_CONFIG)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert ModelArgs.from_json(tmp_path / "config.json") == ModelArgs()
    del cfg["linear_attn_config"]["num_heads"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    missing = "missing required key 'linear_attn_config.num_heads'"
    with pytest.raises(CheckpointError, match=missing):
        ModelArgs.from_json(tmp_path / "config.json")


def test_parameter_count_of_default_args():
    with torch.device("meta"):                                     # shapes only, no memory
        model = Transformer(ModelArgs())
    n = sum(p.numel() for p in model.parameters())
    print(f"\nKimi-Linear-48B-A3B parameters: {n:,} in {len(model.state_dict()):,} tensors")
    assert n == 49_122_681_728 and len(model.state_dict()) == 20_493


@pytest.fixture(scope="module")
def ckpt(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(path, num_shards=3)
    return path


def test_checkpoint_round_trip(model, ckpt, tokens, tmp_path):
    shards = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    files = ["config.json", *shards, "model.safetensors.index.json"]
    assert sorted(p.name for p in ckpt.iterdir()) == files
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    state = model.state_dict()
    assert set(index["weight_map"]) == set(state)
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in state.values())
    linear = json.loads((ckpt / "config.json").read_text())["linear_attn_config"]
    assert linear["full_attn_layers"] == [2, 4] and linear["kda_layers"] == [1, 3]      # 1-based
    assert ModelArgs.from_json(ckpt / "config.json") == TINY

    loaded = Transformer.from_pretrained(ckpt, device="cpu", max_batch_size=2, max_seq_len=256)
    assert loaded.state_dict().keys() == state.keys()
    assert all(torch.equal(loaded.state_dict()[n], t) for n, t in state.items())
    # Computed floats, not stored bytes: memory-mapped weights are not 64-byte aligned, so the CPU's
    # matmul may take another code path and round differently: allow fp32 rounding noise (eps 1.2e-7
    # per operation, a few hundred operations deep), far below any real difference (1e-2 and up).
    assert rel(loaded(tokens), model(tokens)) < 1e-5

    bf16 = Transformer.from_pretrained(ckpt, device="cpu", dtype=torch.bfloat16)
    for n, t in bf16.state_dict().items():
        assert t.dtype == (torch.float32 if n.endswith(("A_log", "dt_bias")) else torch.bfloat16), n
    # bf16 runs on CPU too; the gap is bf16 rounding plus a few top-2 routing choices that flip
    assert rel(bf16(tokens[:1, :80]), model(tokens[:1, :80])) < 0.2
    bf16.save_pretrained(tmp_path, num_shards=2)            # mixed dtypes survive a save too
    saved = {**load_file(tmp_path / "model-00001-of-00002.safetensors"),
             **load_file(tmp_path / "model-00002-of-00002.safetensors")}
    assert all(saved[n].dtype == t.dtype for n, t in bf16.state_dict().items())


def _break_shard(path, edit):
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def _break_index(ckpt, edit):
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    edit(index["weight_map"])
    index_path.write_text(json.dumps(index))


SHARD2 = "model-00002-of-00003.safetensors"


def _drop_first(tensors):
    del tensors[sorted(tensors)[0]]


def _shrink_first(tensors):
    name = sorted(tensors)[0]
    tensors[name] = tensors[name][:-1]


def _rename_config_key(ckpt, old, new):
    (ckpt / "config.json").write_text((ckpt / "config.json").read_text().replace(old, new))


BREAKS = {   # how to break a checkpoint -> what the one-line error message must say
    "missing shard": (lambda c: (c / SHARD2).unlink(),
                      SHARD2 + ": shard listed in the index is missing"),
    "truncated shard": (lambda c: (c / SHARD2).write_bytes((c / SHARD2).read_bytes()[:-100]),
                        SHARD2 + ": unreadable or truncated shard"),
    "missing tensor": (lambda c: _break_shard(c / SHARD2, _drop_first),
                       SHARD2 + ": lacks tensors the index lists in it: "),
    "wrong shape": (lambda c: _break_shard(c / SHARD2, _shrink_first),
                    SHARD2 + ": has tensors of the wrong shape: "),
    "extra tensor": (lambda c: _break_shard(c / SHARD2, lambda t: t.update(bogus=torch.zeros(3))),
                     SHARD2 + ": holds tensors not listed for it in the index: bogus"),
    "extra tensor, indexed": (lambda c: _break_index(c, lambda w: w.update(bogus=SHARD2)),
                              "lists tensors this model does not have: bogus"),
    "unindexed tensor": (lambda c: _break_index(c, lambda w: w.pop("lm_head.weight")),
                         "lacks tensors this model needs: lm_head.weight"),
    "missing index": (lambda c: (c / "model.safetensors.index.json").unlink(),
                      "model.safetensors.index.json: cannot read the index"),
    "missing config key": (lambda c: _rename_config_key(c, '"kv_lora_rank"', '"kv_rank"'),
                           "config.json: missing required key 'kv_lora_rank'"),
}


@pytest.mark.parametrize("kind", BREAKS)
def test_broken_checkpoint_raises_clear_error(ckpt, tmp_path, kind):
    broken = shutil.copytree(ckpt, tmp_path / "broken")
    breaker, message = BREAKS[kind]
    breaker(broken)
    with pytest.raises(CheckpointError) as err:
        Transformer.from_pretrained(broken, device="cpu")
    assert message in str(err.value) and "\n" not in str(err.value)
    if kind in ("missing tensor", "wrong shape"):       # the offending tensor is named
        assert sorted(load_file(ckpt / SHARD2))[0] in str(err.value)


def test_matches_native_transformers(ckpt, tokens, tmp_path):
    """Optional oracle: transformers >= 5.17 has a native kimi_linear loading the official layout.
    It takes the routing weights from the unbiased sigmoid (trap 1), so compare with that flag."""
    transformers = pytest.importorskip("transformers", minversion="5.17")
    folder = shutil.copytree(ckpt, tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "pad_token_id": None}))   # tiny vocab
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ours = Transformer.from_pretrained(folder, device="cpu", max_batch_size=2, max_seq_len=256)
    for gate in (m for m in ours.modules() if isinstance(m, kimi.MoEGate)):
        gate.args = replace(gate.args, routing_weights_biased=False)
    with torch.no_grad():
        assert rel(ours(tokens), hf(tokens).logits) < 1e-4


# ------------------------------------------------------------------------------------------------
# Peak host memory while loading a multi-shard checkpoint (measured in a fresh process)

MEASURE = """
import re, sys, torch, kimi
def peak():     # VmHWM: this process's peak resident set (ru_maxrss inherits pytest's at fork)
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
with torch.device("meta"):
    kimi.Transformer(kimi.CONFIGS["tiny"])      # warm up: the first meta build imports ~150 MB
before = peak()
model = kimi.Transformer.from_pretrained(sys.argv[1], device="cpu", dtype=eval(sys.argv[2]))
print(peak() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_host_memory_while_loading(tmp_path):
    args = replace(TINY, vocab_size=32768, hidden_size=512, num_experts=16,
                   moe_intermediate_size=1024, intermediate_size=2048)
    big = Transformer(args)                                 # ~75M parameters, ~300 MB in fp32
    big.save_pretrained(tmp_path, num_shards=4)
    size = sum(t.numel() * 4 for t in big.state_dict().values())
    shard = max(p.stat().st_size for p in tmp_path.glob("*.safetensors"))
    del big
    delta = {}
    for dtype in ("None", "torch.bfloat16"):
        run = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path), dtype],
                             capture_output=True, text=True, cwd=ROOT, check=True)
        delta[dtype] = int(run.stdout.split()[-1])
    print(f"\ncheckpoint {size / 2**20:.0f} MiB in 4 shards (largest {shard / 2**20:.0f} MiB); "
          f"peak RSS growth while loading: fp32 memory-mapped {delta['None'] / 2**20:.0f} MiB, "
          f"cast to bf16 {delta['torch.bfloat16'] / 2**20:.0f} MiB (the bf16 model itself is "
          f"{size / 2**21:.0f} MiB)")
    assert delta["None"] < shard / 2                            # weights stay on disk, mapped
    assert delta["torch.bfloat16"] < size / 2 + 1.25 * shard    # the bf16 copy + about one shard


# ------------------------------------------------------------------------------------------------
# CUDA: the Triton KDA path of a layer equals the kda_ref path

def bf16_kda_layer_on_gpu():
    if kimi.kda_triton is None:
        pytest.skip("kda_triton does not import (no Triton)")
    args = replace(TINY, hidden_size=256, kda_num_heads=4, kda_head_dim=128)
    layer = randomize(KimiDeltaAttention(args)).cuda()
    for n, p in layer.named_parameters():                          # bf16, except A_log and dt_bias
        p.data = p.data if n in ("A_log", "dt_bias") else p.data.bfloat16()
    layer.setup_cache(2, 512, torch.bfloat16, "cuda")
    return layer


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for the kda_triton path")
def test_triton_kda_layer_matches_reference(monkeypatch):
    layer = bf16_kda_layer_on_gpu()
    x = torch.randn(2, 300, 256, device="cuda", dtype=torch.bfloat16)

    def run():      # one prefill, a prefill in pieces (Triton with an initial state), a step
        with torch.no_grad():
            whole = layer(x, 0)
            pieces = torch.cat([layer(x[:, :10], 0), layer(x[:, 10:200], 10),
                                layer(x[:, 200:299], 200), layer(x[:, 299:], 299)], dim=1)
        return whole, pieces, layer.recurrent_state.clone()

    fast = run()
    monkeypatch.setattr(kimi, "KERNELS", False)                 # all torch: KDA, short convs
    ref = run()
    for a, b in zip(fast, ref):
        assert rel(a, b) < 5e-3
    assert rel(fast[1], fast[0]) < 5e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for the kda_triton path")
def test_triton_kda_layer_hides_left_padding():
    """The Triton kernels (chunked prefill, recurrent step) see left padding as zero input too: a
    padded row equals its tokens alone. bf16 with another chunk alignment: rel 5e-3, as above."""
    layer = bf16_kda_layer_on_gpu()
    x = torch.randn(2, 201, 256, device="cuda", dtype=torch.bfloat16)      # 200 + 1 decode step
    with torch.no_grad():
        both = torch.cat([layer(x[:, :200], 0, pad=torch.tensor([163, 0], device="cuda")),
                          layer(x[:, 200:], 200)], dim=1)
        alone = torch.cat([layer(x[:1, 163:200], 0), layer(x[:1, 200:], 37)], dim=1)
    assert rel(both[:1, 163:], alone) < 5e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for CUDA graphs")
@pytest.mark.parametrize("fused", [False, True])
def test_cuda_graph_decode_equals_eager_decode(tokens, fused):
    """A graph of kimi.py's forward replays the eager kernels (bf16: rel 1e-3, reduction order).
    fast.decode's fused step (fused) computes the same math in other kernels: checked in fp32, where
    it agrees to fp32 rounding (in bf16 the tiny model's routing would flip on 2^-8 differences)."""
    model = bf16_module(Transformer(TINY), seed=12).cuda().eval()
    if fused:
        model.float()
    model.stack_experts()
    model.setup_cache(max_batch_size=2, max_seq_len=160)
    graph = cuda_graph_decoder(model, 2, None if fused else model)      # before the prefill
    tok = tokens[:, :110].cuda()

    def run(step):                                              # a prefill, then 10 decode steps
        out = [model(tok[:, :100], start_pos=0, last_only=True)]
        return torch.cat(out + [step(tok[:, t:t + 1], t).clone() for t in range(100, 110)], dim=1)

    eager = run(lambda t, pos: model(t, torch.tensor(pos, device="cuda"), last_only=True))
    graphed = run(graph)
    assert rel(graphed, eager) < (1e-5 if fused else 1e-3)
