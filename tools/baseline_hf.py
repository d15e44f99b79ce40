"""The transformers baseline of tools/bench.py: transformers' native KimiLinearForCausalLM
(model_type "kimi_linear", transformers >= 5.17) on random weights, built from our ModelArgs.
Without fla it runs transformers' pure-PyTorch KDA (chunk_kimi_delta_attention for prefill,
recurrent_kimi_delta_attention for 1-token decode). That chunked fallback holds ~3 MB of fp32
temporaries per token (a [B, H, T/64, 64, 64, K] decay mask): beside the 91.5 GiB of 48B weights
on a 141 GB GPU one prefill fits T = 8192, not 16384; use baseline_prefill's piece.
`python -m tools.baseline_hf` checks it against kimi.py on a tiny model (CPU, fp32).
"""
import torch
from transformers import DynamicCache, KimiLinearConfig, KimiLinearForCausalLM

import checkpoint


def baseline_model(args, device, dtype=torch.bfloat16):
    """KimiLinearForCausalLM for `args`, allocated once, directly on `device`, random weights."""
    config = KimiLinearConfig(**checkpoint.config_json(args, str(dtype).removeprefix("torch.")),
                              pad_token_id=None, bos_token_id=None, eos_token_id=None)
    with torch.device("meta"):                                  # no memory, no init
        model = KimiLinearForCausalLM(config).to(dtype)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith("A_log"):
                t.uniform_(1, 16).log_()
            elif name.endswith("dt_bias"):
                t.uniform_(-0.5, 0.5)
            elif name.endswith("e_score_correction_bias"):
                t.zero_()
            elif t.dim() == 1:                                  # RMSNorm weights
                t.fill_(1.0)
            else:                                               # linear, embedding, conv, experts
                t.normal_(0.0, t.shape[-1] ** -0.5)
    return model.eval()


@torch.inference_mode()
def baseline_prefill(model, tokens, piece=None):
    """Forward over tokens [B, T]; returns the last position's logits [B, vocab]. With `piece`, the
    prompt goes in slices of that many tokens through a cache (bounds the KDA fallback's memory)."""
    if piece is None:
        return model(input_ids=tokens, use_cache=False, logits_to_keep=1).logits[:, -1]
    cache = DynamicCache(config=model.config)
    for chunk in tokens.split(piece, dim=1):
        logits = model(input_ids=chunk, past_key_values=cache, use_cache=True,
                       logits_to_keep=1).logits
    return logits[:, -1]


def baseline_decoder(model, tokens, piece=None):
    """Prefill tokens [B, T] into a cache (in slices of `piece`, if given); return step(), which
    feeds each sequence its argmax token, updates the cache and returns new logits [B, vocab]."""
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        for chunk in tokens.split(piece or tokens.shape[1], dim=1):
            logits = model(input_ids=chunk, past_key_values=cache, use_cache=True,
                           logits_to_keep=1).logits

    @torch.inference_mode()
    def step():
        nonlocal logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)                        # [B, 1]
        logits = model(input_ids=nxt, past_key_values=cache, use_cache=True,
                       logits_to_keep=1).logits
        return logits[:, -1]
    return step


if __name__ == "__main__":      # tiny fp32 checks on CPU against kimi.py
    import tempfile
    from dataclasses import replace

    from kimi import CONFIGS, Transformer

    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    args = replace(CONFIGS["tiny"], routing_weights_biased=False)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    B, T, STEPS = 2, 150, 6                             # T > 2 KDA chunks, not a multiple of 64
    tokens = torch.randint(0, args.vocab_size, (B, T))
    baseline = baseline_model(args, "cpu", torch.float32)       # (a) builds and runs
    finite = baseline_prefill(baseline, tokens).isfinite().all().item()
    print("(a) baseline_model: logits finite:", finite)
    ours = Transformer(args).eval()                             # (b) same weights, same logits
    for p in ours.parameters():                 # norms, dt_bias, router bias, A_log: random too
        if p.dim() == 1 or p.shape[-1] == 1:
            p.uniform_(0.5, 1.5)
    ours.setup_cache(B, T + STEPS)
    with tempfile.TemporaryDirectory() as tmp:          # HF's loader fuses convs and experts
        ours.save_pretrained(tmp)
        hf = KimiLinearForCausalLM.from_pretrained(tmp, dtype=torch.float32, pad_token_id=None)
        hf.eval()
    shapes_hf = {n: t.shape for n, t in hf.state_dict().items()}
    shapes_baseline = {n: t.shape for n, t in baseline.state_dict().items()}
    assert shapes_hf == shapes_baseline, "baseline_model's layout differs from the checkpoint's"
    ref = ours(tokens, start_pos=0)[:, -1]                     # fills the caches for (c)
    whole, pieces = baseline_prefill(hf, tokens), baseline_prefill(hf, tokens, piece=40)
    print(f"(b) prefill last logits vs kimi.py: rel err {rel(whole, ref):.2e}; "
          f"in pieces of 40: {rel(pieces, ref):.2e}")
    step, errs = baseline_decoder(hf, tokens, piece=64), []     # (c) decode = ours token by token
    fed = baseline_prefill(hf, tokens).argmax(-1)               # what step() feeds first
    for i in range(STEPS):
        got = step()
        want = ours(fed[:, None], start_pos=T + i)[:, -1]
        errs.append(rel(got, want))
        fed = got.argmax(-1)
    print(f"(c) {STEPS} decode steps (B={B}, prefill in pieces of 64) vs kimi.py token by token: "
          f"max rel err {max(errs):.2e}")
