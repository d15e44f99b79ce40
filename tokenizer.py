"""
Kimi's tokenizer on tiktoken: the release's BPE ranks (tiktoken.model), its pre-tokenisation regex
and its 258 special tokens, plus the Instruct chat format. Written from the release's
tokenization_kimi.py (huggingface.co/moonshotai/Kimi-Linear-48B-A3B-Instruct) and checked against
its vocabulary; docs/architecture.md §5 lists the facts and trap 14 the pitfalls.
"""
import base64
import codecs
import os
from collections import Counter

import tiktoken
import torch

from checkpoint import CheckpointError, read_json, want, want_key

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


def read_ranks(path):
    """tiktoken.model -> {token bytes: rank}, from "<base64 bytes> <rank>" lines (blank ones
    skipped, as tiktoken does). Checked here, for tiktoken panics on a bad vocabulary: each token
    and each rank once, the ranks 0..n-1, a token for each of the 256 bytes (without one, encoding
    text that holds that byte panics). Else a one-line CheckpointError naming the file and line."""
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the BPE ranks ({e.strerror})") from None
    ranks, line_of = {}, {}                             # token -> rank, rank -> its line
    for i, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            continue
        try:                    # isdigit: int() would also take "-1", "+1" and "1_0"
            if len(fields) != 2 or not fields[1].isdigit():
                raise ValueError
            token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
        except ValueError:      # (binascii.Error, bad base64, is one)
            raise CheckpointError(f"{path}: not '<base64 bytes> <rank>' lines (line {i}: "
                                  f"{line[:40]!r})") from None
        if token in ranks:
            raise CheckpointError(f"{path}: line {i}: token {token!r} is also on line "
                                  f"{line_of[ranks[token]]}")
        if rank in line_of:
            raise CheckpointError(f"{path}: line {i}: rank {rank} is also on line {line_of[rank]}")
        ranks[token], line_of[rank] = rank, i
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} of the 256 bytes have no token (byte "
                              f"{missing[0]} first): text holding them could not be encoded")
    top = max(line_of)          # distinct ranks >= 0 are 0..n-1 exactly when the largest is n-1
    if top != len(ranks) - 1:
        raise CheckpointError(f"{path}: the ranks must run 0..{len(ranks) - 1}, one a token, but "
                              f"line {line_of[top]} has rank {top}")
    return ranks


def read_specials(path, n_ranks):
    """tokenizer_config.json -> {name: id} of the 258 special ids, which follow the n_ranks BPE
    ranks; unnamed ones are "<|reserved_token_{id}|>". Else a one-line CheckpointError."""
    config = want(read_json(path, "the tokenizer config"), "object", path, "the file")
    decoder = config.get("added_tokens_decoder")
    if not isinstance(decoder, dict):
        raise CheckpointError(f"{path}: no added_tokens_decoder {{id: {{'content': ..}}}}")
    named = {}
    for key, entry in decoder.items():
        label = f"added_tokens_decoder[{key!r}]"
        if not key.isdecimal():                         # JSON keys are strings: the id as text
            raise CheckpointError(f"{path}: {label}: the key must be a token id")
        want(entry, "object", path, label)
        named[int(key)] = want_key(entry, "content", "str", path, f"{label}.content")
    # The release numbers its specials from len(ranks). The demo's toy vocabulary is small, so
    # it states the real base, 163584, under DEMO_BASE_KEY (write_demo); releases lack the key.
    base = config.get(DEMO_BASE_KEY, n_ranks)
    if type(base) is not int or not n_ranks <= base <= 2**32 - NUM_SPECIAL:  # tiktoken: u32 ids
        raise CheckpointError(f"{path}: {DEMO_BASE_KEY} {base!r} is not an int past the ranks "
                              f"(>= {n_ranks})")
    outside = sorted(i for i in named if not base <= i < base + NUM_SPECIAL)
    if outside:
        raise CheckpointError(f"{path}: special ids must lie in {base}..{base + NUM_SPECIAL - 1}, "
                              f"after the {n_ranks} BPE ranks, not {outside[:4]}")
    ids = range(base, base + NUM_SPECIAL)
    names = [named.get(i, f"<|reserved_token_{i}|>") for i in ids]
    twice = [name for name, n in Counter(names).items() if n > 1]
    if twice:                                   # {name: id} would silently lose an id
        raise CheckpointError(f"{path}: added_tokens_decoder names two ids {twice[0]!r}")
    return dict(zip(names, ids))


class Tokenizer:
    """Kimi's tokenizer: tiktoken BPE with Kimi's regex (PAT_STR) and 258 special tokens.

    Tokenizer(folder) reads tiktoken.model and tokenizer_config.json (read_ranks, read_specials: a
    one-line CheckpointError, a ValueError, naming the file and line or key). As in the release,
    the special ids follow the BPE ranks: 163584 = len(ranks) is "[BOS]", up to 163841.
    encode(text) adds no BOS/EOS and turns special-token strings into their ids; decode(ids) ->
    text; stream(ids) yields text pieces as they complete.
    tok.special: {name: id} (unnamed ones: "<|reserved_token_{id}|>"); tok.ids: the ids it knows."""

    def __init__(self, folder):
        ranks = read_ranks(os.path.join(folder, "tiktoken.model"))
        self.special = read_specials(os.path.join(folder, "tokenizer_config.json"), len(ranks))
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
        """ids -> text. Bytes that are not whole UTF-8 characters become U+FFFD (stream() holds
        them back until the character is complete)."""
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


def chat_turn(role, content):
    """One turn of Kimi-Linear's chat template: role token, role name, <|im_middle|>, content,
    <|im_end|> (role: system, user or assistant). Turns follow each other with no newline."""
    inside = [t for t in CHAT_TOKENS if t in content]
    if inside:      # the text would end its turn early or start another
        raise ValueError(f"the {role} turn holds {inside[0]}, which would end or start a turn")
    return f"<|im_{role}|>{role}<|im_middle|>{content}<|im_end|>"


def chat_prompt(user, system=DEFAULT_SYSTEM):
    """A user turn, ready for the reply: the system turn (system "" or None: none, as Kimi-Linear's
    template renders a chat without one), the user turn, then the assistant's turn opened. The
    reply ends at <|im_end|>; a conversation goes on with "<|im_end|>" + chat_prompt(next, None),
    so the whole is the template's rendering of every turn (sample.Chat holds one so)."""
    system_turn = chat_turn("system", system) if system else ""
    return f"{system_turn}{chat_turn('user', user)}<|im_assistant|>assistant<|im_middle|>"
