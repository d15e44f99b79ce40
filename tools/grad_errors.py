"""Gradient errors of chunk_kda's backward against fp64, beside chunk_kda_ref's (README's table).

    python -m tools.grad_errors          # CPU: Triton's interpreter, under a minute; or a GPU

For each case: random inputs (kda_ref.random_inputs, with the case's gate), the loss
(o * dO).sum() + (S_T * dS_T).sum() with random dO and dS_T (and an initial state where the case
has one), and the six gradients (q, k, v, g, beta, initial state) by autograd three ways: through
kda_triton.chunk_kda (its Triton backward, kda_backward.py) in fp32, through the torch reference
chunk_kda_ref in fp32, and through recurrent_kda in fp64, the reference. Each cell is the relative
L2 error ||x - x64|| / ||x64|| of the kernel / of chunk_kda_ref; where x64 is 0 (the initial
state's gradient behind a first gate of -inf), the absolute ||x - x64||.
"""
import math
import sys

import torch
import torch.nn.functional as F

import kda_triton           # (imports fast first: without a GPU that chooses Triton's interpreter)
from kda_ref import chunk_kda_ref, random_inputs, recurrent_kda
from sample import Parser

CASES = [   # T, H, K, V, gate, initial state
    (63, 2, 32, 32, "logsigmoid", True),
    (130, 2, 32, 32, "bounded", False),
    (130, 2, 32, 32, "kimi", True),
    (70, 1, 128, 16, "kimi", True),
    (300, 1, 16, 16, "kimi", True),
    (100, 2, 16, 16, "kimi, every third g = -inf", True),
]
GATES = {   # g [B, T, H, K] from the Kimi gate of random_inputs
    "logsigmoid": lambda g: F.logsigmoid(torch.randn_like(g)),     # mild: fla's test gate
    "bounded": lambda g: -5 * torch.sigmoid(torch.randn_like(g)),  # at most 5 nats a token
    "kimi": lambda g: g,                    # Kimi's softplus gate, decay rates up to 16 (g ~ -85)
    "kimi, every third g = -inf": lambda g: g.index_fill(1, torch.arange(0, g.shape[1], 3),
                                                         -math.inf),    # from the first token on
}
NAMES = ("dq", "dk", "dv", "dg", "dbeta", "dh0")


def gradients(fn, inputs, h0, do, dst, dtype):
    """The gradients of (o * do).sum() + (S * dst).sum() through fn, inputs cast to dtype."""
    xs = [x.to(dtype).requires_grad_() for x in inputs]
    h = None if h0 is None else h0.to(dtype).requires_grad_()
    o, S = fn(*xs, initial_state=h, output_final_state=True)
    loss = (o * do.to(dtype)).sum() + (S * dst.to(S.dtype)).sum()
    return torch.autograd.grad(loss, xs + ([h] if h is not None else []))


def main(argv=()):
    ap = Parser(prog="python -m tools.grad_errors", description=__doc__.splitlines()[0])
    ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print("| T, H, K, V, gate, initial state | " + " | ".join(NAMES) + " |")
    print("|---" * (len(NAMES) + 1) + "|")
    for T, H, K, V, gate, has_h0 in CASES:
        torch.manual_seed(0)
        q, k, v, g, beta = random_inputs(1, T, H, K, V)
        inputs = [x.to(device) for x in (q, k, v, GATES[gate](g), beta)]
        h0 = torch.randn(1, H, K, V, device=device) if has_h0 else None
        do, dst = torch.randn_like(inputs[2]), torch.randn(1, H, K, V, device=device)
        ref = gradients(recurrent_kda, inputs, h0, do, dst, torch.float64)
        ours = gradients(kda_triton.chunk_kda, inputs, h0, do, dst, torch.float32)
        torch_ref = gradients(chunk_kda_ref, inputs, h0, do, dst, torch.float32)
        cells = []
        for a, b, r in zip(ours, torch_ref, ref):
            scale = r.norm() if r.norm() > 0 else 1.0             # relative, or absolute at 0
            err = [((x.double() - r).norm() / scale).item() for x in (a, b)]
            cells.append(" / ".join("0" if e == 0 else f"{e:.1e}" for e in err))
        cells += ["-"] * (len(NAMES) - len(cells))
        yes = "yes" if has_h0 else "no"
        print(f"| {T}, {H}, {K}, {V}, {gate}, {yes} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
