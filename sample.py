"""Generate with Kimi Linear through kimi.py's caches and stream the text: the command line.

    python sample.py --demo                 # offline: a tiny random-weight checkpoint, noise text
    python sample.py --ckpt moonshotai/Kimi-Linear-48B-A3B-Instruct --chat "Is 123 a prime?"
    python sample.py --ckpt DIR --max-new-tokens 64 "The capital of France is"   # Base model
    python sample.py --ckpt DIR --batch --prompt-file prompts.txt     # one prompt per line
    python sample.py --ckpt DIR --chat      # a conversation: one user turn per line

Reading order: the checkpoint checks, the command line, the one-shot stream, the conversation.
generate and Chat are generation.py's, the tokenizer and the chat format tokenizer.py's, the
CUDA-graph decode step fast/decode.py's, the demo checkpoint demo.py's.
"""
import argparse
import os
import resource
import signal
import sys
import time

import torch

import checkpoint
from fast.decode import cuda_graph_decoder
from generation import Chat, ConversationFull, generate
from kimi import CheckpointError, ModelArgs, Transformer
from tokenizer import CHAT_TOKENS, DEFAULT_SYSTEM, Tokenizer, chat_prompt

DEMO_PROMPT = "Kimi Linear is"                 # --demo's prompt when none is given


# ---- checkpoints and devices: clear one-line errors ----
class UsageError(Exception):
    """Bad input: main prints the message as one line and exits with status 2."""


def check_ckpt(ckpt, device, dtype, max_seq_len, batch_size=1):
    """Cheap checks before anything is loaded: files, config, shards, memory. -> ModelArgs"""
    try:
        total = checkpoint.check_folder(ckpt, need=("tiktoken.model", "tokenizer_config.json"))
        args = ModelArgs.from_json(os.path.join(ckpt, "config.json"))     # validated
    except CheckpointError as e:
        raise UsageError(str(e)) from None
    weights = total * (dtype.itemsize / 2 if dtype else 1)     # stored in bf16, as released
    fp8 = dtype == torch.float8_e4m3fn                          # the rest and the cache: bf16
    cache = args.cache_bytes(batch_size, max_seq_len, torch.bfloat16 if fp8 or not dtype else dtype)
    free = checkpoint.free_memory(device)
    if free is not None and weights + cache > free:
        hint = " (try --dtype bf16)" if dtype and dtype.itemsize > 2 else ""
        raise UsageError(f"not enough memory on {device}: the weights need "
                         f"{weights / 2**30:.2f} GiB as {dtype or 'stored'}{hint}, the cache "
                         f"for --max-seq-len {max_seq_len} {cache / 2**30:.2f} GiB; "
                         f"{free / 2**30:.2f} GiB is free")
    return args


def pick_device(name):
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise UsageError(f"unknown device {name!r} (try cpu or cuda)") from None
    if device.type == "cpu" and device.index:
        raise UsageError(f"--device {name}: the CPU is one device, with no index "
                         "(use --device cpu)")
    n = torch.cuda.device_count()
    if device.type not in ("cpu", "cuda") or (device.type == "cuda" and (device.index or 0) >= n):
        raise UsageError(f"--device {name} is not available here ({n} CUDA GPUs visible)")
    return torch.device("cpu") if device.type == "cpu" else device


# ---- the command line ----
class Parser(argparse.ArgumentParser):
    def error(self, message):       # argparse's own adds a usage block and "sample.py: error:"
        fail(f"{message} (see --help)")


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parser():
    ap = Parser(description=__doc__.splitlines()[0], epilog="Bad input exits with status 2 and "
                "one 'error:' line. The speed benchmark is its own program: python -m tools.bench.")
    add = ap.add_argument
    add("prompt", nargs="?", help="the prompt (else --prompt-file, else standard input, which "
        f"with --chat holds a conversation; --demo's default: {DEMO_PROMPT!r})")
    add("--ckpt", help="checkpoint folder or hub id, e.g. moonshotai/Kimi-Linear-48B-A3B-Instruct "
        "(download: hf download ID --local-dir DIR)")
    add("--demo", action="store_true", help="a tiny random-weight checkpoint, written once to "
        "$XDG_CACHE_HOME/kimi-minimal-demo (not with --ckpt)")
    add("--prompt-file", help="read the prompt from this UTF-8 file")
    add("--batch", action="store_true", help="each non-empty line of the prompt (argument, file "
        "or standard input) is a prompt of its own; all are decoded together, then printed")
    add("--chat", action="store_true", help="wrap the prompt in the Instruct chat format; with "
        "no prompt, a conversation: one user turn per line of standard input, each continuing "
        "the caches; /reset, /system TEXT, /exit; Ctrl-C stops a reply, Ctrl-D ends")
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
    add("--dtype", choices=["bf16", "fp16", "fp32", "fp8"], help="the weights' dtype (default: "
        "bf16 on GPU; on CPU the checkpoint's own, memory-mapped); fp8: the projections and "
        "experts quantised to e4m3 while loading (fast/quantize.py; an FP8 folder always loads so)")
    add("--max-seq-len", type=int, default=4096, help="positions the cache holds: prompt + new "
        "tokens (default: %(default)s)")
    return ap


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        run(parser().parse_args(argv))
    except UsageError as e:
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
            raise UsageError(message)


def read_prompt(args):
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file is None and (sys.stdin is None or sys.stdin.isatty()):
        if args.demo:
            return DEMO_PROMPT
        raise UsageError("no prompt: pass it as an argument, with --prompt-file, or on "
                         "standard input")
    try:
        if args.prompt_file is None:
            text = sys.stdin.buffer.read().decode("utf-8")
        else:
            with open(args.prompt_file, "rb") as f:
                text = f.read().decode("utf-8")
    except (OSError, ValueError) as e:          # UnicodeDecodeError is a ValueError
        reason = e.strerror if isinstance(e, OSError) and e.strerror else e
        source = args.prompt_file or "standard input"
        raise UsageError(f"cannot read the prompt from {source}: {reason}") from None
    return DEMO_PROMPT if args.demo and not text and args.prompt_file is None else text


def encode_prompt(args, text, tok, ckpt, vocab_size):
    if args.chat:
        missing = [t for t in CHAT_TOKENS if t not in tok.special]
        if missing:
            raise UsageError(f"--chat needs {', '.join(missing)}: not in "
                             f"{ckpt}/tokenizer_config.json")
        try:
            text = chat_prompt(text, DEFAULT_SYSTEM if args.system is None else args.system)
        except ValueError as e:                     # a chat token inside the text
            raise UsageError(f"{e} (without --chat the text goes in as it is)") from None
    prompt = tok.encode(text)
    if not prompt:
        raise UsageError("the prompt is empty")
    if len(prompt) > args.max_seq_len:
        raise UsageError(f"the prompt has {len(prompt)} tokens but --max-seq-len is "
                         f"{args.max_seq_len}")
    unknown = sorted({t for t in prompt if t >= vocab_size})    # e.g. 163840, 163841
    if unknown:
        raise UsageError("the prompt holds special tokens the model has no embedding for: "
                         f"ids {unknown}")
    return prompt


def run(args):
    check_flags(args)
    device = pick_device(args.device)
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
              "fp8": torch.float8_e4m3fn}
    dtype = dtypes.get(args.dtype or ("bf16" if device.type == "cuda" else ""))  # None: as stored
    try:
        if args.demo:
            import demo                             # the offline demo checkpoint
        ckpt = demo.demo_checkpoint() if args.demo else checkpoint.resolve(args.ckpt)
    except CheckpointError as e:                    # (demo.DemoError is one)
        raise UsageError(str(e)) from None
    # --chat with no prompt is a conversation: its turns come later, line by line
    talk = args.chat and not args.batch and sys.stdin is not None and args.prompt is None \
        and args.prompt_file is None
    text = "" if talk else read_prompt(args)        # "": checks the system turn alone
    texts = [line for line in text.splitlines() if line.strip()] if args.batch else [text]
    if not texts:
        raise UsageError("--batch: every line of the prompt is empty")
    model_args = check_ckpt(ckpt, device, dtype, args.max_seq_len, len(texts))
    try:
        tok = Tokenizer(ckpt)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read the tokenizer in {ckpt}: {e}") from None
    prompts = []
    for n, line in enumerate(texts, 1):
        try:
            prompts.append(encode_prompt(args, line, tok, ckpt, model_args.vocab_size))
        except UsageError as e:
            message = f"prompt {n} of {len(texts)}: {e}" if args.batch else str(e)
            raise UsageError(message) from None
    longest = max(len(p) for p in prompts)
    max_new = min(args.max_new_tokens, args.max_seq_len - longest + 1)  # last one not fed back
    if max_new < args.max_new_tokens and not talk:
        print(f"note: --max-new-tokens cut to {max_new} to fit --max-seq-len {args.max_seq_len}",
              file=sys.stderr)
    t0 = time.perf_counter()
    try:
        if dtype == torch.float8_e4m3fn or checkpoint.read_quantization(ckpt):
            from fast import quantize               # FP8: quantised as it loads, or as stored
            model = quantize.from_pretrained(ckpt, device, len(prompts), args.max_seq_len)
        else:
            model = Transformer.from_pretrained(ckpt, device, dtype, len(prompts), args.max_seq_len)
        print(f"loaded {ckpt} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        if args.seed is not None:
            torch.manual_seed(args.seed)
        if talk:
            converse(args, model, tok)
        else:
            stream_text(args, model, tok, texts, prompts, max_new)
    except CheckpointError as e:
        raise UsageError(str(e)) from None
    except (RuntimeError, MemoryError) as e:    # torch's CPU allocator raises a RuntimeError
        oom = isinstance(e, MemoryError) or "out of memory" in str(e).lower()
        if not (oom or "can't allocate memory" in str(e)):
            raise
        message = f"out of memory on {device} (a smaller --max-seq-len or prompt may fit)"
        raise UsageError(message) from None
    if args.demo:
        print("note: the demo weights are random, so the text above is noise. For real text: "
              "python sample.py --ckpt moonshotai/Kimi-Linear-48B-A3B-Instruct --chat \"Is 123 a "
              "prime?\"", file=sys.stderr)


def graph_decoder(model, rows):
    """On a GPU in bf16: a CUDA-graph decode step for `rows` rows (built before any prefill)."""
    w = model.lm_head.weight
    return cuda_graph_decoder(model, rows) if w.is_cuda and w.dtype == torch.bfloat16 else None


def timed(steps, stamps):
    """steps, with the time each arrived appended to stamps (stamps[0] ends the prefill)."""
    for t in steps:
        stamps.append(time.perf_counter())
        yield t


def report(what, prefilled, t0, stamps, device, rows=1):
    """The speeds line on stderr: `what`, then the prefill and decode rates and peak memory."""
    n = len(stamps)
    prefill_rate = prefilled / (stamps[0] - t0) if n else float("nan")
    decode_rate = rows * (n - 1) / (stamps[-1] - stamps[0]) if n > 1 else float("nan")
    if device.type == "cuda":
        peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated on {device}"
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB process RSS"
    print(f"{what}; prefill {prefill_rate:.1f} tok/s, decode {decode_rate:.1f} tok/s; "
          f"peak memory {peak}", file=sys.stderr)


def stream_text(args, model, tok, texts, prompts, max_new):
    """Print the prompt, then the new text as it comes (--batch: each prompt with its completion,
    labelled, once all are done); then the speeds on stderr."""
    device, decoder, B = model.lm_head.weight.device, None, len(prompts)
    if device.type == "cuda":   # capture before the clock: time what a next prompt gets
        t0 = time.perf_counter()
        decoder = graph_decoder(model, B) if max_new > 1 else None
        with torch.no_grad():
            model(torch.tensor([max(prompts, key=len)] * B, device=device), start_pos=0,
                  last_only=True)
        torch.cuda.synchronize(device)
        print(f"warm-up (kernels, CUDA graph): {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    stamps = []                 # when each step's new tokens arrived
    steps = timed(generate(model, tok, prompts if args.batch else prompts[0], max_new,
                           args.temperature, args.top_k, args.top_p, decoder=decoder), stamps)
    t0 = time.perf_counter()
    if args.batch:
        steps = list(steps) or [[None] * B]  # [steps, B]: ids, None once a prompt stopped
        for b, text in enumerate(texts):
            ids = [step[b] for step in steps if step[b] is not None]
            print(f"--- prompt {b + 1} of {B} ---\n{'' if args.chat else text}{tok.decode(ids)}")
    else:
        print("" if args.chat else texts[0], end="", flush=True)
        for piece in tok.stream(steps):
            print(piece, end="", flush=True)
        print(flush=True)
    what = f"{B} prompts of {min(map(len, prompts))}..{max(map(len, prompts))} tokens, " \
        f"{len(stamps)} steps" if args.batch else \
        f"prompt {len(prompts[0])} tokens, generated {len(stamps)} tokens"
    report(what, sum(map(len, prompts)), t0, stamps, device, B)


# ---- the conversation (--chat with no prompt) ----
def converse(args, model, tok):
    """A Chat fed one user turn per line of standard input, typed after a '> ' marker (a piped
    line is echoed after it, so that stdout reads as the transcript). /reset, /system TEXT (a
    fresh conversation with this system turn; none without TEXT), /exit; Ctrl-D or the input's
    end exits. Bad input ends a piped conversation (status 2); on a terminal, only its line."""
    chat = Chat(model, tok, DEFAULT_SYSTEM if args.system is None else args.system,
                args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                decoder=graph_decoder(model, 1))
    tty = sys.stdin.isatty()
    if tty:
        import readline  # noqa: F401  (line editing and history for input())
        print("type a message; /reset, /system TEXT, /exit; Ctrl-C stops a reply, Ctrl-D ends",
              file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:                            # Ctrl-D, or the end of the input
            print()                                 # (ends the marker's line)
            return
        except ValueError as e:                     # UnicodeDecodeError is a ValueError
            raise UsageError(f"cannot read standard input: {e}") from None
        if not tty:
            print(line, flush=True)
        command, _, rest = line.partition(" ")
        if command == "/exit":
            return
        try:
            if command in ("/reset", "/system"):
                chat.reset(rest.strip() if command == "/system" else None)
            elif line:
                stream_reply(chat, line)
        except ValueError as e:     # a chat token in the text; a turn longer than --max-seq-len
            if not tty:
                raise UsageError(str(e)) from None
            print(f"error: {e}", file=sys.stderr)


def stream_reply(chat, text):
    """Stream the reply to `text`, then its speeds. The first Ctrl-C stops it at its next token,
    never inside a step, so the caches stay exact and the conversation goes on from what was
    shown; a second exits. A full conversation makes way for a fresh one, in one line."""
    try:
        steps = chat.reply(text)
    except ConversationFull as e:
        print(f"note: {e}; a fresh conversation begins (the same system turn)", file=sys.stderr)
        chat.reset()
        steps = chat.reply(text)
    stop, stamps = [], []

    def interrupt(*_):
        if stop:
            raise KeyboardInterrupt
        stop.append(True)
    old = signal.signal(signal.SIGINT, interrupt)
    t0 = time.perf_counter()
    try:
        for piece in chat.tok.stream(timed(steps, stamps)):
            print(piece, end="", flush=True)
            if stop:
                break
    finally:
        signal.signal(signal.SIGINT, old)
    print(flush=True)
    what = f"turn {chat.prefilled} new tokens ({len(chat.ids)} in the conversation), generated " \
        f"{len(stamps)} tokens{', stopped by Ctrl-C' if stop else ''}"
    report(what, chat.prefilled, t0, stamps, chat.model.lm_head.weight.device)


if __name__ == "__main__":
    main()
