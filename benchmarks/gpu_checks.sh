#!/usr/bin/env bash
# Batched single-GPU checks of the newer pieces, then timings; results under $OUT (default benchmarks/results).
#   bash benchmarks/gpu_checks.sh tests     GPU tests: kernels (incl. fused head, custom ops, sync-free varlen),
#                                           chunked training, SP/FSDP over gloo with processes sharing the GPU
#   bash benchmarks/gpu_checks.sh train     profile of tnl-0.4b/1b at 32K, bench_train vs compiled LLaMA,
#                                           train.py per-step lines, longest chunked sequence, tnl-3b with fsdp
#   bash benchmarks/gpu_checks.sh compile   whole-model compile: GPU compile tests, profile (blocks vs model),
#                                           bench_train vs LLaMA compiled whole, train.py model.compile=true
#   bash benchmarks/gpu_checks.sh chunk     longest chunked sequences without block checkpointing (tnl-0.4b, tnl-1b)
#   bash benchmarks/gpu_checks.sh parity    loss after 200 steps, fast path vs eager path, two seeds
#   bash benchmarks/gpu_checks.sh op        GPU tests of the op / policies, kernel speed per state mode and
#                                           entry path, T=2K vs SDPA, profiles with the whole model compiled
#   bash benchmarks/gpu_checks.sh speed     bench_train 2K-128K vs compiled LLaMA (auto recompute), train.py
#   bash benchmarks/gpu_checks.sh next      what is not measured yet: op paths after the fix, kernel regression and
#                                           T=2K with CUDA graphs vs SDPA, train.py vs bare loop, 128K rows,
#                                           tnl-1b chunked at 2M, loss parity at a stable learning rate
#   bash benchmarks/gpu_checks.sh s3a       GPU kernel tests, slope-gradient paths (learnable slopes) and fixed-slope
#                                           kernel times, regression vs SDPA, T=2K/8K with CUDA graphs
#   bash benchmarks/gpu_checks.sh s3b       tnl-1b chunked at 2M, train.py vs the bare-loop profile at 32K
#   bash benchmarks/gpu_checks.sh s3d       GPU kernel tests, slope-gradient paths after moving them into the dq walk,
#                                           fixed-slope times, bench_train 2K/32K/128K vs compiled LLaMA
#   bash benchmarks/gpu_checks.sh s4        SP under torch.compile on the GPU (3 processes), segment lengths rounded to powers
#                                           of two (kernel times), bare loop with clipping vs train.py at 32K
#   bash benchmarks/gpu_checks.sh s5a       loss parity at lr 2e-4 (3 seeds, curves), kernel regression vs SDPA
#   bash benchmarks/gpu_checks.sh s5b       SP compile GPU tests (host reads fix; ~2 min), T=2K eager vs CUDA graph and host cost
#   bash benchmarks/gpu_checks.sh s5c       bench_train 2K/32K/128K vs compiled LLaMA (the baseline's full-recompute retry
#                                           outside the OOM handler), tnl-1b profile at 32K
#   bash benchmarks/gpu_checks.sh s6a       one block's GEMM layouts x residual dtype (tnl-0.4b, tnl-1b at 32K), GEMMs alone
#   bash benchmarks/gpu_checks.sh s6b       tnl-0.4b step profile at 32K: fp32 vs bf16 residual, and bf16 + max-autotune
#   bash benchmarks/gpu_checks.sh s6c       loss parity of the bf16 residual (presets' default now) vs the fp32 eager path;
#                                           bench_train 2K/32K/128K; tnl-1b profile at 32K
#   bash benchmarks/gpu_checks.sh s7a       step profiles with the GPU's idle gaps attributed (tnl-1b: clipping in place vs
#                                           into the fused AdamW step; tnl-0.4b: fused)
#   bash benchmarks/gpu_checks.sh s7b       the same with synced vs back-to-back steps and host issue time; train.py tnl-0.4b and
#                                           tnl-1b at 32K (per-step lines) for the train.py-vs-bare comparison
#   bash benchmarks/gpu_checks.sh s7c       tnl-1b profile (GPU time from the trace), train.py tnl-0.4b at 32K B4, bench_train
#                                           32K/128K vs compiled LLaMA (both bf16 residual); SM clock / power sampled
#   bash benchmarks/gpu_checks.sh s8        not run (s9b ran its parts but the kernel GPU tests): GPU tests after interface.check_static (kernels, models, SP compile over
#                                           3 processes), loss parity with the fused clip, bench_train's back-to-back and
#                                           GPU clock columns
#   (s9a ran at commit 9b7474a, since reverted: GPU tests and tnl-1b profiles with the in-kernel qk_act on / off)
#   bash benchmarks/gpu_checks.sh s9b       chunked GPU tests; tnl-0.4b B4 32K bench_train (back-to-back, clock columns);
#                                           SP compile GPU tests; loss parity with the fused clip, 2 seeds
#   bash benchmarks/gpu_checks.sh s10a      one tnl-1b / tnl-0.4b block at 32K compiled default vs max-autotune (Triton GEMM
#                                           templates with fused epilogues / prologues, with and without persistent TMA)
#   bash benchmarks/gpu_checks.sh s10b      kernel GPU tests with the TMA walks; kernel times TMA vs pointer loads and launch
#                                           variants that TMA's lower register use may open (B4/B1 H16 T32K D128)
#   bash benchmarks/gpu_checks.sh s10c      kernel GPU tests; kernel times with the per-kind TMA defaults vs no TMA (D128 B4/B1,
#                                           D64); tnl-1b step profile at 32K
#   bash benchmarks/gpu_checks.sh s11a      kernel GPU tests (chunk walks, launch tuning) with the small-head defaults
#   bash benchmarks/gpu_checks.sh s11b      bench_train tnl-0.4b vs compiled LLaMA at 32K with the TMA walks (clock over timed steps)
#   bash benchmarks/gpu_checks.sh s11c      kernel times of forward launches that the TMA walks' register use opens (8/16 warps,
#                                           BLK 128), the dq walk at 8 warps (spill-free on sm_90)
#   bash benchmarks/gpu_checks.sh s12a      tnl-1b at 32K with 32K and 64K tokens per optimizer step (B1, B2): bench_train rows,
#                                           the B2 step profile
#   bash benchmarks/gpu_checks.sh s12b      train.py tnl-1b at 32K B2 (per-step lines), then bench_train's B2 row in the same lease
#   bash benchmarks/gpu_checks.sh s13       s12b again (its files were lost with session 12's machine), then train.py tnl-1b B2 with
#                                           2 micro-batches per optimizer step (128K tokens per step)
#   bash benchmarks/gpu_checks.sh s13b      bench_train tnl-1b at 32K: B2 vs B4 as 2 micro-batches of 2, alternating rows (drift)
#   bash benchmarks/gpu_checks.sh s13c      fused head's weight gradient accumulated by the GEMM into fp32: GPU tests, then tnl-1b
#                                           B2 profiles at 32K, unfused / fp32-accumulating alternating
#   bash benchmarks/gpu_checks.sh s14       tokens per walk step (KernelLaunch.BT 128 / 32 vs CHUNK 64): GPU tests of the walks, sm_90
#                                           registers and spills per BT, kernel times per variant
#   bash benchmarks/gpu_checks.sh s3c       bench_train 2K/32K/128K vs compiled LLaMA, loss parity at lr 2e-4, 3 seeds
# Needs omegaconf (+ antlr4 runtime) for train.py: carried as wheels in .whl/ where the image lacks them.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
what=${1:-tests}
if [[ $what == tests ]]; then
  timeout 420 python3 -m pytest -n 12 -q -p no:cacheprovider -m gpu tests/kernels tests/models 2>&1 \
    | tee "$OUT/gpu_tests_kernels_models.log" | tail -15
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/distributed/test_parallelize.py \
    tests/distributed/test_sp_consistency.py -k "gpu" -rs -s 2>&1 | tee "$OUT/gpu_tests_distributed.log" | tail -8
fi
if [[ $what == train ]]; then
  timeout 200 python3 benchmarks/profile_train.py --models tnl-1b --T 32768 --variants ac0-ckpt,ac0-fused \
    --steps 3 --warmup 2 --out "$OUT" 2>&1 | grep -E "^tnl|^\|" | tail -6
  timeout 200 python3 train.py --config configs/tnl-0.4b.yaml parallel.sp=1 data.seq_len=32768 data.max_bytes=8000000 \
    model.compile=true trainer.max_steps=30 trainer.log_every=10 trainer.val_check_interval=null trainer.ckpt_every=0 \
    trainer.out_dir=/tmp/r04 2>&1 | grep -E "^step|done|Error" | tail -6
  timeout 220 python3 benchmarks/bench_train.py --models tnl-0.4b --lengths 32768 --tokens 32768 \
    --steps 3 --warmup 2 --ac 0 --compile 1 --out "$OUT" 2>&1 | grep -E "^\|" | tail -8
fi
if [[ $what == long ]]; then
  timeout 300 python3 benchmarks/bench_train.py --longest --seq-chunk 65536 --ac 1 --models tnl-0.4b \
    --start-tokens 1048576 --max-tokens 4194304 --out "$OUT" 2>&1 | grep -E "^\|" | tail -8
  timeout 240 python3 train.py --config configs/tnl-3b.yaml parallel.sp=1 parallel.fsdp=true trainer.devices=1 \
    data.seq_len=32768 model.overrides.activation_checkpointing=true trainer.max_steps=6 trainer.log_every=1 \
    trainer.val_check_interval=null trainer.ckpt_every=0 trainer.out_dir=/tmp/tnl3b_fsdp1 2>&1 | grep -E "step|done|Error" | tail -8
  python3 benchmarks/memory_plan.py --models tnl-3b --worlds 1 --tokens 32768 2>&1 | tail -6
fi
if [[ $what == compile ]]; then
  timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_compile.py tests/kernels/test_linear_ce.py \
    2>&1 | tee "$OUT/gpu_tests_compile.log" | tail -4
  timeout 240 python3 benchmarks/profile_train.py --models tnl-0.4b --T 32768 --variants ac0-fused --compile blocks \
    --steps 3 --warmup 2 --out "$OUT/blocks" 2>&1 | grep -E "^tnl" | tail -3
  timeout 240 python3 benchmarks/profile_train.py --models tnl-0.4b --T 32768 --variants ac0-fused --compile model \
    --steps 3 --warmup 2 --out "$OUT/model" 2>&1 | grep -E "^tnl" | tail -3
  timeout 300 python3 benchmarks/bench_train.py --models tnl-0.4b --lengths 32768 --tokens 32768 \
    --steps 3 --warmup 2 --ac 0 --compile model --out "$OUT" 2>&1 | grep -E "^\|" | tail -4
  timeout 200 python3 train.py --config configs/tnl-0.4b.yaml parallel.sp=1 data.seq_len=32768 data.max_bytes=8000000 \
    model.compile=true trainer.max_steps=30 trainer.log_every=10 trainer.val_check_interval=null trainer.ckpt_every=0 \
    trainer.out_dir=/tmp/r04m 2>&1 | grep -E "^step|done|Error" | tail -6
fi
if [[ $what == chunk ]]; then
  timeout 330 python3 benchmarks/bench_train.py --longest --seq-chunk 16384 --ac 0 --models tnl-0.4b \
    --start-tokens 1048576 --max-tokens 4194304 --out "$OUT" 2>&1 | grep -E "^\|" | tail -8
fi
if [[ $what == chunk1b ]]; then
  timeout 300 python3 benchmarks/bench_train.py --longest --seq-chunk 16384 --ac 0 --models tnl-1b \
    --start-tokens 2097152 --max-tokens 2097152 --out "$OUT" 2>&1 | grep -E "^\|" | tail -8
fi
if [[ $what == parity ]]; then
  timeout 420 python3 benchmarks/speed_parity.py --model tnl-0.4b --T 8192 --steps 200 --seeds 0,1 --out "$OUT" \
    2>&1 | tail -14
fi
if [[ $what == op ]]; then
  timeout 200 python3 -m pytest -n 12 -q -p no:cacheprovider -m gpu tests/kernels tests/models/test_activation_policy.py \
    2>&1 | tee "$OUT/gpu_tests_op.log" | tail -6
  timeout 60 python3 benchmarks/op_paths.py --shape 1,32768,8,128 --out "$OUT" 2>&1 | grep -E "^\|" | tail -8
  timeout 60 python3 benchmarks/bench_kernel.py --shapes 4,16,2048,128 4,16,32768,128 --impls seqpar,sdpa --no-check \
    2>&1 | grep -E "^\|" | tail -8
  timeout 150 python3 benchmarks/profile_train.py --models tnl-0.4b --T 32768 --variants ac0-fused,acsel-fused \
    --compile model --steps 3 --warmup 2 --out "$OUT/p04" 2>&1 | grep -E "^tnl" | tail -3
  timeout 100 python3 benchmarks/profile_train.py --models tnl-1b --T 32768 --variants ac0-fused \
    --compile model --steps 3 --warmup 2 --out "$OUT/p1b" 2>&1 | grep -E "^tnl" | tail -3
fi
if [[ $what == speed ]]; then
  timeout 200 python3 benchmarks/bench_train.py --models tnl-0.4b --lengths 2048,32768,131072 --tokens 131072 \
    --steps 3 --warmup 2 --ac auto --compile model --out "$OUT" 2>&1 | grep -E "^\|" | tail -8
  timeout 100 python3 train.py --config configs/tnl-0.4b.yaml parallel.sp=1 data.seq_len=32768 data.max_bytes=8000000 \
    model.compile=true trainer.max_steps=40 trainer.log_every=10 trainer.val_check_interval=null trainer.ckpt_every=0 \
    trainer.out_dir=/tmp/r04s 2>&1 | grep -E "^step|done|Error" | tail -6
  timeout 240 python3 benchmarks/speed_parity.py --model tnl-0.4b --T 8192 --steps 200 --seeds 0,1 --out "$OUT" \
    2>&1 | tail -14
fi
if [[ $what == next ]]; then
  timeout 120 python3 benchmarks/op_paths.py --shape 1,32768,8,128 --out "$OUT" 2>&1 | grep -E "^\|" | tail -8
  timeout 120 python3 benchmarks/op_graph.py --shapes 4,16,2048,128 4,16,8192,128 --out "$OUT" 2>&1 | grep -E "^\|" | tail -6
  timeout 120 python3 benchmarks/bench_kernel.py --shapes 4,16,32768,128 1,16,131072,128 --impls seqpar,sdpa --no-check \
    2>&1 | grep -E "^\|" | head -8
  timeout 150 python3 train.py --config configs/tnl-0.4b.yaml parallel.sp=1 data.seq_len=32768 data.max_bytes=8000000 \
    model.compile=true model.activation_checkpointing=none trainer.max_steps=40 trainer.log_every=10 \
    trainer.val_check_interval=null trainer.ckpt_every=0 trainer.out_dir=/tmp/r04n 2>&1 | grep -E "^step|done|Error" | tail -6
  timeout 300 python3 benchmarks/bench_train.py --models tnl-0.4b --lengths 32768,131072 --tokens 131072 \
    --steps 2 --warmup 1 --ac auto --compile model --out "$OUT" 2>&1 | grep -E "^\|" | tail -6
  timeout 300 python3 benchmarks/bench_train.py --longest --seq-chunk 16384 --ac 0 --models tnl-1b \
    --start-tokens 2097152 --max-tokens 2097152 --out "$OUT" 2>&1 | grep -E "^\|" | tail -4
  timeout 300 python3 benchmarks/speed_parity.py --model tnl-0.4b --T 8192 --steps 200 --seeds 0,1,2 --lr 2e-4 \
    --out "$OUT" 2>&1 | tail -14
fi
if [[ $what == s3a ]]; then
  timeout 220 python3 -m pytest -n 12 -q -p no:cacheprovider -m gpu tests/kernels 2>&1 \
    | tee "$OUT/gpu_tests_kernels_s3.log" | tail -6
  timeout 120 python3 benchmarks/bench_kernel.py --tune base ds_rowsum ds_rowsum_bf16 --learnable-slopes \
    --shapes 4,16,32768,128 1,8,32768,128 2,32,32768,64 --out "$OUT/kernel_dslopes_h200.md" 2>&1 | grep -E "^\|" | tail -10
  timeout 60 python3 benchmarks/bench_kernel.py --tune base --shapes 4,16,32768,128 2,32,32768,64 \
    --out "$OUT/kernel_fixed_slopes_s3_h200.md" 2>&1 | grep -E "^\|" | tail -4
  timeout 100 python3 benchmarks/bench_kernel.py --shapes 4,16,2048,128 4,16,32768,128 1,16,131072,128 \
    --impls seqpar,sdpa --no-check --breakdown "" --out "$OUT/kernel_regression_s3_h200.md" 2>&1 | grep -E "^\|" | head -10
  timeout 90 python3 benchmarks/op_graph.py --shapes 4,16,2048,128 4,16,8192,128 --out "$OUT" 2>&1 | grep -E "^\|" | tail -6
fi
if [[ $what == s3b ]]; then
  timeout 290 python3 benchmarks/bench_train.py --longest --seq-chunk 16384 --ac 0 --models tnl-1b \
    --start-tokens 2097152 --max-tokens 2097152 --out "$OUT" 2>&1 | grep -E "^\|" | tail -4
  timeout 150 python3 train.py --config configs/tnl-0.4b.yaml parallel.sp=1 data.seq_len=32768 data.max_bytes=8000000 \
    model.compile=true model.activation_checkpointing=none trainer.max_steps=40 trainer.log_every=10 \
    trainer.val_check_interval=null trainer.ckpt_every=0 trainer.out_dir=/tmp/r04n 2>&1 | grep -E "^step|done|Error" | tail -6
  timeout 150 python3 benchmarks/profile_train.py --models tnl-0.4b --T 32768 --variants ac0-fused \
    --compile model --steps 3 --warmup 2 --out "$OUT/p04s3" 2>&1 | grep -E "^tnl" | tail -3
fi
if [[ $what == s3d ]]; then
  timeout 200 python3 -m pytest -n 12 -q -p no:cacheprovider -m gpu tests/kernels 2>&1 \
    | tee "$OUT/gpu_tests_kernels_s3d.log" | tail -4
  timeout 100 python3 benchmarks/bench_kernel.py --tune base ds_rowsum ds_rowsum_bf16 dqst3 --learnable-slopes \
    --shapes 4,16,32768,128 1,8,32768,128 2,32,32768,64 --out "$OUT/kernel_dslopes_fused_h200.md" 2>&1 | grep -E "^\|" | tail -12
  timeout 50 python3 benchmarks/bench_kernel.py --tune base --shapes 4,16,32768,128 2,32,32768,64 \
    --out "$OUT/kernel_fixed_slopes_s3d_h200.md" 2>&1 | grep -E "^\|" | tail -4
  timeout 220 python3 benchmarks/bench_train.py --models tnl-0.4b --lengths 2048,32768,131072 --tokens 131072 \
    --steps 2 --warmup 1 --ac auto --compile model --out "$OUT" 2>&1 | grep -E "^\|" | tail -8
fi
if [[ $what == s4 ]]; then
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/distributed/test_sp_compile.py -k gpu --runxfail -x 2>&1 \
    | tee "$OUT/gpu_tests_sp_compile.log" | grep -E "Error|assert |passed|failed" | head -12
  timeout 60 python3 benchmarks/bench_kernel.py --tune base --shapes 1,8,32768,128 4,16,2048,128 4,16,8192,128 \
    4,16,32768,128 2>&1 | grep "^| [0-9]" | head -4
  timeout 110 python3 benchmarks/profile_train.py --models tnl-0.4b --T 32768 --variants ac0-fused --compile model \
    --steps 3 --warmup 2 --out "$OUT" 2>&1 | grep -E "^tnl"
  timeout 130 python3 train.py --config configs/tnl-0.4b.yaml parallel.sp=1 data.seq_len=32768 data.max_bytes=8000000 \
    model.compile=true model.activation_checkpointing=none trainer.max_steps=30 trainer.log_every=10 \
    trainer.val_check_interval=null trainer.ckpt_every=0 trainer.out_dir=/tmp/r04s4 2>&1 | grep -E "^step|done|Error" | tail -4
fi
if [[ $what == s5a ]]; then
  timeout 300 python3 benchmarks/speed_parity.py --model tnl-0.4b --T 8192 --steps 200 --seeds 0,1,2 --lr 2e-4 \
    --out "$OUT" 2>&1 | grep -E "^\||fast -|seed" | tail -14
  timeout 100 python3 benchmarks/bench_kernel.py --impls seqpar,sdpa --shapes 4,16,2048,128 4,16,32768,128 \
    1,16,131072,128 --no-check --out "$OUT/kernel_regression_s5_h200.md" 2>&1 | grep "^| [0-9]"
fi
if [[ $what == s5b ]]; then
  timeout 250 python3 -m pytest -q -p no:cacheprovider tests/distributed/test_sp_compile.py -k gpu -rA 2>&1 \
    | tee "$OUT/gpu_tests_sp_compile.log" | grep -E "Error|assert |passed|failed|PASSED|FAILED" | head -12
  timeout 60 python3 benchmarks/op_graph.py --shapes 4,16,2048,128 --out "$OUT" 2>&1 | grep -E "^\| [0-9]"
  timeout 60 python3 benchmarks/host_overhead.py --shape 4,16,2048,128 --rounds 5 2>&1 | grep -E "^\||^shape" | head -14
fi
if [[ $what == s5c ]]; then
  timeout 450 python3 benchmarks/bench_train.py --models tnl-0.4b --lengths 2048,32768,131072 --tokens 131072 \
    --steps 2 --warmup 1 --ac auto --compile model --out "$OUT" 2>&1 | grep -E "^\|" | tail -8
  timeout 130 python3 benchmarks/profile_train.py --models tnl-1b --T 32768 --variants ac0-fused --compile model \
    --steps 3 --warmup 2 --out "$OUT" 2>&1 | grep -E "^tnl"
fi
if [[ $what == s6a ]]; then
  timeout 300 python3 benchmarks/bench_block.py --model tnl-0.4b --T 32768 --gemm-rows 32768,131072 --out "$OUT" \
    2>&1 | grep -E "^\|"
  timeout 200 python3 benchmarks/bench_block.py --model tnl-1b --T 32768 --variants separate,qku+glu,qkvu+glu \
    --out "$OUT" 2>&1 | grep -E "^\|"
fi
if [[ $what == s6b ]]; then
  P="benchmarks/profile_train.py --models tnl-0.4b --T 32768 --variants ac0-fused --compile model --steps 3 --warmup 2"
  timeout 150 python3 $P --tag _s6_residual_param --out "$OUT" 2>&1 | grep -E "^tnl"
  timeout 150 python3 $P --set residual_dtype=autocast --tag _s6_residual_autocast --out "$OUT" 2>&1 | grep -E "^tnl"
  timeout 280 python3 $P --set residual_dtype=autocast --compile-mode max-autotune-no-cudagraphs \
    --tag _s6_residual_autocast_max_autotune --out "$OUT" 2>&1 | grep -E "^tnl"
fi
if [[ $what == s6c ]]; then
  timeout 240 python3 benchmarks/speed_parity.py --model tnl-0.4b --T 8192 --steps 200 --seeds 0,1,2 --lr 2e-4 \
    --out "$OUT" 2>&1 | tail -4
  timeout 240 python3 benchmarks/bench_train.py --models tnl-0.4b --lengths 2048,32768,131072 --tokens 131072 \
    --steps 2 --warmup 1 --ac auto --compile model --baseline none --out "$OUT" 2>&1 | grep -E "^\|" | tail -4
  timeout 100 python3 benchmarks/profile_train.py --models tnl-1b --T 32768 --variants ac0-fused --compile model \
    --steps 3 --warmup 2 --tag _s6_residual_autocast --out "$OUT" 2>&1 | grep -E "^tnl"
fi
if [[ $what == s7a ]]; then
  P="benchmarks/profile_train.py --T 32768 --variants ac0-fused --compile model --steps 3 --warmup 2"
  timeout 130 python3 $P --models tnl-1b --clip-mode inplace --tag _s7_clip_inplace --out "$OUT" 2>&1 | grep -E "^tnl|^GPU idle" -A14 | tail -16
  timeout 130 python3 $P --models tnl-1b --clip-mode fused --tag _s7_clip_fused --out "$OUT" 2>&1 | grep -E "^tnl"
  timeout 110 python3 $P --models tnl-0.4b --clip-mode fused --tag _s7_clip_fused --out "$OUT" 2>&1 | grep -E "^tnl"
fi
if [[ $what == s7b ]]; then
  P="benchmarks/profile_train.py --T 32768 --variants ac0-fused --compile model --steps 4 --warmup 2"
  timeout 130 python3 $P --models tnl-1b --clip-mode fused --tag _s7_clip_fused --out "$OUT" 2>&1 | grep -E "^tnl|^GPU idle" -A14 | tail -16
  timeout 130 python3 $P --models tnl-1b --clip-mode inplace --tag _s7_clip_inplace --out "$OUT" 2>&1 | grep -E "^tnl"
  timeout 110 python3 $P --models tnl-0.4b --clip-mode fused --tag _s7_clip_fused --out "$OUT" 2>&1 | grep -E "^tnl"
  for m in tnl-0.4b tnl-1b; do
    timeout 150 python3 train.py --config configs/$m.yaml parallel.sp=1 data.seq_len=32768 data.max_bytes=8000000 \
      model.compile=true model.overrides.activation_checkpointing=none trainer.max_steps=40 trainer.log_every=10 \
      trainer.val_check_interval=null trainer.ckpt_every=0 trainer.out_dir=/tmp/r_$m 2>&1 | tee "$OUT/train_py_${m}_T32768_s7.log" | grep -E "^step|done|Error" | tail -4
  done
fi
if [[ $what == s7c ]]; then
  nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu \
    --format=csv -lms 500 > "$OUT/smi_s7c.csv" 2>/dev/null & SMI=$!
  timeout 120 python3 benchmarks/profile_train.py --models tnl-1b --T 32768 --variants ac0-fused --compile model \
    --steps 4 --warmup 2 --tag _s7 --out "$OUT" 2>&1 | grep -E "^tnl"
  echo "train.py $(date +%T)"
  timeout 130 python3 train.py --config configs/tnl-0.4b.yaml parallel.sp=1 data.seq_len=32768 data.batch_size=4 \
    data.max_bytes=16000000 model.compile=true trainer.max_steps=30 trainer.log_every=10 trainer.val_check_interval=null \
    trainer.ckpt_every=0 trainer.out_dir=/tmp/r_b4 2>&1 | tee "$OUT/train_py_tnl-0.4b_T32768_B4_s7.log" | grep -E "^step|done|Error" | tail -4
  echo "bench_train $(date +%T)"
  timeout 300 python3 benchmarks/bench_train.py --models tnl-0.4b --lengths 32768,131072 --tokens 131072 \
    --steps 2 --warmup 1 --ac auto --compile model --out "$OUT" 2>&1 | grep -E "^\|" | tail -6
  kill $SMI
fi
if [[ $what == s8 ]]; then
  timeout 300 python3 -m pytest -n 12 -q -p no:cacheprovider -m gpu tests/kernels tests/models 2>&1 \
    | tee "$OUT/gpu_tests_kernels_models.log" | tail -4
  timeout 250 python3 -m pytest -q -p no:cacheprovider tests/distributed/test_sp_compile.py -k gpu -rA 2>&1 \
    | tee "$OUT/gpu_tests_sp_compile.log" | grep -E "passed|failed|PASSED|FAILED" | head -8
  timeout 250 python3 benchmarks/speed_parity.py --model tnl-0.4b --T 8192 --steps 200 --seeds 0,1,2 --lr 2e-4 \
    --out "$OUT" 2>&1 | tail -4
  timeout 150 python3 benchmarks/bench_train.py --models tnl-0.4b --lengths 32768 --tokens 131072 --steps 3 --warmup 1 \
    --ac auto --compile model --baseline none --out "$OUT" 2>&1 | grep -E "^\|" | tail -2
fi
if [[ $what == s9b ]]; then
  timeout 100 python3 -m pytest -q -p no:cacheprovider -m gpu tests/models/test_chunked.py 2>&1 | tail -2
  timeout 130 python3 benchmarks/bench_train.py --models tnl-0.4b --lengths 32768 --tokens 131072 --steps 3 --warmup 1 \
    --ac auto --compile model --baseline none --out "$OUT" 2>&1 | grep -E "^\|" | tail -1
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/distributed/test_sp_compile.py -k gpu -rA 2>&1 \
    | tee "$OUT/gpu_tests_sp_compile.log" | grep -E "passed|failed|PASSED|FAILED" | head -8
  timeout 200 python3 benchmarks/speed_parity.py --model tnl-0.4b --T 8192 --steps 200 --seeds 0,1 --lr 2e-4 \
    --out "$OUT" 2>&1 | tail -4
fi
if [[ $what == s10a ]]; then
  timeout 400 python3 benchmarks/bench_block.py --model tnl-1b --T 32768 --variants separate --residuals bfloat16 \
    --modes default,max-autotune,max-autotune-tma --no-gemm-rows --out "$OUT" 2>&1 | grep -E "^\||Error|error" | tail -8
  timeout 170 python3 benchmarks/bench_block.py --model tnl-0.4b --T 32768 --variants separate --residuals bfloat16 \
    --modes default,max-autotune --no-gemm-rows --out "$OUT" 2>&1 | grep -E "^\||Error|error" | tail -8
fi
if [[ $what == s10b ]]; then
  timeout 240 python3 -m pytest -n 12 -q -p no:cacheprovider tests/kernels/test_chunk_triton.py 2>&1 \
    | tee "$OUT/gpu_tests_chunk_triton.log" | tail -3
  timeout 300 python3 benchmarks/bench_kernel.py --tune base notma dqst3 dvfst3 dvfw4 fwdst3 reg168 \
    --shapes 4,16,32768,128 1,16,32768,128 --out "$OUT/kernel_tuning_h200_s10_tma.md" 2>&1 | grep -E "^\||BEST"
fi
if [[ $what == s10c ]]; then
  timeout 200 python3 -m pytest -n 16 -q -p no:cacheprovider tests/kernels/test_chunk_triton.py tests/kernels/test_tuning.py \
    2>&1 | tee "$OUT/gpu_tests_chunk_triton.log" | tail -3
  timeout 130 python3 benchmarks/bench_kernel.py --tune base notma --shapes 4,16,32768,128 1,16,32768,128 2,32,32768,64 \
    --out "$OUT/kernel_tuning_h200_s10_tma_defaults.md" 2>&1 | grep -E "^\|"
  timeout 200 python3 benchmarks/profile_train.py --models tnl-1b --T 32768 --variants ac0-fused --compile model --steps 4 \
    --warmup 2 --tag _s10_tma --out "$OUT" 2>&1 | grep -E "^\| tnl"
fi
if [[ $what == s11a ]]; then
  timeout 500 python3 -m pytest -n 16 -q -p no:cacheprovider tests/kernels/test_chunk_triton.py tests/kernels/test_tuning.py \
    2>&1 | tee "$OUT/gpu_tests_chunk_triton.log" | tail -3
fi
if [[ $what == s11b ]]; then
  timeout 500 python3 benchmarks/bench_train.py --models tnl-0.4b --lengths 32768 --tokens 131072 --steps 3 --warmup 1 \
    --ac auto --compile model --out "$OUT" 2>&1 | grep -E "^\||Error" | tail -4
fi
if [[ $what == s11c ]]; then
  timeout 330 python3 benchmarks/bench_kernel.py --tune base fwdw8 fwdw8r128 fwdblk128w8 fwdw16 dqw8 \
    --shapes 4,16,32768,128 1,16,32768,128 --out "$OUT/kernel_tuning_h200_s11_fwd_launch.md" 2>&1 | grep -E "^\||BEST"
fi
if [[ $what == s14 ]]; then
  timeout 240 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_chunk_triton.py tests/kernels/test_tuning.py \
    -k "walk_step or tma or lookback or fused_dkdv or bad_values" 2>&1 | tail -4
  for spec in "lb --tma --warps 4" "lb --tma --warps 8" "dq --warps 4" "dq --warps 8" "dv --tma --stages 3 --warps 8"; do
    for bt in 64 128; do
      timeout 120 python3 benchmarks/kernel_regs_offline.py --kernels $spec --bt $bt 2>&1 | grep -E "^\| _|Error" | tail -2
    done
  done
  timeout 400 python3 benchmarks/bench_kernel.py --tune base fwdbt128 fwdbt128w8 dqbt128 dqbt128w8 dvfbt128 bt128 bt32 \
    --shapes 4,16,32768,128 2,32,32768,64 --out "$OUT/kernel_tuning_h200_s14_walk_step.md" 2>&1 | grep -E "^\||BEST|Error"
fi
if [[ $what == s12a ]]; then
  timeout 300 python3 benchmarks/bench_train.py --models tnl-1b --lengths 32768 --tokens 32768,65536 --steps 4 --warmup 2 \
    --ac auto --compile model --baseline none --out "$OUT" 2>&1 | grep -E "^\||Error" | tail -4
  timeout 200 python3 benchmarks/profile_train.py --models tnl-1b --T 32768 --B 2 --variants ac0-fused --compile model \
    --steps 4 --warmup 2 --tag _s12_B2 --out "$OUT" 2>&1 | grep -E "^tnl|Error"
fi
if [[ $what == s12b ]]; then
  timeout 300 python3 train.py --config configs/tnl-1b.yaml parallel.sp=1 data.seq_len=32768 data.batch_size=2 \
    data.max_bytes=16000000 model.compile=true model.overrides.activation_checkpointing=none trainer.max_steps=30 \
    trainer.log_every=10 trainer.val_check_interval=null trainer.ckpt_every=0 trainer.out_dir=/tmp/r_1b \
    2>&1 | tee "$OUT/train_py_tnl-1b_T32768_B2_s12.log" | grep -E "^step|done|Error" | tail -4
  timeout 240 python3 benchmarks/bench_train.py --models tnl-1b --lengths 32768 --tokens 65536 --steps 4 --warmup 2 \
    --ac auto --compile model --baseline none --out "$OUT" 2>&1 | grep -E "^\||Error" | tail -3
fi
if [[ $what == s13 ]]; then
  bash "$0" s12b
  timeout 240 python3 train.py --config configs/tnl-1b.yaml parallel.sp=1 data.seq_len=32768 data.batch_size=2 \
    data.max_bytes=16000000 model.compile=true model.overrides.activation_checkpointing=none trainer.max_steps=20 \
    trainer.accumulate_grad_batches=2 trainer.log_every=10 trainer.val_check_interval=null trainer.ckpt_every=0 \
    trainer.out_dir=/tmp/r_1b_acc2 2>&1 | tee "$OUT/train_py_tnl-1b_T32768_B2_acc2_s13.log" | grep -E "^step|done|Error" | tail -4
fi
if [[ $what == s13b ]]; then
  timeout 500 python3 benchmarks/bench_train.py --models tnl-1b --lengths 32768 --tokens 65536,131072,65536,131072 \
    --micro-batch 2 --steps 4 --warmup 2 --ac auto --compile model --baseline none --out "$OUT" 2>&1 \
    | grep -E "^\||Error" | tail -6
fi
if [[ $what == s13c ]]; then
  timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_linear_ce.py 2>&1 \
    | tee "$OUT/gpu_tests_linear_ce_s13c.log" | tail -3
  i=0
  for hg in unfused auto unfused auto; do
    i=$((i + 1))
    timeout 150 python3 benchmarks/profile_train.py --models tnl-1b --T 32768 --B 2 --variants ac0-fused \
      --compile model --steps 4 --warmup 2 --head-gemms $hg --tag _s13c_B2_${i}_$hg --out "$OUT" 2>&1 \
      | grep -E "^tnl|Error" | tail -2
  done
  ls "$OUT"
fi
if [[ $what == s3c ]]; then
  timeout 300 python3 benchmarks/bench_train.py --models tnl-0.4b --lengths 2048,32768,131072 --tokens 131072 \
    --steps 2 --warmup 1 --ac auto --compile model --out "$OUT" 2>&1 | grep -E "^\|" | tail -8
  timeout 280 python3 benchmarks/speed_parity.py --model tnl-0.4b --T 8192 --steps 200 --seeds 0,1,2 --lr 2e-4 \
    --out "$OUT" 2>&1 | tail -14
fi
