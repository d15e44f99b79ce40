"""What several test files share: the repository's root, a tiny model and a relative error.
(Tests never import each other; they import this.)"""
from pathlib import Path

import torch

from kimi import ModelArgs

ROOT = Path(__file__).resolve().parent.parent       # where sample.py and the tools run from

# Two KDA and two MLA layers: KDA + dense MLP, MLA + MoE, KDA + MoE, MLA + MoE.
TINY = ModelArgs(vocab_size=128, hidden_size=64, num_hidden_layers=4, kda_num_heads=2,
                 kda_head_dim=16, full_attn_layers=(1, 3), num_attention_heads=2, kv_lora_rank=32,
                 qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, intermediate_size=96,
                 moe_intermediate_size=32, num_experts=8, num_experts_per_token=2)


def randomize(module, seed=0):
    """Make every parameter matter: norms, gate biases and the router bias get random values too."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.rand(p.shape, generator=gen)
            if name.endswith("A_log"):
                p.copy_(torch.log(1 + 15 * r))              # decay rates 1..16, as fla inits
            elif name.endswith(("dt_bias", "e_score_correction_bias")):
                p.copy_(r - 0.5)
            elif p.dim() == 1:                                      # RMSNorm weights
                p.copy_(0.5 + r)
            else:
                p.copy_((2 * r - 1) * p.shape[-1] ** -0.5)
    return module


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()
