"""
The routed experts, fast: stacked weights, grouped matmuls, and the weighted sum in one Triton
kernel. A speed path beside kimi.py's definition (SparseMoeBlock.run_experts, a readable loop over
the experts, then forward's fp32 weighted sum), computing the same thing.

kimi.SparseMoeBlock.forward calls grouped_moe once stack_experts has run (kimi.Transformer.
stack_experts; from_pretrained does it on a GPU). There the loop would cost one host sync per expert
and a kernel launch per expert and matrix; the grouped matmuls cost two launches, never sync with
the host, and so fit in a CUDA graph (fast.decode.cuda_graph_decoder).

The weighted sum (combine) then reads the expert-sorted rows where they lie:

    y[n, :] = sum_j w[n, j] * out[pos[n, j], :]     in fp32, j = 0, 1, ..., k-1, rounded once

out [N*k, D] is the grouped matmuls' output in expert order (sorted_experts), pos [N, k] where
(token n, slot j) landed in it. The reference (combine_ref) copies out back to (token, slot) order,
then to fp32 [N, k, D] (600 MB a layer at N = 8192) and reduces that; the kernel reads each row of
out once, where it lies, and writes y. Each program sums its k rows in slot order: the same sum
every run, no atomics (float atomics add in arrival order).
  _combine_kernel  (N / BM, D / BN)     BM tokens x BN columns a program
Before it, SiLU(gate) * up of the grouped matmul's [N*k, 2F] rows in one pass (silu_mul), where
torch takes two (F.silu, then the product) over views of half rows.
  _silu_mul_kernel (N*k / BM, F / BN)

Shapes: N tokens, k experts per token, D hidden, F expert width, E experts.
tests/test_moe.py and tests/test_kimi.py check the equalities.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fast import round_to, stack_linears

# Fixed tile (autotune breaks the interpreter). BN = 256 divides D = 2304; with 4 warps a program
# loads BM * BN / 128 = 16 values a thread per slot, in 16-byte pieces, and its k slots unrolled.
TILE = dict(BM=8, BN=256, num_warps=4)
SILU_TILE = dict(BM=8, BN=256, num_warps=4)    # silu_mul's: 16 values of each half a thread


@torch.no_grad()     # the stacks are plain tensors, outside autograd
def stack_experts(moe):
    """Copy moe's experts into w13 [E', 2F, D] (w1 over w3) and w2 [E', D, F]: the E routed
    experts, then the shared expert as row E when it has their width (E' = E + 1; Kimi's has), so
    that a decode step runs it with the routed ones (fast.decode). Each expert's weights become
    views of them, so the module names and the state_dict stay the checkpoint's. Call it on the
    device (on memory-mapped CPU weights it makes copies). After .to() or .float() the experts'
    weights are new tensors, no longer views: calling it again stacks them anew."""
    if moe.w13 is not None and moe.experts[0].w1.weight.data_ptr() == moe.w13.data_ptr():
        return                                                  # still stacked
    mats = [(e.w1, e.w3, e.w2) for e in moe.experts]            # (gate, up, down) Linears
    s = moe.shared_experts
    if s.gate_proj.weight.shape == moe.experts[0].w1.weight.shape:
        mats.append((s.gate_proj, s.up_proj, s.down_proj))
    # rows gate_0, up_0, gate_1, up_1, ... of one matrix are w13 [E', 2F, D], one expert a slice
    E_, D = len(mats), moe.experts[0].w1.in_features
    w13 = stack_linears([m for gate, up, _ in mats for m in (gate, up)])[0].view(E_, -1, D)
    moe.w2 = stack_linears([down for _, _, down in mats])[0].view(E_, D, -1)
    moe.w13 = w13


def sorted_experts(x, ids, w13, w2, kernel=False):
    """The rows of SparseMoeBlock.run_experts in expert order: x [N, D], ids [N, k] -> (out
    [N*k, D], pos [N, k]) with out[pos[n, j]] = expert ids[n, j] applied to token n. Every expert's
    rows go through one grouped matmul (a stacked shared expert, row E, gets none). kernel: SiLU
    and the product in silu_mul's kernel (forward only)."""
    if (x.dtype, x.device) != (w13.dtype, w13.device):     # the model was moved or cast since
        raise ValueError(f"stacked experts are {w13.dtype} on {w13.device}, the input {x.dtype} on "
                         f"{x.device}: call model.stack_experts() again after .to() or .float()")
    token, _, ends, pos = sort_by_expert(ids, len(w13))
    gu = F.grouped_mm(x[token], w13.mT, offs=ends)                          # [N*k, 2F]
    if kernel:                                          # the same in one pass over gu
        h = silu_mul(gu)
    else:
        gate, up = gu.chunk(2, dim=-1)                                      # [N*k, F] each
        h = F.silu(gate) * up
    out = F.grouped_mm(h, w2.mT, offs=ends)                                 # [N*k, D]
    return out, pos


def sort_by_expert(ids, E):
    """The (token, slot) pairs of ids [N, k] grouped by expert (of E), for grouped matmuls: ->
    token [N*k], the token of each sorted row; expert [N*k], its expert; ends [E] int32, where
    expert e's rows end; pos [N, k], the sorted row of pair (n, j)."""
    expert, order = ids.flatten().sort()                    # order[i]: the pair at sorted row i
    ends = torch.searchsorted(expert, torch.arange(E, device=ids.device), right=True).int()
    # pos = the inverse permutation: row order[i] of (token, slot) order landed at row i. A scatter
    # of N*k ints, cheap; scattering the [N*k, D] rows themselves (unsorted[order] = out) is several
    # times slower than gathering them.
    pos = torch.empty_like(order)
    pos[order] = torch.arange(len(order), device=order.device)
    return order // ids.shape[1], expert, ends, pos.view(ids.shape)


def grouped_experts(x, ids, w13, w2):
    """= SparseMoeBlock.run_experts: out[n, j] = expert ids[n, j] applied to token n.
    x [N, D], ids [N, k] -> [N, k, D] (what the weighted sum needs is grouped_moe)."""
    out, pos = sorted_experts(x, ids, w13, w2)
    return out.index_select(0, pos.flatten()).view(*ids.shape, -1)     # back to (token, slot)


def combine_ref(out, pos, w):
    """y[n] = sum_j w[n, j] out[pos[n, j]] in fp32, rounded once to out's dtype: the einsum of
    kimi.SparseMoeBlock.forward on sorted_experts' rows. out [N*k, D], pos [N, k], w fp32 [N, k]
    -> [N, D]."""
    return torch.einsum("nk,nkd->nd", w, out[pos].float()).to(out.dtype)   # via [N, k, D] fp32


def grouped_moe(x, ids, w, w13, w2, kernel=False):
    """= torch.einsum("nk,nkd->nd", w, run_experts(x, ids).float()).to(x.dtype), the routed part of
    SparseMoeBlock.forward: x [N, D], ids [N, k], w fp32 [N, k] -> [N, D] in x's dtype. kernel:
    SiLU(gate) * up and the weighted sum are Triton kernels (silu_mul; combine: the same fp32 sum
    in another order; forward only), else torch's code and the einsum."""
    out, pos = sorted_experts(x, ids, w13, w2, kernel)
    if kernel:
        return combine(out, pos, w)
    return combine_ref(out, pos, w)


@triton.jit
def _combine_kernel(out_ptr, pos_ptr, w_ptr, y_ptr, N, D, K: tl.constexpr, BM: tl.constexpr,
                    BN: tl.constexpr):
    """y[n, d] = sum_j w[n, j] out[pos[n, j], d] for BM tokens n and BN columns d, j in order."""
    n = tl.program_id(0) * BM + tl.arange(0, BM)                   # [BM] tokens
    d = tl.program_id(1) * BN + tl.arange(0, BN)                   # [BN] columns
    mask = (n < N)[:, None] & (d < D)[None, :]                     # [BM, BN]
    y = tl.zeros((BM, BN), tl.float32)
    for j in tl.static_range(K):        # unrolled: all k rows' loads can be in flight at once
        # pos is int64, so row * D is too: N*k*D passes 2^31 (int32 would wrap) at N = 116,509
        row = tl.load(pos_ptr + n * K + j, mask=n < N, other=0)    # [BM] rows of out
        wj = tl.load(w_ptr + n * K + j, mask=n < N, other=0.0)     # [BM] fp32
        o = tl.load(out_ptr + row[:, None] * D + d[None, :], mask=mask, other=0.0)
        y += wj[:, None] * o.to(tl.float32)
    dt: tl.constexpr = y_ptr.dtype.element_ty
    # the interpreter's cast truncates (fast.round_to): round_to rounds to nearest, as torch does
    tl.store(y_ptr + n[:, None].to(tl.int64) * D + d[None, :], round_to(y, dt).to(dt), mask=mask)


def combine(out, pos, w, BM=TILE["BM"], BN=TILE["BN"], num_warps=TILE["num_warps"]):
    """= combine_ref(out, pos, w): out [N*k, D] (bf16 or fp32), pos [N, k] int64 (each
    row of out once), w [N, k] fp32 -> y [N, D] in out's dtype. Forward only."""
    (N, K), D = pos.shape, out.shape[1]
    out, pos, w = out.contiguous(), pos.contiguous(), w.float().contiguous()
    y = out.new_empty(N, D)
    BN = min(BN, triton.next_power_of_2(D))                         # small D: one block
    _combine_kernel[(triton.cdiv(N, BM), triton.cdiv(D, BN))](
        out, pos, w, y, N, D, K, BM, BN, num_warps=num_warps)
    return y


@triton.jit
def silu_times(gate, up, dt: tl.constexpr):
    """silu(gate) * up in fp32, rounded as torch rounds F.silu(gate) * up in dtype dt: F.silu's
    fp32 result to dt, then the product (silu_mul; fast.fp8's quantisation of w2's input)."""
    gate = gate.to(tl.float32)
    s = round_to(gate / (1.0 + tl.exp(-gate)), dt)
    return round_to(s * up.to(tl.float32), dt)


@triton.jit
def _silu_mul_kernel(gu_ptr, h_ptr, M, F, BM: tl.constexpr, BN: tl.constexpr):
    """h[m, f] = silu(gate[m, f]) * up[m, f] for BM rows and BN columns, gate and up the halves
    of gu [M, 2F]."""
    m = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)[:, None]    # [BM, 1] rows
    f = tl.program_id(1) * BN + tl.arange(0, BN)[None, :]                   # [1, BN] columns
    mask = (m < M) & (f < F)
    gate = tl.load(gu_ptr + m * 2 * F + f, mask=mask, other=0.0)
    up = tl.load(gu_ptr + m * 2 * F + F + f, mask=mask, other=0.0)
    dt: tl.constexpr = h_ptr.dtype.element_ty
    tl.store(h_ptr + m * F + f, silu_times(gate, up, dt).to(dt), mask=mask)


def silu_mul(gu, BM=SILU_TILE["BM"], BN=SILU_TILE["BN"], num_warps=SILU_TILE["num_warps"]):
    """= F.silu(gate) * up for gate, up = gu.chunk(2, dim=-1): gu [M, 2F] contiguous (the
    grouped matmul's output) -> h [M, F] in gu's dtype. Forward only."""
    M, F2 = gu.shape
    F_ = F2 // 2
    h = gu.new_empty(M, F_)
    _silu_mul_kernel[(triton.cdiv(M, BM), triton.cdiv(F_, BN))](
        gu.contiguous(), h, M, F_, BM, min(BN, triton.next_power_of_2(F_)), num_warps=num_warps)
    return h
