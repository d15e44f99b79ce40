"""
FP8 (e4m3) weights for kimi.py: the 48B model in about 49 GB, decode steps that read half the bytes.
A transform beside the definition, as gpt-fast keeps quantize.py apart from model.py: kimi.py never
imports it. One call loads a model in FP8:

    model = fast.quantize.from_pretrained(ckpt_dir)   # a bf16 folder, quantised as it loads,
                                                       # or an FP8 folder (save_pretrained's)

What is quantised: every nn.Linear of KDA and MLA, the dense MLP, the routed and the shared
experts, except KEEP: kv_b_proj (the absorbed MLA decode reads it as per-head matrices, not as a
Linear; 0.06 % of the weights) and lm_head: its e4m3 error, an order of magnitude above bf16's,
reaches the output directly and flips the top-1 token at a fair share of positions, to save
under half a GB (README has the measurements).
What stays: the embedding, the norms, the router and its bias, A_log and dt_bias (fp32), the convs.

The format and the kernels are fast/fp8.py's; here: the modules, loading and saving.
"""
from pathlib import Path

import torch
import torch.nn as nn

import checkpoint
import kimi
from checkpoint import CheckpointError
from fast import pointwise
from fast.fp8 import (DECODE_ROWS, FP8, Fp8Linear, fp8_gpu, fp8_sorted_experts, fp8_stacked_expert,
                     quantize_rows, remember)
from fast.moe import combine

SCALE = "weight_scale"                  # state_dict: <module>.weight beside <module>.weight_scale
KEEP = ("kv_b_proj", "lm_head")         # nn.Linear children by name that stay in the model dtype
# config.json's entry for an FP8 folder (written by save_pretrained, checked when loading)
FORMAT = {"quant_method": "fp8_per_channel", "fmt": "float8_e4m3fn", "scale_suffix": SCALE,
          "scale_shape": "[out_features, 1], fp32, a power of two: weight = fp8 * scale",
          "activation_scheme": "dynamic per token", "not_quantized": list(KEEP)}


# -------------------------------------------------------------------------------------------------
# The modules

class Fp8MoE(kimi.SparseMoeBlock):
    """kimi.SparseMoeBlock with FP8 experts (routed and shared); the gate is unchanged."""
    def __init__(self, args, keep=KEEP):
        super().__init__(args)
        _swap_modules(self, keep)
        self.s13 = self.s2 = None           # stacked scales beside w13, w2 (prepare)

    def forward(self, x):
        """= SparseMoeBlock.forward: on an FP8 GPU the routed experts' rows in expert order
        (fp8_sorted_experts), summed where they lie (fast.moe.combine), and in prefill the shared
        expert from its stacked row (fp8_stacked_expert); elsewhere the loop and the MLP."""
        shape, x = x.shape, x.flatten(0, 1)                         # [N, D]
        ids, w = self.gate(x)                                       # [N, k] each
        if fp8_gpu(x):
            y = combine(*fp8_sorted_experts(x, ids, self), w)       # fp32 sum, rounded once
        else:                                                       # each expert dequantised
            y = torch.einsum("nk,nkd->nd", w, self.run_experts(x, ids).float()).to(x.dtype)
        E = len(self.experts)
        if fp8_gpu(x) and len(x) > DECODE_ROWS and len(self.w13) > E:     # stacked: row E
            shared = fp8_stacked_expert(x, self, E)
        else:
            shared = self.shared_experts(x)
        return (y + shared).view(shape)


class Fp8RMSNorm(kimi.RMSNorm):
    """kimi.RMSNorm whose output FP8 products read (a layer's two norms; the router reads it in
    bf16): in prefill on an FP8 GPU its kernel also quantises each token for them, where
    quantize_once finds it."""
    def forward(self, x):
        if not _quantises(x, self.weight, x.shape[-1]):
            return super().forward(x)
        y, q, scale = pointwise.rms_norm(x, self.weight, self.eps, quantize=True)
        remember(y, q, scale)
        return y


class Fp8GatedRMSNorm(kimi.GatedRMSNorm):
    """kimi.GatedRMSNorm before an FP8 o_proj: the same, a token's heads quantised as one row."""
    def forward(self, x, gate):                     # x, gate [B, T, H, V]
        if not _quantises(x, self.weight, x.shape[-2] * x.shape[-1]):
            return super().forward(x, gate)
        y, q, scale = pointwise.gated_rms_norm(x, gate, self.weight, self.eps, quantize=True)
        remember(y, q, scale)       # q [B*T, H*V]: what quantize_once(y.flatten(-2)) computes
        return y


def _quantises(x, weight, K):
    """Whether the FP8 GEMMs that read a norm's output, K values a token, quantise it (the paths of
    fast.fp8.fp8_linear): its kernel, an FP8 GPU, more than DECODE_ROWS tokens (decode: bf16)."""
    return kimi.use_kernels(x, weight) and fp8_gpu(x) and x.numel() // K > DECODE_ROWS


NORMS = {"input_layernorm": Fp8RMSNorm, "post_attention_layernorm": Fp8RMSNorm,
         "o_norm": Fp8GatedRMSNorm}                 # the norms whose output FP8 GEMMs read


def _swap_modules(module, keep):
    """Replace (on the meta device) each nn.Linear below module by an Fp8Linear, each MoE block by
    an Fp8MoE, the norms in NORMS by their quantising twins, except children named in keep."""
    for name, child in module.named_children():
        if name in keep:
            continue
        if isinstance(child, kimi.SparseMoeBlock) and not isinstance(child, Fp8MoE):
            setattr(module, name, Fp8MoE(child.gate.args, keep))
        elif isinstance(child, nn.Linear):
            setattr(module, name, Fp8Linear(child.in_features, child.out_features))
        elif name in NORMS and type(child) in (kimi.RMSNorm, kimi.GatedRMSNorm):
            setattr(module, name, NORMS[name](len(child.weight), child.eps))
        else:
            _swap_modules(child, keep)


# -------------------------------------------------------------------------------------------------
# Loading

def from_pretrained(ckpt_dir, device=None, max_batch_size=1, max_seq_len=4096):
    """kimi.Transformer.from_pretrained with FP8 weights: a bf16 or fp32 folder is quantised tensor
    by tensor as it loads (never whole in memory), an FP8 folder (config.json has a
    quantization_config) is read as it is. Eval mode, no gradients, caches set up."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args = kimi.ModelArgs.from_json(Path(ckpt_dir) / "config.json")
    with torch.device("meta"):                                  # no memory, no init
        model = kimi.Transformer(args)
    loader = prepare(model, device, checkpoint.read_quantization(ckpt_dir))
    checkpoint.load_into(model, ckpt_dir, device, transform=loader)
    model.requires_grad_(False).eval()
    model.setup_cache(max_batch_size, max_seq_len)
    return model


def prepare(model, device, stored=None):
    """Turn a meta-device model (or any module of one) into its FP8 form and return the transform
    that checkpoint.load_into applies to every tensor it reads. stored: the folder's
    quantization_config if it already holds FP8 weights (read as they are), else None (its bf16 or
    fp32 weights are quantised as they arrive on `device`). The experts' weights go straight into
    stacked tensors allocated here (the routed ones, then the shared one as row E when it has
    their width, as fast.moe.stack_experts stacks bf16), so the model never holds them twice."""
    if stored is not None and (not isinstance(stored, dict) or any(
            stored.get(key) != FORMAT[key] for key in ("quant_method", "fmt", "scale_suffix"))):
        raise CheckpointError(f"config.json: quantization_config {stored!r} is not this project's "
                              f"FP8 format (quant_method {FORMAT['quant_method']!r})")
    keep = KEEP
    if stored:
        names = stored.get("not_quantized", list(KEEP))
        key = "quantization_config.not_quantized"
        keep = tuple(checkpoint.want(names, "strs", "config.json", key))
    with torch.device("meta"):
        _swap_modules(model, keep)
    slots = {}                              # expert weight name -> (its view, its scale's view)
    for prefix, moe in model.named_modules():
        if isinstance(moe, Fp8MoE):
            E, D = len(moe.experts), moe.experts[0].w1.in_features
            F2 = 2 * moe.experts[0].w1.out_features
            mats = [(f"experts.{j}.w1", f"experts.{j}.w3", f"experts.{j}.w2") for j in range(E)]
            # the shared expert as row E when it has their width (fast.moe stacks bf16 so): the
            # decode kernels then read it with the routed ones
            if moe.shared_experts.gate_proj.out_features == F2 // 2:
                mats.append(tuple(f"shared_experts.{n}" for n in ("gate_proj", "up_proj",
                                                                  "down_proj")))
            moe.w13 = torch.empty(len(mats), F2, D, dtype=FP8, device=device)
            moe.w2 = torch.empty(len(mats), D, F2 // 2, dtype=FP8, device=device)
            moe.s13 = torch.empty(len(mats), F2, 1, device=device)
            moe.s2 = torch.empty(len(mats), D, 1, device=device)
            for j, (gate, up, down) in enumerate(mats):
                w1, w3 = moe.w13[j].chunk(2)
                s1, s3 = moe.s13[j].chunk(2)
                for name, w, s in ((gate, w1, s1), (up, w3, s3), (down, moe.w2[j], moe.s2[j])):
                    slots[f"{prefix}.{name}.weight".lstrip(".")] = (w, s)
    model.quantization_config = dict(FORMAT, not_quantized=list(keep))     # save_pretrained's
    fp8 = [n for n, m in model.named_modules() if isinstance(m, Fp8Linear)]
    names = {f"{n}.weight".lstrip(".") for n in fp8}
    return Fp8Loader(names, slots, stored is not None)


class Fp8Loader:
    """checkpoint.load_into's transform: (name, tensor) -> {name: tensor}. Quantised weights come
    out as e4m3 with their scale; everything else as the model dtype (bf16), A_log and dt_bias fp32.
    `makes`: the names it creates, which the folder therefore need not hold."""
    def __init__(self, names, slots, stored):
        self.names, self.slots, self.stored = names, slots, stored
        scales = {n.removesuffix("weight") + SCALE for n in names}
        self.makes = set() if stored else scales

    def __call__(self, name, t):
        if name.endswith("." + SCALE):                  # FP8 folders only (load_into checks)
            _expect(name, t, torch.float32)
            return {name: self._place(name.removesuffix(SCALE) + "weight", 1, t)}
        if name not in self.names:
            return {name: checkpoint.cast(name, t, torch.bfloat16)}
        if self.stored:
            _expect(name, t, FP8)
            return {name: self._place(name, 0, t)}
        if t.dtype == FP8:
            raise CheckpointError(f"{name}: stored as float8_e4m3fn, but config.json has no "
                                  "quantization_config to give its scales")
        q, scale = quantize_rows(t)
        scale_name = name.removesuffix("weight") + SCALE
        return {name: self._place(name, 0, q), scale_name: self._place(name, 1, scale)}

    def _place(self, weight, i, t):
        """Experts: copy into the stacked tensors and hand back the view; else t itself."""
        if weight not in self.slots:
            return t
        return self.slots[weight][i].copy_(t)


def _expect(name, t, dtype):
    if t.dtype != dtype:
        raise CheckpointError(f"{name}: stored as {str(t.dtype).removeprefix('torch.')}, "
                              f"expected {str(dtype).removeprefix('torch.')} in an FP8 folder")
