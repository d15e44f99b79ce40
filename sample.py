"""Tokenize like the released Kimi tokenizer, generate through kimi.py's caches, stream the text.

    python sample.py --demo                 # offline: a tiny random-weight checkpoint, noise text
    python sample.py --ckpt moonshotai/Kimi-Linear-48B-A3B-Instruct --chat "Is 123 a prime?"
    python sample.py --ckpt DIR --max-new-tokens 64 "The capital of France is"   # Base model

Reading order: Tokenizer, chat_prompt, sample, generate, cuda_graph_decoder, checkpoint checks,
the demo writer, the command line. Tokenizer and chat format: docs/architecture.md §5; the
official tokenizer: tokenization_kimi.py at huggingface.co/moonshotai/Kimi-Linear-48B-A3B-Instruct.
"""
import argparse, base64, codecs, json, os, re, resource, shutil, sys, tempfile, time

import tiktoken
import torch

from kimi import CONFIGS, CheckpointError, ModelArgs, Transformer

# Kimi's pre-tokenisation regex, the eight alternatives of the release joined by "|". Han runs
# split off first; words are case-aware (CamelCase splits) with English contractions; digits go
# in groups of <= 3. `&&` is a class intersection: tiktoken's engine (fancy-regex) has it, re not.
PAT_STR = "|".join([
    r"[\p{Han}]+",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"
    r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
    r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])
NUM_SPECIAL = 258   # 256 reserved + 2: ids 163584..163841 in the release, 2 past the model's rows
CHAT_TOKENS = ("<|im_system|>", "<|im_user|>", "<|im_assistant|>", "<|im_middle|>", "<|im_end|>")
STOP_TOKENS = ("[EOS]", "<|im_end|>")     # generation stops at either; <|im_end|> ends a turn
DEFAULT_SYSTEM = "You are a helpful assistant provided by Moonshot-AI."   # the model card's
DEMO_BASE_KEY = "kimi_minimal_special_base"    # our own key: only the demo's tokenizer has it


class Tokenizer:
    """Kimi's tokenizer: tiktoken BPE with Kimi's regex (PAT_STR) and 258 special tokens.

    Tokenizer(folder) reads tiktoken.model and tokenizer_config.json (ValueError or OSError, naming
    the file, if they do not fit). As in the release, the special ids follow the BPE ranks: 163584
    = len(ranks) is "[BOS]", up to 163841. encode(text) adds no BOS/EOS and turns special-token
    strings into their ids; decode(ids) -> text; stream(ids) yields text pieces as they complete.
    tok.special: {name: id} (unnamed ones: "<|reserved_token_{id}|>"); tok.ids: the ids it knows."""

    def __init__(self, folder):
        path = os.path.join(folder, "tiktoken.model")
        try:   # "<base64 bytes> <rank>" lines
            with open(path, "rb") as f:
                ranks = {base64.b64decode(t, validate=True): int(r)
                         for t, r in map(bytes.split, f.read().splitlines())}
        except ValueError:
            raise ValueError(f"{path}: not '<base64 bytes> <rank>' lines") from None
        path = os.path.join(folder, "tokenizer_config.json")
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        try:
            named = {int(i): t["content"] for i, t in config["added_tokens_decoder"].items()}
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ValueError(f"{path}: no added_tokens_decoder {{id: {{'content': ..}}}}") from None
        # The release numbers its specials from len(ranks). The demo's toy vocabulary is small, so
        # it states the real base, 163584, under DEMO_BASE_KEY (write_demo); releases lack the key.
        base = config.get(DEMO_BASE_KEY, len(ranks))
        if type(base) is not int or max(ranks.values(), default=-1) >= base or base < len(ranks):
            raise ValueError(f"{path}: {DEMO_BASE_KEY} {base!r} is not an int past the ranks")
        outside = sorted(i for i in named if not base <= i < base + NUM_SPECIAL)
        if outside:
            raise ValueError(f"{path}: special ids must lie in {base}..{base + NUM_SPECIAL - 1}, "
                             f"after the {len(ranks)} BPE ranks, not {outside[:4]}")
        self.special = {named.get(i, f"<|reserved_token_{i}|>"): i
                        for i in range(base, base + NUM_SPECIAL)}
        self.enc = tiktoken.Encoding("kimi", pat_str=PAT_STR, mergeable_ranks=ranks,
                                     special_tokens=self.special)
        self.ids = sorted(ranks.values()) + sorted(self.special.values())
        self._ids = torch.tensor(self.ids)              # for allowed(), built once
        self.stop_ids = tuple(self.special[s] for s in STOP_TOKENS if s in self.special)

    def encode(self, text):
        """As the release: special-token strings become special ids, and text is cut into <= 400k
        -char slices with no run of > 25k (non-)whitespace chars (tiktoken issue 195)."""
        return [t for s in _slices(text) for t in self.enc.encode(s, allowed_special="all")]

    def decode(self, ids):
        return self.enc.decode(ids)

    def stream(self, ids):
        """Decode piece by piece, holding back an unfinished UTF-8 character; the pieces join to
        decode(ids). `ids` may be any iterable of ids, such as generate(...)."""
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # as tiktoken's decode
        for t in ids:
            piece = utf8.decode(self.enc.decode_single_token_bytes(t))
            if piece:
                yield piece
        tail = utf8.decode(b"", final=True)
        if tail:
            yield tail

    def allowed(self, vocab_size, device=None):
        """[V] bool mask of ids both the model and the tokenizer know (release: all < 163840)."""
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        mask[self._ids[self._ids < vocab_size]] = True
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
    """The Instruct format: turns concatenated with no newlines, then the generation prompt.
    system "" or None: no system turn, as Kimi-Linear's template renders a chat without one."""
    turn = f"<|im_system|>system<|im_middle|>{system}<|im_end|>" if system else ""
    return (f"{turn}<|im_user|>user<|im_middle|>{user}<|im_end|>"
            f"<|im_assistant|>assistant<|im_middle|>")


def sample(logits, temperature=0.0, top_k=None, top_p=None):
    """[B, V] logits -> [B] ids. Temperature 0 is argmax; else keep the top_k largest, then the
    fewest likeliest ids whose probabilities reach top_p, and draw among them."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.double()                    # exact: every fp32 value is an fp64 value
    if top_k:  # keep the k largest (ties at the k-th value stay too), as at any temperature
        kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    # The max subtracted first: the best id's scaled logit is exactly 0, so no finite temperature
    # > 0 (1e-45, 1e300) makes inf - inf or 0 / 0 (in fp32, 1e-46 would round to 0).
    logits = (logits - logits.max(-1, keepdim=True).values) / temperature
    probs = logits.softmax(-1)
    if top_p is not None and top_p < 1:  # the smallest prefix of the sorted probs reaching top_p
        p, idx = probs.sort(-1, descending=True)
        p = p.masked_fill(p.cumsum(-1) - p >= top_p, 0)     # the likeliest id always stays
        probs = probs.scatter(-1, idx, p)
    return torch.multinomial(probs, 1).squeeze(-1)  # renormalises; never a zero-probability id


@torch.no_grad()  # not inference_mode: torch.compile (--compile) fails on inference tensors
def generate(model, tokenizer, prompt, max_new_tokens=200, temperature=0.0, top_k=None,
             top_p=None, stop=None, decoder=None):
    """Yield the ids that continue `prompt` (text, a list of ints or a 1-D int tensor), one at a
    time; greedy by default (see sample()). New ids are only ids `tokenizer` can decode (None: any
    id below vocab_size); an id in `stop` ends it unyielded (default: [EOS], <|im_end|>). One
    prefill, then one step per token through the model's caches, set up here if missing or too
    small; `decoder` (optional): such a step, e.g. cuda_graph_decoder(model, 1), on caches that fit.
        tok.decode(list(generate(model, tok, "The capital of France is", 20)))"""
    ids = torch.as_tensor(tokenizer.encode(prompt) if isinstance(prompt, str) else prompt)
    if ids.dim() != 1 or ids.numel() == 0 or ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(f"prompt: expected text or a non-empty 1-D list/tensor of ints: {ids}")
    if ids.min() < 0 or ids.max() >= model.args.vocab_size:
        raise ValueError(f"prompt: ids must lie in 0..{model.args.vocab_size - 1}")
    device = model.lm_head.weight.device
    tokens = ids.to(device, torch.long)[None]                       # [1, T]
    allowed = tokenizer.allowed(model.args.vocab_size, device) if tokenizer else None
    if stop is None:
        stop = tokenizer.stop_ids if tokenizer else ()
    need = tokens.shape[1] + max(max_new_tokens - 1, 0)     # the last new id is never fed back
    if model.max_batch_size < 1 or model.max_seq_len < need:
        if decoder is not None:
            raise ValueError(f"decoder's caches hold {model.max_seq_len} tokens, {need} needed")
        model.setup_cache(max(model.max_batch_size, 1), need)
    pos = 0
    for _ in range(max_new_tokens):
        if decoder is not None and pos > 0:
            logits = decoder(tokens, pos)[:, -1]                    # [1, V]
        else:
            logits = model(tokens, start_pos=pos, last_only=True)[:, -1]
        if allowed is not None:  # never an id the tokenizer cannot decode (or >= vocab_size)
            logits = logits.masked_fill(~allowed, float("-inf"))
        pos += tokens.shape[1]
        new = sample(logits, temperature, top_k, top_p)             # [1]
        t = new.item()
        if t in stop:
            return
        yield t
        tokens = new.view(1, 1)


def cuda_graph_decoder(model, batch_size, compile=False):
    """decode(tokens [B, 1], start_pos) -> logits [B, 1, vocab]: a decode step replayed from a
    CUDA graph, so its ~3,000 small kernels cost one launch (compile=True first fuses them with
    torch.compile: about a minute for the 48B model on an H200). The position is a device tensor,
    so one graph serves every step; MLA reads its whole cache buffer, masked. Build it after
    setup_cache and before a prefill: capturing runs decode steps on the caches."""
    device = model.lm_head.weight.device
    model.stack_experts()                               # the expert loop syncs with the host
    tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
    pos = torch.ones((), dtype=torch.long, device=device)
    step = model
    if compile:                                         # (rounds to bf16 where eager does)
        step = torch.compile(model, dynamic=False, options={"emulate_precision_casts": True})
    stream = torch.cuda.Stream(device)                  # warm up (compile, plan) off the main one
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.no_grad(), torch.cuda.stream(stream):
        for _ in range(2):
            step(tokens, start_pos=pos, last_only=True)
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        logits = step(tokens, start_pos=pos, last_only=True)    # overwritten by every replay

    def decode(new_tokens, start_pos):
        tokens.copy_(new_tokens)
        pos.fill_(start_pos)
        graph.replay()
        return logits
    return decode


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
        return snapshot_download(ckpt)
    except ImportError:
        raise Fail(f"{ckpt} is not a local folder; to get the weights, pip install huggingface_hub"
                   f" and rerun, or `hf download {ckpt} --local-dir DIR` and --ckpt DIR") from None
    except Exception as e:
        raise Fail(f"could not download {ckpt}: {type(e).__name__}: {e}".splitlines()[0]) from None


def check_ckpt(ckpt, device, dtype, max_seq_len):
    """Cheap checks before anything is loaded: files, config, shards, memory. -> ModelArgs"""
    files = "config.json", "model.safetensors.index.json", "tiktoken.model", "tokenizer_config.json"
    missing = [f for f in files if not os.path.isfile(os.path.join(ckpt, f))]
    if missing:
        raise Fail(f"incomplete checkpoint folder {ckpt}: missing {', '.join(missing)}")
    try:
        args = ModelArgs.from_json(os.path.join(ckpt, "config.json"))   # validated
        with open(os.path.join(ckpt, "model.safetensors.index.json")) as f:
            index = json.load(f)
        shards = sorted(set(index["weight_map"].values()))
        total = int(index["metadata"]["total_size"])
    except CheckpointError as e:
        raise Fail(str(e)) from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise Fail(f"cannot read {ckpt}/model.safetensors.index.json: {e!r}") from None
    missing = [s for s in shards if not os.path.isfile(os.path.join(ckpt, s))]
    if missing:
        raise Fail(f"incomplete checkpoint folder {ckpt}: missing {len(missing)} of {len(shards)}"
                   f" shards ({', '.join(missing[:3])})")
    weights = total * (dtype.itemsize / 2 if dtype else 1)     # stored in bf16, as released
    cache = args.cache_bytes(1, max_seq_len, dtype or torch.bfloat16)
    free = free_memory(device)
    if free is not None and weights + cache > free:
        hint = " (try --dtype bf16)" if dtype and dtype.itemsize > 2 else ""
        raise Fail(f"not enough memory on {device}: the weights need {weights / 2**30:.2f} GiB as "
                   f"{dtype or 'stored'}{hint}, the cache for --max-seq-len {max_seq_len} "
                   f"{cache / 2**30:.2f} GiB; {free / 2**30:.2f} GiB is free")
    return args


def free_memory(device):
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo") as f:
            return int(re.search(r"MemAvailable:\s+(\d+) kB", f.read())[1]) * 1024
    return None                                                 # unknown: no check


def pick_device(name):
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise Fail(f"unknown device {name!r} (try cpu or cuda)") from None
    if device.type == "cpu" and device.index:
        raise Fail(f"--device {name}: the CPU is one device, with no index (use --device cpu)")
    n = torch.cuda.device_count()
    if device.type not in ("cpu", "cuda") or (device.type == "cuda" and (device.index or 0) >= n):
        raise Fail(f"--device {name} is not available here ({n} CUDA GPUs visible)")
    return torch.device("cpu") if device.type == "cpu" else device


DEMO_WORDS = ("the of and to in is you that it was for on are as with his they at be this from "
              "have or by one had not but what all were when we there can Kimi Linear attention "
              "delta model 你好 世界 模型 🙂 🚀")
DEMO_PROMPT, DEMO_VERSION, DEMO_MARKER = "Kimi Linear is", 2, "kimi-minimal-demo.json"
# Named specials of the K2-family tokenizer_config.json, by offset from the first special id.
KIMI_SPECIALS = {0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 3: "<|im_user|>", 4: "<|im_assistant|>",
                 10: "<|im_system|>", 17: "<|im_middle|>", 254: "[UNK]", 255: "[PAD]"}


def demo_ranks():
    """A toy tiktoken vocabulary: the 256 bytes, then the prefixes of each word and " " + word."""
    toks = [bytes([b]) for b in range(256)]
    for w in DEMO_WORDS.split():
        for s in (w.encode(), b" " + w.encode()):
            toks += [s[:i] for i in range(2, len(s) + 1)]  # partial UTF-8 characters, on purpose
    return {t: r for r, t in enumerate(dict.fromkeys(toks))}


def write_tokenizer(folder, ranks, special_base=None, specials=KIMI_SPECIALS):
    """tiktoken.model and tokenizer_config.json; a special_base is stated under DEMO_BASE_KEY."""
    base = len(ranks) if special_base is None else special_base
    with open(os.path.join(folder, "tiktoken.model"), "w") as f:
        f.writelines(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items())
    config = {"added_tokens_decoder": {str(base + i): {"content": s, "special": True}
                                       for i, s in specials.items()}}
    if special_base is not None:
        config[DEMO_BASE_KEY] = special_base
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1)


def write_demo(folder):
    """A random-weight checkpoint of CONFIGS["demo"] in the official layout: the default init from
    seed 0, in bf16 as released (A_log, dt_bias fp32), 3 shards; the toy vocabulary with the real
    special ids 163584.. (DEMO_BASE_KEY); last, DEMO_MARKER: the list of what was written."""
    os.makedirs(folder, exist_ok=True)
    with torch.random.fork_rng(devices=[]):            # seed 0, the caller's RNG untouched
        torch.manual_seed(0)
        model = Transformer(CONFIGS["demo"])
    state = {n: t if n.endswith(("A_log", "dt_bias")) else t.to(torch.bfloat16)
             for n, t in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    model.save_pretrained(folder, num_shards=3)
    write_tokenizer(folder, demo_ranks(), special_base=163584)
    files = sorted(os.listdir(folder) + [DEMO_MARKER])
    with open(os.path.join(folder, DEMO_MARKER), "w") as f:
        json.dump({"version": DEMO_VERSION, "files": files}, f)
    return folder


def is_demo(folder):
    """Does `folder` hold exactly the files its DEMO_MARKER lists, of this DEMO_VERSION?"""
    try:
        with open(os.path.join(folder, DEMO_MARKER)) as f:
            marker = json.load(f)
        return marker == {"version": DEMO_VERSION, "files": sorted(os.listdir(folder))}
    except (OSError, ValueError):
        return False


def demo_checkpoint():
    """The demo's folder in $XDG_CACHE_HOME (or ~/.cache): reused if it holds exactly what its
    DEMO_MARKER lists, else written whole in a fresh folder that then takes its name (replacing at
    most an empty folder). Files the demo did not write are never touched."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    folder = os.path.join(root, "kimi-minimal-demo")
    if os.path.exists(root) and not os.path.isdir(root):
        raise Fail(f"cannot write the demo checkpoint: {root} (XDG_CACHE_HOME) is not a folder")
    if os.path.lexists(folder) and not (os.path.isdir(folder) and not os.listdir(folder)):
        if not is_demo(folder):
            raise Fail(f"{folder} holds files that are not this version's demo checkpoint; move "
                       f"them away (or set XDG_CACHE_HOME elsewhere) and the demo writes a new one")
        print(f"demo: the tiny random-weight checkpoint in {folder}", file=sys.stderr)
        return folder
    tmp = None
    try:
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".kimi-minimal-demo-", dir=root)
        os.rename(write_demo(tmp), folder)
    except OSError as e:
        if not is_demo(folder):                 # (else another run has just written it)
            raise Fail(f"cannot write the demo checkpoint in {root}: {e.strerror or e}") from None
    finally:
        if tmp and os.path.isdir(tmp):          # ours, left by a failure
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"demo: wrote a tiny random-weight checkpoint to {folder}", file=sys.stderr)
    return folder


# ---- the command line ----
class Parser(argparse.ArgumentParser):
    def error(self, message):       # argparse's own adds a usage block and "sample.py: error:"
        fail(f"{message} (see --help)")


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parser():
    ap = Parser(description=__doc__.splitlines()[0], epilog="Bad input exits with status 2 and "
                "one 'error:' line. The speed benchmark is its own program: python bench.py.")
    add = ap.add_argument
    add("prompt", nargs="?", help="the prompt (else --prompt-file, else standard input; "
        f"--demo's default: {DEMO_PROMPT!r})")
    add("--ckpt", help="checkpoint folder or hub id, e.g. moonshotai/Kimi-Linear-48B-A3B-Instruct "
        "(download: hf download ID --local-dir DIR)")
    add("--demo", action="store_true", help="a tiny random-weight checkpoint, written once to "
        "$XDG_CACHE_HOME/kimi-minimal-demo (not with --ckpt)")
    add("--prompt-file", help="read the prompt from this UTF-8 file")
    add("--chat", action="store_true", help="wrap the prompt in the Instruct chat format")
    add("--system", help=f"the system turn of --chat (default: {DEFAULT_SYSTEM!r}, the model "
        "card's example); \"\" = none, as Kimi-Linear's own chat template does without one")
    add("--max-new-tokens", type=int, default=200, help="at most this many new tokens (default: "
        "%(default)s; cut, with a note, to fit --max-seq-len)")
    add("--temperature", type=float, help="0 = greedy, else any finite number > 0 (default: 0, "
        "or 1 with --top-k or --top-p)")
    add("--top-k", type=int, help="sample among the k likeliest ids, k >= 1 (temperature 1 "
        "unless given; refused with --temperature 0)")
    add("--top-p", type=float, help="sample among the fewest likeliest ids whose probabilities "
        "reach p, 0 < p <= 1 (temperature: as --top-k)")
    add("--seed", type=int, help="seed of the draws, 0 .. 2**64 - 1 (default: not fixed)")
    add("--device", help="cpu, cuda or cuda:N (default: cuda if present, else cpu)")
    add("--dtype", choices=["bf16", "fp16", "fp32"], help="the weights' dtype (default: bf16 on "
        "GPU; on CPU the checkpoint's own, memory-mapped)")
    add("--max-seq-len", type=int, default=4096, help="positions the cache holds: prompt + new "
        "tokens (default: %(default)s)")
    add("--compile", action="store_true", help="torch.compile the CUDA-graph decode step (CUDA "
        "and bf16; about a minute's start for the 48B model)")
    return ap


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--bench" in argv:
        fail("the benchmark is its own program now: python bench.py")
    try:
        run(parser().parse_args(argv))
    except Fail as e:
        fail(str(e))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:                     # the reader left (e.g. `| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit's flush
        sys.exit(141)                           # 128 + SIGPIPE, as shell tools


def check_flags(a):
    """Contradictions and ranges, before anything is read. Fills in a.temperature."""
    sampling = a.top_k is not None or a.top_p is not None
    if a.temperature is None:
        a.temperature = 1.0 if sampling else 0.0
    for bad, message in [
            (a.demo == bool(a.ckpt), "give either --ckpt DIR (or a hub id) or --demo (tiny model)"),
            (a.prompt is not None and a.prompt_file is not None,
             "give the prompt as an argument or with --prompt-file, not both"),
            (a.system is not None and not a.chat, "--system is for --chat: add --chat"),
            (a.temperature == 0 and sampling, "--top-k/--top-p sample, --temperature 0 is greedy"),
            (not 0 <= a.temperature < float("inf"), "--temperature must be a finite number >= 0"),
            (a.top_p is not None and not 0 < a.top_p <= 1, "--top-p must be in (0, 1]"),
            (a.top_k is not None and a.top_k < 1, "--top-k must be at least 1"),
            (a.seed is not None and not 0 <= a.seed < 2**64, "--seed must be in 0 .. 2**64 - 1"),
            (a.max_new_tokens < 1, "--max-new-tokens must be at least 1"),
            (a.max_seq_len < 1, "--max-seq-len must be at least 1")]:
        if bad:
            raise Fail(message)


def read_prompt(args):
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file is None and (sys.stdin is None or sys.stdin.isatty()):
        if args.demo:
            return DEMO_PROMPT
        raise Fail("no prompt: pass it as an argument, with --prompt-file, or on standard input")
    try:
        if args.prompt_file is None:
            text = sys.stdin.buffer.read().decode("utf-8")
        else:
            with open(args.prompt_file, "rb") as f:
                text = f.read().decode("utf-8")
    except (OSError, ValueError) as e:          # UnicodeDecodeError is a ValueError
        reason = e.strerror if isinstance(e, OSError) and e.strerror else e
        source = args.prompt_file or "standard input"
        raise Fail(f"cannot read the prompt from {source}: {reason}") from None
    return DEMO_PROMPT if args.demo and not text and args.prompt_file is None else text


def encode_prompt(args, text, tok, ckpt, vocab_size):
    if args.chat:
        missing = [t for t in CHAT_TOKENS if t not in tok.special]
        if missing:
            raise Fail(f"--chat needs {', '.join(missing)}: not in {ckpt}/tokenizer_config.json")
        system = DEFAULT_SYSTEM if args.system is None else args.system
        inside = [t for t in CHAT_TOKENS if t in text + system]
        if inside:
            raise Fail(f"the --chat prompt or --system holds {inside[0]}, which would end or start"
                       f" a turn (without --chat the text goes in as it is)")
        text = chat_prompt(text, system)
    prompt = tok.encode(text)
    if not prompt:
        raise Fail("the prompt is empty")
    if len(prompt) > args.max_seq_len:
        raise Fail(f"the prompt has {len(prompt)} tokens but --max-seq-len is {args.max_seq_len}")
    unknown = sorted({t for t in prompt if t >= vocab_size})    # e.g. 163840, 163841
    if unknown:
        raise Fail(f"the prompt holds special tokens the model has no embedding for: ids {unknown}")
    return prompt


def run(args):
    check_flags(args)
    device = pick_device(args.device)
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    dtype = dtypes.get(args.dtype or ("bf16" if device.type == "cuda" else ""))  # None: as stored
    if args.compile and not (device.type == "cuda" and dtype == torch.bfloat16):
        raise Fail("--compile compiles the CUDA-graph decode step: it needs CUDA and bf16")
    ckpt = demo_checkpoint() if args.demo else resolve_ckpt(args.ckpt)
    model_args = check_ckpt(ckpt, device, dtype, args.max_seq_len)
    text = read_prompt(args)
    try:
        tok = Tokenizer(ckpt)
    except (OSError, ValueError) as e:
        raise Fail(f"cannot read the tokenizer in {ckpt}: {e}") from None
    prompt = encode_prompt(args, text, tok, ckpt, model_args.vocab_size)
    max_new = min(args.max_new_tokens, args.max_seq_len - len(prompt) + 1)  # last one not fed back
    if max_new < args.max_new_tokens:
        print(f"note: --max-new-tokens cut to {max_new} to fit --max-seq-len {args.max_seq_len}",
              file=sys.stderr)
    t0 = time.perf_counter()
    try:
        model = Transformer.from_pretrained(ckpt, device, dtype, max_seq_len=args.max_seq_len)
        print(f"loaded {ckpt} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        stream_text(args, model, tok, text, prompt, max_new)
    except CheckpointError as e:
        raise Fail(str(e)) from None
    except (RuntimeError, MemoryError) as e:    # torch's CPU allocator raises a RuntimeError
        oom = isinstance(e, MemoryError) or "out of memory" in str(e).lower()
        if not (oom or "can't allocate memory" in str(e)):
            raise
        raise Fail(f"out of memory on {device} (a smaller --max-seq-len or prompt may fit)"
                   ) from None


def stream_text(args, model, tok, text, prompt, max_new):
    """Print the prompt, then the new text as it comes; then the speeds on stderr."""
    device, decoder = model.lm_head.weight.device, None
    if args.seed is not None:
        torch.manual_seed(args.seed)
    if device.type == "cuda":   # compile and capture before the clock: time what a next prompt gets
        t0 = time.perf_counter()
        if model.lm_head.weight.dtype == torch.bfloat16 and max_new > 1:
            decoder = cuda_graph_decoder(model, 1, args.compile)
        with torch.no_grad():
            model(torch.tensor([prompt], device=device), start_pos=0, last_only=True)
        torch.cuda.synchronize(device)
        print(f"warm-up (kernel compilation, CUDA graph): {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
    stamps = []                 # when each new token arrived; stamps[0] ends the prefill

    def timed(ids):
        for t in ids:
            stamps.append(time.perf_counter())
            yield t
    ids = generate(model, tok, prompt, max_new, args.temperature, args.top_k, args.top_p,
                   decoder=decoder)
    print("" if args.chat else text, end="", flush=True)
    t0 = time.perf_counter()
    for piece in tok.stream(timed(ids)):
        print(piece, end="", flush=True)
    print(flush=True)
    n = len(stamps)
    prefill = len(prompt) / (stamps[0] - t0) if n else float("nan")
    decode = (n - 1) / (stamps[-1] - stamps[0]) if n > 1 else float("nan")
    if device.type == "cuda":
        peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated on {device}"
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB process RSS"
    print(f"prompt {len(prompt)} tokens, generated {n} tokens; prefill {prefill:.1f} tok/s, "
          f"decode {decode:.1f} tok/s; peak memory {peak}", file=sys.stderr)
    if args.demo:
        print("note: the demo weights are random, so the text above is noise. For real text: "
              "python sample.py --ckpt moonshotai/Kimi-Linear-48B-A3B-Instruct --chat \"Is 123 a "
              "prime?\"", file=sys.stderr)


if __name__ == "__main__":
    main()
