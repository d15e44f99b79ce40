"""Tests for bench.py's CPU-checkable parts: the byte and parameter counts behind its ceilings, the random
model, the command line. (The timings themselves need a GPU; cuda_graph_decoder is tested in test_kimi.)"""
from dataclasses import replace

import pytest
import torch

import bench
from kimi import Transformer
from test_kimi import TINY


@pytest.mark.parametrize("mla_layers", [TINY.full_attn_layers, tuple(range(TINY.num_hidden_layers))])
@pytest.mark.parametrize("B, L", [(1, 7), (3, 50)])
def test_cache_bytes_equal_the_buffers_setup_cache_allocates(mla_layers, B, L):
    args = replace(TINY, full_attn_layers=mla_layers)
    model = Transformer(args).to(torch.bfloat16)
    model.setup_cache(B, L)
    allocated = sum(b.numel() * b.element_size() for b in model.buffers())
    assert bench.cache_bytes(args, B, L) == allocated


def test_active_params_count_what_one_token_touches():
    model = Transformer(TINY)
    k = TINY.num_experts_per_token
    touched = sum(p.numel() for n, p in model.named_parameters()
                  if ".experts." not in n and n != "model.embed_tokens.weight")
    touched += sum(sum(p.numel() for p in layer.block_sparse_moe.experts[0].parameters()) * k
                   for layer in model.model.layers if layer.is_moe)
    assert bench.active_params(TINY) == touched


def test_decode_bytes_grow_by_cached_tokens_and_distinct_experts():
    one = bench.decode_bytes(TINY, 1, 100)
    assert bench.decode_bytes(TINY, 1, 101) - one == \
        len(TINY.full_attn_layers) * (TINY.kv_lora_rank + TINY.qk_rope_head_dim) * 2
    # B = 16 sequences read the shared weights once and each distinct expert once: over 16 separate
    # B = 1 steps, that saves 15 copies of the shared weights and the repeats among 16 x k experts
    moe_layers = TINY.num_hidden_layers - TINY.first_k_dense_replace
    extra = (bench.decode_bytes(TINY, 16, 0) - 16 * bench.decode_bytes(TINY, 1, 0)
             + 15 * 2 * bench.active_params(TINY))                 # = experts beyond the first k
    assert 0 < extra <= moe_layers * (TINY.num_experts - TINY.num_experts_per_token) * bench.expert_bytes(TINY)


def test_random_model_is_bf16_with_fp32_decay_stacked_and_finite():
    model = bench.random_model(TINY, torch.device("cpu"), max_batch_size=2, max_seq_len=32)
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if name.endswith(("A_log", "dt_bias")) else torch.bfloat16), name
    assert all(layer.block_sparse_moe.w13 is not None for layer in model.model.layers if layer.is_moe)
    logits = model(torch.randint(0, TINY.vocab_size, (2, 20)), last_only=True)
    assert logits.shape == (2, 1, TINY.vocab_size) and logits.isfinite().all()


@pytest.mark.parametrize("argv, message", [(["--context", "4,x"], "comma-separated"),
                                           (["--context", "0"], "positive"),
                                           (["--frobnicate"], "unrecognized")])
def test_bad_bench_arguments_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_bench_without_gpu_says_so():
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench.main([])
