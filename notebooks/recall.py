"""
Recall in miniature: helpers for notebooks/03_recall_in_miniature.ipynb.

The Kimi Linear report (https://arxiv.org/abs/2510.26692) compares KDA, Gated DeltaNet and Mamba2 on
synthetic recall tasks. This module builds the classroom version from kimi.py's own layers:
    tasks     mqar_batch (multi-query associative recall), stack_batch (last in, first out)
    models    build_model("kda" | "gdn" | "mla", ...): tiny kimi.Transformer models that differ
              only in their mixer; "gdn" is KDA with one decay per head (ScalarDecayPerHead)
    training  train(...): Adam on fresh random batches, accuracy on a fixed held-out batch
Everything is seeded: the same seed gives the same batches and the same initial weights.
"""
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

import kimi

IGNORE = -100               # target at positions that are not scored (F.cross_entropy's default)

# Vocabulary (64 tokens): 0 unused, keys 1..24, values 25..48, noise 49..61, PUSH 62, POP 63.
KEYS = torch.arange(1, 25)
VALUES = torch.arange(25, 49)
NOISE = torch.arange(49, 62)
PUSH, POP = 62, 63
VOCAB = 64


# -------------------------------------------------------------------------------------------------
# Tasks: each returns tokens [B, T] int64 and targets [B, T] int64 (IGNORE where nothing is scored)

def mqar_batch(batch_size, seq_len, num_pairs, gen):
    """Multi-query associative recall (Zoology's MQAR, https://arxiv.org/abs/2312.04927).
    The sequence opens with num_pairs key-value pairs, k1 v1 k2 v2 ...; then noise tokens, among
    which every key comes back once, in a random order and at a random place, followed by its
    value. The model is scored at each returning key: does it predict the value it was given?

        k3 v3 k1 v1 k2 v2  n n n k1 v1 n n k3 v3 n n n n k2 v2 n
                                 ^ target v1  ^ target v3   ^ target v2
    """
    B, T, n = batch_size, seq_len, num_pairs
    slots = (T - 2 * n) // 2                # places (2 tokens each) where a query can go
    if slots < n:
        raise ValueError(f"seq_len={T} is too short for {n} pairs and their {n} queries")
    keys = torch.rand(B, len(KEYS), generator=gen).argsort(-1)[:, :n]      # distinct, [B, n]
    keys = KEYS[keys]
    values = VALUES[torch.randint(len(VALUES), (B, n), generator=gen)]     # repeats allowed
    tokens = NOISE[torch.randint(len(NOISE), (B, T), generator=gen)]
    tokens[:, 0:2 * n:2] = keys
    tokens[:, 1:2 * n:2] = values
    targets = torch.full((B, T), IGNORE)
    # the queries: slot s covers positions 2n + 2s (the key) and 2n + 2s + 1 (its value)
    where = 2 * n + 2 * torch.rand(B, slots, generator=gen).argsort(-1)[:, :n]  # [B, n]
    order = torch.rand(B, n, generator=gen).argsort(-1)                   # which pair, where
    rows = torch.arange(B)[:, None]
    tokens[rows, where] = keys.gather(1, order)
    tokens[rows, where + 1] = values.gather(1, order)
    targets[rows, where] = values.gather(1, order)
    return tokens, targets


def stack_batch(batch_size, seq_len, gen, push_prob=0.5):
    """A stack, written as operations of two tokens: "PUSH x" puts value x on top; "POP n" takes
    the top off, and the model must name it at the POP token (n is a noise token). A POP on an
    empty stack becomes a PUSH, so every POP has an answer.

        PUSH v7 PUSH v2 POP n PUSH v5 POP n POP n
                        ^ v2        ^ v5  ^ v7
    """
    B, n_ops = batch_size, seq_len // 2
    pops = (torch.rand(B, n_ops, generator=gen) >= push_prob).tolist()
    vals = VALUES[torch.randint(len(VALUES), (B, n_ops), generator=gen)].tolist()
    noise = NOISE[torch.randint(len(NOISE), (B, n_ops), generator=gen)].tolist()
    tokens = [[0] * seq_len for _ in range(B)]
    targets = [[IGNORE] * seq_len for _ in range(B)]
    for b in range(B):                          # plain Python lists: one real stack per row
        stack = []
        for i in range(n_ops):
            if pops[b][i] and stack:
                tokens[b][2 * i:2 * i + 2] = [POP, noise[b][i]]
                targets[b][2 * i] = stack.pop()
            else:
                tokens[b][2 * i:2 * i + 2] = [PUSH, vals[b][i]]
                stack.append(vals[b][i])
    return torch.tensor(tokens), torch.tensor(targets)


def token_name(t):
    """A readable name: keys k0..k23, values v0..v23, noise tokens '.', 'push', 'pop'."""
    t = int(t)
    if t in (PUSH, POP):
        return "push" if t == PUSH else "pop"
    if KEYS[0] <= t <= KEYS[-1]:
        return f"k{t - KEYS[0]}"
    if VALUES[0] <= t <= VALUES[-1]:
        return f"v{t - VALUES[0]}"
    return "."


def render(tokens, targets):
    """One sequence as text; a scored position shows as [token->expected answer]."""
    words = []
    for t, y in zip(tokens.tolist(), targets.tolist()):
        name = token_name(t)
        if y != IGNORE:
            name = f"[{name}->{token_name(y)}]"
        words.append(name)
    return " ".join(words)


# -------------------------------------------------------------------------------------------------
# Models

class ScalarDecayPerHead(nn.Module):
    """A parametrization (torch.nn.utils.parametrize) that stores one row per head and shows the
    K channels of that head the same row: [H, ...] -> [H*K, ...] by repeating each row K times.
    Applied to KDA's f_b_proj.weight [H*K, K] and dt_bias [H*K], it makes the forget gate
        g[t, h, c] = -exp(A_log[h]) * softplus(f_b_proj(f_a_proj(x))[h*K + c] + dt_bias[h*K + c])
    the same for every channel c of head h: one decay per head and token, which is the gate of
    Gated DeltaNet (https://arxiv.org/abs/2412.06464). Nothing else in KDA changes."""
    def __init__(self, K):
        super().__init__()
        self.K = K

    def forward(self, per_head):                # [H, ...] -> [H*K, ...]
        return per_head.repeat_interleave(self.K, dim=0)

    def right_inverse(self, per_channel):       # [H*K, ...] -> [H, ...]: keep channel 0 of each
        return per_channel[::self.K].clone()    # head (so the init has the scale it had)


def model_args(mixer, vocab_size=VOCAB, hidden=64, layers=2, heads=2, head_dim=16):
    """A tiny ModelArgs: KDA in every layer ("kda", "gdn") or MLA in every layer ("mla"); a dense
    SwiGLU MLP after each mixer (num_experts=0: no MoE at this size)."""
    full = tuple(range(layers)) if mixer == "mla" else ()
    return kimi.ModelArgs(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                          full_attn_layers=full, kda_num_heads=heads, kda_head_dim=head_dim,
                          num_attention_heads=heads, kv_lora_rank=2 * head_dim,
                          qk_nope_head_dim=head_dim, qk_rope_head_dim=head_dim // 2,
                          v_head_dim=head_dim, intermediate_size=2 * hidden, num_experts=0)


def build_model(mixer, seed, **sizes):
    """kimi.Transformer with the given mixer; "gdn" ties the decay of each head's channels."""
    if mixer not in ("kda", "gdn", "mla"):
        raise ValueError(f"mixer must be 'kda', 'gdn' or 'mla', not {mixer!r}")
    torch.manual_seed(seed)
    model = kimi.Transformer(model_args(mixer, **sizes))
    if mixer == "gdn":
        for layer in model.model.layers:
            kda = layer.self_attn
            parametrize.register_parametrization(kda.f_b_proj, "weight", ScalarDecayPerHead(kda.K))
            parametrize.register_parametrization(kda, "dt_bias", ScalarDecayPerHead(kda.K))
    return model


def count_params(model):
    """Trainable numbers (a parametrized tensor counts its stored per-head rows, not the copies)."""
    return sum(p.numel() for p in model.parameters())


# -------------------------------------------------------------------------------------------------
# Training

def accuracy(model, tokens, targets):
    """Fraction of the scored positions where the most likely next token is the target."""
    with torch.no_grad():
        logits = model(tokens)                                      # [B, T, vocab]
    scored = targets != IGNORE
    return (logits.argmax(-1)[scored] == targets[scored]).float().mean().item()


def train(model, make_batch, steps, eval_every, lr=3e-3, batch_size=64, eval_size=256, seed=0,
          device="cpu", log=print):
    """Adam with a short linear warm-up, then a constant rate, on fresh batches drawn by
    make_batch(batch_size, gen=generator) (tokens and targets [B, T] on the CPU). Returns
    {"step": [...], "acc": [...], "loss": [...], "seconds": float}: the held-out accuracy
    (eval_size sequences from a separate seed) every eval_every steps and at the end."""
    model.to(device).train()
    gen = torch.Generator().manual_seed(seed)
    held_out = make_batch(eval_size, gen=torch.Generator().manual_seed(seed + 10**6))
    eval_tokens, eval_targets = (t.to(device) for t in held_out)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    warmup = max(1, steps // 20)
    history = {"step": [], "acc": [], "loss": []}
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, step / warmup)
        tokens, targets = make_batch(batch_size, gen=gen)
        logits = model(tokens.to(device))                           # [B, T, vocab]
        loss = F.cross_entropy(logits.flatten(0, 1), targets.to(device).flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % eval_every == 0 or step == steps:
            history["step"].append(step)
            history["acc"].append(accuracy(model, eval_tokens, eval_targets))
            history["loss"].append(loss.item())
    history["seconds"] = time.perf_counter() - t0
    if log:
        log(f"  {steps} steps in {history['seconds']:.1f} s, final accuracy "
            f"{history['acc'][-1]:.1%}")
    return history
