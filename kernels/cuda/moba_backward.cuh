// Shared pieces of the MoBA backward kernels (moba_backward.cu: mma.sync kernels for any head dim;
// moba_backward_wgmma.cu: the warpgroup-MMA dK/dV kernel for D = 128 on sm_90): the argument block, and the
// key-major work list of a CTA that owns a tile of keys - which complete blocks overlap the tile (their buckets of
// gathered rows come first) and which causal rows follow.
#pragma once
#include <climits>

#include "kernels/cuda/moba_common.cuh"

namespace moba::cuda::attn {

struct BackwardArgs {
  bf16* dq;               // (Nq, H, D) +=
  void* dk;               // (Nk, Hkv, D) +=, bf16 (or f32 with dkv_f32)
  void* dv;               // (Nk, Hkv, D) +=
  bool dkv_f32;
  float* dq_part;         // deterministic: (entries of the chunk, D) dQ of each selected block, already scaled,
                          // indexed by entry - dispatch.entry_base
  float* dq_acc;          // otherwise: (Nq, H, D) f32 dS K (unscaled) accumulated with atomics by the dK/dV kernel
  float* delta;           // (Nq, H)
  const bf16* dout;       // (Nq, H, D)
  const bf16* q;          // (Nq, H, D)
  const bf16* k;          // (Nk, Hkv, D)
  const bf16* v;          // (Nk, Hkv, D)
  const bf16* out;        // (Nq, H, D)
  const float* lse;       // (Nq, H) natural log
  const int32_t* selected;     // (Nq, H, top_k)
  const int32_t* cu_seqlens;   // (S + 1)
  const int32_t* q_rows;       // (Nq) key row of each query row, or nullptr (row i at key row i)
  const int32_t* query_index;  // (Nk + 1) first query row at or after each key row, or nullptr
  Dispatch dispatch;      // dK/dV: of all rows; deterministic dQ passes: of the chunk being processed
  int n_segments;
  int64_t Nq, Nk;
  int H, Hkv, D, B, top_k;
  float scale;            // softmax scale
  float scale_log2;       // softmax scale * log2(e)
  int tile_offset;        // deterministic current-block dQ pass: the chunk's first 64-row tile
};

// The row tiles of a key-major CTA that owns keys [key_begin, key_end) of kv head `kv_head`, in this order:
//  - selected: for each complete block overlapping the keys that some row chose, the rows of its bucket in tiles of
//    kRows (a row sees every key of that block and no other);
//  - causal: the query rows standing at key rows [key_begin, row_end) (local rows [causal_begin, causal_end)), of
//    each query head of the group, in tiles of kRows (the row at key row t sees key u iff u <= t < end of u's block).
// Lives in shared memory; build() is called by warp 0, then a __syncthreads makes it visible.
template <int kKeys, int kRows>
struct KeyTileWork {
  int row_end, n_sel, n_selected_tiles;
  int causal_begin, causal_end;  // query rows of the causal part
  int sel_start[kKeys], sel_first[kKeys], sel_rows[kKeys];  // selected blocks: first token, first entry, rows
  int sel_tile0[kKeys + 1];                                  // their first row tile

  __device__ void build(const BackwardArgs& a, int key_begin, int key_end, int kv_head, int lane) {
    const int past_slots = a.top_k - 1;
    int end = 0, n = 0;
#pragma unroll
    for (int round = 0; round < kKeys / 32; ++round) {
      const int i = round * 32 + lane, key = key_begin + i;
      bool has = false;
      int start = 0, first = 0, rows = 0;
      if (key < key_end) {
        const TokenBlock tb = token_block(a.cu_seqlens, a.n_segments, key, a.B);
        end = max(end, static_cast<int>(min(tb.block_start + a.B, tb.segment_end)));
        start = static_cast<int>(tb.block_start);
        // The block's first key in this tile, a complete block, and chosen by some row.
        if (past_slots > 0 && (i == 0 || key == start) && tb.block_start + a.B <= tb.segment_end) {
          const int bucket = static_cast<int>((tb.block_start / a.B) * a.Hkv + kv_head);
          rows = a.dispatch.count[bucket];
          first = a.dispatch.offset[bucket];
          has = rows > 0;
        }
      }
      const unsigned ballot = __ballot_sync(0xFFFFFFFFu, has);
      if (has) {
        const int pos = n + __popc(ballot & ((1u << lane) - 1u));
        sel_start[pos] = start;
        sel_first[pos] = first;
        sel_rows[pos] = rows;
      }
      n += __popc(ballot);
    }
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) end = max(end, __shfl_xor_sync(0xFFFFFFFFu, end, d));
    __syncwarp();
    if (lane == 0) {
      row_end = end;
      causal_begin = first_query_at(a.query_index, key_begin);
      causal_end = max(causal_begin, first_query_at(a.query_index, end));
      n_sel = n;
      int tiles = 0;
      for (int b = 0; b < n; ++b) {
        sel_tile0[b] = tiles;
        tiles += (sel_rows[b] + kRows - 1) / kRows;
      }
      sel_tile0[n] = tiles;
      n_selected_tiles = tiles;
    }
  }

  // The selected block of row tile `tile` (an index into sel_*), or -1 for a causal tile.
  __device__ int selected_block(int tile) const {
    if (tile >= n_selected_tiles) return -1;
    int b = 0;
    while (b + 1 < n_sel && sel_tile0[b + 1] <= tile) ++b;
    return b;
  }

  // Where row tile `tile` takes its rows, worked out once per tile: a selected tile reads n entries of its bucket,
  // a causal tile takes tokens t0 .. t0 + n - 1 of head h. Reads shared memory only.
  struct Source {
    const int32_t* entries;  // selected: the tile's first entry; causal: nullptr
    int n, h, t0;
  };
  __device__ Source source(const BackwardArgs& a, int tile, int kv_head) const {
    Source src{nullptr, 0, 0, 0};
    const int b = selected_block(tile);
    if (b >= 0) {
      const int first = (tile - sel_tile0[b]) * kRows;
      src.entries = a.dispatch.entries + sel_first[b] + first;
      src.n = min(kRows, sel_rows[b] - first);
    } else {
      const int causal = tile - n_selected_tiles;
      const int tiles_per_head = causal_tiles_per_head();
      src.h = kv_head * (a.H / a.Hkv) + causal / tiles_per_head;
      src.t0 = causal_begin + (causal % tiles_per_head) * kRows;
      src.n = min(kRows, causal_end - src.t0);
    }
    return src;
  }
  __device__ int causal_tiles_per_head() const { return (causal_end - causal_begin + kRows - 1) / kRows; }
  __device__ int n_tiles(const BackwardArgs& a) const {
    return n_selected_tiles + causal_tiles_per_head() * (a.H / a.Hkv);
  }
};

// Query row i * H + h of row r of a tile, or -1 past its rows.
template <class Source>
__device__ __forceinline__ int source_row(const BackwardArgs& a, const Source& src, int r) {
  if (r >= src.n) return -1;
  return src.entries != nullptr ? src.entries[r] / (a.top_k - 1) : (src.t0 + r) * a.H + src.h;
}

// The rows of a tile that see key `key` (its block starts at key_block_start, and causal rows end at key_row_end;
// INT_MIN for a key past N): tokens [lo, hi). Causal tile: [key, key_row_end); selected tile of the block starting at
// sel_start: every row when the key lies in that block, else none. One formula for both kinds of tile, so the
// per-element mask does not branch on the tile kind.
__device__ __forceinline__ int2 visible_rows(int key, int key_block_start, int key_row_end, bool selected,
                                             int sel_start) {
  if (!selected) return make_int2(key, key_row_end);
  return key_block_start == sel_start ? make_int2(0, INT_MAX) : make_int2(INT_MAX, INT_MIN);
}

// The key row the query row `row` (= i * H + h) stands at, -1 for no row: what the masks compare keys with.
__device__ __forceinline__ int row_key_row(const BackwardArgs& a, int row) {
  return row >= 0 ? query_key_row(a.q_rows, row / a.H) : -1;
}

// Launches the warpgroup-MMA dK/dV kernel (D = 128 padded, sm_90a): dk, dv += and, with fused_dq, dq_acc += dS K
// for every row (float atomics). Defined in moba_backward_wgmma.cu.
void launch_dkv_wgmma(const BackwardArgs& a, cudaStream_t stream, bool fused_dq);

}  // namespace moba::cuda::attn
