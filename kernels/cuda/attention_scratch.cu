// Sizes of the GPU attention scratch for the largest call of a plan, checked access to a buffer, and the query index
// of query subsets (see attention_scratch.h).
#include "kernels/cuda/attention_scratch.h"

#include "common/error.h"
#include "kernels/cuda/moba_dispatch.cuh"

namespace moba::cuda {
namespace attn {
namespace {

// query_index[u] = the first i with q_rows[i] >= u (Nq when none), u in [0, Nk]: a binary search per key row.
__global__ void query_index_kernel(int32_t* __restrict__ query_index, const int32_t* __restrict__ q_rows, int64_t Nq,
                                   int64_t Nk) {
  const int64_t u = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (u > Nk) return;
  int64_t lo = 0, hi = Nq;
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    if (__ldg(q_rows + mid) < u) lo = mid + 1;
    else hi = mid;
  }
  query_index[u] = static_cast<int32_t>(lo);
}

}  // namespace

void* scratch(const ScratchBuffer& buffer, const char* name, size_t bytes) {
  MOBA_CHECK(bytes <= buffer.bytes,
             cat("attention scratch '", name, "' holds ", buffer.bytes, " bytes, this call needs ", bytes),
             "size AttentionCall::scratch with Backend::attention_scratch_sizes for the largest call (rows, block "
             "size, top_k, q_rows); this is a bug in the caller");
  return buffer.ptr;
}

const int32_t* build_query_index(const CudaContext& ctx, const AttentionArgs& a) {
  auto* index = static_cast<int32_t*>(
      scratch(a.scratch.query_index, "query_index", static_cast<size_t>(a.n_keys + 1) * sizeof(int32_t)));
  const int64_t n = a.n_keys + 1;
  query_index_kernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, ctx.stream>>>(index, a.q_rows, a.n_queries,
                                                                                      a.n_keys);
  MOBA_CUDA_CHECK(cudaGetLastError());
  return index;
}

}  // namespace attn

AttentionScratchSizes attention_scratch_sizes(const AttentionScratchShape& s) {
  using namespace attn;
  const int64_t Nq = s.max_queries, Nk = s.max_keys, rows64 = (Nq + 63) / 64 * 64;
  const int H = s.n_heads, Hkv = s.n_kv_heads, D = s.head_dim, B = s.min_block_size;
  const int64_t budget = s.settings.entry_budget_bytes;
  AttentionScratchSizes z;
  z.row_stats = dense_row_stats_bytes(Nq, H);  // the MoBA backward's Delta takes half of it
  z.partials = dense_dq_accum_bytes(Nq, H, D);
  if (s.query_rows) z.query_index = static_cast<size_t>(Nk + 1) * sizeof(int32_t);
  if (s.max_top_k < 1) return z;
  z.partials = std::max(z.partials, static_cast<size_t>(Nq * H * D) * sizeof(float));  // atomic dQ sums
  z.block_means = moba_block_means_bytes(Nk, B, Hkv, D);
  for (int k = 2; k <= s.max_top_k; ++k) {  // the per-entry buffers of every top_k up to the largest
    const int64_t forward_rows = moba_chunk_rows(Nq, H, k, (D + 1) * int64_t{sizeof(float)}, budget);
    const int64_t dq_rows = moba_chunk_rows(Nq, H, k, D * int64_t{sizeof(float)}, budget);
    z.partials = std::max({z.partials, static_cast<size_t>(forward_rows * H * (k - 1) * (D + 1)) * sizeof(float),
                           static_cast<size_t>(dq_rows * H * (k - 1) * D) * sizeof(float)});
    z.dispatch = std::max(z.dispatch, dispatch_bytes(Nk, B, H, Hkv, k, rows64));
    // Deterministic backward: the canonical dispatch's sort borrows `partials` (moba_attention_backward).
    z.partials = std::max(z.partials, dispatch_sort_bytes(Nk, B, H, Hkv, k, rows64));
    if (dq_rows < rows64) z.chunk_dispatch = std::max(z.chunk_dispatch, dispatch_bytes(Nk, B, H, Hkv, k, dq_rows));
  }
  return z;
}

}  // namespace moba::cuda
