#!/usr/bin/env bash
# Sourced by scripts/gpu/*.sh: `linux_slice MOBA DIR` prepares DIR/train.h5 and DIR/val.h5 from the first ~40 MB of
# $MOBA_SHARED_DATA/linux-6.1-core.jsonl.xz. The GPU machine has no liblzma-dev, so its moba cannot read .xz
# (`moba prep` says so and stops): scripts/xz_prefix.py decompresses the slice to plain JSON Lines first. Returns 1
# with a message when the corpus is absent.
linux_slice() {
  local moba=$1 dir=$2 corpus=${MOBA_SHARED_DATA:-../shared/data}/linux-6.1-core.jsonl.xz
  [ -f "$corpus" ] || { echo "no Linux corpus at $corpus (carry it, see the header of scripts/gpu/attention.sh)"; return 1; }
  mkdir -p "$dir"
  python3 scripts/xz_prefix.py "$corpus" "$dir/linux-slice.jsonl" 56e6  # prep reads 40 MB of text
  "$moba" prep "$dir/linux-slice.jsonl" --out "$dir" --max-bytes 40000000 --seed 3 > "$dir/prep.log" 2>&1 ||
    { echo "prep failed:"; tail -5 "$dir/prep.log"; return 1; }
}
