// Shared pieces of the MoBA CUDA kernels (moba_routing.cu, moba_forward.cu, moba_backward*.cu): block geometry of a
// key row, the slot of a complete block, the key-block dispatch, the query rows a forward / dQ CTA owns, and the
// launchers' shape checks. Device primitives (MMA, tiles, online softmax, documents) are attention_primitives.cuh's.
// Invariant: a "slot" is floor(block_start / B) of a COMPLETE block; distinct complete blocks (disjoint, B key rows
// long) always get distinct slots, so (slot, kv head) indexes buckets without a prefix sum over documents.
#pragma once
#include <cuda_bf16.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "kernels/cuda/attention.h"
#include "kernels/cuda/attention_primitives.cuh"
#include "kernels/cuda/moba_dispatch.cuh"

namespace moba::cuda::attn {

inline constexpr int kKeyTile = 64;  // keys per tile in the mma.sync attention kernels

// Where key row t sits: its document's bounds and its block's start.
struct TokenBlock {
  int64_t segment_start, segment_end, block_start;
};
__device__ __forceinline__ TokenBlock token_block(const int32_t* cu_seqlens, int n_segments, int64_t t, int B) {
  const int s = segment_of(cu_seqlens, n_segments, t);
  const int64_t start = cu_seqlens[s];
  return {start, cu_seqlens[s + 1], start + (t - start) / B * B};
}

// The first key row of the complete block whose slot is `slot` (the block starting in [slot * B, slot * B + B)), or
// -1 when no complete block starts there: the first block boundary at or after the window start of the document
// holding it, or the first block of a later document starting inside the window.
__device__ __forceinline__ int64_t slot_block_start(const int32_t* cu_seqlens, int n_segments, int64_t slot, int B) {
  const int64_t window = slot * B;
  for (int s = segment_of(cu_seqlens, n_segments, window); s < n_segments && cu_seqlens[s] < window + B; ++s) {
    const int64_t seg = cu_seqlens[s];
    const int64_t first = seg >= window ? seg : seg + (window - seg + B - 1) / B * B;
    if (first < window + B && first + B <= cu_seqlens[s + 1]) return first;
  }
  return -1;
}

// Query row i (head h) of a current-block pass: its row index i * H + h, the keys it sees [block start, t + 1) (t its
// key row) and its current block's index inside its document; row -1 and an empty range past row_end.
struct CurrentBlockRow {
  int row = -1, lo = INT_MAX, hi = INT_MIN, current = 0;
};
template <typename Args>
__device__ __forceinline__ CurrentBlockRow current_block_row(const Args& a, int64_t i, int h, int64_t row_end) {
  CurrentBlockRow r;
  if (i >= row_end) return r;
  const int t = query_key_row(a.q_rows, i);
  const TokenBlock tb = token_block(a.cu_seqlens, a.n_segments, t, a.B);
  r.row = static_cast<int>(i * a.H + h);
  r.lo = static_cast<int>(tb.block_start);
  r.hi = t + 1;
  r.current = static_cast<int>((tb.block_start - tb.segment_start) / a.B);
  return r;
}

// Checks shared by the launchers (throw moba::Error with the caller's name).
void check_moba_shape(const char* caller, const AttentionArgs& a);

// ---- which query rows a forward or dQ CTA owns ----------------------------------------------------------------------
// SELECTED: blockIdx.x is a dispatch work item: up to kRowsPerChunk gathered rows of one bucket (kv head, complete
//   block); every row sees the whole block; s_aux[r] = the row's partial entry (row * (top_k - 1) + slot).
// Otherwise: blockIdx.x + a.tile_offset is a 64-row tile of query rows of head blockIdx.y; the row at key row t sees
//   keys [block_start(t), t]; s_aux[r] = the row's current block index inside its document.
// Fills s_row (i * H + h, or -1), s_aux, s_lo/s_hi (each row's visible keys) and s_range (their union), sets
// *kv_head, and returns false when this CTA has no work item (uniform over the CTA: the caller returns).
// Called by all 128 threads; ends with __syncthreads().
template <bool SELECTED, typename Args>
__device__ bool tile_rows(const Args& a, int* s_row, int* s_aux, int* s_lo, int* s_hi, int* s_range, int* kv_head) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  if constexpr (SELECTED) {
    if (static_cast<int>(blockIdx.x) >= a.dispatch.chunk_offset[a.dispatch.n_buckets]) return false;
    const int2 item = a.dispatch.items[blockIdx.x];
    const int bucket = item.x;
    *kv_head = bucket % a.Hkv;
    const int start = a.dispatch.slot_start[bucket / a.Hkv];
    const int n_rows = min(kRowsPerChunk, a.dispatch.count[bucket] - item.y * kRowsPerChunk);
    if (tid < 64) {
      int row = -1, entry = -1;
      if (tid < n_rows) {
        entry = a.dispatch.entries[a.dispatch.offset[bucket] + item.y * kRowsPerChunk + tid];
        row = entry / (a.top_k - 1);
      }
      s_row[tid] = row;
      s_aux[tid] = entry;
      s_lo[tid] = start;
      s_hi[tid] = start + a.B;
    }
    if (tid == 0) {
      s_range[0] = start;
      s_range[1] = start + a.B;
    }
  } else {
    const int h = blockIdx.y;
    *kv_head = h / (a.H / a.Hkv);
    if (tid < 64) {
      const CurrentBlockRow r =
          current_block_row(a, (static_cast<int64_t>(blockIdx.x) + a.tile_offset) * 64 + tid, h, a.Nq);
      s_row[tid] = r.row;
      s_lo[tid] = r.lo;
      s_hi[tid] = r.hi;
      s_aux[tid] = r.current;
    }
    __syncthreads();
    if (warp == 0) {  // union of the 64 rows' key ranges
      int lo = min(s_lo[lane], s_lo[lane + 32]), hi = max(s_hi[lane], s_hi[lane + 32]);
#pragma unroll
      for (int d = 16; d > 0; d >>= 1) {
        lo = min(lo, __shfl_xor_sync(0xFFFFFFFFu, lo, d));
        hi = max(hi, __shfl_xor_sync(0xFFFFFFFFu, hi, d));
      }
      if (lane == 0) {
        s_range[0] = lo;
        s_range[1] = hi;
      }
    }
  }
  __syncthreads();
  return true;
}

}  // namespace moba::cuda::attn
