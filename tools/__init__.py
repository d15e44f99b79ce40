"""Programs that measure, run from the repository's root as `python -m tools.NAME` (those that need
a GPU say so on a CPU, and stop). They import the model and its fast paths; nothing imports them
but the tests and each other. One timer serves them all: tools.timing.cuda_time.

    bench            the full-size model on random weights against its ceilings (--baseline:
                     transformers' model beside it; --context, --throughput: against an all-MLA
                     twin, as long_context measures it)
    kernels          each Triton kernel against the torch code it replaces
    profile_decode   a decode step's GPU time by kernel
    profile_prefill  a prefill's GPU time by kernel
    measure_fp8      FP8 weights' accuracy and memory
    fp8_gemms        the FP8 prefill's matmuls against bf16, promoting sums or not
    grad_errors      chunk_kda's gradients against fp64, beside chunk_kda_ref's (README's table)
    baseline_hf      transformers' KimiLinearForCausalLM as bench's baseline (needs transformers)
    timing           cuda_time, and l2_flusher for it
    fullsize         the full-size model with random weights, and what a step must read (the
                     ceilings); long_context: the all-MLA twin at long contexts (bench's modes)
"""
