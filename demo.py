"""
The offline demo: a tiny random-weight checkpoint in the official layout, for `python sample.py
--demo`, the tests and the notebooks. Its weights are kimi.CONFIGS["demo"] (the real 163,840-row
vocabulary, tiny everything else) and its tokenizer is a toy BPE vocabulary of a few hundred tokens
whose special tokens keep the release's ids (163584..), so chat prompts and stop ids behave as with
the real model. The generated text is noise, by design.
"""
import base64
import json
import os
import shutil
import sys
import tempfile

import torch

from kimi import CONFIGS, CheckpointError, Transformer
from tokenizer import DEMO_BASE_KEY

DEMO_WORDS = ("the of and to in is you that it was for on are as with his they at be this from "
              "have or by one had not but what all were when we there can Kimi Linear attention "
              "delta model 你好 世界 模型 🙂 🚀")
DEMO_VERSION, DEMO_MARKER = 2, "kimi-minimal-demo.json"


class DemoError(CheckpointError):
    """The demo folder cannot be written or holds files the demo did not write (one line)."""


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
        raise DemoError(f"cannot write the demo checkpoint: {root} (XDG_CACHE_HOME) is not "
                        f"a folder")
    if os.path.lexists(folder) and not (os.path.isdir(folder) and not os.listdir(folder)):
        if not is_demo(folder):
            raise DemoError(f"{folder} holds files that are not this version's demo checkpoint; "
                            f"move them away (or set XDG_CACHE_HOME elsewhere) and the demo "
                            f"writes a new one")
        print(f"demo: the tiny random-weight checkpoint in {folder}", file=sys.stderr)
        return folder
    tmp = None
    try:
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".kimi-minimal-demo-", dir=root)
        os.rename(write_demo(tmp), folder)
    except OSError as e:
        if not is_demo(folder):                 # (else another run has just written it)
            reason = e.strerror or e
            raise DemoError(f"cannot write the demo checkpoint in {root}: {reason}") from None
    finally:
        if tmp and os.path.isdir(tmp):          # ours, left by a failure
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"demo: wrote a tiny random-weight checkpoint to {folder}", file=sys.stderr)
    return folder


