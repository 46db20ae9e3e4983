#!/usr/bin/env bash
# Installs missing dependencies, builds (Release, CUDA compiled when nvcc exists), and runs every test.
# GPU tests (ctest label "gpu") skip themselves when no GPU is present. Without ctest args, the fuzz targets then
# run for a minute each (scripts/fuzz.sh: a separate clang build). Usage: ./scripts/test.sh [ctest args]
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
./scripts/build.sh
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1  # CI runs as root
cd build
ctest --output-on-failure -j "$(nproc)" "$@"
cd ..
if [ $# -eq 0 ]; then
  ./scripts/fuzz.sh 60
fi
