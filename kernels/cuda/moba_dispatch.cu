// The MoBA key-block dispatch (see moba_dispatch.cuh): count per (slot, kv head) bucket with shared-memory
// histograms, one exclusive scan, fill, and work items of kRowsPerChunk rows. "Slot" = floor(block_start / B) of a
// complete block, unique per block, so no per-document prefix sums.
// Invariant: count, offsets and items are exact (integer atomics); the atomic fill leaves the order of entries inside
// a bucket to the run, the canonical fill (a stable radix sort of (bucket, entry) pairs listed in entry order) puts
// them in ascending entry id, so kernels that sum over a bucket's rows (dK/dV) are bitwise reproducible over it.
#include <algorithm>

#include "common/error.h"
#include "kernels/cuda/attention_scratch.h"
#include "kernels/cuda/moba_common.cuh"
#include "kernels/cuda/sort.cuh"

namespace moba::cuda::attn {
namespace {

// Calls visit(block start, bucket, entry) for every past block of query row `row` = i * H + h (its selected entries
// before the current block); entry = row * (top_k - 1) + position in the row.
template <typename Visit>
__device__ __forceinline__ void for_each_past_block(const int32_t* selected, const int32_t* cu_seqlens, int n_segments,
                                                    const int32_t* q_rows, int64_t row, int H, int Hkv, int B,
                                                    int top_k, Visit&& visit) {
  const int64_t t = query_key_row(q_rows, row / H);
  const int h = static_cast<int>(row % H);
  const TokenBlock tb = token_block(cu_seqlens, n_segments, t, B);
  const int64_t current = (tb.block_start - tb.segment_start) / B;
  const int past_slots = top_k - 1;
  for (int i = 0; i < past_slots; ++i) {
    const int32_t b = selected[row * top_k + i];
    if (b < 0 || b >= current) break;  // rows are ascending: the current block ends the past ones
    const int64_t start = tb.segment_start + static_cast<int64_t>(b) * B;
    visit(start, (start / B) * Hkv + h / (H / Hkv), row * past_slots + i);
  }
}

// Counting sort of the past selections into buckets. With `local` (n_buckets small enough), each CTA first builds
// a histogram of its rows in shared memory and touches global counters once per non-empty bucket: the selections
// of a whole layer land on only N / B * Hkv counters, and per-selection global atomics serialise on them.
__global__ void __launch_bounds__(256) dispatch_count_kernel(int32_t* __restrict__ count,
                                                             const int32_t* __restrict__ selected,
                                                             const int32_t* __restrict__ cu_seqlens, int n_segments,
                                                             const int32_t* __restrict__ q_rows, int64_t row_begin, int64_t row_end, int H, int Hkv, int B,
                                                             int top_k, int n_buckets, bool local) {
  extern __shared__ int hist[];  // (n_buckets) when local
  if (local) {
    for (int i = threadIdx.x; i < n_buckets; i += blockDim.x) hist[i] = 0;
    __syncthreads();
  }
  for (int64_t row = row_begin + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; row < row_end;
       row += static_cast<int64_t>(gridDim.x) * blockDim.x)
    for_each_past_block(selected, cu_seqlens, n_segments, q_rows, row, H, Hkv, B, top_k, [&](int64_t, int64_t bucket, int64_t) {
      atomicAdd(local ? &hist[bucket] : &count[bucket], 1);
    });
  if (local) {
    __syncthreads();
    for (int i = threadIdx.x; i < n_buckets; i += blockDim.x)
      if (hist[i]) atomicAdd(&count[i], hist[i]);
  }
}

// Same traversal as the count; with `local`, the CTA reserves one contiguous range per bucket and places its rows
// through shared-memory cursors.
__global__ void __launch_bounds__(256) dispatch_fill_kernel(int32_t* __restrict__ entries, int32_t* __restrict__ fill,
                                                            const int32_t* __restrict__ offset,
                                                            const int32_t* __restrict__ selected,
                                                            const int32_t* __restrict__ cu_seqlens, int n_segments,
                                                            const int32_t* __restrict__ q_rows, int64_t row_begin, int64_t row_end, int H, int Hkv, int B,
                                                            int top_k, int n_buckets, bool local) {
  extern __shared__ int hist[];  // (2, n_buckets) when local: counts / cursors, then range starts
  int* base = hist + n_buckets;
  const int64_t first = row_begin + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  if (!local) {
    for (int64_t row = first; row < row_end; row += stride)
      for_each_past_block(selected, cu_seqlens, n_segments, q_rows, row, H, Hkv, B, top_k,
                          [&](int64_t, int64_t bucket, int64_t entry) {
                            entries[offset[bucket] + atomicAdd(&fill[bucket], 1)] = static_cast<int32_t>(entry);
                          });
    return;
  }
  for (int i = threadIdx.x; i < n_buckets; i += blockDim.x) hist[i] = 0;
  __syncthreads();
  for (int64_t row = first; row < row_end; row += stride)
    for_each_past_block(selected, cu_seqlens, n_segments, q_rows, row, H, Hkv, B, top_k,
                        [&](int64_t, int64_t bucket, int64_t) { atomicAdd(&hist[bucket], 1); });
  __syncthreads();
  for (int i = threadIdx.x; i < n_buckets; i += blockDim.x) {
    base[i] = hist[i] ? offset[i] + atomicAdd(&fill[i], hist[i]) : 0;
    hist[i] = 0;
  }
  __syncthreads();
  for (int64_t row = first; row < row_end; row += stride)
    for_each_past_block(selected, cu_seqlens, n_segments, q_rows, row, H, Hkv, B, top_k,
                        [&](int64_t, int64_t bucket, int64_t entry) {
                          entries[base[bucket] + atomicAdd(&hist[bucket], 1)] = static_cast<int32_t>(entry);
                        });
}

// The canonical fill's sort input, one thread per query row: for each of its past_slots entries (local index
// entry - entry_base) the key = its bucket, or n_buckets past the row's past blocks (sorted behind every bucket),
// and the value = the entry.
__global__ void __launch_bounds__(256) dispatch_keys_kernel(int32_t* __restrict__ keys, int32_t* __restrict__ values,
                                                            const int32_t* __restrict__ selected,
                                                            const int32_t* __restrict__ cu_seqlens, int n_segments,
                                                            const int32_t* __restrict__ q_rows, int64_t row_begin,
                                                            int64_t row_end, int H, int Hkv, int B, int top_k,
                                                            int n_buckets, int64_t entry_base) {
  const int64_t row = row_begin + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= row_end) return;
  const int past_slots = top_k - 1;
  for (int i = 0; i < past_slots; ++i) {
    const int64_t entry = row * past_slots + i;
    keys[entry - entry_base] = n_buckets;
    values[entry - entry_base] = static_cast<int32_t>(entry);
  }
  for_each_past_block(selected, cu_seqlens, n_segments, q_rows, row, H, Hkv, B, top_k,
                      [&](int64_t, int64_t bucket, int64_t entry) {
                        keys[entry - entry_base] = static_cast<int32_t>(bucket);
                      });
}

// slot_start[slot] = first token of the slot's complete block (-1 when none).
__global__ void dispatch_slot_start_kernel(int32_t* __restrict__ slot_start, const int32_t* __restrict__ cu_seqlens,
                                           int n_segments, int n_slots, int B) {
  const int slot = blockIdx.x * blockDim.x + threadIdx.x;
  if (slot < n_slots) slot_start[slot] = static_cast<int32_t>(slot_block_start(cu_seqlens, n_segments, slot, B));
}

// One CTA of 1024 threads: offset = exclusive scan of count, chunk_offset = exclusive scan of
// ceil(count / kRowsPerChunk); both get their total at index n.
__global__ void __launch_bounds__(1024) dispatch_scan_kernel(int32_t* __restrict__ offset,
                                                             int32_t* __restrict__ chunk_offset,
                                                             const int32_t* __restrict__ count, int n) {
  __shared__ int warp_rows[32], warp_chunks[32];
  __shared__ int carry[2];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  if (tid == 0) carry[0] = carry[1] = 0;
  __syncthreads();
  for (int base = 0; base < n; base += 1024) {
    const int i = base + tid;
    const int rows = i < n ? count[i] : 0;
    const int chunks = (rows + kRowsPerChunk - 1) / kRowsPerChunk;
    int inc_rows = rows, inc_chunks = chunks;  // inclusive scans within the warp
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int r = __shfl_up_sync(0xFFFFFFFFu, inc_rows, d);
      const int c = __shfl_up_sync(0xFFFFFFFFu, inc_chunks, d);
      if (lane >= d) {
        inc_rows += r;
        inc_chunks += c;
      }
    }
    if (lane == 31) {
      warp_rows[warp] = inc_rows;
      warp_chunks[warp] = inc_chunks;
    }
    __syncthreads();
    if (warp == 0) {
      int wr = warp_rows[lane], wc = warp_chunks[lane];
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        const int r = __shfl_up_sync(0xFFFFFFFFu, wr, d);
        const int c = __shfl_up_sync(0xFFFFFFFFu, wc, d);
        if (lane >= d) {
          wr += r;
          wc += c;
        }
      }
      warp_rows[lane] = wr;  // inclusive over warps
      warp_chunks[lane] = wc;
    }
    __syncthreads();
    const int before_rows = carry[0] + (warp ? warp_rows[warp - 1] : 0);
    const int before_chunks = carry[1] + (warp ? warp_chunks[warp - 1] : 0);
    if (i < n) {
      offset[i] = before_rows + inc_rows - rows;
      chunk_offset[i] = before_chunks + inc_chunks - chunks;
    }
    __syncthreads();
    if (tid == 0) {
      carry[0] += warp_rows[31];
      carry[1] += warp_chunks[31];
    }
    __syncthreads();
  }
  if (tid == 0) {
    offset[n] = carry[0];
    chunk_offset[n] = carry[1];
  }
}

__global__ void dispatch_items_kernel(int2* __restrict__ items, const int32_t* __restrict__ count,
                                      const int32_t* __restrict__ chunk_offset, int n_buckets) {
  const int bucket = blockIdx.x * blockDim.x + threadIdx.x;
  if (bucket >= n_buckets) return;
  const int chunks = (count[bucket] + kRowsPerChunk - 1) / kRowsPerChunk;
  for (int c = 0; c < chunks; ++c) items[chunk_offset[bucket] + c] = make_int2(bucket, c);
}

}  // namespace

size_t dispatch_bytes(int64_t n_keys, int block_size, int H, int Hkv, int top_k, int64_t max_rows) {
  const int64_t n_slots = (n_keys + block_size - 1) / block_size, n_buckets = n_slots * Hkv;
  const int64_t max_entries = max_rows * H * (top_k - 1);
  const int64_t max_items = (max_entries + kRowsPerChunk - 1) / kRowsPerChunk + n_buckets;
  const int64_t words = 4 * n_buckets + 2 + n_slots + max_entries + 2 * max_items + 4;
  return static_cast<size_t>(words) * sizeof(int32_t);
}

namespace {
// The canonical fill's scratch: keys, sorted keys and values, (entries) i32 each, 256-byte aligned, then cub's.
size_t sort_bytes(int64_t entries, int n_buckets) {
  return 3 * aligned_256(static_cast<size_t>(entries) * sizeof(int32_t)) +
         sort_pairs_temp_bytes(entries, sort_key_bits(n_buckets));
}
}  // namespace

size_t dispatch_sort_bytes(int64_t n_keys, int block_size, int H, int Hkv, int top_k, int64_t max_rows) {
  const int64_t n_buckets = (n_keys + block_size - 1) / block_size * Hkv;
  return sort_bytes(max_rows * H * (top_k - 1), static_cast<int>(n_buckets));
}

Dispatch build_dispatch(const CudaContext& ctx, const ScratchBuffer& buffer, const char* name, const AttentionArgs& a,
                        int64_t row_begin, int64_t row_end, int64_t max_rows, const ScratchBuffer* sort_scratch,
                        const char* sort_name) {
  const int H = a.n_heads, Hkv = a.n_kv_heads, B = a.block_size, top_k = a.top_k;
  Dispatch d;
  d.n_slots = static_cast<int>((a.n_keys + B - 1) / B);
  d.n_buckets = d.n_slots * Hkv;
  d.max_entries = max_rows * H * (top_k - 1);
  d.max_items = (d.max_entries + kRowsPerChunk - 1) / kRowsPerChunk + d.n_buckets;
  d.entry_base = row_begin * H * (top_k - 1);
  const size_t nb = static_cast<size_t>(d.n_buckets);
  int32_t* base = static_cast<int32_t*>(scratch(buffer, name, dispatch_bytes(a.n_keys, B, H, Hkv, top_k, max_rows)));
  d.count = base;
  d.fill = d.count + nb;
  d.offset = d.fill + nb;
  d.chunk_offset = d.offset + nb + 1;
  d.slot_start = d.chunk_offset + nb + 1;
  d.entries = d.slot_start + d.n_slots;
  d.items = reinterpret_cast<int2*>(d.entries + d.max_entries + ((d.max_entries + d.n_slots) & 1));  // 8-byte aligned
  MOBA_CUDA_CHECK(cudaMemsetAsync(d.count, 0, 2 * nb * sizeof(int32_t), ctx.stream));
  const int64_t first = row_begin * H, last = row_end * H;
  const bool local = d.n_buckets <= 6144;  // (2, n_buckets) ints within the default 48 KB of shared memory
  const int64_t row_blocks = std::max<int64_t>(1, (last - first + 255) / 256);
  const unsigned grid = static_cast<unsigned>(local ? std::min<int64_t>(row_blocks, 2 * std::max(ctx.sm_count, 1))
                                                    : row_blocks);
  dispatch_slot_start_kernel<<<(d.n_slots + 255) / 256, 256, 0, ctx.stream>>>(d.slot_start, a.cu_seqlens,
                                                                              a.n_segments, d.n_slots, B);
  MOBA_CUDA_CHECK(cudaGetLastError());
  dispatch_count_kernel<<<grid, 256, local ? nb * sizeof(int) : 0, ctx.stream>>>(
      d.count, a.selected, a.cu_seqlens, a.n_segments, a.q_rows, first, last, H, Hkv, B, top_k, d.n_buckets, local);
  MOBA_CUDA_CHECK(cudaGetLastError());
  dispatch_scan_kernel<<<1, 1024, 0, ctx.stream>>>(d.offset, d.chunk_offset, d.count, d.n_buckets);
  MOBA_CUDA_CHECK(cudaGetLastError());
  if (sort_scratch == nullptr) {
    dispatch_fill_kernel<<<grid, 256, local ? 2 * nb * sizeof(int) : 0, ctx.stream>>>(
        d.entries, d.fill, d.offset, a.selected, a.cu_seqlens, a.n_segments, a.q_rows, first, last, H, Hkv, B, top_k,
        d.n_buckets, local);
    MOBA_CUDA_CHECK(cudaGetLastError());
  } else if (last > first) {
    // Canonical: the entries of rows [first, last) sorted stably by bucket land at offset[bucket] onwards in entry
    // order (the sentinel-keyed ones after offset[n_buckets], where nothing reads).
    const int64_t entries = (last - first) * (top_k - 1);
    const size_t index_bytes = aligned_256(static_cast<size_t>(entries) * sizeof(int32_t));
    const int key_bits = sort_key_bits(d.n_buckets);
    auto* sort_base = static_cast<char*>(scratch(*sort_scratch, sort_name, sort_bytes(entries, d.n_buckets)));
    auto* keys = reinterpret_cast<int32_t*>(sort_base);
    auto* sorted_keys = reinterpret_cast<int32_t*>(sort_base + index_bytes);
    auto* values = reinterpret_cast<int32_t*>(sort_base + 2 * index_bytes);
    dispatch_keys_kernel<<<static_cast<unsigned>((last - first + 255) / 256), 256, 0, ctx.stream>>>(
        keys, values, a.selected, a.cu_seqlens, a.n_segments, a.q_rows, first, last, H, Hkv, B, top_k, d.n_buckets,
        d.entry_base);
    MOBA_CUDA_CHECK(cudaGetLastError());
    sort_pairs(ctx.stream, sort_base + 3 * index_bytes, sort_pairs_temp_bytes(entries, key_bits), keys, sorted_keys,
               values, d.entries, entries, key_bits);
  }
  dispatch_items_kernel<<<(d.n_buckets + 255) / 256, 256, 0, ctx.stream>>>(d.items, d.count, d.chunk_offset,
                                                                           d.n_buckets);
  MOBA_CUDA_CHECK(cudaGetLastError());
  return d;
}

}  // namespace moba::cuda::attn
