"""
The routed experts, fast: stacked weights and grouped matmuls. A speed path beside kimi.py's
definition (SparseMoeBlock.run_experts, a readable loop over the experts), computing the same thing.

kimi.SparseMoeBlock.forward calls grouped_experts once stack_experts has run (kimi.Transformer.
stack_experts; from_pretrained does it on a GPU). There the loop would cost one host sync per expert
and a kernel launch per expert and matrix; the grouped matmuls cost two launches, never sync with
the host, and so fit in a CUDA graph (sample.cuda_graph_decoder). test_kimi.py checks the equality.

Shapes: N tokens, k experts per token, D hidden, F expert width, E experts.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


@torch.no_grad()     # the stacks are plain tensors, outside autograd
def stack_experts(moe):
    """Copy moe's experts into w13 [E', 2F, D] (w1 over w3) and w2 [E', D, F]: the E routed
    experts, then the shared expert as row E when it has their width (E' = E + 1; Kimi's has), so
    that a decode step runs it with the routed ones (decode.py). Each expert's weights become views
    of them, so the module names and the state_dict stay the checkpoint's. Call it on the device
    (on memory-mapped CPU weights it makes copies). After .to() or .float() the experts' weights
    are new tensors, no longer views: calling it again stacks them anew."""
    if moe.w13 is not None and moe.experts[0].w1.weight.data_ptr() == moe.w13.data_ptr():
        return                                                  # still stacked
    mats = [(e.w1, e.w3, e.w2) for e in moe.experts]            # (gate, up, down) Linears
    s = moe.shared_experts
    if s.gate_proj.weight.shape == moe.experts[0].w1.weight.shape:
        mats.append((s.gate_proj, s.up_proj, s.down_proj))
    w13 = torch.stack([torch.cat([gate.weight, up.weight]) for gate, up, _ in mats])
    w2 = torch.stack([down.weight for _, _, down in mats])
    for (gate, up, down), gate_up, down_w in zip(mats, w13, w2):
        w1, w3 = gate_up.chunk(2)
        gate.weight = nn.Parameter(w1, requires_grad=False)
        up.weight = nn.Parameter(w3, requires_grad=False)
        down.weight = nn.Parameter(down_w, requires_grad=False)
    moe.w13, moe.w2 = w13, w2


def grouped_experts(x, ids, w13, w2):
    """= SparseMoeBlock.run_experts: out[n, j] = expert ids[n, j] applied to token n.
    x [N, D], ids [N, k] -> [N, k, D], with every expert's rows in one grouped matmul (a stacked
    shared expert, row E, gets none)."""
    if (x.dtype, x.device) != (w13.dtype, w13.device):     # the model was moved or cast since
        raise ValueError(f"stacked experts are {w13.dtype} on {w13.device}, the input {x.dtype} on "
                         f"{x.device}: call model.stack_experts() again after .to() or .float()")
    expert_of_row, order = ids.flatten().sort()             # (token, slot) pairs grouped by expert
    xs = x[order // ids.shape[1]]                           # [N*k, D], expert e's rows contiguous
    experts = torch.arange(len(w13), device=x.device)
    ends = torch.searchsorted(expert_of_row, experts, right=True).int()     # [E] row ends
    gate, up = F.grouped_mm(xs, w13.mT, offs=ends).chunk(2, dim=-1)         # [N*k, F] each
    out = F.grouped_mm(F.silu(gate) * up, w2.mT, offs=ends)                 # [N*k, D]
    unsorted = torch.empty_like(out)
    unsorted[order] = out                                   # back to (token, slot) order
    return unsorted.view(*ids.shape, -1)
