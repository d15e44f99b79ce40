"""
Kimi's tokenizer on tiktoken: the release's BPE ranks (tiktoken.model), its pre-tokenisation regex
and its 258 special tokens, plus the Instruct chat format. Written from the release's
tokenization_kimi.py (huggingface.co/moonshotai/Kimi-Linear-48B-A3B-Instruct) and checked against
its vocabulary; docs/architecture.md §5 lists the facts and trap 14 the pitfalls.
"""
import base64
import codecs
import json
import os

import tiktoken
import torch

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
