#!/usr/bin/env bash
# The device check that decides whether direct launches (msdnet_ops/triton/_direct_launch.py,
# opt-in) become the default, on a lent GPU in one call of about 6 minutes:
#   1. install as the device's own torch/triton allow (`pip install --no-build-isolation --no-deps .`);
#   2. the GPU tests of the Triton kernels, CUDA-graph training and direct launches, with direct
#      launches ON (every repeated launch in them then goes the direct way), while Triton's
#      cache is warmed for the two timed models in the background;
#   3. eager training and inference, ours direct vs ours through Triton's launcher, beside plain
#      (benches/gpu_direct_launch.py).
# Everything lands in OUT_DIR: machine.txt, build.log, tests.log, warm.log, direct-launch.md/json.
#
#   bash benches/gpu_check_direct_launch.sh OUT_DIR
set -uo pipefail
out=$(realpath -m "${1:?usage: gpu_check_direct_launch.sh OUT_DIR}")
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
start=$(date +%s)
stamp() { echo "[t=$(( $(date +%s) - start ))s] $*"; }

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv; nproc
  "$python" -c "import torch, triton; print(torch.__version__, triton.__version__, torch.version.cuda, \
torch.backends.cudnn.version())"; } > "$out/machine.txt" 2>&1
cat "$out/machine.txt"
arch=$("$python" -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')")
MAX_JOBS=$(nproc) MSDNET_OPS_CUDA_ARCHS=$arch FORCE_CUDA=1 timeout 150 \
  "$python" -m pip install --no-build-isolation --no-deps . > "$out/build.log" 2>&1
stamp "install rc=$?"

models=msdnet-cifar100-anytime,densenet-bc100
( timeout 130 "$python" benches/gpu_compile.py --all --with-trials --skip-extension --jobs 6 --archs "$arch" \
    --models $models --dtypes float32 --json "$out/warm.json" > "$out/warm.log" 2>&1
  echo "warm rc=$?" >> "$out/warm.log" ) &
MSDNET_OPS_DIRECT_LAUNCH=1 timeout 200 "$python" -m pytest -n 10 -q -rfE -p no:cacheprovider \
  python_tests/test_direct_launch.py python_tests/test_triton_kernels.py \
  python_tests/test_triton_conv_activated.py python_tests/test_cuda_graph.py > "$out/tests.log" 2>&1
stamp "tests rc=$?"
tail -25 "$out/tests.log"
wait
tail -2 "$out/warm.log"
stamp warm
timeout 160 "$python" benches/gpu_direct_launch.py --models $models --out "$out" 2>&1 | tee "$out/ab.log" | tail -22
stamp "direct vs Triton rc=$?"
