"""Tests for sample.py, tokenizer.py and demo.py: tokenizer, chat prompt, streaming, sampling,
generation, the demo, and every bad input of the command line (one `error:` line, status 2, no
traceback, no file touched)."""
import ast
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import replace

import pytest
import tiktoken
import torch
from hypothesis import given, settings, strategies as st

import demo
from helpers import ROOT
import generation
import sample
import tokenizer
from demo import demo_ranks, write_tokenizer
from kimi import CONFIGS, Transformer
from tokenizer import PAT_STR, Tokenizer, chat_prompt



@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    write_tokenizer(folder, demo_ranks(), special_base=163584)  # the demo's: real special ids
    return Tokenizer(folder)


pieces = st.sampled_from(["a", "Z", "the", " of", "Kimi", "'s", "I'M", "7", "2024", " ", "  ", "\t",
                          "\n", "\r\n", "\r", ".", "!?", "你好", "模型", "世界",
                          "こんにちは", "🙂", "🚀", "👍🏽", "é", "ß", "<|im_end|>"])
texts = st.lists(pieces, max_size=30).map("".join) | st.text(max_size=60)


@settings(deadline=None, max_examples=200)
@given(texts)
def test_round_trip_and_streaming(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    streamed = list(tok.stream(ids))
    assert "".join(streamed) == text
    assert all("\ufffd" not in p for p in streamed) or "\ufffd" in text  # no character cut in two


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
    named = {"[BOS]": 163584, "[EOS]": 163585, "<|im_end|>": 163586, "<|im_user|>": 163587,
             "<|im_assistant|>": 163588, "<|im_system|>": 163594, "<|im_middle|>": 163601,
             "[UNK]": 163838, "[PAD]": 163839, "<|reserved_token_163589|>": 163589,
             "<|reserved_token_163600|>": 163600, "<|reserved_token_163841|>": 163841}
    for name, i in named.items():
        assert tok.encode(name) == [i] and tok.decode([i]) == name
    ids = tok.encode("the<|im_end|>the")
    assert ids[1] == 163586 and ids[0] == ids[2] and len(ids) == 3
    mask = tok.allowed(163840)
    assert mask[163586] and mask[163839] and mask[:256].all() and not mask[len(demo_ranks())]
    assert tok.stop_ids == (163585, 163586)


def test_real_layout_numbers_specials_from_the_rank_count(tmp_path):
    ranks = {bytes([b]): b for b in range(256)}
    write_tokenizer(tmp_path, ranks)                # no stated base: as a release folder
    t = Tokenizer(tmp_path)
    assert t.special["[BOS]"] == 256 and t.special["<|im_end|>"] == 258 and max(t.ids) == 256 + 257
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert tokenizer.DEMO_BASE_KEY not in config


@pytest.mark.parametrize("change, message", [
    (lambda c: c["added_tokens_decoder"].update({"255": {"content": "<|x|>"}}), "must lie in 256"),
    (lambda c: c["added_tokens_decoder"].update({"600": {"content": "<|x|>"}}), "must lie in 256"),
    (lambda c: c.update({tokenizer.DEMO_BASE_KEY: 100}), "is not an int past the ranks"),
    (lambda c: c.update({tokenizer.DEMO_BASE_KEY: "300"}), "is not an int past the ranks"),
    (lambda c: c.update({"added_tokens_decoder": [1]}), "no added_tokens_decoder"),
])
def test_tokenizer_refuses_specials_that_do_not_follow_the_ranks(tmp_path, change, message):
    write_tokenizer(tmp_path, {bytes([b]): b for b in range(256)})
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    change(config)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        Tokenizer(tmp_path)


def test_tokenizer_refuses_a_malformed_rank_file(tmp_path):
    write_tokenizer(tmp_path, {bytes([b]): b for b in range(256)})
    (tmp_path / "tiktoken.model").write_text("YQ== 0\nnot-base64! 1\n")
    with pytest.raises(ValueError, match="tiktoken.model: not '<base64 bytes> <rank>' lines"):
        Tokenizer(tmp_path)


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
    # A vocabulary holding every prefix of each expected piece and of each piece joined to the
    # next: tiktoken returns exactly the expected pieces only if its regex cuts the text there.
    expected, toks = SPLITS[text], [bytes([b]) for b in range(256)]
    for a, b in zip(expected, expected[1:] + [""]):
        toks += [s[:i] for s in (a.encode(), (a + b).encode()) for i in range(2, len(s) + 1)]
    ranks = {t: r for r, t in enumerate(dict.fromkeys(toks))}
    enc = tiktoken.Encoding("t", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens={})
    got = [enc.decode_single_token_bytes(t).decode() for t in enc.encode_ordinary(text)]
    assert got == expected


def test_chat_prompt(tok):
    expected = ("<|im_system|>system<|im_middle|>You are a helpful assistant provided by "
                "Moonshot-AI.<|im_end|><|im_user|>user<|im_middle|>Is 123 a prime?<|im_end|>"
                "<|im_assistant|>assistant<|im_middle|>")
    assert chat_prompt("Is 123 a prime?") == expected
    ids = tok.encode(expected)
    assert ids[0] == 163594 and ids[-1] == 163601 and ids.count(163586) == 2
    # no system turn, as Kimi-Linear's chat template renders a conversation without one
    no_system = expected[expected.index("<|im_user|>"):]
    assert chat_prompt("Is 123 a prime?", "") == chat_prompt("Is 123 a prime?", None) == no_system


@settings(deadline=None, max_examples=100)
@given(st.lists(st.floats(-8, 8), min_size=2, max_size=40), st.integers(1, 5),
       st.floats(0.05, 1.0), st.floats(0.3, 3.0), st.integers(0, 2**31))
def test_top_k_top_p_stay_in_their_set(logits, k, p, temperature, seed):
    torch.manual_seed(seed)
    x = torch.tensor([logits]).repeat(16, 1)
    kth = x[0].topk(min(k, len(logits))).values[-1]
    assert (x[0, generation.sample(x, temperature, top_k=k)] >= kth).all()   # stored: exact
    probs = (x[0].double() / temperature).softmax(-1)   # fp64, as sample() computes them
    for t in generation.sample(x, temperature, top_p=p):
        # The mass clearly above t is short of p. sample() rounds in another order (max first),
        # so "clearly": more than 1e-9 relative, and 1e-12 on the sum: both far above fp64
        # rounding (~1e-16 per value, ~1e-15 over 40 terms), far below the drawn p's and probs.
        assert probs[probs > probs[t] * (1 + 1e-9)].sum() < p + 1e-12
    assert (generation.sample(x, 0.0) == x[0].argmax()).all()


@pytest.mark.parametrize("temperature", [1e-45, 1e-320, 1e300, 1.7e308])
def test_extreme_temperatures_draw_valid_ids(temperature):
    torch.manual_seed(0)
    logits = torch.tensor([[0.5, 3.0, -2.0, 1.0, float("-inf")]]).repeat(64, 1)
    ids = generation.sample(logits, temperature)
    assert ids.min() >= 0 and ids.max() <= 3                # never the -inf (disallowed) id
    if temperature < 1:                                     # ~ argmax: one maximum, so exact
        assert (ids == 1).all()
    else:                                                   # ~ uniform over the allowed four
        assert len(set(ids.tolist())) > 1


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Transformer(replace(CONFIGS["demo"], vocab_size=320)).eval()   # no caches yet


def assert_greedy(model, prompt, new):
    """Each greedy id's logit is its row's maximum in one full (stateless) re-forward, up to the
    rounding by which cached decoding and a full forward differ: fp32 eps (1.2e-7) x logits of
    ~1 x a few hundred accumulated terms < 1e-4, far below typical gaps between logits."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + new[:-1]]))[0, len(prompt) - 1:]
    chosen = logits[torch.arange(len(new)), torch.tensor(new)]
    assert (chosen >= logits.max(-1).values - 1e-4).all()


@settings(deadline=None, max_examples=6)
@given(st.lists(st.integers(0, 319), min_size=1, max_size=20))
def test_greedy_picks_the_argmax_of_full_re_forwards(tiny, prompt):
    new = list(generation.generate(tiny, None, prompt, 10, stop=()))
    assert len(new) == 10
    assert_greedy(tiny, prompt, new)


def test_generate_takes_text_lists_and_tensors_and_sets_up_caches(tok, tiny):
    tiny.setup_cache(0, 0)                                  # as a fresh model: no caches
    prompt = tok.encode("the of and")
    assert max(prompt) < 320
    new = list(generation.generate(tiny, None, prompt, 6, stop=()))
    assert tiny.max_batch_size == 1 and tiny.max_seq_len == len(prompt) + 5
    assert_greedy(tiny, prompt, new)
    tiny.setup_cache(1, 2)                                  # too small: generate grows it
    for form in (torch.tensor(prompt), torch.tensor(prompt, dtype=torch.int32), "the of and"):
        new = list(generation.generate(tiny, tok, form, 6, stop=()))
        assert tiny.max_seq_len >= len(prompt) + 5 and len(new) == 6
        assert_greedy(tiny, prompt, new)
    for bad in ([], [[1, 2], []], [1.5], [320], [-1], [[1], [2.5]]):
        with pytest.raises(ValueError, match="prompt"):
            list(generation.generate(tiny, None, bad, 2))


def test_generate_batch_equals_each_prompt_alone(tiny):
    """A list of prompts of lengths 2..130 decodes as one left-padded batch; every row's greedy ids
    equal its prompt's alone (ids: exact; fp32 reorderings are far below the logits' gaps). A row
    that meets a stop id yields None from then on; the batch ends when every row has stopped."""
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 320, (n,), generator=gen).tolist() for n in (2, 9, 67, 130)]
    alone = [list(generation.generate(tiny, None, p, 8, stop=())) for p in prompts]
    rows = list(zip(*generation.generate(tiny, None, prompts, 8, stop=())))
    assert [list(r) for r in rows] == alone
    stop = alone[1][3]                      # row 1 stops at its 4th id; others where it occurs
    steps = list(generation.generate(tiny, None, prompts, 8, stop=[stop]))
    for b, ids in enumerate(alone):
        cut = ids.index(stop) if stop in ids else len(ids)
        got = [step[b] for step in steps]
        assert got[:cut] == ids[:cut] and all(t is None for t in got[cut:])
    assert len(steps) == max(ids.index(stop) if stop in ids else 8 for ids in alone)


def test_generate_emits_only_ids_the_tokenizer_decodes(tmp_path):
    write_tokenizer(tmp_path, {bytes([b]): b for b in range(256)}, special_base=300)
    t = Tokenizer(tmp_path)                                 # ids 256..299 decode to nothing
    torch.manual_seed(0)
    model = Transformer(replace(CONFIGS["demo"], vocab_size=320)).eval()
    with torch.no_grad():
        model.lm_head.weight[256:300] *= 100                # the model prefers the unknown ids
    for temperature in (0.0, 1e300):                        # greedy; then uniform over allowed
        torch.manual_seed(1)
        ids = list(generation.generate(model, t, [1, 2, 3], 40, temperature=temperature, stop=()))
        assert len(ids) == 40 and not any(256 <= i < 300 for i in ids)
        t.decode(ids)                                       # decodes without a KeyError


@pytest.fixture(scope="module")
def demo_ckpt(tmp_path_factory):
    return demo.write_demo(str(tmp_path_factory.mktemp("demo")))


def run_cli(*argv, stdin=subprocess.DEVNULL, env=None, timeout=120):
    return subprocess.run([sys.executable, "sample.py", *argv], cwd=ROOT, stdin=stdin, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_demo_end_to_end_writes_once_then_reuses(tmp_path):
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    r = run_cli("--demo", "--max-new-tokens", "4", "The answer is", env=env)    # as README runs it
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The answer is") and "tok/s" in r.stderr and "wrote" in r.stderr
    folder = tmp_path / "kimi-minimal-demo"
    files = os.listdir(folder)
    assert {"config.json", "model.safetensors.index.json", "tiktoken.model",
            "tokenizer_config.json", demo.DEMO_MARKER} < {*files}
    assert sum(f.endswith(".safetensors") for f in files) == 3
    before = {f: (folder / f).read_bytes() for f in files}
    r2 = run_cli("--demo", "--max-new-tokens", "4", "The answer is", env=env)
    assert r2.returncode == 0 and "wrote" not in r2.stderr
    assert r2.stdout.startswith("The answer is") and "demo: the tiny random-weight" in r2.stderr
    assert {f: (folder / f).read_bytes() for f in os.listdir(folder)} == before    # untouched


def test_cli_batch_prints_each_prompt_labelled_as_alone(demo_ckpt, tmp_path):
    """--batch: one prompt per non-empty line, decoded together; each completion equals the one
    the prompt gets alone (greedy: the same ids, so the same text)."""
    lines = ["The answer is", "", "Kimi Linear is a model that can read a long"]
    (tmp_path / "p.txt").write_text("\n".join(lines) + "\n")
    r = run_cli("--ckpt", demo_ckpt, "--max-new-tokens", "5", "--batch", "--prompt-file",
                str(tmp_path / "p.txt"))
    assert r.returncode == 0, r.stderr
    alone = [run_cli("--ckpt", demo_ckpt, "--max-new-tokens", "5", line).stdout
             for line in (lines[0], lines[2])]
    assert r.stdout == "".join(f"--- prompt {n} of 2 ---\n{text}" for n, text in
                               enumerate(alone, 1))
    assert "2 prompts of" in r.stderr and "tok/s" in r.stderr


def error_line(capsys, code):
    """The one line of a refused run: status 2, one 'error:' line, nothing on stdout."""
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("error: ") and out == ""
    assert sum(line.startswith("error") for line in lines) == 1 and "Traceback" not in err
    return lines[-1]


def broken(demo, tmp_path, how):
    if how in (None, "missing"):
        return demo if how is None else str(tmp_path / "nothing")
    folder = shutil.copytree(demo, tmp_path / "ckpt")
    shard = folder / "model-00002-of-00003.safetensors"
    config = json.loads((folder / "config.json").read_text())
    if how == "no config":
        os.remove(folder / "config.json")
    elif how == "config not an object":
        (folder / "config.json").write_text("[1, 2]")
    elif how == "hidden_size a string":
        (folder / "config.json").write_text(json.dumps(dict(config, hidden_size="64")))
    elif how == "top-k above experts":
        (folder / "config.json").write_text(json.dumps(dict(config, num_experts_per_token=20)))
    elif how == "layer 99 of 4":
        linear = dict(config["linear_attn_config"], full_attn_layers=[2, 99])
        (folder / "config.json").write_text(json.dumps(dict(config, linear_attn_config=linear)))
    elif how == "no shard":
        os.remove(shard)
    elif how == "truncated":
        shard.write_bytes(shard.read_bytes()[:-1000])
    elif how == "huge":
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        index["metadata"]["total_size"] = 2**60
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    elif how == "no chat tokens":
        write_tokenizer(folder, demo_ranks(), 163584, {0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>"})
    elif how == "specials below the ranks":             # a release-like config, one id too low
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["added_tokens_decoder"]["5"] = {"content": "<|low|>", "special": True}
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.mark.parametrize("how, extra, message", [
    ("missing", [], "no checkpoint folder"),
    ("no config", [], "missing config.json"),
    ("config not an object", [], "not a Kimi-Linear config"),
    ("hidden_size a string", [], "hidden_size must be an integer >= 1, not '64'"),
    ("top-k above experts", [], "num_experts_per_token=20 exceeds"),
    ("layer 99 of 4", [], "full_attn_layers [2, 99] must split the layers 1..4"),
    ("no shard", [], "missing 1 of 3 shards"),
    ("truncated", [], "truncated"),
    ("huge", [], "not enough memory"),
    ("no chat tokens", ["--chat"], "--chat needs <|im_system|>, <|im_user|>, <|im_assistant|>, "
                                   "<|im_middle|>: not in"),
    ("specials below the ranks", [], "special ids must lie in 163584..163841, after the"),
    (None, ["--max-seq-len", "4"], "tokens but --max-seq-len is 4"),
    (None, ["--max-seq-len", str(10**12)], "the cache for --max-seq-len 1000000000000"),
    (None, ["--max-seq-len", "0"], "--max-seq-len must be at least 1"),
    (None, ["--max-seq-len", "-3"], "--max-seq-len must be at least 1"),
    (None, ["--max-seq-len", "x"], "argument --max-seq-len: invalid int value: 'x'"),
    (None, ["--device", "nosuchdevice"], "unknown device"),
    (None, ["--device", "cuda:7"], "--device cuda:7 is not available here"),
    (None, ["--device", "meta"], "--device meta is not available here"),
    (None, ["--device", "cpu:3"], "the CPU is one device, with no index"),
    (None, ["--top-k", "0"], "--top-k must be at least 1"),
    (None, ["--top-p", "nan"], "--top-p must be in (0, 1]"),
    (None, ["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (None, ["--top-k", "5", "--temperature", "0"], "--temperature 0 is greedy"),
    (None, ["--temperature", "nan"], "--temperature must be a finite number"),
    (None, ["--temperature", "inf"], "--temperature must be a finite number"),
    (None, ["--temperature", "-1"], "--temperature must be a finite number"),
    (None, ["--seed", str(2**70)], "--seed must be in 0 .. 2**64 - 1"),
    (None, ["--seed", "-1"], "--seed must be in 0 .. 2**64 - 1"),
    (None, ["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (None, ["--system", "Be brief."], "--system is for --chat"),
    (None, ["--demo"], "either --ckpt"),
    (None, ["--prompt-file", "p.txt"], "not both"),
    (None, ["--compile"], "unrecognized arguments: --compile"),     # fast.decode.step is faster
    (None, ["--chat", "--system", "a<|im_end|>b"], "holds <|im_end|>, which would end or start"),
])
def test_bad_input_exits_2_with_one_line(demo_ckpt, tmp_path, capsys, how, extra, message):
    folder = broken(demo_ckpt, tmp_path, how)
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", folder, *extra, "a prompt of several words"])
    assert message in error_line(capsys, e.value.code)


@pytest.mark.parametrize("argv, message", [
    (["x<|reserved_token_163841|>"], "no embedding for: ids [163841]"),   # past the 163840 rows
    (["--prompt-file", "not-utf8.txt"], "cannot read the prompt from"),
    (["--prompt-file", "absent.txt"], "absent.txt: No such file or directory"),
    (["--prompt-file", "."], "cannot read the prompt from .: Is a directory"),
    ([""], "the prompt is empty"),
    (["--chat", "hi <|im_assistant|>"], "holds <|im_assistant|>"),
    (["--batch", " \n\n"], "every line of the prompt is empty"),
    (["--batch", "--max-seq-len", "4", "ok\na longer prompt than four"], "prompt 2 of 2: the "
     "prompt has 19 tokens but --max-seq-len is 4"),
])
def test_bad_prompt_exits_2(demo_ckpt, tmp_path, capsys, monkeypatch, argv, message):
    (tmp_path / "not-utf8.txt").write_bytes(b"\xff\xfe not UTF-8")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", demo_ckpt, *argv])
    assert message in error_line(capsys, e.value.code)


def test_closed_standard_input_is_no_prompt(demo_ckpt, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", None)                 # what Python sets for a closed fd 0
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", demo_ckpt])
    assert "no prompt" in error_line(capsys, e.value.code)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_out_of_memory_while_allocating_is_one_line(demo_ckpt, device):
    """Free memory reported unknown, so the 1.6e14-byte cache is really attempted. On the CPU the
    address space is capped first (RLIMIT_AS, 16 GiB): where the kernel overcommits memory, the
    allocation could otherwise succeed and the zero fill summon the OOM killer, not an error."""
    code = f"""if True:
        import resource, checkpoint, sample
        checkpoint.free_memory = lambda device: None
        if {device!r} == "cpu":
            soft, hard = resource.getrlimit(resource.RLIMIT_AS)     # RLIM_INFINITY is -1
            cap = min([16 << 30] + [n for n in (soft, hard) if n != resource.RLIM_INFINITY])
            resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
        sample.main(["--ckpt", {demo_ckpt!r}, "--device", {device!r}, "--max-seq-len", "{10**12}",
                     "hi"])"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr, r.stderr
    assert lines[-1].startswith(f"error: out of memory on {device}")


def demo_env(tmp_path):
    return dict(os.environ, XDG_CACHE_HOME=str(tmp_path))


def test_demo_refuses_a_cache_home_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("mine")
    r = run_cli("--demo", env=dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "file")))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: cannot write the demo checkpoint: {tmp_path / 'file'} (XDG_CACHE_HOME) is not a "
        "folder"]
    assert (tmp_path / "file").read_text() == "mine"


def test_demo_refuses_an_unwritable_cache_folder(tmp_path):
    if os.geteuid() == 0:
        root = "/proc/self"                             # root writes anywhere but in /proc
    else:
        root = str(tmp_path / "ro")
        os.mkdir(root, 0o500)
    r = run_cli("--demo", env=dict(os.environ, XDG_CACHE_HOME=root))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1
    assert lines[0].startswith(f"error: cannot write the demo checkpoint in {root}: ")


@pytest.mark.parametrize("foreign", ["notes.txt", "config.json"])
def test_demo_never_touches_files_it_did_not_write(tmp_path, foreign):
    folder = tmp_path / "kimi-minimal-demo"
    folder.mkdir()
    (folder / foreign).write_text("precious")
    r = run_cli("--demo", env=dict(os.environ, XDG_CACHE_HOME=str(tmp_path)))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1
    assert lines[0].startswith(f"error: {folder} holds files that are not this version's demo")
    assert os.listdir(folder) == [foreign] and (folder / foreign).read_text() == "precious"


def test_flags_that_change_the_meaning(demo_ckpt, tmp_path, capsys):
    args = sample.parser().parse_args(["--demo", "--top-k", "5"])
    sample.check_flags(args)
    assert args.temperature == 1.0                      # --top-k alone samples at temperature 1
    (tmp_path / "p.txt").write_text("Is 123 a prime?")
    sample.main(["--ckpt", demo_ckpt, "--chat", "--prompt-file", str(tmp_path / "p.txt"),
                 "--max-new-tokens", "3", "--temperature", "0.8", "--top-k", "50", "--top-p", "0.9",
                 "--seed", str(2**64 - 1)])
    n = len(Tokenizer(demo_ckpt).encode(chat_prompt("Is 123 a prime?")))
    assert f"prompt {n} tokens" in capsys.readouterr().err
    sample.main(["--ckpt", demo_ckpt, "--chat", "--system", "", "--max-new-tokens", "3", "hi"])
    n = len(Tokenizer(demo_ckpt).encode(chat_prompt("hi", "")))
    assert f"prompt {n} tokens" in capsys.readouterr().err
    sample.main(["--ckpt", demo_ckpt, "--max-seq-len", "3", "--max-new-tokens", str(10**30), "hi"])
    err = capsys.readouterr().err               # "hi" is 1 token: 3 fit (the last is not fed back)
    assert "note: --max-new-tokens cut to 3 to fit --max-seq-len 3" in err


@pytest.mark.parametrize("temperature", ["1e-45", "1e300"])     # sample() at these: above
def test_tiny_and_huge_temperatures_run(demo_ckpt, capsys, temperature):
    sample.main(["--ckpt", demo_ckpt, "--max-new-tokens", "3", "--temperature", temperature, "hi"])
    out, err = capsys.readouterr()
    assert out.startswith("hi") and "tok/s" in err


def test_help_documents_every_flag_and_its_default():
    text = sample.parser().format_help()
    for action in sample.parser()._actions:
        assert action.help, action.dest
    for words in ("default: 200", "default: 4096", "default: 0, or 1 with --top-k", "\"\" = none",
                  "refused with --temperature 0", "0 .. 2**64 - 1", "python -m tools.bench"):
        assert "".join(words.split()) in "".join(text.split()), words   # wrapping aside


def test_hub_id_without_huggingface_hub(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails, as if not installed
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", "moonshotai/Kimi-Linear-48B-A3B-Instruct", "--device", "cpu", "hi"])
    assert "hf download moonshotai/Kimi-Linear-48B-A3B-Instruct" in error_line(capsys, e.value.code)


def test_broken_pipe_exits_quietly(demo_ckpt):
    p = subprocess.Popen([sys.executable, "sample.py", "--ckpt", demo_ckpt, "--max-new-tokens",
                          "2000", "--max-seq-len", "2048", "a b c"], cwd=ROOT,
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.read(8)                                    # `| head -c 8`: read a little, then leave
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and "Traceback" not in err and "error" not in err


def test_ctrl_c_exits_130_with_one_short_line(demo_ckpt):
    p = subprocess.Popen([sys.executable, "sample.py", "--ckpt", demo_ckpt, "--max-new-tokens",
                          "2000", "--max-seq-len", "2048", "a b c"], cwd=ROOT,
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.read(5)                                    # generating: the prompt is echoed
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "Traceback" not in err.decode()
    assert err.decode().splitlines()[-1] == "interrupted"


def test_sample_imports_only_the_model_tokenizer_torch_and_stdlib():
    """sample.py's own imports: the model (kimi, checkpoint), the tokenizer, generation.py, the
    fast paths (fast/) and torch; the demo checkpoint (demo.py) only when --demo asks for it."""
    tree = ast.parse(open(os.path.join(ROOT, "sample.py"), encoding="utf-8").read())
    top = {n.module if isinstance(n, ast.ImportFrom) else a.name
           for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))
           for a in n.names}
    own = {m.split(".")[0] for m in top} - set(sys.stdlib_module_names)
    assert own == {"checkpoint", "fast", "generation", "kimi", "tokenizer", "torch"}
    code = "import sys, sample; print('bench' in sys.modules or 'demo' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.stdout.strip() == "False"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA path needs a GPU")
def test_demo_on_cuda_warms_up_before_the_clock(demo_ckpt):
    r = run_cli("--ckpt", demo_ckpt, "--max-new-tokens", "8", "--device", "cuda", "hello")
    assert r.returncode == 0, r.stderr
    assert "warm-up" in r.stderr and "tok/s" in r.stderr and r.stdout.startswith("hello")
