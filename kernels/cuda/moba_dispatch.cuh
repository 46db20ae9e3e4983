// The MoBA key-block dispatch (moba_dispatch.cu): a selection (Nq, H, top_k) turned into, per (complete key block,
// kv head) bucket, the list of the query rows that chose the block as a past block, and work items of up to
// kRowsPerChunk rows. The forward's selected-block pass and the backward's dK/dV kernels read it.
// Invariant: no host synchronisation; sizes are bounded up front (rows <= chunk rows * H * (top_k - 1)), so a layer
// can be captured in a CUDA graph. The order of rows inside a bucket is set by atomics (it varies run to run),
// unless the dispatch is built canonical: then every bucket lists its entries in ascending entry id (row order).
#pragma once
#include <cstdint>

#include "kernels/cuda/attention.h"

namespace moba::cuda::attn {

inline constexpr int kRowsPerChunk = 64;  // gathered query rows per work item

// A dispatch covers the query rows i * H + h of the query rows [row_begin, row_end) of one chunk (or of all Nq).
// Layout of its buffer (scratch `dispatch` or `chunk_dispatch`), all int32:
//   count[n_buckets], fill[n_buckets]          entries per bucket (fill: write cursor)
//   offset[n_buckets + 1], chunk_offset[n_buckets + 1]   exclusive scans; chunk_offset[n_buckets] = work items
//   slot_start[n_slots]                         first key row of the complete block of each used slot
//   entries[max_entries]                        row * (top_k - 1) + i: the query row and its selection position
//   items[2 * max_items]                        (bucket, chunk) per work item of kRowsPerChunk rows
// Per-entry buffers of a chunk (partial outputs, dQ parts) are indexed by entry - entry_base.
struct Dispatch {
  int n_slots = 0, n_buckets = 0;
  int64_t max_entries = 0, max_items = 0;
  int64_t entry_base = 0;  // row_begin * H * (top_k - 1): the chunk's first entry
  int32_t* count = nullptr;
  int32_t* fill = nullptr;
  int32_t* offset = nullptr;
  int32_t* chunk_offset = nullptr;
  int32_t* slot_start = nullptr;
  int32_t* entries = nullptr;
  int2* items = nullptr;
};

// Bytes of a dispatch over up to max_rows query rows of a call (top_k >= 2).
size_t dispatch_bytes(int64_t n_keys, int block_size, int H, int Hkv, int top_k, int64_t max_rows);

// Bytes of the canonical order's sort (three (entries) i32 arrays and cub's storage) for up to max_rows query rows.
size_t dispatch_sort_bytes(int64_t n_keys, int block_size, int H, int Hkv, int top_k, int64_t max_rows);

// Builds the dispatch of the query rows [row_begin, row_end) into `buffer` (named `name` in errors) on ctx.stream,
// sized for max_rows rows, so every chunk of a call fits the same buffer; a.top_k >= 2. With sort_scratch (named
// sort_name, holding dispatch_sort_bytes; free for the duration of the build), the buckets are filled by a stable
// sort of (bucket, entry) in entry order instead of atomics: the canonical order the deterministic dK/dV sums need.
Dispatch build_dispatch(const CudaContext& ctx, const ScratchBuffer& buffer, const char* name, const AttentionArgs& a,
                        int64_t row_begin, int64_t row_end, int64_t max_rows,
                        const ScratchBuffer* sort_scratch = nullptr, const char* sort_name = nullptr);

}  // namespace moba::cuda::attn
