#!/usr/bin/env bash
# One batched single-GPU session: correctness first, then timings; results under $OUT (default benchmarks/results).
#   bash benchmarks/gpu_session.sh [tests|kernel|train|all]        (default all; ~25 min on an H100 for all)
# Needs: torch + triton on a CUDA GPU; fla-core / lightning-attn for the peer columns; pytest-xdist for -n.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
what=${1:-all}
gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace('NVIDIA ', '').split()[0].lower())") || exit 1
mkdir -p "$OUT"
if [[ $what == tests || $what == all ]]; then
  echo "== GPU tests (Triton kernels on CUDA, 1M-token numerics)"
  python3 -m pytest -n 12 -q -p no:cacheprovider tests/kernels/test_chunk_triton.py tests/kernels/test_numerics.py \
    2>&1 | tee "$OUT/gpu_tests_$gpu.log" | tail -5
  echo "== train.py on the GPU (debug config)"
  python3 train.py --config configs/debug.yaml trainer.accelerator=gpu trainer.max_steps=20 \
    trainer.out_dir=/tmp/seqpar_gpu_smoke 2>&1 | tail -2
fi
if [[ $what == kernel || $what == all ]]; then
  echo "== operator benchmark vs SDPA / fla / lightning-attn"
  python3 benchmarks/bench_kernel.py --out "$OUT/kernel_$gpu.md" --budget-s 400 | grep "^| [0-9]"
fi
if [[ $what == train || $what == all ]]; then
  echo "== training throughput vs length (eager, compiled, LLaMA-SDPA) and the longest sequence"
  python3 benchmarks/bench_train.py --models tnl-0.4b --tokens 131072 --steps 3 --warmup 2 --compile both --out "$OUT"
  python3 benchmarks/bench_train.py --longest --models tnl-0.4b --out "$OUT"
  python3 benchmarks/bench_train.py --longest --offload --models tnl-0.4b --max-tokens 1048576 --out "$OUT"
fi
