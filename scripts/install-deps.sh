#!/usr/bin/env bash
# Installs the Debian packages the build and the tests need, only when something is missing.
# Safe to run repeatedly; uses sudo when not root.
set -euo pipefail

packages=(build-essential cmake pkg-config xz-utils
          libopenmpi-dev openmpi-bin libhdf5-dev libyaml-cpp-dev libgtest-dev
          libsentencepiece-dev sentencepiece liblzma-dev zlib1g-dev
          python3-numpy python3-scipy python3-h5py python3-matplotlib
          clang-14 libclang-rt-14-dev libomp-14-dev)  # clang: the fuzz targets (scripts/fuzz.sh)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "[deps] all Debian packages present"
  exit 0
fi

echo "[deps] installing: ${missing[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "[deps] error: need root or sudo to install ${missing[*]}" >&2; exit 1; }
  SUDO=sudo
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
echo "[deps] done"
