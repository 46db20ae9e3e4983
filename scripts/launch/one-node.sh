#!/usr/bin/env bash
# One node, one GPU per rank, NCCL between them:
#   scripts/launch/one-node.sh RECIPE [moba train options...]          # every GPU of this machine
#   GPUS=4 scripts/launch/one-node.sh recipes/... --set parallel.zero=1
# Each rank takes the GPU of its local rank (moba reads it from MPI, not from variables). NVLink multicast stays off
# (NCCL_NVLS_ENABLE=0): this machine's fabric is not set up for it. Stopping: Ctrl-C, or `kill -USR1 <mpirun pid>`
# (forwarded to every rank; exit 0), finishes the step and writes a checkpoint; the same command resumes.
# odls_base_sigkill_timeout gives the ranks time to save after mpirun forwards a SIGTERM/SIGINT (its default, 1 s,
# would kill them mid-save; the previous checkpoint would still load).
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -ge 1 ] || { echo "usage: $0 RECIPE [moba train options...]" >&2; exit 2; }
gpus=${GPUS:-$(nvidia-smi --list-gpus 2>/dev/null | wc -l)}
[ "$gpus" -ge 1 ] || { echo "no GPU found (nvidia-smi); set GPUS, or use backend: cpu with mpirun directly" >&2; exit 1; }
root_flags=()
[ "$(id -u)" -eq 0 ] && root_flags=(--allow-run-as-root)
exec mpirun -np "$gpus" "${root_flags[@]}" --bind-to none --mca odls_base_sigkill_timeout 120 \
  -x NCCL_NVLS_ENABLE=0 -x OMP_NUM_THREADS=4 \
  ./build/moba train "$@"
