"""Damaged and malformed files (issue 23, part 2): each class of damage to tiktoken.model,
tokenizer_config.json, config.json, the index or a shard ends in one CheckpointError line naming
the file and the line, key or tensor at fault, never a traceback from tiktoken, torch or json; and
save_pretrained checks its arguments first and leaves nothing behind when it fails."""
import base64
import errno
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoint
from checkpoint import CheckpointError
from demo import write_tokenizer
from kimi import CONFIGS, Transformer
from tokenizer import DEMO_BASE_KEY, Tokenizer

INDEX, SHARD1 = "model.safetensors.index.json", "model-00001-of-00002.safetensors"


def one_line(err, *parts):
    """The exception's message is one line and holds each of `parts`."""
    message = str(err.value)
    assert "\n" not in message and all(p in message for p in parts), message


def damage_json(path, change):
    """Rewrite a JSON file: change(value) edits it in place, or returns the file's new text."""
    value = json.loads(path.read_text())
    text = change(value)
    path.write_text(json.dumps(value) if text is None else text)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny checkpoint (config.json, 2 shards, the index), to copy and damage."""
    folder = tmp_path_factory.mktemp("tiny")
    Transformer(CONFIGS["tiny"]).save_pretrained(folder)
    return folder


@pytest.fixture
def ckpt(saved, tmp_path):
    return shutil.copytree(saved, tmp_path / "ckpt")


# ---- tiktoken.model: tiktoken itself panics (a Rust panic, a BaseException) on most of these

RANKS = {**{bytes([b]): b for b in range(256)}, b"th": 256, b"the": 257}
LINES = [f"{base64.b64encode(t).decode()} {r}" for t, r in RANKS.items()]   # line n: rank n - 1
THE = base64.b64encode(b"the").decode()

RANK_DAMAGE = {   # what -> (the file's lines -> its new lines or text, what the message says)
    "cut short": (lambda L: "\n".join(L)[:-5], "not '<base64 bytes> <rank>' lines (line 258"),
    "bad base64": (lambda L: L[:3] + ["not-base64! 3"] + L[4:], "lines (line 4: b'not-base64"),
    "rank not an integer": (lambda L: L[:-1] + [f"{THE} 257.0"], "lines (line 258"),
    "negative rank": (lambda L: L[:-1] + [f"{THE} -257"], "lines (line 258"),
    "three fields": (lambda L: L[:-1] + [f"{THE} 257 1"], "lines (line 258"),
    "binary": (lambda L: "\xff\xfe\x00", "lines (line 1"),
    "rank twice": (lambda L: L[:-1] + [f"{THE} 256"], "line 258: rank 256 is also on line 257"),
    "token twice": (lambda L: L + [f"{THE} 258"], "line 259: token b'the' is also on line 258"),
    "gap in the ranks": (lambda L: L[:-1] + [f"{THE} 300"],
                         "the ranks must run 0..257, one a token, but line 258 has rank 300"),
    "a byte with no token": (lambda L: L[1:], "1 of the 256 bytes have no token (byte 0 first)"),
    "empty": (lambda L: "", "256 of the 256 bytes have no token"),
    "a folder": (None, "tiktoken.model: cannot read the BPE ranks (Is a directory)"),
}


@pytest.mark.parametrize("what", RANK_DAMAGE)
def test_damaged_rank_file(tmp_path, what):
    change, message = RANK_DAMAGE[what]
    write_tokenizer(tmp_path, RANKS)
    path = tmp_path / "tiktoken.model"
    assert path.read_text() == "\n".join(LINES) + "\n"          # LINES is what demo writes
    if change is None:
        path.unlink()
        path.mkdir()
    else:
        text = change(LINES)
        path.write_text(text if isinstance(text, str) else "\n".join(text) + "\n")
    with pytest.raises(CheckpointError) as err:
        Tokenizer(tmp_path)
    one_line(err, "tiktoken.model", message)


def test_blank_lines_in_the_rank_file_are_skipped_as_tiktoken_does(tmp_path):
    write_tokenizer(tmp_path, RANKS)
    (tmp_path / "tiktoken.model").write_text("\n".join(LINES[:9] + [""] + LINES[9:]) + "\n\n")
    assert Tokenizer(tmp_path).encode("the") == [257]


# ---- tokenizer_config.json (the specials follow the 258 ranks: ids 258..515)

SPECIALS_DAMAGE = {   # what -> (change(config) or the new text, what the message says)
    "content null": (lambda c: c["added_tokens_decoder"]["258"].update(content=None),
                     "added_tokens_decoder['258'].content must be a non-empty string, not None"),
    "content a number": (lambda c: c["added_tokens_decoder"]["258"].update(content=7),
                         "added_tokens_decoder['258'].content must be a non-empty string, not 7"),
    "content missing": (lambda c: c["added_tokens_decoder"]["258"].pop("content") and None,
                        "missing required key 'added_tokens_decoder['258'].content'"),
    "entry not an object": (lambda c: c["added_tokens_decoder"].update({"258": "[BOS]"}),
                            "added_tokens_decoder['258'] must be an object, not '[BOS]'"),
    "id not a number": (lambda c: c["added_tokens_decoder"].update({"x1": {"content": "<|x|>"}}),
                        "added_tokens_decoder['x1']: the key must be a token id"),
    "a name twice": (lambda c: c["added_tokens_decoder"]["259"].update(content="[BOS]"),
                     "added_tokens_decoder names two ids '[BOS]'"),
    "decoder a list": (lambda c: c.update(added_tokens_decoder=[]), "no added_tokens_decoder"),
    "base a bool": (lambda c: c.update({DEMO_BASE_KEY: True}), "True is not an int past the ranks"),
    "base past 2**32": (lambda c: c.update({DEMO_BASE_KEY: 2**32}), "is not an int past the ranks"),
    "not an object": (lambda c: "[1]", "the file must be an object, not [1]"),
    "not JSON": (lambda c: '{"added_tokens_decoder": ', "cannot read the tokenizer config"),
    "a key twice": (lambda c: '{"added_tokens_decoder": {}, "added_tokens_decoder": {}}',
                    "cannot read the tokenizer config (key 'added_tokens_decoder' given twice)"),
}


@pytest.mark.parametrize("what", SPECIALS_DAMAGE)
def test_damaged_tokenizer_config(tmp_path, what):
    change, message = SPECIALS_DAMAGE[what]
    write_tokenizer(tmp_path, RANKS)
    damage_json(tmp_path / "tokenizer_config.json", change)
    with pytest.raises(CheckpointError) as err:
        Tokenizer(tmp_path)
    one_line(err, "tokenizer_config.json", message)


# ---- model.safetensors.index.json: the same line from sample.py's early check and from loading

INDEX_DAMAGE = {   # what -> (change(index) or the new text, what the message says)
    "total_size 1e999": (lambda i: json.dumps(i).replace(
        f'"total_size": {i["metadata"]["total_size"]}', '"total_size": 1e999'),
        "metadata.total_size must be an integer >= 0, not inf"),
    "total_size a string": (lambda i: i["metadata"].update(total_size="1024"),
                            "metadata.total_size must be an integer >= 0, not '1024'"),
    "total_size negative": (lambda i: i["metadata"].update(total_size=-1),
                            "metadata.total_size must be an integer >= 0, not -1"),
    "total_size missing": (lambda i: i["metadata"].clear(),
                           "missing required key 'metadata.total_size'"),
    "no metadata": (lambda i: i.pop("metadata") and None, "missing required key 'metadata'"),
    "weight_map a list": (lambda i: i.update(weight_map=[SHARD1]),
                          "weight_map must be an object, not ['model-00001"),
    "a shard name a number": (lambda i: i["weight_map"].update({"lm_head.weight": 2}),
                              "weight_map['lm_head.weight'] must be a non-empty string, not 2"),
    "a shard name null": (lambda i: i["weight_map"].update({"lm_head.weight": None}),
                          "weight_map['lm_head.weight'] must be a non-empty string, not None"),
    "not an object": (lambda i: "[]", "the index must be an object, not []"),
    "not JSON": (lambda i: json.dumps(i)[:-9], "cannot read the index (Unterminated string"),
    "a key twice": (lambda i: '{"metadata": {}, "metadata": {}}',
                    "cannot read the index (key 'metadata' given twice)"),
}


@pytest.mark.parametrize("what", INDEX_DAMAGE)
def test_damaged_index(ckpt, what):
    change, message = INDEX_DAMAGE[what]
    damage_json(ckpt / INDEX, change)
    for read in (checkpoint.check_folder, lambda c: Transformer.from_pretrained(c, "cpu")):
        with pytest.raises(CheckpointError) as err:
            read(ckpt)
        one_line(err, INDEX, message)


# ---- config.json

def _linear(**changes):
    return lambda c: c["linear_attn_config"].update(changes)


CONFIG_DAMAGE = {   # what -> (change(config) or the new text, what the message says)
    "not an object": (lambda c: "[1, 2]", "not a Kimi-Linear config"),
    "not JSON": (lambda c: "{", "cannot read config (Expecting"),
    "a key twice": (lambda c: json.dumps(c)[:-1] + ', "hidden_size": 64}',
                    "cannot read config (key 'hidden_size' given twice)"),
    "an int a string": (lambda c: c.update(hidden_size="64"),
                        "hidden_size must be an integer >= 1, not '64'"),
    "an int a bool": (lambda c: c.update(num_experts=True),
                      "num_experts must be an integer >= 0, not True"),
    "an int a float": (lambda c: c.update(num_hidden_layers=4.0),
                       "num_hidden_layers must be an integer >= 1, not 4.0"),
    "a float infinite": (lambda c: json.dumps(c).replace('"rms_norm_eps": 1e-05',
                                                         '"rms_norm_eps": 1e999'),
                         "rms_norm_eps must be a positive finite number, not inf"),
    "linear_attn_config a list": (lambda c: c.update(linear_attn_config=[]),
                                  "not a Kimi-Linear config (no linear_attn_config object)"),
    "kda_layers a string": (_linear(kda_layers="1,3"),
                            "linear_attn_config.kda_layers must be a list of integers, not '1,3'"),
    "full_attn_layers of floats": (_linear(full_attn_layers=[2.0, 4.0]), "linear_attn_config."
                                   "full_attn_layers must be a list of integers, not [2.0, 4.0]"),
    "a required key missing": (lambda c: c["linear_attn_config"].pop("num_heads") and None,
                               "missing required key 'linear_attn_config.num_heads'"),
    "quantization_config a number": (lambda c: c.update(quantization_config=5),
                                     "quantization_config must be an object, not 5"),
}


@pytest.mark.parametrize("what", CONFIG_DAMAGE)
def test_damaged_config(ckpt, what):
    change, message = CONFIG_DAMAGE[what]
    damage_json(ckpt / "config.json", change)
    with pytest.raises(CheckpointError) as err:
        Transformer.from_pretrained(ckpt, "cpu")
    one_line(err, "config.json", message)


def test_quantization_config_not_quantized_a_number(ckpt):
    from fast import quantize
    damage_json(ckpt / "config.json",
                lambda c: c.update(quantization_config=dict(quantize.FORMAT, not_quantized=5)))
    with pytest.raises(CheckpointError) as err:
        quantize.from_pretrained(ckpt, "cpu")
    one_line(err, "config.json", "quantization_config.not_quantized must be a list of strings")


# ---- shards: a tensor of a dtype no weight has (torch's own error: 17 lines)

@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.float64,
                                   torch.float8_e4m3fn])
def test_shard_with_a_tensor_of_the_wrong_dtype(ckpt, dtype):
    tensors = load_file(ckpt / SHARD1)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].to(dtype)
    save_file(tensors, ckpt / SHARD1, metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as err:
        Transformer.from_pretrained(ckpt, "cpu")
    kind = str(dtype).removeprefix("torch.")
    one_line(err, SHARD1, "has tensors not of dtype bfloat16/float16/float32", f"{name} ({kind})")


# ---- save_pretrained: arguments first, and nothing half-written

@pytest.fixture(scope="module")
def model():
    return Transformer(CONFIGS["tiny"])


@pytest.mark.parametrize("num_shards", [0, -1, 2.5, True, "2", None, 10**6])
def test_save_refuses_a_bad_shard_count_and_writes_nothing(model, tmp_path, num_shards):
    folder = tmp_path / "a" / "ckpt"
    with pytest.raises(ValueError) as err:
        model.save_pretrained(folder, num_shards=num_shards)
    one_line(err, "num_shards must be an integer in 1..141", repr(num_shards))
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_a_file_for_a_folder(model, tmp_path):
    (tmp_path / "ckpt").write_text("mine")
    with pytest.raises(ValueError) as err:
        model.save_pretrained(tmp_path / "ckpt")
    one_line(err, "ckpt_dir:", "exists and is not a folder")
    assert (tmp_path / "ckpt").read_text() == "mine"


@pytest.mark.parametrize("existing", [False, True])
def test_a_failed_save_leaves_nothing_behind(model, tmp_path, monkeypatch, existing):
    """The disk fills up at the second shard: a new folder (and its new parent) is gone again; an
    existing one holds only what it held."""
    folder = tmp_path / "new" / "ckpt"
    if existing:
        folder.mkdir(parents=True)
        (folder / "notes.txt").write_text("mine")
    calls = []

    def full_disk(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(folder)
    if existing:
        assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    else:
        assert list(tmp_path.iterdir()) == []


def test_save_over_a_checkpoint_replaces_it(model, saved, tmp_path):
    folder = shutil.copytree(saved, tmp_path / "ckpt")
    model.save_pretrained(folder, num_shards=1)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["config.json", INDEX, SHARD1, "model-00002-of-00002.safetensors",   # the old shards stay
         "model-00001-of-00001.safetensors"])
    loaded = Transformer.from_pretrained(folder, "cpu")
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t)
