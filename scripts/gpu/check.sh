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
# nvcc 13.0 rejects libstdc++ 13's headers in C++20 mode (std::string in common/error.h); the GPU image has
# g++-12 beside its g++ 13 and exports CUDAHOSTCXX, so override that before the first configure.
if [ -x /usr/bin/g++-12 ]; then export CUDAHOSTCXX=/usr/bin/g++-12; fi
if [ ! -f build-gpu/build.ninja ]; then
  cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a -DMOBA_CUDA=ON \
    > "$out/configure.log" 2>&1 || { tail -30 "$out/configure.log"; exit 1; }
fi
# A failed build fails this script (the first errors are printed), so no run reports green on stale binaries.
if ! ninja -C build-gpu $targets $( [ -n "$targets" ] && echo moba ) > "$out/build.log" 2>&1; then
  echo "build failed:"
  grep -E "error|FAILED" "$out/build.log" | head -20
  exit 1
fi
grep -E "warning: " "$out/build.log" | sort -u | head -10 || true
cd build-gpu
set -o pipefail
if [ -n "$regex" ]; then
  ctest --output-on-failure --no-tests=error ${CTEST_EXCLUDE:+-E "$CTEST_EXCLUDE"} -R "$regex" 2>&1 | tee "$out/ctest.log" | tail -40
else
  ctest --output-on-failure --no-tests=error ${CTEST_EXCLUDE:+-E "$CTEST_EXCLUDE"} -L gpu 2>&1 | tee "$out/ctest.log" | tail -40
fi
