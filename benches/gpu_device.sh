#!/usr/bin/env bash
# The whole GPU run on a lent machine, with that machine's own torch and triton, inside a fixed
# wall-clock limit: install the package as the issue prescribes (its CUDA module built for the
# machine's architecture), then `benches/gpu.py` with the time that is left. Everything lands
# in OUT_DIR: machine.txt, build.log, gpu.log, gpu-tests.log, RESULTS-gpu.md, results-gpu.json.
#
#   bash benches/gpu_device.sh OUT_DIR [LIMIT_S] [gpu.py arguments...]
#
# LIMIT_S (default 570) bounds the whole script. gpu.py rewrites its report after every step
# and is interrupted (SIGINT) at the limit, so a run cut short still leaves its report.
set -uo pipefail
out=$(realpath -m "${1:?usage: gpu_device.sh OUT_DIR [LIMIT_S] [gpu.py arguments...]}")
limit=${2:-570}
cd "$(dirname "$0")/.."  # the repository root: what pip installs, where gpu.py runs
shift $(( $# >= 2 ? 2 : 1 ))
start=$(date +%s)
python=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

{ date -u; nproc
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  "$python" -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, \
triton.__version__, torch.version.cuda, torch.backends.cudnn.version())"
} > "$out/machine.txt" 2>&1
cat "$out/machine.txt"

# The CUDA module for this machine's GPU only (saves build time); without it the Triton and
# cuDNN paths still run, so a failed CUDA build is reported and the rest goes on.
arch=$("$python" -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')" 2>/dev/null || echo 90)
export MAX_JOBS=${MAX_JOBS:-$(nproc)} MSDNET_OPS_CUDA_ARCHS=${MSDNET_OPS_CUDA_ARCHS:-$arch}
if FORCE_CUDA=1 "$python" -m pip install --no-build-isolation --no-deps . > "$out/build.log" 2>&1; then
  export MSDNET_OPS_EXPECT_CUDA=1
else
  echo "[gpu_device] the CUDA module did not build (build.log); installing without it"
  tail -20 "$out/build.log"
  SKIP_CUDA=1 "$python" -m pip install --no-build-isolation --no-deps . >> "$out/build.log" 2>&1 \
    || { tail -30 "$out/build.log"; exit 1; }
fi
echo "[gpu_device] installed in $(( $(date +%s) - start )) s (CUDA archs $MSDNET_OPS_CUDA_ARCHS)"

left=$(( limit - ($(date +%s) - start) ))
# SIGINT 15 s before the limit, SIGKILL at it: the report of every step done is on disk by then
timeout -s INT -k 15 $(( left - 15 )) "$python" benches/gpu.py --out "$out" --budget-s $(( left - 35 )) "$@" \
  2>&1 | tee "$out/gpu.log"
