"""Every Triton kernel compiles for the H200 (sm_90) on any machine, a GPU or not.

Without a GPU the other tests run the kernels in Triton's CPU interpreter, which accepts code that
the compiler refuses: on the H200, short_conv.py once failed with "initial value for `src` is of
type [64, 1], but the then block redefines it as [1, 4]" (a name given another shape inside a
runtime `if`) while every interpreter test passed. Triton's compiler and ptxas run on a CPU too,
for a named target, so this test compiles kda_triton.py's four kernels (with and without the
backward's stores), kda_backward.py's four, fast/short_conv.py's and fast/moe.py's combine,
and the decode step's and FP8's kernels, at the 48B model's sizes, as their launchers configure
them. Skipped where
the installed Triton cannot compile for CUDA here (no CUDA backend, or another compile API).
"""
import os
import subprocess
import sys

import pytest

from helpers import ROOT

SCRIPT = r"""
import kda_backward
import kda_triton
from fast import moe, pointwise, short_conv
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

BF, F32, I64, F8 = "*bf16", "*fp32", "*i64", "*fp8e4nv"


def build(fn, pointers, constexprs, num_warps, num_stages=3):
    names = fn.arg_names
    sig = {n: pointers.get(n, "constexpr" if n in constexprs else
                           "fp32" if n == "scale" else "i32") for n in names}
    src = ASTSource(fn=fn, signature=sig,
                    constexprs={(names.index(n),): v for n, v in constexprs.items()})
    triton.compile(src, target=GPUTarget("cuda", 90, 32),
                   options=dict(num_warps=num_warps, num_stages=num_stages))
    print("compiled", fn.__name__, flush=True)


kt, KV = kda_triton, dict(K=128, V=128)
build(kt._kda_diag_kernel, dict(q=BF, k=BF, g=F32, Akkd=F32, Aqk=BF),
      dict(K=128, C=kt.C, BC=kt.BC, BH=kt.DIAG_HEADS), kt.DIAG_WARPS)
for store in (False, True):     # the inference path, and the forward that keeps the backward's
    build(kt._kda_intra_kernel, dict(q=BF, k=BF, v=BF, g=F32, beta=F32, Akkd=F32, w=BF, u=BF,
                                     qg=BF, kg=BF, Aqk=BF, decay=F32, tinv=F32),
          dict(KV, C=kt.C, BC=kt.BC, BK=kt.BK, DOT=tl.bfloat16, PREC="tf32",
               STORE_TINV=store), kt.INTRA_WARPS)
    build(kt._kda_scan_kernel, dict(w=BF, u=BF, qg=BF, kg=BF, Aqk=BF, decay=F32, o=BF, h0=F32,
                                    ht=F32, hn=BF, vn=BF),
          dict(KV, C=kt.C, BV=kt.BV_SCAN, HAS_H0=True, STORE_HT=True, DOT=tl.bfloat16,
               PREC="tf32", STORE_H=store), kt.SCAN_WARPS, kt.SCAN_STAGES)
build(kt._kda_step_kernel, dict(q=BF, k=BF, v=BF, g=F32, beta=F32, o=BF, h0=F32, ht=F32),
      dict(KV, BV=kt.BV_STEP, HAS_H0=True, STORE_HT=True), kt.STEP_WARPS)
for has_state in (True, False):
    build(short_conv._short_conv_kernel, dict(x=BF, w=BF, state=BF, y=BF),
          dict(W=4, WP=4, HAS_STATE=has_state, BT=short_conv.BT, BC=short_conv.BC),
          short_conv.WARPS)
tile = moe.TILE
build(moe._combine_kernel, dict(out_ptr=BF, pos_ptr=I64, w_ptr=F32, y_ptr=BF),
      dict(K=8, BM=tile["BM"], BN=tile["BN"]), tile["num_warps"])
for kind, N, quant in ((pointwise.RMS, 2304, False), (pointwise.GATED, 128, False),
                       (pointwise.L2, 128, False), (pointwise.RMS, 2304, True),
                       (pointwise.GATED, 128, True)):     # quant: FP8 prefill's q beside y
    BN = triton.next_power_of_2(N)
    build(pointwise._norm_kernel, dict(x=BF, gate=BF, w=BF, y=BF, q=F8 if quant else BF,
                                       s=F32 if quant else BF, eps="fp32"),
          dict(KIND=kind, QUANT=quant, BR=1 if kind == pointwise.RMS else 32, BN=BN),
          pointwise.WARPS)
build(moe._silu_mul_kernel, dict(gu_ptr=BF, h_ptr=BF),
      dict(BM=moe.SILU_TILE["BM"], BN=moe.SILU_TILE["BN"]), moe.SILU_TILE["num_warps"])
build(pointwise._gate_kernel, dict(f=BF, A_log=F32, dt_bias=F32, g=F32),
      dict(K=128, BLOCK=pointwise.GATE_BLOCK), pointwise.WARPS)
kb = kda_backward
build(kb._kda_bwd_scan_kernel, dict(qg=BF, kg=BF, w=BF, Aqk=BF, decay=F32, do=BF, dht=F32, dhn=BF,
                                    dvn=F32, dh0=F32),
      dict(KV, C=kb.C, BV=kb.BV_BWD_SCAN, HAS_DHT=True, STORE_DH0=True, DOT=tl.bfloat16,
           PREC="tf32"), kb.BWD_SCAN_WARPS, kb.BWD_SCAN_STAGES)
build(kb._kda_bwd_wy_kernel, dict(v=BF, beta=F32, do=BF, vn=BF, dvn=F32, tinv=F32, dv=BF,
                                  dAqk=F32, dAkk=F32, dbeta_wy=F32),
      dict(V=128, C=kb.C, BV=kb.BV_BWD, PREC="tf32"), kb.BWD_WY_WARPS)
build(kb._kda_bwd_sub_kernel, dict(q=BF, k=BF, g=F32, beta=F32, dAqk=F32, dAkk=F32, dq2=F32,
                                   dk2=F32, dG2=F32, db2=F32),
      dict(K=128, C=kb.C, BC=kb.BC, BK=kb.BK_BWD_SUB, PREC="tf32"), kb.BWD_SUB_WARPS)
build(kb._kda_bwd_intra_kernel, dict(q=BF, k=BF, g=F32, beta=F32, do=BF, vn=BF, dvn=F32, hn=BF,
                                     dhn=BF, tinv=F32, dbeta_wy=F32, dq2=F32, dk2=F32, dG2=F32,
                                     db2=F32, dq=BF, dk=BF, dg=F32, dbeta=F32),
      dict(KV, C=kb.C, BC=kb.BC, BK=kb.BK_BWD, BV=kb.BV_BWD, NK2=128 // kb.BK_BWD_SUB,
           PREC="tf32"), kb.BWD_INTRA_WARPS)
# The decode kernels of fast/moe_decode.py and fast/mla_decode.py, as their launchers configure
# them at the 48B sizes: bf16 and e4m3 weights, both of SWAP's forms
from fast import mla_decode, moe_decode
SCALAR, md = "fp32", moe_decode
build(md._logits_kernel, dict(x_ptr=BF, w_ptr=BF, out_ptr=F32),
      dict(DOT=tl.bfloat16, PREC="tf32", BM=16, BE=md.LOGITS["BE"], BK=md.LOGITS["BK"]),
      md.LOGITS["num_warps"])
build(md._route_kernel, dict(logits_ptr=F32, bias_ptr=BF, ids_ptr=I64, w_ptr=F32, scaling=SCALAR,
                             shared_w=SCALAR),
      dict(K=8, KP=9, BE=256, BK=16, RENORMALIZE=True, BIASED=True), md.ROUTE_WARPS)
for W, scaled in ((BF, False), (F8, True)):
    meta = dict(SCALED=scaled, DOT=tl.bfloat16, PREC="tf32", BM=16, BJ=16)
    for swap in (True, False):
        up, down = (md.UP_SWAP, md.DOWN_SWAP) if swap else (md.UP, md.DOWN)
        build(md._gate_up_kernel, dict(x_ptr=BF, ids_ptr=I64, w13_ptr=W, s13_ptr=F32, h_ptr=BF),
              dict(meta, SWAP=swap, BN=up["BN"], BK=up["BK"]), up["num_warps"], up["num_stages"])
        build(md._down_kernel, dict(h_ptr=BF, ids_ptr=I64, w2_ptr=W, s2_ptr=F32, out_ptr=BF),
              dict(meta, SWAP=swap, BN=down["BN"], BK=down["BK"]), down["num_warps"],
              down["num_stages"])
build(md._slot_sum_kernel, dict(out_ptr=BF, wts_ptr=F32, y_ptr=BF), dict(BN=md.SLOT_SUM), 4)
for config in (mla_decode.SPLIT, dict(BL=32, HEADS=64, num_warps=8, num_stages=3)):
    build(mla_decode._mla_split_kernel, dict(q_lat_ptr=BF, q_pe_ptr=BF, cache=BF, pos=I64,
                                             pad=I64, m_part=F32, l_part=F32, acc_part=F32,
                                             scale_log2=SCALAR),
          dict(H=32, R=512, PE=64, HP=max(config["HEADS"], 32), RP=512, PEP=64, BL=config["BL"],
               MIN_SPLIT=mla_decode.MIN_SPLIT, POS_TENSOR=True, HAS_PAD=True, DOT=tl.bfloat16,
               PREC="tf32"), config["num_warps"], config["num_stages"])
for pos_tensor in (True, False):         # pos in device memory (a graph's step), or an int
    build(mla_decode._latent_write_kernel, dict(c=BF, k_pe=BF, w=BF, cache=BF, eps=SCALAR,
                                                pos=I64 if pos_tensor else "i32"),
          dict(R=512, PE=64, RP=512, PEP=64, POS_TENSOR=pos_tensor), 4)
build(mla_decode._heads_matmul_kernel, dict(x=BF, w=BF, y=BF),
      dict(BB=16, BK=mla_decode.HEADS_BK, BN=mla_decode.HEADS_BN, DOT=tl.bfloat16, PREC="tf32"), 4)
build(mla_decode._mla_combine_kernel, dict(m_part=F32, l_part=F32, acc_part=F32, o=BF),
      dict(H=32, R=512, BS=mla_decode.BLOCK_S, BR=mla_decode.BLOCK_R), 4)
# The rest of fast.decode's step: the residual add + RMSNorm, the KDA layer's step
from fast import decode, fp8, kda_decode
for parts, J, weighted in ((BF, 9, True), (F32, 4, False)):   # the MoE's slots, o_proj's
    build(decode._add_rmsnorm_kernel, dict(h_ptr=BF, parts_ptr=parts, wts_ptr=F32, w_ptr=BF,
                                           h_out=BF, n_out=BF, eps=SCALAR),
          dict(HAS_DELTA=True, J=J, WEIGHTED=weighted, BD=4096), 8)
for splits in (1, kda_decode.SPLITS):      # a head's program alone; programs sharing a head
    build(kda_decode._kda_decode_kernel,
          dict(q=BF, k=BF, v=BF, f_a=BF, g_a=BF, b=BF, conv=BF, wq=BF, wk=BF, wv=BF, f_b_w=BF,
               g_b_w=BF, A_log=F32, dt_bias=F32, o_norm_w=BF, S=F32, o=BF, gates=BF,
               done="*i32", scale=SCALAR, eps=SCALAR),
          dict(K=128, W=4, WP=4, MV=kda_decode.MV, SPLITS=splits),
          kda_decode.WARPS if splits == 1 else kda_decode.SPLIT_WARPS)
# FP8: the prefill's activation quantisation, the decode product (one weight, and grouped)
for gated in (False, True):                      # a row as it is, SiLU(gate) * up of its halves
    build(fp8._quantize_kernel, dict(x_ptr=BF, q_ptr=F8, s_ptr=F32),
          dict(BK=fp8.QUANT_BK, SILU_MUL=gated), 4)
rows = {n: v for n, v in fp8.ROWS.items() if not n.startswith("num_")}
for grouped, out in ((False, F32), (True, BF)):     # split o_proj's fp32 parts, the experts
    build(fp8._rows_kernel, dict(x_ptr=BF, w_ptr=F8, s_ptr=F32, out_ptr=out, expert_ptr=I64,
                                 end_ptr=I64),
          dict(rows, GROUPED=grouped, DOT=tl.bfloat16, PREC="tf32"), fp8.ROWS["num_warps"],
          fp8.ROWS["num_stages"])
print("all compiled")
"""


def test_kernels_compile_for_sm90():
    env = dict(os.environ, TRITON_INTERPRET="0")        # the compiler, not the interpreter
    run = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    if run.returncode != 0:
        last = run.stderr.strip().splitlines()[-1] if run.stderr.strip() else "no message"
        if "CompilationError" not in run.stderr:        # the toolchain, not our code
            pytest.skip(f"Triton cannot compile for sm_90 here: {last}")
        pytest.fail(f"a kernel does not compile for sm_90 (it would fail on the H200):\n"
                    f"{run.stdout}{run.stderr[-3000:]}")
    assert "all compiled" in run.stdout, run.stdout
