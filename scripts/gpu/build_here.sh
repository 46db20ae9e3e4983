#!/usr/bin/env bash
# Sourced by scripts/gpu/{check,bench}.sh on the GPU machine: configure build-gpu once (sm_90a, g++-12 as the CUDA
# host compiler) and build the given ninja targets. Sources whose content changed since the last build there are
# touched first: the working-tree copy that reaches the machine can carry older mtimes than the objects already
# built, and ninja would then keep stale objects.
gpu_build() {
  local out=${OUT:-/tmp}
  # nvcc 13.0 rejects libstdc++ 13's headers in C++20 mode (std::string in common/error.h); the GPU image has
  # g++-12 beside its g++ 13 and exports CUDAHOSTCXX, so override that before the first configure.
  if [ -x /usr/bin/g++-12 ]; then export CUDAHOSTCXX=/usr/bin/g++-12; fi
  if [ ! -f build-gpu/build.ninja ]; then
    cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a -DMOBA_CUDA=ON \
      > "$out/configure.log" 2>&1 || { tail -30 "$out/configure.log"; return 1; }
  fi
  local sums=build-gpu/.sources.md5
  if [ -f "$sums" ]; then
    # md5sum -c exits 1 when any file changed: under the callers' `set -e -o pipefail` that aborted the build
    # (and a caller that went on ran the old binaries), so its status is ignored here.
    { md5sum -c "$sums" 2>/dev/null || true; } | sed -n 's/: FAILED$//p' | xargs -r touch
  else  # objects of unknown origin (or none): rebuild everything once
    find common data kernels model parallel trainer tests -type f -print0 | xargs -0 touch
  fi
  if ! ninja -C build-gpu "$@" > "$out/build.log" 2>&1; then
    echo "build failed:"
    grep -E "error|FAILED" "$out/build.log" | head -20
    return 1
  fi
  find common data kernels model parallel trainer tests -type f \
    \( -name '*.cu' -o -name '*.cuh' -o -name '*.cpp' -o -name '*.h' \) -print0 | xargs -0 md5sum > "$sums"
  grep -E "warning: " "$out/build.log" | sort -u | head -10 || true
}
