"""Tests for the CPU-checkable parts of tools/: tools.fullsize's byte and parameter counts behind
the ceilings, its random model (bf16 and FP8), tools.long_context's --throughput batch
arithmetic, tools.bench's, tools.kernels' and tools.grad_errors' command lines; the kernel names
profile_decode groups by. (The timings need a GPU; cuda_graph_decoder is tested in test_decode.py,
args.cache_bytes, which the --context sweep and largest_batch use, in test_kimi.py; who imports
tools, in test_imports.py.)"""
import ast
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from fast.fp8 import FP8
from fast.quantize import SCALE
from helpers import ROOT
from kimi import CONFIGS, Transformer
from tools import (bench, fullsize, grad_errors, kernels, long_context, profile_decode,
                   profile_prefill)

TINY = CONFIGS["tiny"]
FULL = CONFIGS["kimi-linear-48b-a3b"]


def test_active_params_count_what_one_token_touches():
    model = Transformer(TINY)
    k = TINY.num_experts_per_token
    touched = sum(p.numel() for n, p in model.named_parameters()
                  if ".experts." not in n and n != "model.embed_tokens.weight")
    touched += sum(sum(p.numel() for p in layer.block_sparse_moe.experts[0].parameters()) * k
                   for layer in model.model.layers if layer.is_moe)
    assert fullsize.active_params(TINY) == touched


def test_decode_bytes_grow_by_cached_tokens_and_distinct_experts():
    one = fullsize.decode_bytes(TINY, 1, 100)
    assert fullsize.decode_bytes(TINY, 1, 101) - one == \
        len(TINY.full_attn_layers) * (TINY.kv_lora_rank + TINY.qk_rope_head_dim) * 2
    # B = 16 sequences read the shared weights once and each distinct expert once: over 16
    # separate B = 1 steps, that saves 15 copies of the shared weights and the repeats among
    # 16 x k experts
    moe_layers = TINY.num_hidden_layers - TINY.first_k_dense_replace
    extra = (fullsize.decode_bytes(TINY, 16, 0) - 16 * fullsize.decode_bytes(TINY, 1, 0)
             + 15 * 2 * fullsize.active_params(TINY))          # = experts beyond the first k
    unused = TINY.num_experts - TINY.num_experts_per_token
    most = moe_layers * unused * fullsize.expert_bytes(TINY)
    # decode_bytes is a float (expected distinct experts); the sum above is exact to fp64 rounding
    assert 0 < extra <= most * (1 + 1e-12)


def test_random_model_is_bf16_with_fp32_decay_stacked_and_finite():
    model = fullsize.random_model(TINY, torch.device("cpu"), max_batch_size=2, max_seq_len=32)
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if name.endswith(("A_log", "dt_bias")) else torch.bfloat16)
    assert model.max_batch_size == 2 and model.max_seq_len == 32
    assert all(layer.block_sparse_moe.w13 is not None for layer in model.model.layers
               if layer.is_moe)
    tokens = torch.randint(0, TINY.vocab_size, (2, 20))
    with torch.no_grad():
        stateless = model(tokens, last_only=True)
        cached = model(tokens, start_pos=0, last_only=True)
    assert stateless.shape == (2, 1, TINY.vocab_size) and stateless.isfinite().all()
    # the same computation with and without caches: equal to bf16 rounding of O(1) logits
    torch.testing.assert_close(cached, stateless, rtol=2 ** -7, atol=2 ** -7)


def test_fp8_random_model_reads_fewer_bytes():
    """fullsize.random_model(fp8=True): quantised tensor by tensor; a decode step's bytes, counted
    on the model, are those of bf16 with every quantised weight at 1 byte (+ 4 a row of scales)."""
    fp8 = fullsize.random_model(TINY, torch.device("cpu"), 1, 32, fp8=True)
    bf16 = fullsize.random_model(TINY, torch.device("cpu"), 1, 32)
    assert fp8.model.layers[1].block_sparse_moe.w13.dtype == FP8
    state = fp8.state_dict()
    saved = sum(t.numel() - 4 * state[n.removesuffix("weight") + SCALE].numel()
                for n, t in state.items() if t.dtype == FP8 and ".experts." not in n)
    shared = fullsize.model_decode_bytes(bf16, 0, 100) - fullsize.model_decode_bytes(fp8, 0, 100)
    assert shared == saved
    assert fullsize.model_decode_bytes(fp8, 16, 100) < fullsize.model_decode_bytes(bf16, 16, 100)


def test_largest_batch_is_the_rows_that_fit_beside_the_weights():
    weights, step, safety = 50 * 10**9, 2**20, long_context.SAFETY_BYTES
    for L in (4096, 131072, 1048576):
        row = FULL.cache_bytes(1, L) + step
        one = weights + safety + row                        # room for exactly one row
        assert long_context.largest_batch(FULL, L, one, weights, step) == 1
        assert long_context.largest_batch(FULL, L, one + row - 1, weights, step) == 1
        assert long_context.largest_batch(FULL, L, one + 5 * row, weights, step) == 6
        with pytest.raises(ValueError) as e:                # not one row: refused in one line
            long_context.largest_batch(FULL, L, one - 1, weights, step)
        assert str(e.value).startswith(f"not one row fits at context {L}: ")
        assert "\n" not in str(e.value)


def test_largest_batch_grows_with_memory_and_shrinks_with_context():
    memories = [g * 10**9 for g in (60, 80, 100, 141, 200)]
    contexts = (4096, 32768, 131072, 524288, 1048576)
    weights, step = 50 * 10**9, 8 * 2**20

    def batch(args, L, memory):
        try:
            return long_context.largest_batch(args, L, memory, weights, step)
        except ValueError:
            return 0
    for args in (FULL, long_context.variants(FULL)[1][1], TINY):
        table = [[batch(args, L, m) for m in memories] for L in contexts]
        assert all(row == sorted(row) for row in table)                     # more memory
        assert all(list(col) == sorted(col, reverse=True) for col in zip(*table))  # longer context
    # the twin keeps 27 layers' latents to Kimi Linear's 7: fewer rows, at 1M none under 80 GB
    twin = long_context.variants(FULL)[1][1]
    assert all(batch(twin, L, 141 * 10**9) < batch(FULL, L, 141 * 10**9) for L in contexts[2:])
    assert batch(twin, 1048576, 80 * 10**9) == 0 < batch(FULL, 1048576, 80 * 10**9)


@pytest.mark.parametrize("argv, message", [
    (["--context", "4,x"], "--context takes comma-separated token counts, not '4,x'"),
    (["--context", "0"], "--context lengths must be positive"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["--out", "somewhere"], "--out writes the --context or --throughput results: add one"),
    (["--batch", "8"], "--batch takes a row count >= 1 and goes with --context"),
    (["--context", "8", "--batch", "0"], "--batch takes a row count >= 1 and goes with --context"),
    (["--context", "8", "--baseline"], "--compile and --baseline do not apply"),
    (["--config", "no/such/config.json"], "cannot read config"),
    (["--config", "tiny", "--context", "8", "--out", "/proc/self/x"], "cannot make --out"),
    (["--memory-cap-gb", "80"], "--memory-cap-gb takes a positive number of GB and goes with "
     "--throughput"),
    (["--throughput", "--memory-cap-gb", "0"], "--memory-cap-gb takes a positive number of GB"),
    (["--throughput", "--memory-cap-gb", "-5"], "--memory-cap-gb takes a positive number of GB"),
    (["--throughput", "--memory-cap-gb", "nan"], "--memory-cap-gb takes a positive number of GB"),
    (["--throughput", "--memory-cap-gb", "inf"], "--memory-cap-gb takes a positive number of GB"),
    (["--throughput", "--memory-cap-gb", "x"], "invalid float value: 'x'"),
    (["--throughput", "--batch", "4"], "--throughput finds its batch, FP8: --batch, --compile"),
    (["--throughput", "--fp8"], "--throughput finds its batch, FP8: --batch, --compile"),
    (["--throughput", "--context", "0"], "--context lengths must be positive"),
    (["--quick", "--compile"], "--quick times sample.py's path alone: --compile does not apply"),
    (["--quick", "--context", "64"], "--context replaces the speed table: --fp8 and --quick"),
])
def test_bad_bench_arguments_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert err[0].startswith("error: ") and message in err[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_bench_without_gpu_says_so_in_one_line():
    r = subprocess.run([sys.executable, "-m", "tools.bench", "--config", "tiny"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: the benchmark needs a CUDA GPU (see --help)"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
@pytest.mark.parametrize("argv", [["--throughput"], ["--throughput", "--memory-cap-gb", "80",
                                                     "--context", "1048576"]])
def test_throughput_without_gpu_says_so_in_one_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--config", "tiny", *argv])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: the benchmark needs a CUDA GPU (see --help)"]


def test_throughput_contexts_by_default_and_a_cap_within_the_gpu(monkeypatch, capsys):
    """parse as on a GPU of 80e9 bytes (its checks need none)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(total_memory=80 * 10**9))
    opts, _, contexts = bench.parse(["--config", "tiny", "--throughput", "--memory-cap-gb", "80"])
    assert contexts == list(long_context.THROUGHPUT_CONTEXTS) and opts.memory_cap_gb == 80
    assert bench.parse(["--config", "tiny", "--throughput", "--context", "64"])[2] == [64]
    with pytest.raises(SystemExit) as e:
        bench.parse(["--config", "tiny", "--throughput", "--memory-cap-gb", "80.5"])
    assert e.value.code == 2 and capsys.readouterr().err.splitlines() == [
        "error: --memory-cap-gb 80.5 is more than this GPU holds (see --help)"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the benchmark needs a CUDA GPU")
def test_bench_runs_the_tiny_config_on_cuda(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tools.bench", "--config", "tiny", "--context",
                        "64,256", "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "TPOT" in r.stdout and (tmp_path / "tpot.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_kernels_without_gpu_says_so_in_one_line():
    r = subprocess.run([sys.executable, "-m", "tools.kernels"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stderr == ""
    assert len(r.stdout.splitlines()) == 1 and r.stdout.startswith("no GPU: nothing to time")


def test_grad_errors_takes_no_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        grad_errors.main(["--fast"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ")


def test_kernels_bad_name_exits_2_with_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        kernels.main(["kda", "frobnicate"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert err[0].startswith("error: no kernel named 'frobnicate': choose among kda, ")


def test_profile_decode_groups_name_kernels_that_exist():
    """Each *_kernel fragment that profile_decode groups by is a Triton kernel's name in fast/
    (a renamed kernel would otherwise fall silently into "other")."""
    defined = {node.name for path in (ROOT / "fast").glob("*.py")
               for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.FunctionDef)}
    for fragment, _ in profile_decode.GROUPS:
        if fragment.endswith("_kernel"):
            assert fragment in defined, fragment


@pytest.mark.parametrize("tool", [profile_decode, profile_prefill])
@pytest.mark.parametrize("layers", ["0", "28"])
def test_profiles_refuse_layers_outside_the_model_in_one_line(tool, layers, capsys):
    with pytest.raises(SystemExit) as e:
        tool.main(["--layers", layers])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2
    assert err == [f"error: --layers takes 1 to 27, not {layers} (see --help)"]
