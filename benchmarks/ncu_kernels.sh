#!/usr/bin/env bash
# Hardware counters (Nsight Compute) of the Triton LA2 kernels of one fwd+bwd step, one report per path:
#   bash benchmarks/ncu_kernels.sh [B,H,T,D] [outdir] [paths]
# (defaults 4,16,32768,128, benchmarks/results, "default"; paths from: default scan lookback, i.e.
# LaunchConfig.lookback = "fwd" / False / True via SEQPAR_LA_CONFIG). Writes ncu_<path>_<shape>.txt (details: speed of light,
# occupancy, launch stats, warp states, memory workload incl. register spills). Clocks are left alone.
set -uo pipefail
cd "$(dirname "$0")/.."
shape=${1:-4,16,32768,128}
out=${2:-benchmarks/results}
paths=${3:-default}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
step='
import sys, torch
from seqpar import lightning_attn
B, H, T, D = (int(x) for x in sys.argv[1].split(","))
q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
s = torch.linspace(0.01, 0.5, H, device="cuda")
do = torch.randn_like(v)
for _ in range(2):
    lightning_attn(q, k, v, s, backend="triton")[0].backward(do)
torch.cuda.synchronize()
'
for path in $paths; do
  case $path in
    default) cfg='{"lookback": "fwd"}'; n=5 ;;
    scan) cfg='{"lookback": false}'; n=7 ;;
    lookback) cfg='{"lookback": true}'; n=4 ;;
    *) echo "unknown path $path (default, scan, lookback)"; exit 2 ;;
  esac
  SEQPAR_LA_CONFIG=$cfg ncu --clock-control none -k 'regex:_seg_state|_scan_kernel|_fwd_out|_bwd_|_lb_walk' \
    --launch-skip $n --launch-count $n --section SpeedOfLight --section Occupancy --section LaunchStats \
    --section WarpStateStats --section MemoryWorkloadAnalysis \
    python3 -c "$step" "$shape" > "$out/ncu_${path}_${shape//,/_}.txt" 2>&1
  echo "== $path: $out/ncu_${path}_${shape//,/_}.txt"
  grep -E '^  _|Duration|DRAM Throughput|Memory Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Block Limit (Registers|Shared)|Spilling Requests |Compute \(SM\) Throughput|L2 Hit Rate |Warp Cycles Per Issued' \
    "$out/ncu_${path}_${shape//,/_}.txt" | sed 's/  */ /g'
done
