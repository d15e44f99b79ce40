"""Tests for sample.py: tokenizer, chat prompt, streaming, sampling, generation, the demo and bad input."""
import json, os, shutil, subprocess, sys

import pytest, tiktoken, torch
from hypothesis import given, settings, strategies as st

import sample
from kimi import ModelArgs, Transformer
from sample import PAT_STR, Tokenizer, chat_prompt, demo_ranks, generate, write_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    write_tokenizer(folder, demo_ranks())  # 256 bytes + prefixes of a few words, partial UTF-8 included
    return Tokenizer(folder)


pieces = st.sampled_from(["a", "Z", "the", " of", "Kimi", "'s", "I'M", "7", "2024", " ", "  ", "\t", "\n",
                          "\r\n", "\r", ".", "!?", "你好", "模型", "世界", "こんにちは", "🙂", "🚀", "👍🏽", "é",
                          "ß", "<|im_end|>"])
texts = st.lists(pieces, max_size=30).map("".join) | st.text(max_size=60)


@settings(deadline=None, max_examples=200)
@given(texts)
def test_round_trip_and_streaming(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    streamed = list(tok.stream(ids))
    assert "".join(streamed) == text
    assert all("\ufffd" not in p for p in streamed) or "\ufffd" in text  # no character is ever cut in two


@settings(deadline=None, max_examples=200)
@given(st.data())
def test_streaming_random_ids(tok, data):
    ids = data.draw(st.lists(st.sampled_from(tok.ids), max_size=40))  # may end mid-character
    streamed = list(tok.stream(ids))
    for p in streamed:
        p.encode("utf-8")  # valid UTF-8
    assert "".join(streamed) == tok.decode(ids)


def test_special_tokens(tok):
    assert len(tok.special) == 258 and sorted(tok.special.values()) == list(range(163584, 163842))
    for name, i in {"[BOS]": 163584, "[EOS]": 163585, "<|im_end|>": 163586, "<|im_user|>": 163587,
                    "<|im_assistant|>": 163588, "<|im_system|>": 163594, "<|im_middle|>": 163601,
                    "[UNK]": 163838, "[PAD]": 163839, "<|reserved_token_163589|>": 163589,
                    "<|reserved_token_163600|>": 163600, "<|reserved_token_163841|>": 163841}.items():
        assert tok.encode(name) == [i] and tok.decode([i]) == name
    ids = tok.encode("the<|im_end|>the")
    assert ids[1] == 163586 and ids[0] == ids[2] and len(ids) == 3
    mask = tok.allowed(163840)
    assert mask[163586] and mask[163839] and mask[:256].all() and not mask[len(demo_ranks())]


# Hand-checked splits of the released pat_str.
SPLITS = {
    "HelloWorld CamelCaseString": ["Hello", "World", " Camel", "Case", "String"],
    "HTTPServer parseJSON": ["HTTPServer", " parse", "JSON"],
    "中文abc我love你们": ["中文", "abc", "我", "love", "你们"],
    "日本語です": ["日本語", "です"],
    "12345678 abc12345": ["123", "456", "78", " abc", "123", "45"],
    "I'm don't THEY'RE we'll": ["I'm", " don't", " THEY'RE", " we'll"],
    "hello, world!": ["hello", ",", " world", "!"],
    "a   b\n\nc": ["a", "  ", " b", "\n\n", "c"],
    "line1\r\n  line2  ": ["line", "1", "\r\n", " ", " line", "2", "  "],
    "hi 🙂🙂 naïve;\n": ["hi", " 🙂🙂", " naïve", ";\n"],
}


@pytest.mark.parametrize("text", SPLITS)
def test_regex_splits(text):
    # A vocabulary holding every prefix of each expected piece and of each piece joined to the next: tiktoken
    # returns exactly the expected pieces as tokens only if its regex cuts the text at those places.
    expected, toks = SPLITS[text], [bytes([b]) for b in range(256)]
    for a, b in zip(expected, expected[1:] + [""]):
        toks += [s[:i] for s in (a.encode(), (a + b).encode()) for i in range(2, len(s) + 1)]
    ranks = {t: r for r, t in enumerate(dict.fromkeys(toks))}
    enc = tiktoken.Encoding("t", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens={})
    assert [enc.decode_single_token_bytes(t).decode() for t in enc.encode_ordinary(text)] == expected


def test_chat_prompt(tok):
    expected = ("<|im_system|>system<|im_middle|>You are a helpful assistant provided by Moonshot-AI.<|im_end|>"
                "<|im_user|>user<|im_middle|>Is 123 a prime?<|im_end|><|im_assistant|>assistant<|im_middle|>")
    assert chat_prompt("Is 123 a prime?") == expected
    ids = tok.encode(expected)
    assert ids[0] == 163594 and ids[-1] == 163601 and ids.count(163586) == 2


@settings(deadline=None, max_examples=100)
@given(st.lists(st.floats(-8, 8), min_size=2, max_size=40), st.integers(1, 5), st.floats(0.05, 1.0),
       st.floats(0.3, 3.0), st.integers(0, 2**31))
def test_top_k_top_p_stay_in_their_set(logits, k, p, temperature, seed):
    torch.manual_seed(seed)
    x = torch.tensor([logits]).repeat(16, 1)
    kth = x[0].topk(min(k, len(logits))).values[-1]
    assert (x[0, sample.sample(x, temperature, top_k=k)] >= kth).all()
    probs = (x[0] / temperature).softmax(-1)  # the same fp32 values sample() sees
    for t in sample.sample(x, temperature, top_p=p):
        assert probs[probs > probs[t]].sum() < p + 1e-5  # the mass strictly above t is short of p
    assert (sample.sample(x, 0.0) == x[0].argmax()).all()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**dict(sample.DEMO_ARGS, vocab_size=320))).eval()
    model.setup_cache(1, 64)
    return model


@settings(deadline=None, max_examples=6)
@given(st.lists(st.integers(0, 319), min_size=1, max_size=20))
def test_greedy_equals_full_forward_argmax(tiny, prompt):
    new = list(generate(tiny, prompt, 10, stop=()))
    logits = tiny(torch.tensor([prompt + new[:-1]]), start_pos=0)  # one full re-forward, no cache reuse
    assert logits[0, len(prompt) - 1:].argmax(-1).tolist() == new


@pytest.fixture(scope="module")
def demo_ckpt(tmp_path_factory):
    return sample.write_demo(str(tmp_path_factory.mktemp("demo")))


def test_demo_end_to_end(tmp_path):
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    r = subprocess.run([sys.executable, "sample.py", "--demo", "--max-new-tokens", "12", "The answer is"],
                       cwd=HERE, env=env, capture_output=True, text=True, timeout=120)  # as README runs it
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The answer is") and "tok/s" in r.stderr and "random" in r.stderr
    files = os.listdir(tmp_path / "kimi-minimal-demo")
    assert {"config.json", "model.safetensors.index.json", "tiktoken.model", "tokenizer_config.json"} < {*files}
    assert sum(f.endswith(".safetensors") for f in files) == 3


def broken(demo, tmp_path, how):
    if how in (None, "missing"):
        return demo if how is None else str(tmp_path / "nothing")
    folder = shutil.copytree(demo, tmp_path / "ckpt")
    shard = folder / "model-00002-of-00003.safetensors"
    if how == "no config":
        os.remove(folder / "config.json")
    elif how == "config not an object":
        (folder / "config.json").write_text("[1, 2]")
    elif how == "no shard":
        os.remove(shard)
    elif how == "truncated":
        shard.write_bytes(shard.read_bytes()[:-1000])
    elif how == "huge":
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        index["metadata"]["total_size"] = 2**60
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return str(folder)


@pytest.mark.parametrize("how, extra, message", [
    ("missing", [], "no checkpoint folder"),
    ("no config", [], "missing config.json"),
    ("config not an object", [], "not a Kimi-Linear config"),
    ("no shard", [], "missing 1 of 3 shards"),
    ("truncated", [], "truncated"),
    ("huge", [], "not enough memory"),
    (None, ["--max-seq-len", "4"], "--max-seq-len is 4"),
    (None, ["--device", "nosuchdevice"], "unknown device"),
    (None, ["--device", "cuda:7"], "cuda:7"),
    (None, ["--top-k", "0"], "--top-k must be at least 1"),
    (None, ["--temperature", "nan"], "--temperature must be a finite number"),
    (None, ["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
])
def test_bad_input_exits_2(demo_ckpt, tmp_path, capsys, how, extra, message):
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", broken(demo_ckpt, tmp_path, how), *extra, "a prompt of several words"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith("error: ") and message in err[-1]


@pytest.mark.parametrize("prompt, message", [
    (["x<|reserved_token_163841|>"], "no embedding for: ids [163841]"),   # a special id past the 163840 rows
    (["--prompt-file", "not-utf8.txt"], "cannot read the prompt"),
])
def test_bad_prompt_exits_2(demo_ckpt, tmp_path, capsys, prompt, message):
    (tmp_path / "not-utf8.txt").write_bytes(b"\xff\xfe not UTF-8")
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", demo_ckpt, *(str(tmp_path / p) if p.endswith(".txt") else p for p in prompt)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith("error: ") and message in err[-1]


def test_chat_from_prompt_file_with_sampling(demo_ckpt, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("Is 123 a prime?")
    sample.main(["--ckpt", demo_ckpt, "--chat", "--prompt-file", str(tmp_path / "p.txt"),
                 "--max-new-tokens", "4", "--temperature", "0.8", "--top-k", "50", "--top-p", "0.9", "--seed", "1"])
    n = len(Tokenizer(demo_ckpt).encode(chat_prompt("Is 123 a prime?")))
    assert f"prompt {n} tokens" in capsys.readouterr().err


def test_hub_id_without_huggingface_hub(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if it were not installed
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", "moonshotai/Kimi-Linear-48B-A3B-Instruct", "--device", "cpu", "hi"])
    assert e.value.code == 2 and "pip install huggingface_hub" in capsys.readouterr().err
