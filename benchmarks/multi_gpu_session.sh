#!/usr/bin/env bash
# The multi-GPU runs (issues 3, 6, 7), batched: NCCL correctness first, then SP op scaling, then training.
#   bash benchmarks/multi_gpu_session.sh            # uses every visible GPU (2 on nvidia-h200-x2, 8 on -x8)
# Needs: the lasp package for the LASP column of bench_sp.py (pip download --no-deps lasp==0.0.1), omegaconf.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
P=$(python3 -c "import torch; print(torch.cuda.device_count())")
(( P >= 2 )) || { echo "needs >= 2 GPUs, found $P"; exit 1; }
mkdir -p "$OUT"
echo "== NCCL tests of the SP op (P=2; fp32 and bf16)"
python3 -m pytest -q -p no:cacheprovider tests/distributed -m gpu 2>&1 | tail -3
echo "== SP op weak scaling: P = 1, 2, 4, 8 (up to $P), 32K and 128K tokens per GPU"
for p in 1 2 4 8; do
  (( p <= P )) || break
  torchrun --nproc_per_node "$p" benchmarks/bench_sp.py --tokens 32768 131072 --out "$OUT/sp_p${p}.md" 2>&1 | tail -12
done
echo "== loss parity SP=1 vs SP=2, 50 steps of tnl-0.4b"
python3 benchmarks/loss_parity.py --sp 2 --steps 50 --tag gpu_tnl04b --out "$OUT" -- \
  --config configs/tnl-0.4b.yaml data.seq_len=16384
echo "== training throughput: SP=$P vs SP=1 at the same tokens per GPU (32K per GPU)"
python3 train.py --config configs/tnl-0.4b.yaml parallel.sp=1 trainer.devices=1 data.seq_len=32768 \
  trainer.max_steps=30 trainer.val_check_interval=null trainer.out_dir=/tmp/tp_sp1 2>&1 | tail -1
torchrun --nproc_per_node "$P" train.py --config configs/tnl-0.4b.yaml parallel.sp="$P" data.seq_len=$((32768 * P)) \
  trainer.max_steps=30 trainer.val_check_interval=null trainer.out_dir=/tmp/tp_sp$P 2>&1 | tail -1
for d in /tmp/tp_sp1 /tmp/tp_sp$P; do echo "$d"; tail -2 "$d"/logs/version_0/metrics.csv; done
if (( P >= 8 )); then
  echo "== eight GPUs: tnl-1b at SP=8 and dp 2 x sp 4"
  torchrun --nproc_per_node 8 train.py --config configs/tnl-1b.yaml trainer.max_steps=100 parallel.sp=8 \
    trainer.out_dir=/tmp/tnl1b_sp8 2>&1 | tail -1
  torchrun --nproc_per_node 8 train.py --config configs/tnl-1b.yaml trainer.max_steps=100 parallel.sp=4 \
    trainer.out_dir=/tmp/tnl1b_sp4 2>&1 | tail -1
fi
for offload in false true; do
  echo "== longest tnl-0.4b sequence at SP=$P (activation checkpointing, offload=$offload), doubling until it fails"
  for T in 524288 1048576 2097152 4194304 8388608; do
    run=/tmp/longest_${offload}_$T
    if torchrun --nproc_per_node "$P" train.py --config configs/tnl-0.4b.yaml parallel.sp="$P" data.seq_len=$T \
        model.overrides.activation_checkpointing=true model.overrides.activation_offload=$offload trainer.max_steps=2 \
        trainer.log_every=1 trainer.val_check_interval=null trainer.ckpt_every=0 trainer.out_dir=$run > $run.log 2>&1; then
      echo "T=$T trains at SP=$P: $(tail -1 $run/logs/version_0/metrics.csv)"
    else
      echo "T=$T fails at SP=$P: $(grep -m1 -o 'OutOfMemoryError.*' $run.log | head -c 200)"; break
    fi
  done
done
if (( P >= 8 )); then
  echo "== FSDP2 (issue 16): memory plan, then tnl-15b with fsdp at SP 8 (parameters sharded over all 8 GPUs)"
  python3 benchmarks/memory_plan.py --models tnl-15b --worlds 8 --tokens 32768
  torchrun --nproc_per_node 8 train.py --config configs/tnl-15b.yaml parallel.sp=8 parallel.fsdp=true \
    data.seq_len=262144 model.overrides.activation_checkpointing=true trainer.max_steps=10 trainer.log_every=1 \
    trainer.val_check_interval=null trainer.ckpt_every=0 trainer.out_dir=/tmp/tnl15b_fsdp_sp8 2>&1 | tail -2
  tail -3 /tmp/tnl15b_fsdp_sp8/logs/version_0/metrics.csv
  echo "== FSDP2 weak scaling: tnl-3b, 32K tokens per GPU, fsdp on, P = 1, 2, 4, 8 (dp 1 x sp P)"
  for p in 1 2 4 8; do
    torchrun --nproc_per_node "$p" train.py --config configs/tnl-3b.yaml parallel.sp="$p" parallel.fsdp=true \
      data.seq_len=$((32768 * p)) trainer.max_steps=20 trainer.log_every=1 trainer.val_check_interval=null \
      trainer.ckpt_every=0 trainer.out_dir=/tmp/tnl3b_fsdp_p$p 2>&1 | tail -1
    tail -1 /tmp/tnl3b_fsdp_p$p/logs/version_0/metrics.csv
  done
  echo "== FSDP2 dp 2 x sp 4 vs DDP at the same layout (tnl-1b)"
  for f in false true; do
    torchrun --nproc_per_node 8 train.py --config configs/tnl-1b.yaml parallel.sp=4 parallel.fsdp=$f \
      trainer.max_steps=30 trainer.log_every=1 trainer.val_check_interval=null trainer.ckpt_every=0 \
      trainer.out_dir=/tmp/tnl1b_sp4_fsdp_$f 2>&1 | tail -1
    tail -1 /tmp/tnl1b_sp4_fsdp_$f/logs/version_0/metrics.csv
  done
fi
