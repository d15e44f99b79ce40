"""The FP8 measurements of README's "FP8 weights" section, on one H200, random weights at full size.

    python -m tools.measure_fp8 [--cap-gb 80] [--out results.json]

1. Accuracy end to end over a 512-token prompt: logits of the bf16 model against an fp32 reference
   (the same bf16 weights, each layer run in fp32 on the torch reference paths), and of the FP8
   model (the same weights quantised) against bf16 and against fp32: relative error, top-1
   agreement, mean KL(reference || model).
2. Under a memory cap (torch.cuda.set_per_process_memory_fraction; 80 GB = 80e9 bytes, less
   than the 85e9 bytes an H100 80 GB reports): load the FP8 model, prefill 8,192 tokens, decode
   at a 4,096 and a 131,072 context, each with its peak allocated memory and time; then the
   longest context whose cache and decode step still fit.
"""
import argparse
import json
import time

import torch

import kimi
from fast.fp8 import dequantize
from tools import fullsize, long_context
from tools.timing import cuda_time

GiB = 2 ** 30


def compare(logits, ref):
    """[T, V] fp32 each -> relative error, top-1 agreement, mean KL(ref || logits) in nats."""
    kl = torch.kl_div(logits.log_softmax(-1), ref.log_softmax(-1), log_target=True)
    return dict(rel=((logits - ref).norm() / ref.norm()).item(),
                top1=(logits.argmax(-1) == ref.argmax(-1)).float().mean().item(),
                kl=kl.sum(-1).mean().item())


def fp32_reference(model, tokens):
    """The logits with every layer run in fp32 (weights upcast one layer at a time: the fp32 model
    is 196 GB), KDA through kda_ref's torch code and the experts through their loop."""
    kernels, kimi.KERNELS = kimi.KERNELS, False          # the torch KDA and convs, in fp32
    torch.backends.cuda.matmul.allow_tf32 = False
    h = model.model.embed_tokens(tokens).float()
    for i, layer in enumerate(model.model.layers):
        with torch.device(tokens.device):
            ref = kimi.DecoderLayer(i, model.args)      # fp32; its experts unstacked (the loop)
        ref.load_state_dict(layer.state_dict())
        h = ref(h)
        del ref
    kimi.KERNELS = kernels
    return model.lm_head.float()(model.model.norm.float()(h))[0]   # (the model is dropped next)


def tame(model, factor=2.0 ** -3):
    """Scale every residual branch's output projection (o_proj, down_proj, the experts' w2) by a
    power of two, in place. With random weights at full scale each of the 27 layers adds as much as
    the residual stream holds and the model is chaotic: bf16 and fp32 logits then disagree
    completely, and no rounding error can be measured. Smaller branches (as GPT-2's 1/sqrt(2L)
    init, here 1/8 for 54 branches) make each layer a perturbation, as in trained models. A power
    of two is exact in bf16 and, applied to the scales, leaves the FP8 weights bit for bit."""
    for name, m in model.named_modules():
        if name.endswith(("o_proj", "down_proj")):
            (m.weight_scale if hasattr(m, "weight_scale") else m.weight).mul_(factor)
        elif isinstance(m, kimi.SparseMoeBlock):
            (m.s2 if hasattr(m, "s2") else m.w2).mul_(factor)   # stacked: the experts' w2 views
    return model


def accuracy(args, device, T=512):
    tokens = torch.randint(0, args.vocab_size, (1, T), device=device,
                           generator=torch.Generator(device).manual_seed(1))
    model = tame(fullsize.random_model(args, device, 0, 0))
    q_proj = model.model.layers[1].self_attn.q_proj.weight[:64].clone()  # to check the FP8 twin
    bf16 = model(tokens)[0]
    fp32 = fp32_reference(model, tokens)
    model = None
    torch.cuda.empty_cache()
    model = tame(fullsize.random_model(args, device, 0, 0, fp8=True))  # the same seed: same weights
    layer = model.model.layers[1].self_attn.q_proj
    twin = dequantize(layer.weight[:64], layer.weight_scale[:64])
    assert ((twin - q_proj.float()).abs() <= q_proj.float().abs() / 16 + 2 ** -9).all()
    fp8 = model(tokens)[0]
    model = None
    torch.cuda.empty_cache()
    return {"bf16 vs fp32": compare(bf16, fp32), "fp8 vs bf16": compare(fp8, bf16),
            "fp8 vs fp32": compare(fp8, fp32)}


def under_cap(args, device, cap):
    """Load, prefill and decode the FP8 model inside `cap` bytes; the longest context that fits."""
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(cap / total, device.index or 0)   # (needs an index)
    out, peak = {}, lambda: torch.cuda.max_memory_allocated(device) / GiB
    torch.cuda.reset_peak_memory_stats(device)
    t0 = time.time()
    model = fullsize.random_model(args, device, 0, 0, fp8=True)
    out["load"] = dict(peak_gib=peak(), seconds=time.time() - t0,
                       weights_gib=torch.cuda.memory_allocated(device) / GiB)
    weights = torch.cuda.memory_allocated(device)
    T = 8192
    model.setup_cache(1, T)
    torch.cuda.reset_peak_memory_stats(device)
    tokens = torch.randint(0, args.vocab_size, (1, T), device=device)
    ms = cuda_time(lambda: model(tokens, start_pos=0, last_only=True), runs=3)
    out["prefill 8192"] = dict(peak_gib=peak(), tok_s=T / ms * 1e3)
    for L in (4096, 131072):
        out[f"decode at {L}"] = decode_at(model, device, L) | dict(peak_gib=peak())
    # The longest context: the cache grows by cache_bytes per token; leave the decode step's own
    # workspace (measured at 4,096 above) and try, stepping down 2 % until it fits.
    per_token = args.cache_bytes(1, 1 << 20) / (1 << 20)
    work = out["decode at 4096"]["peak_gib"] * GiB - weights - args.cache_bytes(1, 4096)
    L = int((cap - weights - work) / per_token) // 1024 * 1024
    while L > 0:
        try:
            out["longest context"] = decode_at(model, device, L) | dict(context=L, peak_gib=peak())
            break
        except torch.OutOfMemoryError:
            L = int(L * 0.98) // 1024 * 1024
    out["cap_gib"] = cap / GiB
    return out


def decode_at(model, device, L, steps=16):
    """TPOT at B = 1 after a cache of L tokens (random values: time does not depend on them)."""
    model.setup_cache(0, 0)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    model.setup_cache(1, L)
    return dict(tpot_ms=long_context.random_cache_tpot_ms(model, L, steps))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cap-gb", type=float, default=80.0, help="memory cap in 1e9 bytes")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--config", default="kimi-linear-48b-a3b", choices=list(kimi.CONFIGS))
    ap.add_argument("--accuracy-only", action="store_true", help="(runs on a CPU too)")
    opts = ap.parse_args()
    args = kimi.CONFIGS[opts.config]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not opts.accuracy_only:
        ap.error("the memory cap needs a CUDA GPU (--accuracy-only runs on a CPU)")
    results = {}
    with torch.no_grad():
        results["accuracy"] = accuracy(args, device)
        report(results, opts.out)
        if not opts.accuracy_only:
            results["under_cap"] = under_cap(args, device, opts.cap_gb * 1e9)
            report(results, opts.out)


def report(results, path):
    print(json.dumps(results, indent=1), flush=True)
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
