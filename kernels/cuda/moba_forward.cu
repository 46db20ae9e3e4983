// MoBA attention forward on the GPU (moba-spec.md, Forward step 5) and the key-block dispatch shared with the
// backward. Two passes, as the spec's kernel plan: (1) selected-block attention, key/value-block-major: each CTA
// takes up to 64 query rows that chose one (block, kv head) - any heads of the GQA group - streams that block's
// K/V once and writes a normalised partial (o, lse) per (row, selection slot); (2) the causal current-block
// attention per (64-token tile, head), which merges the partials of its rows by log-sum-exp and writes O and LSE.
// Both run per chunk of query tokens whose partials fit a fixed budget (kEntryBudgetBytes), so scratch does not
// grow with N * H * (top_k - 1).
// Invariant: each output row is produced by one thread quad in a fixed order, so the forward is bitwise
// reproducible; rows never interact inside a tile (mma rows are independent), so the order of rows within a
// bucket (set by atomics) cannot change any result.
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdlib>

#include "common/error.h"
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
};

template <int DP>
constexpr size_t forward_smem_bytes() {
  return size_t{5} * 64 * (DP + 8) * sizeof(bf16) + 8 * 64 * sizeof(int);
}

// SELECTED: blockIdx.x is a dispatch work item (bucket, chunk): up to 64 gathered rows x one complete block, all
// keys visible; writes o_part/lse_part. Otherwise: blockIdx.x is a 64-token tile, blockIdx.y the head; row t sees
// keys [block_start(t), t]; merges its rows' partials and writes out/lse.
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
  const int past_slots = a.top_k - 1;

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
      if ((lane & 3) == 0) a.lse_part[entry] = (m + log2f(l)) * kLn2;
    }
  } else {
    // Merge with the selected blocks' partials: LSE = logsumexp of all parts, O = sum of exp(lse_i - LSE) o_i.
    // The partials are staged through shared memory one selection slot at a time (coalesced, all loads in
    // flight at once); per-thread scattered loads made this epilogue latency-bound.
    float* s_diag = reinterpret_cast<float*>(s_aux + 64);  // (64) log2 denominator of the current-block part
    float* s_lse2 = s_diag + 64;                           // (64) log2 of the merged denominator
    float* s_weight = s_lse2 + 64;                         // (64) weight of the partial being added
    int* s_n_past = reinterpret_cast<int*>(s_weight + 64);  // (64) selected past blocks of the row
    __shared__ int s_max_past;
    if ((lane & 3) == 0) {
      s_diag[r0] = m0 + log2f(l0);
      s_diag[r1] = m1 + log2f(l1);
    }
    if (tid == 0) s_max_past = 0;
    __syncthreads();  // also: every warp is done with sK/sV, which become the staging buffer
    if (tid < 64) {
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
    constexpr int LDF = DP + 8;                  // staging row stride (floats): conflict-free float2 reads
    float* stage = reinterpret_cast<float*>(sK);  // (64, LDF) f32: exactly the two K buffers
    const int max_past = s_max_past;
    for (int i = 0; i < max_past; ++i) {
      for (int idx = tid; idx < 64 * (DP / 4); idx += 128) {
        const int r = idx / (DP / 4), c = idx % (DP / 4) * 4;
        const int row = s_row[r];
        const bool ok = row >= 0 && i < s_n_past[r] && c < a.D;
        const int64_t entry = static_cast<int64_t>(row) * past_slots + i - a.dispatch.entry_base;
        cp_async16(stage + r * LDF + c, ok ? a.o_part + entry * a.D + c : a.o_part, ok ? 16 : 0);
      }
      cp_async_commit();
      if (tid < 64) {
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
                block_size, top_k, softmax_scale * kLog2e, 0};
  const int64_t n_tiles = (N + 63) / 64;
  if (top_k == 1) {  // current block only: no partials
    if (D <= 64)
      launch_forward<64, false>(a, dim3(static_cast<unsigned>(n_tiles), H), ctx.stream);
    else
      launch_forward<128, false>(a, dim3(static_cast<unsigned>(n_tiles), H), ctx.stream);
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
    const dim3 selected_grid(static_cast<unsigned>(a.dispatch.max_items));
    const dim3 current_grid(static_cast<unsigned>((token_end - token_begin + 63) / 64), H);
    if (D <= 64) {
      launch_forward<64, true>(a, selected_grid, ctx.stream);
      launch_forward<64, false>(a, current_grid, ctx.stream);
    } else {
      launch_forward<128, true>(a, selected_grid, ctx.stream);
      launch_forward<128, false>(a, current_grid, ctx.stream);
    }
  }
}

}  // namespace moba::cuda
