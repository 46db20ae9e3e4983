#!/usr/bin/env bash
# Builds the libFuzzer targets (fuzz/, clang with ASan + UBSan) into ./build-fuzz and runs each for SECONDS
# (default 60) on a corpus seeded from the tests' inputs, then every kept crash input once (ctest label fuzz).
# Usage: ./scripts/fuzz.sh [SECONDS]   (docs/fuzzing.md: what the targets check, and the long runs)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
clang=$(command -v clang++-14 || command -v clang++ || true)
[ -n "$clang" ] || { echo "fuzz: clang++ not found (scripts/install-deps.sh installs clang-14)" >&2; exit 1; }
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
if [ ! -f build-fuzz/CMakeCache.txt ]; then
  CC="${clang/clang++/clang}" CXX="$clang" cmake -S . -B build-fuzz "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
    -DMOBA_FUZZ=ON ${CMAKE_ARGS:-}
fi
cmake -B build-fuzz -DMOBA_FUZZ_SECONDS="$seconds" >/dev/null
cmake --build build-fuzz -j "$(nproc)"
cd build-fuzz
ctest --output-on-failure -L fuzz
