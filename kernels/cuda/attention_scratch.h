// The scratch of the GPU attention ops: what each named buffer holds and how many bytes a call needs (one formula per
// buffer, used both by attention_scratch_sizes and by the launchers that carve the buffers), checked access to a
// buffer, and the query index of a call with q_rows.
// Invariant: a launcher never uses more of a buffer than these formulas give for its call.
#pragma once
#include <algorithm>
#include <cstdint>

#include "kernels/cuda/attention.h"

namespace moba::cuda::attn {

// The padded head dim of the tensor-core tiles: 16, 32, 64 or 128 (extra columns are zero).
inline int padded_head_dim(int D) { return D <= 16 ? 16 : D <= 32 ? 32 : D <= 64 ? 64 : 128; }

// Dense backward: dq accumulation (H, ceil(Nq / 64), 64 * kD) f32, and Delta + lse * log2(e) (2, H, Nq) f32.
inline size_t dense_dq_accum_bytes(int64_t Nq, int H, int D) {
  return static_cast<size_t>(H) * ((Nq + 63) / 64) * 64 * padded_head_dim(D) * sizeof(float);
}
inline size_t dense_row_stats_bytes(int64_t Nq, int H) { return static_cast<size_t>(2 * Nq * H) * sizeof(float); }

// MoBA per-entry buffers (forward partials (D + 1) f32, deterministic dQ parts D f32 per (query row, head, past
// block)) hold N * H * (top_k - 1) entries for a whole call (44 GiB at N = 1M, H = 8, k = 12, D = 128), so the query
// rows run in chunks whose entries fit the settings' budget; buckets stay large (every block is chosen by many rows of
// a chunk). Rows per chunk: a multiple of 64 (whole 64-row tiles), at least 64, at most Nq rounded up to 64.
inline int64_t moba_chunk_rows(int64_t Nq, int H, int top_k, int64_t bytes_per_entry, int64_t budget) {
  const int64_t per_row = std::max<int64_t>(1, int64_t{H} * (top_k - 1) * bytes_per_entry);
  const int64_t fit = budget / per_row / 64 * 64;
  return std::min(std::max<int64_t>(fit, 64), (Nq + 63) / 64 * 64);
}
// MoBA routing: the bf16 block means (ceil(Nk / B), Hkv, D), padded to 256 bytes, then a non-finite flag.
inline size_t moba_block_means_bytes(int64_t Nk, int B, int Hkv, int D) {
  return (static_cast<size_t>((Nk + B - 1) / B) * Hkv * D * 2 + 255) / 256 * 256 + 256;
}

// The buffer's pointer when it holds `bytes`; otherwise an Error naming the buffer and the sizes.
void* scratch(const ScratchBuffer& buffer, const char* name, size_t bytes);
// query_index (Nk + 1) i32: the first query row standing at key row u or later, from a.q_rows, in scratch
// `query_index`; returns it (a.q_rows must be set).
const int32_t* build_query_index(const CudaContext& ctx, const AttentionArgs& a);

}  // namespace moba::cuda::attn
