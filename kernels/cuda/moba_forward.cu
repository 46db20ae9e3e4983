// MoBA attention forward on the GPU (moba-spec.md, Forward step 5) and the key-block dispatch shared with the
// backward. Two passes, as the spec's kernel plan: (1) selected-block attention, key/value-block-major: each CTA
// takes up to 64 query rows that chose one (block, kv head) - any heads of the GQA group - streams that block's
// K/V once and writes a normalised partial (o, lse) per (row, selection slot); (2) the causal current-block
// attention per (64-token tile, head), which merges the partials of its rows by log-sum-exp and writes O and LSE.
// Both run per chunk of query tokens whose partials fit a fixed budget (kEntryBudgetBytes), so scratch does not
// grow with N * H * (top_k - 1).
// Head dims above 64 on sm_90 run both passes on warpgroup MMAs (moba_forward_wgmma_kernel), the rest on mma.sync.
// Invariant: each output row is produced by one thread quad in a fixed order, so the forward is bitwise
// reproducible; rows never interact inside a tile (mma rows are independent), so the order of rows within a
// bucket (set by atomics) cannot change any result.
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdlib>

#include "common/error.h"
#include "kernels/cuda/flash_attention_common.cuh"
#include "kernels/cuda/moba_common.cuh"

namespace moba::cuda {
namespace moba_detail {
namespace {

// ---- dispatch kernels ------------------------------------------------------------------------------------------
// Calls visit(bucket, entry) for every past block of query row `row` (its selected entries before the current
// block); entry = row * (top_k - 1) + position in the row.
template <typename Visit>
__device__ __forceinline__ void for_each_past_block(const int32_t* selected, const int32_t* cu_seqlens, int n_segments,
                                                    int64_t row, int H, int Hkv, int B, int top_k, Visit&& visit) {
  const int64_t t = row / H;
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
                                                             int64_t row_begin, int64_t row_end, int H, int Hkv, int B,
                                                             int top_k, int n_buckets, bool local) {
  extern __shared__ int hist[];  // (n_buckets) when local
  if (local) {
    for (int i = threadIdx.x; i < n_buckets; i += blockDim.x) hist[i] = 0;
    __syncthreads();
  }
  for (int64_t row = row_begin + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; row < row_end;
       row += static_cast<int64_t>(gridDim.x) * blockDim.x)
    for_each_past_block(selected, cu_seqlens, n_segments, row, H, Hkv, B, top_k, [&](int64_t, int64_t bucket, int64_t) {
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
                                                            int64_t row_begin, int64_t row_end, int H, int Hkv, int B,
                                                            int top_k, int n_buckets, bool local) {
  extern __shared__ int hist[];  // (2, n_buckets) when local: counts / cursors, then range starts
  int* base = hist + n_buckets;
  const int64_t first = row_begin + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  if (!local) {
    for (int64_t row = first; row < row_end; row += stride)
      for_each_past_block(selected, cu_seqlens, n_segments, row, H, Hkv, B, top_k,
                          [&](int64_t, int64_t bucket, int64_t entry) {
                            entries[offset[bucket] + atomicAdd(&fill[bucket], 1)] = static_cast<int32_t>(entry);
                          });
    return;
  }
  for (int i = threadIdx.x; i < n_buckets; i += blockDim.x) hist[i] = 0;
  __syncthreads();
  for (int64_t row = first; row < row_end; row += stride)
    for_each_past_block(selected, cu_seqlens, n_segments, row, H, Hkv, B, top_k,
                        [&](int64_t, int64_t bucket, int64_t) { atomicAdd(&hist[bucket], 1); });
  __syncthreads();
  for (int i = threadIdx.x; i < n_buckets; i += blockDim.x) {
    base[i] = hist[i] ? offset[i] + atomicAdd(&fill[i], hist[i]) : 0;
    hist[i] = 0;
  }
  __syncthreads();
  for (int64_t row = first; row < row_end; row += stride)
    for_each_past_block(selected, cu_seqlens, n_segments, row, H, Hkv, B, top_k,
                        [&](int64_t, int64_t bucket, int64_t entry) {
                          entries[base[bucket] + atomicAdd(&hist[bucket], 1)] = static_cast<int32_t>(entry);
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

// ---- attention kernels -----------------------------------------------------------------------------------------
struct ForwardArgs {
  bf16* out;             // (N, H, D)
  float* lse;            // (N, H)
  float* o_part;         // (entries of the chunk, D) normalised partial outputs of the selected blocks
  float* lse_part;       // (entries of the chunk) their natural-log LSE; both indexed by entry - entry_base
  const bf16* q;         // (N, H, D)
  const bf16* k;         // (N, Hkv, D)
  const bf16* v;         // (N, Hkv, D)
  const int32_t* selected;
  const int32_t* cu_seqlens;
  Dispatch dispatch;      // of the chunk being processed
  int n_segments;
  int64_t N;
  int H, Hkv, D, B, top_k;
  float scale_log2;      // softmax_scale * log2(e)
  int tile_offset;       // current-block pass: the chunk's first 64-token tile
  int64_t token_end;     // current-block pass: one past the chunk's last token
};

template <int DP>
constexpr size_t forward_smem_bytes() {
  return size_t{5} * 64 * (DP + 8) * sizeof(bf16) + 8 * 64 * sizeof(int);
}

// SELECTED: blockIdx.x is a dispatch work item (bucket, chunk): up to 64 gathered rows x one complete block, all
// keys visible; writes o_part/lse_part. Otherwise: blockIdx.x is a 64-token tile, blockIdx.y the head; row t sees
// keys [block_start(t), t]; merges its rows' partials and writes out/lse.
// Epilogue of the current-block pass of both forward kernels: merges the current block's (o, running max m, sum l)
// of the thread's rows r0, r1 (fragment rows; columns quad_col + 8 d, + 1) with the rows' selected-block partials,
// LSE = logsumexp of all parts and O = sum of exp(lse_i - LSE) o_i, and writes out and lse. The partials are staged
// through shared memory one selection slot at a time (coalesced, all loads in flight at once); per-thread scattered
// loads made this epilogue latency-bound. s_words: 4 kRows free words; stage: (kRows, LDF) f32 over buffers every
// warp is done with at the first barrier. Called by all kThreads threads.
template <int kRows, int kThreads, int DP, int LDF, int DT>
__device__ __forceinline__ void merge_partials(const ForwardArgs& a, float (&o)[DT][4], float m0, float l0, float m1,
                                               float l1, int r0, int r1, int quad_col, const int* s_row,
                                               const int* s_aux, float* s_words, float* stage) {
  const int tid = threadIdx.x;
  const int past_slots = a.top_k - 1;
  float* s_diag = s_words;  // (kRows) log2 denominator of the current-block part
  float* s_lse2 = s_diag + kRows;  // (kRows) log2 of the merged denominator
  float* s_weight = s_lse2 + kRows;  // (kRows) weight of the partial being added
  int* s_n_past = reinterpret_cast<int*>(s_weight + kRows);  // (kRows) selected past blocks of the row
  __shared__ int s_max_past;
  if ((threadIdx.x & 3) == 0) {
    s_diag[r0] = m0 + log2f(l0);
    s_diag[r1] = m1 + log2f(l1);
  }
  if (tid == 0) s_max_past = 0;
  __syncthreads();  // also: every warp is done with what `stage` overlays
  if (tid < kRows) {
    const int row = s_row[tid];
    int n_past = 0;
    float lse2 = 0.0f;
    if (row >= 0) {
      const int current = s_aux[tid];
      const int32_t* sel = a.selected + static_cast<int64_t>(row) * a.top_k;
      const float* part_lse = a.lse_part + (static_cast<int64_t>(row) * past_slots - a.dispatch.entry_base);
      float top = s_diag[tid];
      while (n_past < past_slots && sel[n_past] >= 0 && sel[n_past] < current) {
        top = fmaxf(top, part_lse[n_past] * kLog2e);
        ++n_past;
      }
      float total = exp2f(s_diag[tid] - top);
      for (int i = 0; i < n_past; ++i) total += exp2f(part_lse[i] * kLog2e - top);
      lse2 = top + log2f(total);
      a.lse[row] = lse2 * kLn2;
      atomicMax(&s_max_past, n_past);
    }
    s_lse2[tid] = lse2;
    s_n_past[tid] = n_past;
  }
  __syncthreads();
  const float w_diag0 = l0 > 0.0f ? exp2f(s_diag[r0] - s_lse2[r0]) / l0 : 0.0f;
  const float w_diag1 = l1 > 0.0f ? exp2f(s_diag[r1] - s_lse2[r1]) / l1 : 0.0f;
#pragma unroll
  for (int d = 0; d < DT; ++d) {
    o[d][0] *= w_diag0;
    o[d][1] *= w_diag0;
    o[d][2] *= w_diag1;
    o[d][3] *= w_diag1;
  }
  const int max_past = s_max_past;
  for (int i = 0; i < max_past; ++i) {
    for (int idx = tid; idx < kRows * (DP / 4); idx += kThreads) {
      const int r = idx / (DP / 4), c = idx % (DP / 4) * 4;
      const int row = s_row[r];
      const bool ok = row >= 0 && i < s_n_past[r] && c < a.D;
      const int64_t entry = static_cast<int64_t>(row) * past_slots + i - a.dispatch.entry_base;
      cp_async16(stage + r * LDF + c, ok ? a.o_part + entry * a.D + c : a.o_part, ok ? 16 : 0);
    }
    cp_async_commit();
    if (tid < kRows) {
      const int row = s_row[tid];
      s_weight[tid] = row >= 0 && i < s_n_past[tid]
                          ? exp2f(a.lse_part[static_cast<int64_t>(row) * past_slots + i - a.dispatch.entry_base] *
                                      kLog2e -
                                  s_lse2[tid])
                          : 0.0f;
    }
    cp_async_wait<0>();
    __syncthreads();
    const float w0 = s_weight[r0], w1 = s_weight[r1];
#pragma unroll
    for (int d = 0; d < DT; ++d) {
      const int col = d * 8 + quad_col;
      const float2 p0 = *reinterpret_cast<const float2*>(stage + r0 * LDF + col);
      const float2 p1 = *reinterpret_cast<const float2*>(stage + r1 * LDF + col);
      o[d][0] += w0 * p0.x;
      o[d][1] += w0 * p0.y;
      o[d][2] += w1 * p1.x;
      o[d][3] += w1 * p1.y;
    }
    __syncthreads();  // the next slot overwrites the staging buffer
  }
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = s_row[half ? r1 : r0];
    if (row < 0) continue;
    bf16* dst = a.out + static_cast<int64_t>(row) * a.D;
#pragma unroll
    for (int d = 0; d < DT; ++d) {
      const int col = d * 8 + quad_col;
      if (col < a.D)
        *reinterpret_cast<__nv_bfloat162*>(dst + col) =
            __floats2bfloat162_rn(o[d][2 * half], o[d][2 * half + 1]);
    }
  }
}

// End of both forward kernels, for the thread's rows r0, r1 (the quad's partial sums l0, l1 not yet reduced):
// SELECTED writes the normalised partial (o, lse) of each row's entry; otherwise merge_partials.
template <bool SELECTED, int kRows, int kThreads, int DP, int LDF, int DT>
__device__ __forceinline__ void finish_rows(const ForwardArgs& a, float (&o)[DT][4], float m0, float l0, float m1,
                                            float l1, int r0, int r1, int quad_col, const int* s_row,
                                            const int* s_aux, float* s_words, float* stage) {
#pragma unroll
  for (int d = 1; d <= 2; d <<= 1) {
    l0 += __shfl_xor_sync(0xFFFFFFFFu, l0, d);
    l1 += __shfl_xor_sync(0xFFFFFFFFu, l1, d);
  }
  if constexpr (SELECTED) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = half ? r1 : r0;
      if (s_row[r] < 0) continue;
      const float m = half ? m1 : m0, l = half ? l1 : l0;
      const int64_t entry = s_aux[r] - a.dispatch.entry_base;
      const float inv = 1.0f / l;
      float* dst = a.o_part + entry * a.D;
#pragma unroll
      for (int d = 0; d < DT; ++d) {
        const int col = d * 8 + quad_col;
        if (col < a.D)
          *reinterpret_cast<float2*>(dst + col) = make_float2(o[d][2 * half] * inv, o[d][2 * half + 1] * inv);
      }
      if ((threadIdx.x & 3) == 0) a.lse_part[entry] = (m + log2f(l)) * kLn2;
    }
  } else {
    merge_partials<kRows, kThreads, DP, LDF>(a, o, m0, l0, m1, l1, r0, r1, quad_col, s_row, s_aux, s_words, stage);
  }
}

template <int DP, bool SELECTED>
__global__ void __launch_bounds__(128) moba_forward_kernel(const ForwardArgs a) {
  constexpr int LD = DP + 8;        // padded row: ldmatrix rows land in distinct banks
  constexpr int NT = kKeyTile / 8;  // n-tiles of S per warp
  constexpr int DT = DP / 8;        // n-tiles of O per warp
  extern __shared__ __align__(16) unsigned char smem[];
  bf16* sQ = reinterpret_cast<bf16*>(smem);  // (64, LD)
  bf16* sK = sQ + 64 * LD;                   // (2, 64, LD)
  bf16* sV = sK + 2 * 64 * LD;               // (2, 64, LD)
  int* s_lo = reinterpret_cast<int*>(sV + 2 * 64 * LD);  // (64) first visible key of each row
  int* s_hi = s_lo + 64;                                 // (64) one past the last visible key
  int* s_row = s_hi + 64;                                // (64) query row t * H + h, or -1
  int* s_aux = s_row + 64;  // (64) SELECTED: partial entry; else: the row's current block index
  __shared__ int s_range[2];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  int kv_head;
  if (!tile_rows<SELECTED>(a, s_row, s_aux, s_lo, s_hi, s_range, &kv_head)) return;
  const int key_begin = s_range[0], key_end = s_range[1];
  const int n_tiles = (key_end - key_begin + kKeyTile - 1) / kKeyTile;

  for (int idx = tid; idx < 64 * (DP / 8); idx += 128) {
    const int r = idx / (DP / 8), c = idx % (DP / 8) * 8;
    const int row = s_row[r];
    const bool ok = row >= 0 && c < a.D;
    cp_async16(sQ + r * LD + c, ok ? a.q + static_cast<int64_t>(row) * a.D + c : a.q, ok ? 16 : 0);
  }
  // K and V of a key tile travel in separate cp.async groups, so S = Q K^T starts while V is still in flight and
  // the next K arrives during P V (FlashAttention-2's load schedule).
  auto load_tile = [&](bf16* dst, const bf16* src, int tile, int buf) {
    const int k0 = key_begin + tile * kKeyTile;
    for (int idx = tid; idx < kKeyTile * (DP / 8); idx += 128) {
      const int r = idx / (DP / 8), c = idx % (DP / 8) * 8;
      const bool ok = k0 + r < key_end && c < a.D;
      const int64_t off = (static_cast<int64_t>(k0 + r) * a.Hkv + kv_head) * a.D + c;
      cp_async16(dst + (buf * 64 + r) * LD + c, ok ? src + off : src, ok ? 16 : 0);
    }
  };
  load_tile(sK, a.k, 0, 0);
  cp_async_commit();  // Q + K of tile 0
  load_tile(sV, a.v, 0, 0);
  cp_async_commit();  // V of tile 0

  const int r0 = warp * 16 + (lane >> 2), r1 = r0 + 8, quad_col = 2 * (lane & 3);
  const int lo0 = s_lo[r0], hi0 = s_hi[r0], lo1 = s_lo[r1], hi1 = s_hi[r1];
  float o[DT][4];
#pragma unroll
  for (int d = 0; d < DT; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.0f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;  // running max (log2 units) and this thread's sum

  for (int tile = 0; tile < n_tiles; ++tile) {
    const bool more = tile + 1 < n_tiles;
    cp_async_wait<1>();  // everything but the newest group (this tile's V): this tile's K is in
    __syncthreads();     // ... for every thread; and every warp is done with the previous tile
    if (more) {
      load_tile(sK, a.k, tile + 1, (tile + 1) & 1);
      cp_async_commit();
    }
    const bf16* k_s = sK + (tile & 1) * 64 * LD;
    const bf16* v_s = sV + (tile & 1) * 64 * LD;

    float s[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < DP / 16; ++ks) {
      uint32_t qa[4];
      load_a(qa, sQ, LD, warp * 16, ks * 16, lane);
#pragma unroll
      for (int j2 = 0; j2 < NT / 2; ++j2) {
        uint32_t b[4];
        load_b_rows(b, k_s, LD, j2 * 16, ks * 16, lane);
        mma_16816(s[2 * j2], qa, b[0], b[1]);
        mma_16816(s[2 * j2 + 1], qa, b[2], b[3]);
      }
    }
    const int k0 = key_begin + tile * kKeyTile;
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = k0 + j * 8 + quad_col + (e & 1);
        const bool visible = e < 2 ? (key >= lo0 && key < hi0) : (key >= lo1 && key < hi1);
        s[j][e] = visible ? s[j][e] * a.scale_log2 : -INFINITY;
      }
      mx0 = fmaxf(mx0, fmaxf(s[j][0], s[j][1]));
      mx1 = fmaxf(mx1, fmaxf(s[j][2], s[j][3]));
    }
#pragma unroll
    for (int d = 1; d <= 2; d <<= 1) {
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xFFFFFFFFu, mx0, d));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xFFFFFFFFu, mx1, d));
    }
    const float new0 = fmaxf(m0, mx0), new1 = fmaxf(m1, mx1);
    const float base0 = new0 == -INFINITY ? 0.0f : new0, base1 = new1 == -INFINITY ? 0.0f : new1;
    const float alpha0 = exp2f(m0 - base0), alpha1 = exp2f(m1 - base1);
    m0 = new0;
    m1 = new1;
    float sum0 = 0.0f, sum1 = 0.0f;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      s[j][0] = exp2f(s[j][0] - base0);
      s[j][1] = exp2f(s[j][1] - base0);
      s[j][2] = exp2f(s[j][2] - base1);
      s[j][3] = exp2f(s[j][3] - base1);
      sum0 += s[j][0] + s[j][1];
      sum1 += s[j][2] + s[j][3];
    }
    l0 = l0 * alpha0 + sum0;
    l1 = l1 * alpha1 + sum1;
#pragma unroll
    for (int d = 0; d < DT; ++d) {
      o[d][0] *= alpha0;
      o[d][1] *= alpha0;
      o[d][2] *= alpha1;
      o[d][3] *= alpha1;
    }
    if (more)
      cp_async_wait<1>();  // this tile's V is in (the next K may still be in flight)
    else
      cp_async_wait<0>();
    __syncthreads();
    if (more) {
      load_tile(sV, a.v, tile + 1, (tile + 1) & 1);
      cp_async_commit();
    }
#pragma unroll
    for (int kk = 0; kk < kKeyTile / 16; ++kk) {
      const uint32_t pa[4] = {pack_bf16(s[2 * kk][0], s[2 * kk][1]), pack_bf16(s[2 * kk][2], s[2 * kk][3]),
                              pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int d2 = 0; d2 < DT / 2; ++d2) {
        uint32_t b[4];
        load_b_cols(b, v_s, LD, kk * 16, d2 * 16, lane);
        mma_16816(o[2 * d2], pa, b[0], b[1]);
        mma_16816(o[2 * d2 + 1], pa, b[2], b[3]);
      }
    }
  }

  // Row sums, then the partials (selected pass) or the merge (current-block pass); sK and sV become the staging.
  finish_rows<SELECTED, 64, 128, DP, DP + 8>(a, o, m0, l0, m1, l1, r0, r1, quad_col, s_row, s_aux,
                                             reinterpret_cast<float*>(s_aux + 64), reinterpret_cast<float*>(sK));
}

template <int DP, bool SELECTED>
void launch_forward(const ForwardArgs& a, dim3 grid, cudaStream_t stream) {
  constexpr size_t bytes = forward_smem_bytes<DP>();
  static const bool configured = [] {
    MOBA_CUDA_CHECK(cudaFuncSetAttribute(moba_forward_kernel<DP, SELECTED>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
    return true;
  }();
  (void)configured;
  moba_forward_kernel<DP, SELECTED><<<grid, 128, bytes, stream>>>(a);
  MOBA_CUDA_CHECK(cudaGetLastError());
}

// ---- wgmma forward (sm_90a, head dims 72..128) ------------------------------------------------------------------
// The same two passes on Hopper warpgroup MMAs, after the dense wgmma forward (flash_attention_forward.cu, itself
// after FlashAttention-3, Shah et al. 2024): kWg warpgroups x 64 query rows per CTA; Q gathered row by row into a
// 128-byte-swizzled WgTile (one cp.async per 16-byte chunk from the row's own address); K/V tiles of 64 keys,
// double-buffered; S = Q K^T as wgmma m64n64k16 with both operands in shared memory; O += P V as m64n128k16 with P
// taken straight from the S accumulators (FlashAttention-2's register reuse) and V read MN-major. Each warp's
// share of a wgmma accumulator has the mma.sync m16n8 layout, so the softmax and both epilogues are the ones of
// moba_forward_kernel above.
// Two warpgroups (128 rows) per CTA at two CTAs per SM (the dense forward's best shape too): at 32K, B 512, k 3 the
// forward (routing included) takes 1.555 ms against 1.777 with one warpgroup per CTA and 1.610 when every tile is
// masked (bench/notes/moba_kernels.md, v4).
// Key tiles start at a fixed origin per row: the block start in the selected pass, a multiple of 64 in the
// current-block pass. A tile with no visible key for a row leaves that row's (m, l, o) bitwise unchanged (factor
// exp2(0) = 1, p = 0), so a row's result does not depend on which rows share its CTA: chunked and one-chunk runs
// give the same bits whatever kWg is.
template <int kWg>
struct WgForwardShape {
  static constexpr int kThreads = 128 * kWg;
  static constexpr int kRows = 64 * kWg;  // query rows per CTA
  using QTile = flash::WgTile<kRows>;     // (kRows, 128); warpgroup w reads rows [64w, 64w + 64)
  using KVTile = flash::WgTile<kKeyTile>;  // (64, 128)
  static constexpr int kTileBytes = QTile::kBytes + 4 * KVTile::kBytes;  // Q, then (K, V) x 2 stages
  static constexpr int kStageLd = 128 + 8;  // merge staging row (f32): conflict-free float2 reads
  static_assert(kRows * kStageLd * sizeof(float) <= kTileBytes, "the merge staging reuses the Q/K/V tiles");
  // 1024 bytes of alignment slack (the 128-byte swizzle repeats every 1024 bytes), the tiles, 8 per-row arrays:
  // 83 KB (kWg 1) / 101 KB (kWg 2), two CTAs per SM.
  static constexpr size_t kSmemBytes = 1024 + kTileBytes + 8 * kRows * sizeof(int);
};

// SELECTED: blockIdx.x is a dispatch work item; a CTA takes the bucket's chunks c .. c + kWg - 1 for c a multiple
// of kWg (the other items' CTAs return at once), so its warpgroups share every K/V tile of the block. Otherwise:
// blockIdx.x is a tile of kRows tokens of the chunk, blockIdx.y the head. Only tiles that some row of the
// warpgroup does not see whole are masked.
template <int kWg, bool SELECTED>
__global__ void __launch_bounds__(128 * kWg, 2) moba_forward_wgmma_kernel(const ForwardArgs a) {
  using Shape = WgForwardShape<kWg>;
  using QTile = typename Shape::QTile;
  using KVTile = typename Shape::KVTile;
  constexpr int kRows = Shape::kRows, kThreads = Shape::kThreads;
  constexpr int NT = kKeyTile / 8;   // n8 tiles of S per warp
  constexpr int DT = 128 / 8;        // n8 tiles of O per warp
  constexpr int kPSteps = kKeyTile / 16;
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t s_q = (flash::smem_address(smem) + 1023) & ~1023u;
  unsigned char* tiles = smem + (s_q - flash::smem_address(smem));
  int* s_lo = reinterpret_cast<int*>(tiles + Shape::kTileBytes);  // (kRows) first visible key of each row
  int* s_hi = s_lo + kRows;                                        // (kRows) one past the last visible key
  int* s_row = s_hi + kRows;                                       // (kRows) query row t * H + h, or -1
  int* s_aux = s_row + kRows;  // (kRows) SELECTED: partial entry; else: the row's current block index
  __shared__ int s_bounds[kRows / 32][4];  // per 32 rows, over the valid ones: min lo, max hi, max lo, min hi
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wg = warp >> 2;
  const int g = lane >> 2, tig = lane & 3;
  const int past_slots = a.top_k - 1;

  // ---- the CTA's rows and their visible keys ----
  int kv_head;
  int my_lo = INT_MAX, my_hi = INT_MIN;  // row tid's visible keys (tid < kRows), empty for a padding row
  if constexpr (SELECTED) {
    if (static_cast<int>(blockIdx.x) >= a.dispatch.chunk_offset[a.dispatch.n_buckets]) return;
    const int2 item = a.dispatch.items[blockIdx.x];
    if (item.y % kWg != 0) return;
    const int bucket = item.x;
    kv_head = bucket % a.Hkv;
    const int start = a.dispatch.slot_start[bucket / a.Hkv];
    const int n_rows = min(kRows, a.dispatch.count[bucket] - item.y * kRowsPerChunk);
    if (tid < kRows) {
      int row = -1, entry = -1;
      if (tid < n_rows) {
        entry = a.dispatch.entries[a.dispatch.offset[bucket] + item.y * kRowsPerChunk + tid];
        row = entry / past_slots;
        my_lo = start;
        my_hi = start + a.B;
      }
      s_row[tid] = row;
      s_aux[tid] = entry;
      s_lo[tid] = start;
      s_hi[tid] = start + a.B;
    }
  } else {
    const int h = blockIdx.y;
    kv_head = h / (a.H / a.Hkv);
    if (tid < kRows) {
      const int64_t t = static_cast<int64_t>(a.tile_offset) * 64 + static_cast<int64_t>(blockIdx.x) * kRows + tid;
      int row = -1, current = 0;
      if (t < a.token_end) {
        const TokenBlock tb = token_block(a.cu_seqlens, a.n_segments, t, a.B);
        row = static_cast<int>(t * a.H + h);
        my_lo = static_cast<int>(tb.block_start);
        my_hi = static_cast<int>(t + 1);
        current = static_cast<int>((tb.block_start - tb.segment_start) / a.B);
      }
      s_row[tid] = row;
      s_lo[tid] = my_lo;
      s_hi[tid] = my_hi;
      s_aux[tid] = current;
    }
  }
  if (warp < kRows / 32) {  // the warps of threads tid < kRows
    const bool valid = my_lo != INT_MAX;
    int lo = my_lo, hi = my_hi, full_lo = valid ? my_lo : INT_MIN, full_hi = valid ? my_hi : INT_MAX;
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) {
      lo = min(lo, __shfl_xor_sync(0xFFFFFFFFu, lo, d));
      hi = max(hi, __shfl_xor_sync(0xFFFFFFFFu, hi, d));
      full_lo = max(full_lo, __shfl_xor_sync(0xFFFFFFFFu, full_lo, d));
      full_hi = min(full_hi, __shfl_xor_sync(0xFFFFFFFFu, full_hi, d));
    }
    if (lane == 0) {
      s_bounds[warp][0] = lo;
      s_bounds[warp][1] = hi;
      s_bounds[warp][2] = full_lo;
      s_bounds[warp][3] = full_hi;
    }
  }
  __syncthreads();
  // This warpgroup's rows (32-row groups 2 wg, 2 wg + 1): keys any of them sees, keys all of them see.
  const int wg_lo = min(s_bounds[2 * wg][0], s_bounds[2 * wg + 1][0]);
  const int wg_hi = max(s_bounds[2 * wg][1], s_bounds[2 * wg + 1][1]);
  const int wg_full_lo = max(s_bounds[2 * wg][2], s_bounds[2 * wg + 1][2]);
  const int wg_full_hi = min(s_bounds[2 * wg][3], s_bounds[2 * wg + 1][3]);
  int cta_lo = INT_MAX, cta_hi = INT_MIN;  // at least one valid row: the first one
#pragma unroll
  for (int i = 0; i < kRows / 32; ++i) {
    cta_lo = min(cta_lo, s_bounds[i][0]);
    cta_hi = max(cta_hi, s_bounds[i][1]);
  }
  const int key_origin = SELECTED ? cta_lo : cta_lo & ~(kKeyTile - 1);
  const int n_tiles = (cta_hi - key_origin + kKeyTile - 1) / kKeyTile;

  // ---- loads: Q rows gathered (16 threads per row), K/V tiles (cp.async; rows past cta_hi zero-filled) ----
  for (int idx = tid; idx < kRows * 16; idx += kThreads) {
    const int r = idx >> 4, c = idx & 15;
    const int row = s_row[r];
    const bool ok = row >= 0 && c * 8 < a.D;
    flash::cp_async_16(s_q + QTile::offset(r, c), ok ? a.q + static_cast<int64_t>(row) * a.D + c * 8 : a.q, ok);
  }
  const int64_t kv_stride = static_cast<int64_t>(a.Hkv) * a.D;
  auto s_k = [&](int stage) { return s_q + QTile::kBytes + stage * 2 * KVTile::kBytes; };
  auto s_v = [&](int stage) { return s_k(stage) + KVTile::kBytes; };
  auto load_kv = [&](int j, int stage) {
    const int k0 = key_origin + j * kKeyTile;
    const int64_t off = static_cast<int64_t>(k0) * kv_stride + static_cast<int64_t>(kv_head) * a.D;
    const int rows = min(kKeyTile, cta_hi - k0);
    flash::load_tile<KVTile, kThreads>(s_k(stage), a.k + off, kv_stride, rows, a.D, true, tid);
    flash::load_tile<KVTile, kThreads>(s_v(stage), a.v + off, kv_stride, rows, a.D, true, tid);
  };
  load_kv(0, 0);
  cp_async_commit();  // Q + K/V of tile 0

  const int r0 = warp * 16 + g, r1 = r0 + 8;  // the thread's two accumulator rows (CTA row index)
  const int lo0 = s_lo[r0], hi0 = s_hi[r0], lo1 = s_lo[r1], hi1 = s_hi[r1];
  float o[DT][4];
#pragma unroll
  for (int d = 0; d < DT; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.0f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;  // running max (log2 units) and this thread's sum
  const uint32_t q_rows = s_q + wg * 64 * QTile::kRowBytes;

  for (int j = 0; j < n_tiles; ++j) {
    const int stage = j & 1;
    if (j + 1 < n_tiles) {
      load_kv(j + 1, stage ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    flash::fence_proxy_async();  // cp.async (generic proxy) writes before wgmma (async proxy) reads
    __syncthreads();
    const int k0 = key_origin + j * kKeyTile;
    if (k0 < wg_hi && k0 + kKeyTile > wg_lo) {  // uniform per warpgroup: some row of it sees a key of the tile
      // ---- S = Q K^T: 8 k-steps of 16 channels (32 bytes of a 128-byte swizzled row) ----
      float s[NT][4];
#pragma unroll
      for (int n = 0; n < NT; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
      flash::fence_registers(s);
      flash::wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 8; ++kk) {
        const uint32_t q_column = (kk / 4) * QTile::kBlockBytes + (kk % 4) * 32;
        const uint32_t k_column = (kk / 4) * KVTile::kBlockBytes + (kk % 4) * 32;
        flash::wgmma_m64n64k16_ss<0, 0>(s, flash::wgmma_descriptor(q_rows + q_column, 16, 1024),
                                        flash::wgmma_descriptor(s_k(stage) + k_column, 16, 1024));
      }
      flash::wgmma_commit();
      flash::wgmma_wait_all();
      flash::fence_registers(s);
      // ---- mask (raw scores; -inf for keys outside the row's [lo, hi)) ----
      if (k0 < wg_full_lo || k0 + kKeyTile > wg_full_hi) {
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int key = k0 + n * 8 + 2 * tig + (e & 1);
            const bool visible = e < 2 ? (key >= lo0 && key < hi0) : (key >= lo1 && key < hi1);
            if (!visible) s[n][e] = -INFINITY;
          }
      }
      // ---- online softmax (a row's 4 threads are a quad) ----
      float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        mx0 = fmaxf(mx0, fmaxf(s[n][0], s[n][1]));
        mx1 = fmaxf(mx1, fmaxf(s[n][2], s[n][3]));
      }
#pragma unroll
      for (int d = 1; d <= 2; d <<= 1) {
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xFFFFFFFFu, mx0, d));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xFFFFFFFFu, mx1, d));
      }
      const float new0 = fmaxf(m0, mx0 * a.scale_log2), new1 = fmaxf(m1, mx1 * a.scale_log2);
      const float base0 = new0 == -INFINITY ? 0.0f : new0, base1 = new1 == -INFINITY ? 0.0f : new1;
      // Exactly 1 when the max did not move (a tile the row does not see must leave it bitwise unchanged).
      const float alpha0 = m0 == new0 ? 1.0f : flash::fast_exp2(m0 - base0);
      const float alpha1 = m1 == new1 ? 1.0f : flash::fast_exp2(m1 - base1);
      m0 = new0;
      m1 = new1;
      float sum0 = 0.0f, sum1 = 0.0f;
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        s[n][0] = flash::fast_exp2(fmaf(s[n][0], a.scale_log2, -base0));
        s[n][1] = flash::fast_exp2(fmaf(s[n][1], a.scale_log2, -base0));
        s[n][2] = flash::fast_exp2(fmaf(s[n][2], a.scale_log2, -base1));
        s[n][3] = flash::fast_exp2(fmaf(s[n][3], a.scale_log2, -base1));
        sum0 += s[n][0] + s[n][1];
        sum1 += s[n][2] + s[n][3];
      }
      l0 = l0 * alpha0 + sum0;
      l1 = l1 * alpha1 + sum1;
#pragma unroll
      for (int d = 0; d < DT; ++d) {
        o[d][0] *= alpha0;
        o[d][1] *= alpha0;
        o[d][2] *= alpha1;
        o[d][3] *= alpha1;
      }
      // ---- O += P V (P from the accumulators; V MN-major: 16 keys = 2048 bytes per step) ----
      uint32_t pa[kPSteps][4];
#pragma unroll
      for (int ks = 0; ks < kPSteps; ++ks) flash::accumulators_to_a(pa[ks], s[2 * ks], s[2 * ks + 1]);
      flash::fence_registers(o);
      flash::wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < kPSteps; ++ks)
        flash::wgmma_m64n128k16_rs<1>(
            o, pa[ks], flash::wgmma_descriptor(s_v(stage) + ks * 16 * KVTile::kRowBytes, KVTile::kBlockBytes, 1024));
      flash::wgmma_commit();
      flash::wgmma_wait_all();
      flash::fence_registers(o);
      flash::fence_registers(pa);
    }
    __syncthreads();  // this stage is refilled by the next iteration's prefetch
  }

  // Row sums, then the partials (selected pass) or the merge (current-block pass), over the Q/K/V tiles.
  finish_rows<SELECTED, kRows, kThreads, 128, Shape::kStageLd>(a, o, m0, l0, m1, l1, r0, r1, 2 * tig, s_row, s_aux,
                                                              reinterpret_cast<float*>(s_aux + kRows),
                                                              reinterpret_cast<float*>(tiles));
}

template <int kWg, bool SELECTED>
void launch_forward_wgmma(const ForwardArgs& a, dim3 grid, cudaStream_t stream) {
  constexpr size_t bytes = WgForwardShape<kWg>::kSmemBytes;
  static const bool configured = [] {
    MOBA_CUDA_CHECK(cudaFuncSetAttribute(moba_forward_wgmma_kernel<kWg, SELECTED>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
    return true;
  }();
  (void)configured;
  moba_forward_wgmma_kernel<kWg, SELECTED><<<grid, WgForwardShape<kWg>::kThreads, bytes, stream>>>(a);
  MOBA_CUDA_CHECK(cudaGetLastError());
}


// One pass over [token_begin, token_end) (current block) or over the chunk's dispatch items (selected): wgmma
// kernels (two warpgroups x 64 rows per CTA) on sm_90 for head dims above 64, moba_forward_kernel otherwise.
template <bool SELECTED>
void launch_pass(const ForwardArgs& a, bool wgmma, int64_t token_begin, int64_t token_end, cudaStream_t stream) {
  constexpr int kWg = 2;
  auto grid = [&](int rows) {
    return SELECTED ? dim3(static_cast<unsigned>(a.dispatch.max_items))
                    : dim3(static_cast<unsigned>((token_end - token_begin + rows - 1) / rows), a.H);
  };
  if (wgmma) launch_forward_wgmma<kWg, SELECTED>(a, grid(64 * kWg), stream);
  else if (a.D <= 64) launch_forward<64, SELECTED>(a, grid(64), stream);
  else launch_forward<128, SELECTED>(a, grid(64), stream);
}

}  // namespace

int64_t entry_budget_bytes() {
  const char* v = std::getenv("MOBA_CUDA_ENTRY_BUDGET_MB");  // read per call: tests change it between runs
  if (v == nullptr || v[0] == '\0') return kEntryBudgetBytes;
  const long long mib = std::atoll(v);
  MOBA_CHECK(mib > 0, cat("MOBA_CUDA_ENTRY_BUDGET_MB = '", v, "' is not a positive number of MiB"),
             "unset it (default 4096) or give a positive integer");
  return static_cast<int64_t>(mib) << 20;
}

void check_moba_shape(const char* caller, int64_t N, int H, int Hkv, int D, int block_size, int top_k,
                      int n_segments) {
  MOBA_CHECK(N >= 0 && H >= 1 && Hkv >= 1 && H % Hkv == 0 && n_segments >= 1,
             cat(caller, " (cuda): invalid shape N=", N, " H=", H, " Hkv=", Hkv, " segments=", n_segments),
             "need N >= 0, at least one segment, and kv heads dividing the query heads");
  MOBA_CHECK(D >= 8 && D <= 128 && D % 8 == 0, cat(caller, " (cuda): head_dim ", D, " is not supported"),
             "the CUDA MoBA kernels take head dims 8..128 in steps of 8 (16-byte rows); use the cpu backend");
  MOBA_CHECK(block_size >= 1 && top_k >= 1, cat(caller, " (cuda): block_size ", block_size, ", top_k ", top_k),
             "need block_size >= 1 and top_k >= 1");
  MOBA_CHECK(N * H * static_cast<int64_t>(top_k) < (int64_t{1} << 31),
             cat(caller, " (cuda): N * H * top_k = ", N * H * top_k, " does not fit 32-bit indices"),
             "split the batch into smaller micro-batches");
}

Dispatch build_dispatch(const CudaContext& ctx, int slot, const int32_t* selected, const int32_t* cu_seqlens,
                        int n_segments, int64_t N, int H, int Hkv, int block_size, int top_k, int64_t token_begin,
                        int64_t token_end, int64_t max_tokens) {
  Dispatch d;
  d.n_slots = static_cast<int>((N + block_size - 1) / block_size);
  d.n_buckets = d.n_slots * Hkv;
  d.max_entries = max_tokens * H * (top_k - 1);
  d.max_items = (d.max_entries + kRowsPerChunk - 1) / kRowsPerChunk + d.n_buckets;
  d.entry_base = token_begin * H * (top_k - 1);
  const size_t nb = static_cast<size_t>(d.n_buckets);
  const size_t words = 4 * nb + 2 + static_cast<size_t>(d.n_slots) + static_cast<size_t>(d.max_entries) +
                       2 * static_cast<size_t>(d.max_items) + 4;
  int32_t* base = static_cast<int32_t*>(ctx.scratch(slot, words * sizeof(int32_t)));
  d.count = base;
  d.fill = d.count + nb;
  d.offset = d.fill + nb;
  d.chunk_offset = d.offset + nb + 1;
  d.slot_start = d.chunk_offset + nb + 1;
  d.entries = d.slot_start + d.n_slots;
  d.items = reinterpret_cast<int2*>(d.entries + d.max_entries + ((d.max_entries + d.n_slots) & 1));  // 8-byte aligned
  MOBA_CUDA_CHECK(cudaMemsetAsync(d.count, 0, 2 * nb * sizeof(int32_t), ctx.stream));
  const int64_t row_begin = token_begin * H, row_end = token_end * H;
  const bool local = d.n_buckets <= 6144;  // (2, n_buckets) ints within the default 48 KB of shared memory
  const int64_t row_blocks = std::max<int64_t>(1, (row_end - row_begin + 255) / 256);
  const unsigned grid = static_cast<unsigned>(local ? std::min<int64_t>(row_blocks, 2 * std::max(ctx.sm_count, 1))
                                                    : row_blocks);
  dispatch_slot_start_kernel<<<(d.n_slots + 255) / 256, 256, 0, ctx.stream>>>(d.slot_start, cu_seqlens, n_segments,
                                                                              d.n_slots, block_size);
  MOBA_CUDA_CHECK(cudaGetLastError());
  dispatch_count_kernel<<<grid, 256, local ? nb * sizeof(int) : 0, ctx.stream>>>(
      d.count, selected, cu_seqlens, n_segments, row_begin, row_end, H, Hkv, block_size, top_k, d.n_buckets, local);
  MOBA_CUDA_CHECK(cudaGetLastError());
  dispatch_scan_kernel<<<1, 1024, 0, ctx.stream>>>(d.offset, d.chunk_offset, d.count, d.n_buckets);
  MOBA_CUDA_CHECK(cudaGetLastError());
  dispatch_fill_kernel<<<grid, 256, local ? 2 * nb * sizeof(int) : 0, ctx.stream>>>(
      d.entries, d.fill, d.offset, selected, cu_seqlens, n_segments, row_begin, row_end, H, Hkv, block_size, top_k,
      d.n_buckets, local);
  MOBA_CUDA_CHECK(cudaGetLastError());
  dispatch_items_kernel<<<(d.n_buckets + 255) / 256, 256, 0, ctx.stream>>>(d.items, d.count, d.chunk_offset,
                                                                           d.n_buckets);
  MOBA_CUDA_CHECK(cudaGetLastError());
  return d;
}

}  // namespace moba_detail

void moba_attention_forward(const CudaContext& ctx, bf16* out, float* lse, const bf16* q, const bf16* k,
                            const bf16* v, const int32_t* selected, const int32_t* cu_seqlens, int n_segments,
                            int64_t N, int H, int Hkv, int D, int block_size, int top_k, float softmax_scale) {
  using namespace moba_detail;
  check_moba_shape("moba_attention_forward", N, H, Hkv, D, block_size, top_k, n_segments);
  if (N == 0) return;
  ForwardArgs a{out, lse, nullptr, nullptr, q, k, v, selected, cu_seqlens, Dispatch{}, n_segments, N, H, Hkv, D,
                block_size, top_k, softmax_scale * kLog2e, 0, N};
  const bool wgmma = D > 64 && device_has_wgmma(ctx);
  if (top_k == 1) {  // current block only: no partials
    launch_pass<false>(a, wgmma, 0, N, ctx.stream);
    return;
  }
  // Query tokens in chunks whose partials fit kEntryBudgetBytes (one chunk at the usual sizes): per chunk, the
  // dispatch of its rows, the selected-block pass, then the current-block pass that merges its partials.
  const int64_t chunk = chunk_tokens(N, H, top_k, (D + 1) * static_cast<int64_t>(sizeof(float)));
  const int64_t max_entries = chunk * H * (top_k - 1);
  // Scratch slot 6: o_part (max_entries, D) f32, then lse_part (max_entries) f32.
  float* part = static_cast<float*>(ctx.scratch(6, static_cast<size_t>(max_entries) * (D + 1) * sizeof(float)));
  a.o_part = part;
  a.lse_part = part + max_entries * D;
  for (int64_t token_begin = 0; token_begin < N; token_begin += chunk) {
    const int64_t token_end = std::min(N, token_begin + chunk);
    a.dispatch = build_dispatch(ctx, 5, selected, cu_seqlens, n_segments, N, H, Hkv, block_size, top_k, token_begin,
                                token_end, chunk);
    a.tile_offset = static_cast<int>(token_begin / 64);
    a.token_end = token_end;
    launch_pass<true>(a, wgmma, token_begin, token_end, ctx.stream);
    launch_pass<false>(a, wgmma, token_begin, token_end, ctx.stream);
  }
}

}  // namespace moba::cuda
