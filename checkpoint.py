"""
The official checkpoint layout, read and written: config.json, model-0000i-of-0000n.safetensors
shards and model.safetensors.index.json (the layout of moonshotai/Kimi-Linear-48B-A3B-*). kimi.py
calls these from ModelArgs.from_json, Transformer.from_pretrained and save_pretrained; here is only
the file format and its checks, so that every broken folder gets one line naming the file and the
tensor at fault (CheckpointError), never a traceback from deep inside torch.
"trap n" refers to the numbered traps of docs/architecture.md §6.
"""
import contextlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

FLOATS = (torch.bfloat16, torch.float16, torch.float32)     # what a weight may be stored as
# ModelArgs field -> key inside config.json's linear_attn_config (every other field is top level)
LINEAR_KEYS = {"kda_num_heads": "num_heads", "kda_head_dim": "head_dim",
               "short_conv_kernel_size": "short_conv_kernel_size",
               "full_attn_layers": "full_attn_layers"}
NOT_IN_CONFIG = ("routing_weights_biased",)  # ModelArgs fields that config.json lacks


class CheckpointError(ValueError):
    """A checkpoint folder that does not match the model; the message names the file or tensor.
    A ValueError (a bad value, read from a file), so callers catching bad input catch it too."""


# What a value read from a JSON file must be: kind -> (test, as the message says it). type(v) is
# int, not isinstance: JSON's true reads as True, an int to isinstance. 1e999 reads as inf.
KINDS = {
    "object": (lambda v: isinstance(v, dict), "an object"),
    "size": (lambda v: type(v) is int and v >= 0, "an integer >= 0"),
    "str": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "ints": (lambda v: isinstance(v, list) and all(type(i) is int for i in v),
             "a list of integers"),
    "strs": (lambda v: isinstance(v, list) and all(type(i) is str for i in v),
             "a list of strings"),
}


def want(value, kind, path, key):
    """`value` if it is of `kind` (KINDS), else a one-line CheckpointError naming file and key."""
    test, expected = KINDS[kind]
    if not test(value):
        shown = repr(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."  # a whole object: still one line
        raise CheckpointError(f"{path}: {key} must be {expected}, not {shown}")
    return value


def want_key(obj, key, kind, path, label=None):
    """obj[key], which must be there, checked by want; `label`: the key's path, as 'metadata.x'."""
    if key not in obj:
        raise CheckpointError(f"{path}: missing required key '{label or key}'")
    return want(obj[key], kind, path, label or key)


def read_json(path, what):
    """A JSON file's value (any type: the caller checks it); a key given twice, invalid JSON or an
    unreadable file raises a one-line CheckpointError naming the file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"), object_pairs_hook=_unique)
    except (OSError, ValueError) as e:      # UnicodeDecodeError and JSONDecodeError: ValueErrors
        raise CheckpointError(f"{path}: cannot read {what} ({getattr(e, 'strerror', None) or e})"
                              ) from None


def _unique(pairs):
    """json's object_pairs_hook: refuse a key given twice (json would silently keep the last)."""
    twice = [k for k, n in Counter(k for k, _ in pairs).items() if n > 1]
    if twice:
        raise ValueError(f"key {twice[0]!r} given twice")
    return dict(pairs)


def read_config(args_cls, path):
    """config.json -> args_cls (kimi.ModelArgs). Its layer lists are 1-based; unknown keys are
    ignored; a missing key or an invalid value raises CheckpointError naming it. The values'
    types are checked by args_cls itself (ModelArgs.__post_init__: check_args), the lists here."""
    cfg = read_json(path, "config")
    linear = cfg.get("linear_attn_config") if isinstance(cfg, dict) else None
    if not isinstance(linear, dict):
        raise CheckpointError(f"{path}: not a Kimi-Linear config (no linear_attn_config object)")
    kwargs = {}
    for f in fields(args_cls):
        src, key, where = cfg, f.name, ""
        if f.name in LINEAR_KEYS:
            src, key, where = linear, LINEAR_KEYS[f.name], "linear_attn_config."
        if f.name in NOT_IN_CONFIG:
            continue
        if key not in src:
            raise CheckpointError(f"{path}: missing required key '{where}{key}'")
        kwargs[f.name] = src[key]
    full = want(kwargs["full_attn_layers"], "ints", path, "linear_attn_config.full_attn_layers")
    kda = want(linear.get("kda_layers", []), "ints", path, "linear_attn_config.kda_layers")
    n = kwargs["num_hidden_layers"]
    if kda and type(n) is int and sorted(full + kda) != list(range(1, n + 1)):
        raise CheckpointError(f"{path}: linear_attn_config's kda_layers {kda!r} and "
                              f"full_attn_layers {full!r} must split the layers 1..{n}")
    kwargs["full_attn_layers"] = tuple(i - 1 for i in full)   # 1-based in config.json (trap 11)
    try:
        return args_cls(**kwargs)
    except ValueError as e:                                  # ModelArgs' own validation
        raise CheckpointError(f"{path}: {e}") from None


def require(ok, message):
    """A ValueError of one line unless ok: bad input (config values, call arguments)."""
    if not ok:
        raise ValueError(message)


def check_args(args):
    """Refuse impossible sizes in a ModelArgs (kimi.py), however it was made, before any tensor
    is: a ValueError of one line naming the field (read_config names the file too)."""
    for f in fields(args):
        value = getattr(args, f.name)
        if f.type is int:
            low = 0 if f.name in ("num_experts", "first_k_dense_replace") else 1
            ok = type(value) is int and value >= low
            require(ok, f"{f.name} must be an integer >= {low}, not {value!r}")
        elif f.type is float:
            ok = type(value) in (int, float) and 0 < value < math.inf
            require(ok, f"{f.name} must be a positive finite number, not {value!r}")
        elif f.type is bool:
            require(type(value) is bool, f"{f.name} must be true or false, not {value!r}")
    layers = args.full_attn_layers
    ok = isinstance(layers, (tuple, list)) and all(
        type(i) is int and 0 <= i < args.num_hidden_layers for i in layers)
    ok = ok and len(set(layers)) == len(layers)
    require(ok, "full_attn_layers must be distinct layer numbers below "
            f"num_hidden_layers={args.num_hidden_layers}, not {layers!r}")
    k, E = args.num_experts_per_token, args.num_experts
    require(E == 0 or k <= E, f"num_experts_per_token={k} exceeds num_experts={E}")
    # Group-limited routing with one group (the release's setting) picks from all experts
    groups = (args.num_expert_group, args.topk_group)
    require(groups == (1, 1), f"num_expert_group, topk_group = {groups}: only (1, 1)")


def read_quantization(ckpt_dir):
    """config.json's quantization_config (an FP8 folder), or None; its keys are fast/quantize.py's
    format, checked there. (A config.json that is no object is read_config's to refuse.)"""
    path = Path(ckpt_dir) / "config.json"
    cfg = read_json(path, "config")
    if not isinstance(cfg, dict) or cfg.get("quantization_config") is None:    # absent or null
        return None
    return want(cfg["quantization_config"], "object", path, "quantization_config")


def read_index(folder):
    """model.safetensors.index.json -> (weight_map {tensor name: shard file}, total_size)."""
    path = Path(folder) / "model.safetensors.index.json"
    index = want(read_json(path, "the index"), "object", path, "the index")
    metadata = want_key(index, "metadata", "object", path)
    total = want_key(metadata, "total_size", "size", path, "metadata.total_size")
    weight_map = want_key(index, "weight_map", "object", path)
    for name, shard in weight_map.items():
        want(shard, "str", path, f"weight_map[{name!r}]")
    return weight_map, total


def config_json(args, dtype="bfloat16"):
    """args -> the official config.json dict (1-based layer lists)."""
    cfg = {f.name: getattr(args, f.name) for f in fields(args)
           if f.name not in LINEAR_KEYS and f.name not in NOT_IN_CONFIG}
    full = [i + 1 for i in args.full_attn_layers]
    kda = [i for i in range(1, args.num_hidden_layers + 1) if i not in full]
    linear = {key: getattr(args, name) for name, key in LINEAR_KEYS.items()}
    linear.update(full_attn_layers=full, kda_layers=kda)
    fixed = {"num_key_value_heads": args.num_attention_heads, "q_lora_rank": None,
             "mla_use_nope": True, "hidden_act": "silu", "moe_router_activation_func": "sigmoid",
             "use_grouped_topk": True, "tie_word_embeddings": False}
    return {"architectures": ["KimiLinearForCausalLM"], "model_type": "kimi_linear",
            "dtype": dtype, **cfg, **fixed, "linear_attn_config": linear}


def resolve(ckpt):
    """A checkpoint folder, or an "org/name" hub id downloaded with huggingface_hub (optional)."""
    if os.path.isdir(ckpt):
        return ckpt
    if os.path.exists(ckpt) or not re.fullmatch(r"[\w.-]+/[\w.-]+", ckpt):
        raise CheckpointError(f"no checkpoint folder at {ckpt}")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(ckpt)
    except ImportError:
        raise CheckpointError(f"{ckpt} is not a local folder; to get the weights, pip install "
                              f"huggingface_hub and rerun, or `hf download {ckpt} --local-dir DIR` "
                              f"and --ckpt DIR") from None
    except Exception as e:
        message = f"could not download {ckpt}: {type(e).__name__}: {e}"
        raise CheckpointError(message.splitlines()[0]) from None


def check_folder(folder, need=()):
    """Cheap checks before anything is loaded: config.json, the index, every shard it names and the
    files in `need` exist, the index reads. -> the weights' total size in bytes (from the index)."""
    files = ["config.json", "model.safetensors.index.json", *need]
    missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        names = ", ".join(missing)
        raise CheckpointError(f"incomplete checkpoint folder {folder}: missing {names}")
    weight_map, total = read_index(folder)
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
    if missing:
        raise CheckpointError(f"incomplete checkpoint folder {folder}: missing {len(missing)} of "
                              f"{len(shards)} shards ({', '.join(missing[:3])})")
    return total


def free_memory(device):
    """Bytes free on `device` (a CUDA GPU, or this machine's RAM), or None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo") as f:
            return int(re.search(r"MemAvailable:\s+(\d+) kB", f.read())[1]) * 1024
    return None


def check_plain_load(ckpt_dir, dtype):
    """Before a load without transform: dtype is None or a float type, and the folder does not
    hold FP8 weights; either, else one line that says how to load them."""
    fp8 = "FP8 weights load through fast.quantize.from_pretrained(dir)"
    if dtype == torch.float8_e4m3fn:
        raise ValueError(f"dtype=torch.float8_e4m3fn: {fp8}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype: expected None or a float type like torch.bfloat16: {dtype!r}")
    if read_quantization(ckpt_dir):
        raise CheckpointError(f"{ckpt_dir} holds FP8 weights: {fp8}")


def load_into(model, ckpt_dir, device, dtype=None, transform=None):
    """Fill a meta-device model from the folder, shard by shard, straight onto `device`: host memory
    stays about one shard (on a CPU without a dtype change the weights stay memory-mapped).
    `dtype` casts all but A_log and dt_bias, which stay fp32 (trap 10). `transform` (the FP8
    loader of fast/quantize.py) maps each tensor read, after the cast, to {name: tensor}; the names
    in its set `makes` are made by it, so the folder need not hold them."""
    ckpt_dir = Path(ckpt_dir)
    index_path = ckpt_dir / "model.safetensors.index.json"
    weight_map, _ = read_index(ckpt_dir)
    # FP8 weights only through the transform, which checks which tensors hold them
    dtypes = FLOATS + ((torch.float8_e4m3fn,) if transform else ())
    expected = {name: t.shape for name, t in model.state_dict().items()}
    stored = set(expected) - (transform.makes if transform else set())    # the folder's names
    _check(index_path, "lists tensors this model does not have", set(weight_map) - stored)
    _check(index_path, "lacks tensors this model needs", stored - set(weight_map))
    shards = sorted(set(weight_map.values()))
    loaded_bytes, t0 = 0, time.perf_counter()
    for i, shard in enumerate(shards, 1):
        state = _read_shard(ckpt_dir, shard, weight_map, expected, dtypes, device)
        if dtype is not None:
            state = {n: cast(n, t, dtype) for n, t in state.items()}
        if transform is not None:
            state = {m: u for n, t in state.items() for m, u in transform(n, t).items()}
        model.load_state_dict(state, strict=False, assign=True)    # assign keeps their dtypes
        loaded_bytes += sum(t.numel() * t.element_size() for t in state.values())
        del state
        print(f"shard {i}/{len(shards)}: {loaded_bytes / 1e9:.2f} GB loaded in "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    unloaded = [n for n, p in model.state_dict().items() if p.is_meta]
    _check(ckpt_dir, "left parameters unloaded", unloaded)


def _read_shard(ckpt_dir, shard, weight_map, expected, dtypes, device):
    """The tensors of one shard, checked against the index, the model's shapes and `dtypes`."""
    path = ckpt_dir / shard
    listed = {n for n, s in weight_map.items() if s == shard}
    if not path.is_file():
        raise CheckpointError(f"{path}: shard listed in the index is missing")
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            names = set(f.keys())
            _check(path, "holds tensors not listed for it in the index", names - listed)
            _check(path, "lacks tensors the index lists in it", listed - names)
            state = {n: f.get_tensor(n) for n in sorted(names)}
    except SafetensorError as e:
        raise CheckpointError(f"{path}: unreadable or truncated shard ({e})") from None
    _check(path, "has tensors of the wrong shape", [
        f"{n} {list(t.shape)} (expected {list(expected[n])})"
        for n, t in state.items() if t.shape != expected[n]])
    allowed = "/".join(str(d).removeprefix("torch.") for d in dtypes)
    _check(path, f"has tensors not of dtype {allowed}", [
        f"{n} ({str(t.dtype).removeprefix('torch.')})" for n, t in state.items()
        if t.dtype not in dtypes])
    return state


def cast(name, t, dtype):
    """A_log and dt_bias stay fp32. Copied: a view into a cast shard would keep the whole shard
    mapped in memory."""
    if name.endswith(("A_log", "dt_bias")):
        return t.to(torch.float32, copy=True)
    return t.to(dtype)


def _check(where, problem, offenders, shown=8):
    """Raise a one-line CheckpointError naming the offending tensors, if there are any."""
    offenders = sorted(offenders)
    if offenders:
        more = f" and {len(offenders) - shown} more" if len(offenders) > shown else ""
        raise CheckpointError(f"{where}: {problem}: {', '.join(offenders[:shown])}{more}")


def save(model, ckpt_dir, num_shards=2):
    """Write config.json, num_shards safetensors shards and the index, in the official layout.
    The arguments are checked first (ValueError); the files are written into a hidden folder
    inside ckpt_dir and moved into place once all are written: a failed save leaves nothing."""
    ckpt_dir, state = Path(ckpt_dir), model.state_dict()
    if type(num_shards) is not int or not 1 <= num_shards <= len(state):
        raise ValueError(f"num_shards must be an integer in 1..{len(state)} (the model's "
                         f"tensors), not {num_shards!r}")
    on_meta = [n for n, t in state.items() if t.is_meta]
    if on_meta:
        raise ValueError(f"model: {len(on_meta)} tensors ({on_meta[0]}, ...) are on the meta "
                         f"device, never loaded: nothing to save")
    if ckpt_dir.exists() and not ckpt_dir.is_dir():
        raise ValueError(f"ckpt_dir: {ckpt_dir} exists and is not a folder")
    made = [p for p in (ckpt_dir, *ckpt_dir.parents) if not p.exists()]  # deepest first
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    # inside ckpt_dir, not beside it: on its file system (it may be a mount), moves are renames
    tmp = Path(tempfile.mkdtemp(prefix=".saving-", dir=ckpt_dir))
    try:
        files = _write(model, state, tmp, num_shards)
        for name in files:      # config.json last; older files of the same names are replaced
            os.replace(tmp / name, ckpt_dir / name)
        tmp.rmdir()
    except BaseException:       # KeyboardInterrupt too
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in made:
            with contextlib.suppress(OSError):      # rmdir: only while empty, as we made it
                folder.rmdir()
        raise


def _write(model, state, folder, num_shards):
    """save's files, into `folder`. -> their names, config.json last."""
    sizes = {n: t.numel() * t.element_size() for n, t in state.items()}
    total, done = sum(sizes.values()), 0
    groups = [[] for _ in range(num_shards)]
    for n in state:                         # contiguous runs of tensors, balanced by bytes
        groups[min(num_shards - 1, (done + sizes[n] // 2) * num_shards // max(total, 1))].append(n)
        done += sizes[n]
    weight_map, shards = {}, []
    for i, names in enumerate(groups, 1):
        shard = f"model-{i:05d}-of-{num_shards:05d}.safetensors"
        # copies: stacked experts (fast.moe.stack_experts) are views of one shared tensor
        tensors = {n: state[n].detach().to("cpu", copy=True, memory_format=torch.contiguous_format)
                   for n in names}
        save_file(tensors, folder / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, shard))
        shards.append(shard)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    dtype = str(model.model.embed_tokens.weight.dtype).removeprefix("torch.")
    config = config_json(model.args, dtype)
    if getattr(model, "quantization_config", None):                 # FP8 weights (fast/quantize.py)
        config["quantization_config"] = model.quantization_config
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return [*shards, "model.safetensors.index.json", "config.json"]
