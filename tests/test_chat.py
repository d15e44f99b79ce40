"""Tests for the conversation: generation.Chat and `sample.py --chat` with no prompt, on the demo
checkpoint (CPU, greedy, a few tokens a reply). The caches are exact: every reply equals the one a
single prefill of the whole transcript gives. The command line is run in this process where it can
be (standard input a StringIO), in a subprocess where a signal or a terminal is the point."""
import codecs
import io
import itertools
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import demo
from helpers import ROOT
import sample
from kimi import Transformer
from generation import Chat, ConversationFull, generate
from tokenizer import Tokenizer, chat_prompt

QUESTIONS = ["Is 123 a prime?", "Why is that?", "the model of attention"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return demo.write_demo(str(tmp_path_factory.mktemp("demo")))


@pytest.fixture(scope="module")
def tok(ckpt):
    return Tokenizer(ckpt)


@pytest.fixture(scope="module")
def fp32(ckpt):
    """Two fp32 models of the demo's weights: one holds the conversation, the other re-prefills
    the whole transcript (a generate() call would clear the conversation's caches)."""
    return [Transformer.from_pretrained(ckpt, "cpu", torch.float32, 1, 512) for _ in range(2)]


@pytest.fixture(scope="module")
def stored(ckpt):
    """The model as the command line loads it on a CPU: the checkpoint's own bf16."""
    return Transformer.from_pretrained(ckpt, "cpu", None, 1, 512)


def turn_text(n, question, system="Be brief."):
    """Kimi-Linear's template, written out: the system turn first, else the last reply's end."""
    start = f"<|im_system|>system<|im_middle|>{system}<|im_end|>" if n == 0 else "<|im_end|>"
    return f"{start}<|im_user|>user<|im_middle|>{question}<|im_end|>" \
        "<|im_assistant|>assistant<|im_middle|>"


def test_the_template_of_a_conversation():
    """chat_prompt's pieces join into the template's rendering of every turn."""
    text = chat_prompt("Hi", "Be brief.") + "Hello!" + "<|im_end|>" + chat_prompt("Bye", None)
    assert text == turn_text(0, "Hi") + "Hello!" + turn_text(1, "Bye")
    with pytest.raises(ValueError, match=re.escape("the user turn holds <|im_end|>")):
        chat_prompt("a<|im_end|>b")
    with pytest.raises(ValueError, match=re.escape("the system turn holds <|im_user|>")):
        chat_prompt("hi", "<|im_user|>")


def test_three_turns_equal_one_prefill_of_the_transcript(fp32, tok):
    """Each turn prefills only its own ids (and a cut reply's last id, never fed back), yet its
    greedy reply equals that of one prefill of the whole transcript: the caches are exact."""
    model, ref = fp32
    chat = Chat(model, tok, system="Be brief.", max_new_tokens=6, max_seq_len=512)
    transcript = []
    for n, question in enumerate(QUESTIONS):
        turn = tok.encode(turn_text(n, question))
        reply = list(chat.reply(question))
        transcript += turn
        assert reply == list(generate(ref, tok, transcript, 6))
        assert len(reply) == 6 and chat.prefilled == len(turn) + (n > 0)   # + the cut id
        transcript += reply
        assert chat.ids == transcript


def test_a_reply_left_early_or_stopped_goes_on_exactly(fp32, ckpt):
    """A reply left after two ids (as Ctrl-C leaves it) stays in the conversation as far as it
    came; one ended by a stop id leaves nothing unfed; an error inside a step costs the next turn
    a prefill of the whole transcript, never a wrong cache."""
    model, ref = fp32
    tok = Tokenizer(ckpt)                           # its own: its stop ids change below
    chat = Chat(model, tok, system="Be brief.", max_new_tokens=6, max_seq_len=512)
    steps = chat.reply(QUESTIONS[0])
    left = list(itertools.islice(steps, 2))
    steps.close()
    assert chat.ids[-2:] == left and chat.fed == len(chat.ids) - 1
    transcript = chat.ids + tok.encode(turn_text(1, QUESTIONS[1]))
    alone = list(generate(ref, tok, transcript, 6))
    tok.stop_ids += (alone[2],)                     # the third id now ends the reply
    assert chat.say(QUESTIONS[1]) == tok.decode(alone[:alone.index(alone[2])])
    assert chat.fed == len(chat.ids)                # the stop id's input was fed
    tok.stop_ids = tok.stop_ids[:-1]

    def flaky(tokens, pos):                         # a step that fails after writing the caches
        model(tokens, start_pos=pos, last_only=True)
        raise RuntimeError("interrupted inside a step")
    chat.decoder = flaky
    with pytest.raises(RuntimeError):
        chat.say(QUESTIONS[2])
    chat.decoder = None
    transcript = chat.ids + tok.encode(turn_text(1, QUESTIONS[0]))
    assert chat.say(QUESTIONS[0]) == tok.decode(list(generate(ref, tok, transcript, 6)))
    assert chat.prefilled == len(transcript)        # all of it, once


def run_chat(monkeypatch, capsys, ckpt, lines, *argv):
    """sample.main(--chat, no prompt) here, the lines on a piped standard input ->
    (status, stdout, stderr)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
    try:
        sample.main(["--ckpt", ckpt, "--device", "cpu", "--chat", "--max-seq-len", "512", *argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_conversation_equals_the_library_chat(monkeypatch, capsys, ckpt, tok, stored):
    """One turn per line, each echoed after '> '; /reset gives the first reply again (a fresh
    process's), /system TEXT starts afresh with that system turn, /exit ends; nothing after."""
    lines = [*QUESTIONS, "", "/reset", QUESTIONS[0], "/system Be brief.", QUESTIONS[0], "/exit",
             "never read"]
    code, out, err = run_chat(monkeypatch, capsys, ckpt, lines, "--max-new-tokens", "3")
    chat = Chat(stored, tok, max_new_tokens=3, max_seq_len=512)
    replies = {n: chat.say(q) for n, q in enumerate(QUESTIONS)}
    chat.reset()
    replies[5] = chat.say(QUESTIONS[0])
    chat.reset("Be brief.")
    replies[7] = chat.say(QUESTIONS[0])
    assert code == 0 and "Traceback" not in err
    assert out == "".join(f"> {line}\n" + (f"{replies[n]}\n" if n in replies else "")
                          for n, line in enumerate(lines[:lines.index("/exit") + 1]))
    assert replies[5] == replies[0] != replies[7]
    turns = [line for line in err.splitlines() if line.startswith("turn ")]
    assert len(turns) == 5 and all("generated 3 tokens; prefill" in line for line in turns)


def test_a_full_conversation_starts_afresh_in_one_line(monkeypatch, capsys, ckpt, tok, stored):
    limit = len(tok.encode(chat_prompt(QUESTIONS[0]))) + 10     # the second turn cannot fit
    chat = Chat(stored, tok, max_new_tokens=8, max_seq_len=limit)
    first = chat.say(QUESTIONS[0])
    before = list(chat.ids)
    with pytest.raises(ConversationFull, match=f"and a reply of up to 8 pass max_seq_len {limit}"):
        chat.reply(QUESTIONS[1])
    assert chat.ids == before                       # refused before anything changed
    chat.reset()
    second = chat.say(QUESTIONS[1])
    code, out, err = run_chat(monkeypatch, capsys, ckpt, QUESTIONS[:2], "--max-new-tokens", "8",
                              "--max-seq-len", str(limit))
    assert code == 0 and out == f"> {QUESTIONS[0]}\n{first}\n> {QUESTIONS[1]}\n{second}\n> \n"
    notes = [line for line in err.splitlines() if "pass max_seq_len" in line]
    assert notes == [f"note: the conversation's {len(before)} tokens, this turn's "
                     f"{len(tok.encode(turn_text(1, QUESTIONS[1])))} and a reply of up to 8 pass "
                     f"max_seq_len {limit}; a fresh conversation begins (the same system turn)"]


@pytest.mark.parametrize("lines, message", [
    (["hi", "a <|im_end|> inside"], "error: the user turn holds <|im_end|>"),
    (["/system <|im_user|>"], "error: the system turn holds <|im_user|>"),
    (["the of and " * 200], "error: this turn has"),
])
def test_bad_piped_input_exits_2_in_one_line(monkeypatch, capsys, ckpt, lines, message):
    code, out, err = run_chat(monkeypatch, capsys, ckpt, lines, "--max-new-tokens", "2")
    assert code == 2 and err.splitlines()[-1].startswith(message) and "Traceback" not in err


def popen(ckpt, *argv, stdin=subprocess.PIPE):
    """sample.py --chat as a foreground program sees Ctrl-C: SIGINT at its default, also where
    the tests run in a background job, which a shell starts with SIGINT ignored (and Python then
    keeps it ignored)."""
    argv = ["sample.py", "--ckpt", ckpt, "--device", "cpu", "--chat", *argv]
    return subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdin=stdin,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def read_until(p, out, done, timeout=60):
    """Read p's stdout into the bytearray out until done(out)."""
    end = time.monotonic() + timeout
    while not done(out):
        assert time.monotonic() < end, out
        chunk = os.read(p.stdout.fileno(), 4096)
        assert chunk, (out, p.stderr.read().decode())     # the process ended early
        out += chunk


def shown(tok, ids):
    """What the command line prints of a reply stopped after `ids`: tok.stream's pieces, less
    the unfinished UTF-8 character a final flush would add."""
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return "".join(utf8.decode(tok.enc.decode_single_token_bytes(t)) for t in ids)


def test_ctrl_c_stops_a_reply_and_the_conversation_goes_on(ckpt, tok, stored):
    """SIGINT while a reply streams ends it at its next token; the next turn continues the caches
    (its two pending ids and its own, no more) and equals the library's, itself exact."""
    p = popen(ckpt, "--max-new-tokens", "1000", "--max-seq-len", "2048")
    out = bytearray()
    for question in QUESTIONS[:2]:                  # each reply stopped once it streams
        p.stdin.write(f"{question}\n".encode())
        p.stdin.flush()
        marker = f"> {question}\n".encode()
        read_until(p, out, lambda o: marker in o and not o.endswith(marker))   # it streams
        p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(b"/exit\n", timeout=120)
    stdout, stderr = (out + stdout).decode(), stderr.decode()
    assert p.returncode == 0 and "Traceback" not in stderr, stderr
    k = [int(n) for n in re.findall(r"generated (\d+) tokens, stopped by Ctrl-C", stderr)]
    assert len(k) == 2
    chat = Chat(stored, tok, max_new_tokens=1000, max_seq_len=2048)
    replies = []
    for question, n in zip(QUESTIONS, k):
        steps = chat.reply(question)
        replies.append(list(itertools.islice(steps, n)))
        steps.close()
    assert chat.prefilled == 1 + len(tok.encode(turn_text(1, QUESTIONS[1])))  # + the cut id
    assert f"turn {chat.prefilled} new tokens" in stderr
    turns = [f"> {q}\n{shown(tok, ids)}\n" for q, ids in zip(QUESTIONS, replies)]
    assert stdout == "".join(turns) + "> /exit\n"


class Terminal(io.StringIO):
    """Standard input as a terminal would give it (in this process: no signals, no echo)."""
    def isatty(self):
        return True


def test_on_a_terminal_nothing_is_echoed_and_ctrl_d_exits_0(monkeypatch, capsys, ckpt, tok,
                                                             stored):
    monkeypatch.setattr(sys, "stdin", Terminal("hi\n"))       # then Ctrl-D: the end of input
    sample.main(["--ckpt", ckpt, "--device", "cpu", "--chat", "--max-new-tokens", "3",
                 "--max-seq-len", "512"])
    out, err = capsys.readouterr()
    reply = Chat(stored, tok, max_new_tokens=3, max_seq_len=512).say("hi")
    assert out == f"> {reply}\n> \n" and "Traceback" not in err


def test_ctrl_c_at_the_prompt_exits_130(ckpt, tok, stored):
    """On a real terminal (a pseudo-terminal): a reply, then Ctrl-C at the prompt (the terminal
    sends SIGINT) ends the program with status 130 and one line."""
    reply = Chat(stored, tok, max_new_tokens=3, max_seq_len=512).say("hi")
    master, slave = os.openpty()
    p = popen(ckpt, "--max-new-tokens", "3", "--max-seq-len", "512", stdin=slave)
    os.close(slave)
    out, shown = bytearray(), f"> {reply}\n> ".encode()     # the reply, and the next prompt
    try:
        os.write(master, b"hi\n")
        read_until(p, out, lambda o: len(o) >= len(shown))
        for _ in range(30):     # a signal just before input()'s read blocks is seen only when
            p.send_signal(signal.SIGINT)    # the read returns (CPython's race): a second ends it
            try:
                p.wait(timeout=1)
                break
            except subprocess.TimeoutExpired:
                pass
        stdout, stderr = p.communicate(timeout=60)
    finally:
        os.close(master)
    assert p.returncode == 130 and out + stdout == shown
    assert "Traceback" not in stderr.decode() and stderr.decode().splitlines()[-1] == "interrupted"
