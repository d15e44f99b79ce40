"""Tokenize like the released Kimi tokenizer, generate through kimi.py's caches, stream the text.

    python sample.py --demo                       # offline: tiny random-weight checkpoint, noise text
    python sample.py --ckpt moonshotai/Kimi-Linear-48B-A3B-Instruct --chat "Is 123 a prime?"
    python sample.py --ckpt DIR --max-new-tokens 64 "The capital of France is"   # Base: plain continuation

    python sample.py --bench                      # GPU: speed of the full-size model, random weights
Reading order: Tokenizer, chat_prompt, sample, generate, checkpoint checks, the demo writer, main. Tokenizer
facts: ../shared/docs/ARCHITECTURE.md §5; the official one: tokenization_kimi.py in the model repositories.
"""
import argparse, base64, codecs, json, os, re, resource, sys, time

import tiktoken
import torch

import bench
from kimi import CheckpointError, ModelArgs, Transformer

# Kimi's pre-tokenisation regex, the eight alternatives of the release joined by "|". Han runs split off
# first; words are case-aware (CamelCase splits) with English contractions; digits go in groups of <= 3.
# `&&` is a class intersection: tiktoken's Rust engine (fancy-regex) supports it, Python's re does not.
PAT_STR = "|".join([
    r"[\p{Han}]+",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])
NUM_SPECIAL = 258                 # 256 reserved + 2: ids 163584..163841, two past the model's 163840 rows
EOS, IM_END = 163585, 163586      # generation stops at either; <|im_end|> is config.json's eos_token_id
DEFAULT_SYSTEM = "You are a helpful assistant provided by Moonshot-AI."
# Named specials of the K2-family tokenizer_config.json (the demo writes these; real folders bring theirs).
KIMI_SPECIALS = {163584: "[BOS]", 163585: "[EOS]", 163586: "<|im_end|>", 163587: "<|im_user|>",
                 163588: "<|im_assistant|>", 163590: "<|start_header_id|>", 163591: "<|end_header_id|>",
                 163593: "[EOT]", 163594: "<|im_system|>", 163595: "<|tool_calls_section_begin|>",
                 163596: "<|tool_calls_section_end|>", 163597: "<|tool_call_begin|>", 163598:
                 "<|tool_call_argument_begin|>", 163599: "<|tool_call_end|>", 163601: "<|im_middle|>",
                 163838: "[UNK]", 163839: "[PAD]"}


class Tokenizer:
    """tiktoken BPE over tiktoken.model with Kimi's regex and 258 specials; no BOS/EOS is added."""

    def __init__(self, ckpt_dir):
        with open(os.path.join(ckpt_dir, "tiktoken.model"), "rb") as f:  # "<base64 bytes> <rank>" lines
            ranks = {base64.b64decode(t): int(r) for t, r in (ln.split() for ln in f.read().splitlines() if ln)}
        with open(os.path.join(ckpt_dir, "tokenizer_config.json")) as f:
            named = {int(i): t["content"] for i, t in json.load(f).get("added_tokens_decoder", {}).items()}
        # The release starts the specials at len(ranks) = 163584, where its added_tokens_decoder starts too;
        # taking the latter lets the demo's small vocabulary keep the real special ids.
        base = min(named, default=len(ranks))
        self.special = {named.get(i, f"<|reserved_token_{i}|>"): i for i in range(base, base + NUM_SPECIAL)}
        self.enc = tiktoken.Encoding("kimi", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=self.special)
        self.ids = sorted(ranks.values()) + sorted(self.special.values())  # every id decode knows

    def encode(self, text):
        # As the release: special-token strings become special ids (allowed_special="all"), and text is cut
        # into <= 400k-char slices with no run of > 25k (non-)whitespace chars (tiktoken issue 195).
        return [t for s in _slices(text) for t in self.enc.encode(s, allowed_special="all")]

    def decode(self, ids):
        return self.enc.decode(ids)

    def stream(self, ids):
        """Decode piece by piece, holding back an unfinished UTF-8 character; pieces join to decode(ids)."""
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # same "replace" as tiktoken's decode
        for t in ids:
            if piece := utf8.decode(self.enc.decode_single_token_bytes(t)):
                yield piece
        if tail := utf8.decode(b"", final=True):
            yield tail

    def allowed(self, vocab_size, device=None):
        """[V] bool mask of ids both the model and the tokenizer know (the release: all below 163840)."""
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        mask[torch.tensor([i for i in self.ids if i < vocab_size])] = True
        return mask.to(device)


def _slices(text, max_chars=400_000, max_run=25_000):
    for i in range(0, len(text), max_chars):
        s, start, run = text[i:i + max_chars], 0, 0
        for j in range(len(s)):
            run = run + 1 if j and s[j].isspace() == s[j - 1].isspace() else 1
            if run > max_run:
                yield s[start:j]
                start, run = j, 1
        yield s[start:]


def chat_prompt(user, system=DEFAULT_SYSTEM):
    """The Instruct format: turns concatenated with no newlines, then the assistant generation prompt."""
    return (f"<|im_system|>system<|im_middle|>{system}<|im_end|>"
            f"<|im_user|>user<|im_middle|>{user}<|im_end|><|im_assistant|>assistant<|im_middle|>")


def sample(logits, temperature=0.0, top_k=None, top_p=None):
    """[B, V] fp32 logits -> [B] ids. Temperature 0 is argmax; otherwise top-k, then top-p, then a draw."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:  # keep the k largest (ties at the k-th value stay too)
        kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p is not None and top_p < 1:  # keep the smallest prefix of the sorted probs reaching top_p
        p, idx = probs.sort(-1, descending=True)
        probs = probs.scatter(-1, idx, p.masked_fill(p.cumsum(-1) - p >= top_p, 0))  # keeps the top one
    return torch.multinomial(probs, 1).squeeze(-1)  # renormalises; never draws a zero-probability id


@torch.no_grad()  # not inference_mode: torch.compile (--compile) fails on inference tensors
def generate(model, prompt, max_new_tokens, temperature=0.0, top_k=None, top_p=None, allowed=None,
             stop=(IM_END, EOS), decoder=None):
    """Yield new ids: one prefill over the prompt ids, then one decode step per token through the caches,
    by `decoder` if given (e.g. bench.cuda_graph_decoder(model, 1): a CUDA-graph replay per token)."""
    device = next(model.parameters()).device
    tokens, pos = torch.tensor([prompt], device=device), 0
    for _ in range(max_new_tokens):
        logits = (decoder(tokens, pos) if decoder and pos else model(tokens, pos, last_only=True))[:, -1]
        if allowed is not None:  # never emit an id the model (>= vocab_size) or the tokenizer lacks
            logits = logits.masked_fill(~allowed, float("-inf"))
        pos += tokens.shape[1]
        tok = sample(logits, temperature, top_k, top_p)
        if (t := tok.item()) in stop:
            return
        yield t
        tokens = tok.view(1, 1)


# ---- checkpoints: clear one-line errors, the hub, and the offline demo ----
class Fail(Exception):
    """Bad input: main prints the message as one line and exits with status 2."""


def resolve_ckpt(ckpt):
    if os.path.isdir(ckpt):
        return ckpt
    if os.path.exists(ckpt) or not re.fullmatch(r"[\w.-]+/[\w.-]+", ckpt):
        raise Fail(f"no checkpoint folder at {ckpt}")
    try:  # an "org/name" hub repo id; huggingface_hub is optional
        from huggingface_hub import snapshot_download
    except ImportError:
        raise Fail(f"{ckpt} is not a local folder; to get the weights, pip install huggingface_hub and "
                   f"rerun, or run `hf download {ckpt} --local-dir DIR` and pass --ckpt DIR") from None
    try:
        return snapshot_download(ckpt)
    except Exception as e:
        raise Fail(f"could not download {ckpt}: {type(e).__name__}: {e}".splitlines()[0]) from None


def check_ckpt(ckpt, device, dtype):
    """Cheap checks before anything is loaded: files, shards named by the index, memory. -> ModelArgs"""
    need = ["config.json", "model.safetensors.index.json", "tiktoken.model", "tokenizer_config.json"]
    if missing := [f for f in need if not os.path.isfile(os.path.join(ckpt, f))]:
        raise Fail(f"incomplete checkpoint folder {ckpt}: missing {', '.join(missing)}")
    try:
        args = ModelArgs.from_json(os.path.join(ckpt, "config.json"))
        with open(os.path.join(ckpt, "model.safetensors.index.json")) as f:
            index = json.load(f)
        shards, total = sorted(set(index["weight_map"].values())), index["metadata"]["total_size"]
    except CheckpointError as e:
        raise Fail(str(e)) from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise Fail(f"cannot read {ckpt}/model.safetensors.index.json: {e!r}") from None
    if missing := [s for s in shards if not os.path.isfile(os.path.join(ckpt, s))]:
        raise Fail(f"incomplete checkpoint folder {ckpt}: missing {len(missing)} of {len(shards)} shards "
                   f"({', '.join(missing[:3])})")
    need = total * (dtype.itemsize / 2 if dtype else 1)  # stored in bf16, as released
    free = free_memory(device)
    if free is not None and need > free:
        hint = " (try --dtype bf16)" if dtype and dtype.itemsize > 2 else ""
        raise Fail(f"not enough memory on {device}: the weights need {need / 2**30:.1f} GiB as "
                   f"{dtype or 'stored'}, {free / 2**30:.1f} GiB is free{hint}")
    return args


def free_memory(device):
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu" and os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo") as f:
            return int(re.search(r"MemAvailable:\s+(\d+) kB", f.read())[1]) * 1024
    return None  # unknown: skip the check


def pick_device(name):
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise Fail(f"unknown device {name!r} (try cpu or cuda)") from None
    backend, count = getattr(torch, device.type, None), torch.cuda.device_count()
    if device.type != "cpu" and not (hasattr(backend, "is_available") and backend.is_available()
                                     and (device.type != "cuda" or (device.index or 0) < count)):
        raise Fail(f"device {name} is not available here ({count} CUDA GPUs visible)")
    return device


DEMO_WORDS = ("the of and to in is you that it was for on are as with his they at be this from have or "
              "by one had not but what all were when we there can Kimi Linear attention delta model "
              "你好 世界 模型 🙂 🚀")
# Small enough to write in about a second, with the real 163840-row vocabulary so special ids line up.
DEMO_ARGS = dict(vocab_size=163840, hidden_size=64, num_hidden_layers=4, full_attn_layers=(1, 3),
                 kda_num_heads=2, kda_head_dim=32, num_attention_heads=2, kv_lora_rank=32,
                 qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, intermediate_size=128,
                 moe_intermediate_size=32, num_experts=8, num_experts_per_token=2)


def demo_ranks():
    """A toy tiktoken vocabulary: the 256 single bytes, then the prefixes of each word and " " + word."""
    toks = [bytes([b]) for b in range(256)]
    for w in DEMO_WORDS.split():
        for s in (w.encode(), b" " + w.encode()):
            toks += [s[:i] for i in range(2, len(s) + 1)]  # partial UTF-8 characters included, on purpose
    return {t: r for r, t in enumerate(dict.fromkeys(toks))}


def write_tokenizer(folder, ranks, specials=KIMI_SPECIALS):
    with open(os.path.join(folder, "tiktoken.model"), "w") as f:
        f.writelines(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items())
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"added_tokens_decoder": {str(i): {"content": s, "special": True}
                                            for i, s in specials.items()}}, f, indent=1)


def write_demo(folder):
    """A random-weight checkpoint in the official layout: config.json, 3 shards + index, tokenizer files."""
    os.makedirs(folder, exist_ok=True)  # bf16 like the release, except the fp32 A_log and dt_bias
    bench.random_model(ModelArgs(**DEMO_ARGS), torch.device("cpu"), 1, 1).save_pretrained(folder, num_shards=3)
    write_tokenizer(folder, demo_ranks())
    return folder


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="--bench [...]: time the full-size "
                                 "model on a GPU, random weights (bench.py; --bench --help lists its options)")
    ap.add_argument("prompt", nargs="?", help="prompt text (else --prompt-file, else standard input)")
    ap.add_argument("--ckpt", help="folder or hub id, e.g. moonshotai/Kimi-Linear-48B-A3B-Instruct")
    ap.add_argument("--demo", action="store_true", help="write and run a tiny random-weight checkpoint")
    ap.add_argument("--prompt-file")
    ap.add_argument("--chat", action="store_true", help="wrap the prompt in the Instruct chat format")
    ap.add_argument("--system", default=DEFAULT_SYSTEM, help="system turn for --chat")
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int)
    ap.add_argument("--top-p", type=float)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--device", help="default: cuda if present, else cpu")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"],
                    help="default: bf16 on GPU; on CPU the checkpoint's own (bf16), memory-mapped")
    ap.add_argument("--max-seq-len", type=int, default=4096)
    ap.add_argument("--compile", action="store_true", help="torch.compile the GPU decode step (slow start)")
    argv = sys.argv[1:] if argv is None else argv
    if "--bench" in argv:
        return bench.main([a for a in argv if a != "--bench"])
    args = ap.parse_args(argv)
    try:
        run(args)
    except Fail as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run(args):
    if not args.demo and not args.ckpt:
        raise Fail("give --ckpt DIR (or a hub repo id), or --demo to try a tiny random-weight model")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise Fail(f"--top-p must be in (0, 1], not {args.top_p}")
    if args.top_k is not None and args.top_k < 1:
        raise Fail(f"--top-k must be at least 1, not {args.top_k}")
    if not 0 <= args.temperature < float("inf"):  # also refuses nan
        raise Fail(f"--temperature must be a finite number >= 0, not {args.temperature}")
    if args.max_new_tokens < 1:
        raise Fail(f"--max-new-tokens must be at least 1, not {args.max_new_tokens}")
    device = pick_device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, None: None}[
        args.dtype or (None if device.type == "cpu" else "bf16")]  # None: keep the checkpoint's dtypes
    if args.demo:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        ckpt = write_demo(os.path.join(cache, "kimi-minimal-demo"))
        print(f"demo: wrote a tiny random-weight checkpoint to {ckpt}", file=sys.stderr)
    else:
        ckpt = resolve_ckpt(args.ckpt)
    model_args = check_ckpt(ckpt, device, dtype)

    if args.prompt is not None:
        text = args.prompt
    elif args.demo and not args.prompt_file:
        text = "Kimi Linear is"
    elif args.prompt_file or not sys.stdin.isatty():
        try:
            with open(args.prompt_file, "rb") if args.prompt_file else sys.stdin.buffer as f:
                text = f.read().decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise Fail(f"cannot read the prompt from {args.prompt_file or 'standard input'}: {e}") from None
    else:
        raise Fail("no prompt: pass it as an argument, with --prompt-file, or on standard input")
    try:
        tok = Tokenizer(ckpt)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise Fail(f"cannot read the tokenizer files in {ckpt}: {e!r}") from None
    prompt = tok.encode(chat_prompt(text, args.system) if args.chat else text)
    if not prompt:
        raise Fail("the prompt is empty")
    if len(prompt) > args.max_seq_len:
        raise Fail(f"the prompt has {len(prompt)} tokens but --max-seq-len is {args.max_seq_len}")
    if unknown := sorted({t for t in prompt if t >= model_args.vocab_size}):  # e.g. 163840, 163841
        raise Fail(f"the prompt holds special tokens the model has no embedding for: ids {unknown}")

    t0 = time.perf_counter()
    try:
        model = Transformer.from_pretrained(ckpt, device, dtype, max_seq_len=args.max_seq_len)
    except CheckpointError as e:
        raise Fail(str(e)) from None
    except torch.OutOfMemoryError:
        raise Fail(f"out of memory on {device} while loading {ckpt}") from None
    print(f"loaded {ckpt} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if args.seed is not None:
        torch.manual_seed(args.seed)

    max_new = min(args.max_new_tokens, args.max_seq_len - len(prompt) + 1)  # the last is not fed back
    fast = device.type == "cuda" and model.lm_head.weight.dtype == torch.bfloat16 and max_new > 1
    decoder = bench.cuda_graph_decoder(model, 1, args.compile) if fast else None   # before the clock
    ids = generate(model, prompt, max_new, args.temperature, args.top_k, args.top_p,
                   allowed=tok.allowed(model.args.vocab_size, device), decoder=decoder)
    print("" if args.chat else text, end="", flush=True)
    t0, stamps = time.perf_counter(), []  # stamps: when each new token arrived; stamps[0] ends the prefill
    for piece in tok.stream(stamps.append(time.perf_counter()) or t for t in ids):
        print(piece, end="", flush=True)
    print()
    n = len(stamps)
    prefill = len(prompt) / (stamps[0] - t0) if n else float("nan")
    decode = (n - 1) / (stamps[-1] - stamps[0]) if n > 1 else float("nan")
    peak = (f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated on {device}"
            if device.type == "cuda" else
            f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB process RSS")
    print(f"prompt {len(prompt)} tokens, generated {n} tokens; prefill {prefill:.1f} tok/s, "
          f"decode {decode:.1f} tok/s; peak memory {peak}", file=sys.stderr)
    if args.demo:
        print("note: the demo weights are random, so the text above is noise. For real text: python sample.py "
              "--ckpt moonshotai/Kimi-Linear-48B-A3B-Instruct --chat \"Is 123 a prime?\"", file=sys.stderr)


if __name__ == "__main__":
    main()
