"""Bad arguments to the library end in one ValueError or TypeError line that names the argument:
never a traceback from deep inside torch, never a silent answer."""
import pytest
import torch

from kimi import CONFIGS, ModelArgs, Transformer

TINY = CONFIGS["tiny"]


@pytest.fixture(scope="module")
def model():
    m = Transformer(TINY).eval()
    m.setup_cache(max_batch_size=2, max_seq_len=64)
    with torch.no_grad():
        m(torch.zeros(2, 8, dtype=torch.long), start_pos=0)            # a prefill: caches in use
    return m


def one_line(error):
    message = str(error.value)
    assert "\n" not in message and len(message) < 200, message
    return message


@pytest.mark.parametrize("tokens, kwargs, error, words", [
    (torch.zeros(5, dtype=torch.long), {}, ValueError, "expected [B, T]"),          # 1-D
    (torch.zeros(1, 2, 3, dtype=torch.long), {}, ValueError, "expected [B, T]"),
    (torch.zeros(1, 0, dtype=torch.long), {}, ValueError, "at least one id"),
    (torch.full((1, 3), 256), {}, ValueError, "ids lie in 0..255"),                  # = vocab
    (torch.full((1, 3), -1), {}, ValueError, "ids lie in 0..255"),
    (torch.zeros(1, 3), {}, TypeError, "integer ids"),                                # floats
    (torch.zeros(1, 3, dtype=torch.bool), {}, TypeError, "integer ids"),
    ([[1, 2, 3]], {}, TypeError, "not list"),
    (torch.zeros(1, 1, dtype=torch.long), dict(start_pos=-3), ValueError, "start_pos"),
    (torch.zeros(1, 1, dtype=torch.long), dict(start_pos=2.0), ValueError, "start_pos"),
    (torch.zeros(1, 1, dtype=torch.long), dict(start_pos=64), ValueError, "max_seq_len=64"),
    (torch.zeros(3, 1, dtype=torch.long), dict(start_pos=8), ValueError, "max_batch_size=2"),
    (torch.zeros(1, 2, dtype=torch.long), dict(start_pos=torch.tensor(3)), ValueError,
     "one-token steps"),
])
def test_forward_refuses_in_one_line(model, tokens, kwargs, error, words):
    with pytest.raises(error) as e, torch.no_grad():
        model(tokens, **kwargs)
    assert words in one_line(e)


def test_a_refused_call_leaves_the_caches_as_they_were(model):
    before = [b.clone() for b in model.buffers()]
    with pytest.raises(ValueError), torch.no_grad():
        model(torch.full((2, 1), 999), start_pos=8)
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))


def test_constructor_wants_model_args():
    with pytest.raises(TypeError) as e:
        Transformer("tiny")
    assert "expected a ModelArgs" in one_line(e)
    with pytest.raises(ValueError) as e:
        ModelArgs(hidden_size=0)
    assert "hidden_size must be an integer >= 1" in one_line(e)


@pytest.mark.parametrize("dtype, words", [
    ("bfloat16", "dtype: expected None or a float type"),
    (torch.int8, "dtype: expected None or a float type"),
    (torch.float8_e4m3fn, "fast.quantize.from_pretrained"),
])
def test_from_pretrained_refuses_a_bad_dtype_before_reading(tmp_path, dtype, words):
    with pytest.raises(ValueError) as e:
        Transformer.from_pretrained(tmp_path, device="cpu", dtype=dtype)    # an empty folder
    assert words in one_line(e)


@pytest.mark.parametrize("prompt, kwargs, words", [
    (["hello", 5], {}, "prompt: expected text, a non-empty list of ints"),
    (torch.zeros(2, 3, dtype=torch.long), {}, "got torch.int64 (2, 3)"),         # not the tensor
    ([], {}, "prompt: expected"),
    ([1, 2], dict(temperature=1.0, top_p=0), "top_p must be None or in (0, 1]"),
    ([1, 2], dict(top_k=3), "temperature 0 is greedy"),
    ([1, 2], dict(temperature=-1.0), "temperature must be finite and >= 0"),
    ([1, 2], dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    ("text", {}, "text needs a tokenizer"),
])
def test_generate_refuses_in_one_line(model, prompt, kwargs, words):
    from generation import generate
    with pytest.raises(ValueError) as e:
        list(generate(model, None, prompt, **kwargs))
    assert words in one_line(e)
