#!/usr/bin/env bash
# On the GPU machine: configure and build for sm_90a into build-gpu, then run the GPU tests (ctest label
# "gpu") or the tests matching a regex; $CTEST_EXCLUDE (a regex) leaves tests out. Logs go to $OUT when set.
# Usage: scripts/gpu/check.sh [regex] [targets]
#   scripts/gpu/check.sh                       # all GPU tests
#   scripts/gpu/check.sh 'CudaOps' test_cuda_ops_gpu   # one suite, building only its target
set -euo pipefail
cd "$(dirname "$0")/../.."
regex=${1:-}
targets=${2:-}
out=${OUT:-/tmp}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
source scripts/gpu/build_here.sh
# A failed build fails this script (the first errors are printed), so no run reports green on stale binaries.
gpu_build $targets $( [ -n "$targets" ] && echo moba )
cd build-gpu
set -o pipefail
if [ -n "$regex" ]; then
  ctest --output-on-failure --no-tests=error ${CTEST_EXCLUDE:+-E "$CTEST_EXCLUDE"} -R "$regex" 2>&1 | tee "$out/ctest.log" | tail -40
else
  ctest --output-on-failure --no-tests=error ${CTEST_EXCLUDE:+-E "$CTEST_EXCLUDE"} -L gpu 2>&1 | tee "$out/ctest.log" | tail -40
fi
