#!/usr/bin/env bash
# Configures and builds into ./build (Release). CUDA is compiled automatically when nvcc is found
# (/usr/local/cuda/bin/nvcc or on PATH); pass -DMOBA_CUDA=OFF in CMAKE_ARGS to skip it.
set -euo pipefail
cd "$(dirname "$0")/.."
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
if [ ! -f build/CMakeCache.txt ]; then
  cmake -S . -B build "${generator[@]}" -DCMAKE_BUILD_TYPE=Release ${CMAKE_ARGS:-}
fi
cmake --build build -j "$(nproc)"
