"""Generation through kimi.py's caches, as a library: one draw (sample), a prompt's continuation
(generate: one prefill, then one step per token) and a conversation held in the caches (Chat).
sample.py is the command line around them.

    ids = list(generate(model, tok, "The capital of France is", max_new_tokens=20))
    chat = Chat(model, tok); chat.say("Is 123 a prime?")
"""
import torch
from torch.nn.utils.rnn import pad_sequence

from tokenizer import CHAT_TOKENS, DEFAULT_SYSTEM, chat_prompt


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


@torch.no_grad()  # not inference_mode: torch.compile fails on inference tensors (bench.py)
def generate(model, tokenizer, prompt, max_new_tokens=200, temperature=0.0, top_k=None,
             top_p=None, stop=None, decoder=None, start_pos=0):
    """Yield the ids that continue `prompt` (text, a list of ints or a 1-D int tensor), one at a
    time; greedy by default (see sample()). New ids are only ids `tokenizer` can decode (None: any
    id below vocab_size); an id in `stop` ends it unyielded (default: [EOS], <|im_end|>). One
    prefill, then one step per token through the model's caches, set up here if missing or too
    small; `decoder` (optional): such a step, e.g. cuda_graph_decoder(model, 1), on caches that fit.
        tok.decode(list(generate(model, tok, "The capital of France is", 20)))
    A list of prompts runs as one batch, left-padded (see Transformer.forward's pad): each step
    then yields a list of one id per prompt, None for a prompt that has stopped, until all have.
    start_pos > 0: one prompt that continues the sequence of start_pos ids in the caches (Chat).
    The sampling arguments mean what the command line's --temperature, --top-k, --top-p and
    --max-new-tokens mean, and are refused in the same cases (one ValueError line)."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    batch = isinstance(prompt, (list, tuple)) and len(prompt) > 0 and all(
        isinstance(p, (str, list, tuple)) or torch.is_tensor(p) and p.dim() > 0 for p in prompt)
    ids = [prompt_ids(model, tokenizer, p) for p in (prompt if batch else [prompt])]
    device = model.lm_head.weight.device
    tokens = pad_sequence(ids, batch_first=True, padding_side="left").to(device)    # [B, T]
    B, T = tokens.shape
    pad = torch.tensor([T - len(i) for i in ids], device=device)   # row b: pad[b] zeros, then ids
    allowed = tokenizer.allowed(model.args.vocab_size, device) if tokenizer else None
    if stop is None:
        stop = tokenizer.stop_ids if tokenizer else ()
    need = start_pos + T + max(max_new_tokens - 1, 0)   # the last new id is never fed back
    size = getattr(decoder, "batch_size", B)            # (cuda_graph_decoder's is fixed)
    if decoder is not None and (size != B or model.max_seq_len < need):
        raise ValueError(f"decoder holds {size} x {model.max_seq_len} tokens; {B} x {need} needed")
    if start_pos and (batch or model.max_seq_len < need):  # never reallocate what it continues
        raise ValueError(f"start_pos {start_pos}: one prompt continuing the caches, which hold "
                         f"{model.max_seq_len} positions; {need} needed")
    if model.max_batch_size < B or model.max_seq_len < need:
        model.setup_cache(max(model.max_batch_size, B), max(model.max_seq_len, need))
    pos, running = start_pos, [True] * B
    for i in range(max_new_tokens):
        if i == 0:                                                  # the prefill: [B, V]
            logits = model(tokens, start_pos=pos, last_only=True, pad=None if pos else pad)[:, -1]
        elif decoder is not None:
            logits = decoder(tokens, pos)[:, -1]
        else:
            logits = model(tokens, start_pos=pos, last_only=True)[:, -1]
        if allowed is not None:  # never an id the tokenizer cannot decode (or >= vocab_size)
            logits = logits.masked_fill(~allowed, float("-inf"))
        pos += tokens.shape[1]
        new = sample(logits, temperature, top_k, top_p)             # [B]
        ids = new.tolist()
        running = [r and t not in stop for r, t in zip(running, ids)]
        if not any(running):
            return
        yield [t if r else None for r, t in zip(running, ids)] if batch else ids[0]
        tokens = new.view(B, 1)            # a stopped prompt keeps decoding, its ids unused


def check_sampling(max_new_tokens, temperature, top_k, top_p):
    """generate's sampling arguments, refused as the command line refuses its flags."""
    for bad, message in [
            (type(max_new_tokens) is not int or max_new_tokens < 1,
             f"max_new_tokens must be an integer >= 1, not {max_new_tokens!r}"),
            (not 0 <= temperature < float("inf"), f"temperature must be finite and >= 0, not "
             f"{temperature!r}"),
            (top_k is not None and not (type(top_k) is int and top_k >= 1),
             f"top_k must be None or an integer >= 1, not {top_k!r}"),
            (top_p is not None and not 0 < top_p <= 1, f"top_p must be None or in (0, 1], not "
             f"{top_p!r}"),
            (temperature == 0 and (top_k, top_p) != (None, None),
             "top_k/top_p sample, temperature 0 is greedy: give a temperature > 0")]:
        if bad:
            raise ValueError(message)


def prompt_ids(model, tokenizer, prompt):
    """One prompt (text, a list of ints or a 1-D int tensor) -> a 1-D int64 CPU tensor, checked."""
    expected = "prompt: expected text, a non-empty list of ints or a 1-D int tensor (or a list"
    if isinstance(prompt, str) and tokenizer is None:
        raise ValueError("prompt: text needs a tokenizer (generate(model, tokenizer, ...))")
    try:
        ids = torch.as_tensor(tokenizer.encode(prompt) if isinstance(prompt, str) else prompt)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{expected} of those), not {type(prompt).__name__}") from None
    if ids.dim() != 1 or ids.numel() == 0 or ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(f"{expected} of those), got {ids.dtype} {tuple(ids.shape)}")
    if ids.min() < 0 or ids.max() >= model.args.vocab_size:
        raise ValueError(f"prompt: ids must lie in 0..{model.args.vocab_size - 1}")
    return ids.cpu().long()


# ---- a conversation in the caches ----
class ConversationFull(ValueError):
    """The next turn and a full reply do not fit the caches after the conversation so far."""


class Chat:
    """A conversation held in the model's caches: a turn prefills only its new ids (the last
    reply's <|im_end|>, the user turn, the assistant's turn opened; see chat_prompt).
        chat = Chat(model, tok, system="Be brief.")     # default: the model card's system turn
        chat.say("Is 123 a prime?")                      # -> the reply's text
        for piece in tok.stream(chat.reply("Why?")):     # or its ids, as they come
            print(piece, end="")
    A reply ends at a stop id or after max_new_tokens; one left early stays as far as it came.
    chat.ids: the conversation's ids; chat.prefilled: the last turn's new ones. max_seq_len: set
    up the caches for so many positions (default: as they are, else 4096); a turn that with a full
    reply would not fit raises ConversationFull (reset() starts afresh). Sampling as in generate.
    The Chat owns the caches: a generate() call in between clears them."""

    def __init__(self, model, tokenizer, system=DEFAULT_SYSTEM, max_new_tokens=200,
                 temperature=0.0, top_k=None, top_p=None, max_seq_len=None, decoder=None):
        missing = [t for t in CHAT_TOKENS if t not in tokenizer.special]
        if missing:
            raise ValueError(f"Chat needs {', '.join(missing)}: not in the tokenizer")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
        if max_seq_len or not model.max_batch_size:
            model.setup_cache(1, max_seq_len or 4096)
        self.model, self.tok, self.decoder = model, tokenizer, decoder
        self.max_new_tokens = max_new_tokens
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        self.reset(system or "")

    def reset(self, system=None):
        """A fresh conversation; system (if not None): its new system turn, "" for none."""
        if system is not None:
            chat_prompt("", system)                     # refuses one holding a chat token
            self.system = system
        self.ids, self.fed, self.prefilled = [], 0, 0   # fed: how many of ids the caches hold

    def say(self, text):
        """The reply to the user turn `text`, as text."""
        return self.tok.decode(list(self.reply(text)))

    def reply(self, text):
        """The ids of the reply to the user turn `text`, as they come (checked before)."""
        ids, limit, max_new = self.ids, self.model.max_seq_len, self.max_new_tokens
        close = "<|im_end|>" if ids else ""            # the last reply's end: not fed yet
        turn = self.tok.encode(close + chat_prompt(text, None if ids else self.system))
        need = len(ids) + len(turn)                     # positions once the turn is in
        if ids and need + max_new - 1 > limit:          # (a reply's last id is never fed back)
            raise ConversationFull(f"the conversation's {len(ids)} tokens, this turn's "
                                   f"{len(turn)} and a reply of up to {max_new} pass "
                                   f"max_seq_len {limit}")
        if need > limit:
            raise ValueError(f"this turn has {len(turn)} tokens but max_seq_len is {limit}")
        new = prompt_ids(self.model, self.tok, ids[self.fed:] + turn)     # ids < vocab_size
        max_new = min(max_new, limit - need + 1)        # a fresh conversation's: cut to fit
        steps = generate(self.model, self.tok, new, max_new, **self.sampling,
                         decoder=self.decoder, start_pos=self.fed)
        return self._record(steps, turn, len(new), max_new)

    def _record(self, steps, turn, prefilled, max_new):
        """steps, each id added to the conversation, and self.fed kept true as they come."""
        self.ids += turn
        self.prefilled, self.fed, n = prefilled, 0, 0   # in flux: an error mid-step re-prefills
        for n, t in enumerate(steps, 1):
            self.ids.append(t)
            self.fed = len(self.ids) - 1    # between steps the caches hold all but the newest
            yield t                         # (a consumer that stops here leaves them so)
            self.fed = 0
        self.fed = len(self.ids) - (n == max_new)   # a stop id ended it: the newest was fed
