// MoBA attention forward on the GPU (moba-spec.md, Forward step 5). Two passes, as the spec's kernel plan: (1)
// selected-block attention, key/value-block-major: each CTA takes up to 64 query rows that chose one (block, kv head)
// - any heads of the GQA group - streams that block's K/V once and writes a normalised partial (o, lse) per (row,
// selection slot); (2) the causal current-block attention per (64 query rows, head), which merges the partials of its
// rows by log-sum-exp and writes O and LSE. Both run per chunk of query rows whose partials fit the settings' entry
// budget, so scratch does not grow with Nq * H * (top_k - 1). Query rows stand at their key rows (q_rows).
// Head dims above 64 on sm_90 run both passes on warpgroup MMAs (moba_forward_wgmma_kernel), the rest on mma.sync.
// Invariant: each output row is produced by one thread quad in a fixed order, so the forward is bitwise
// reproducible; rows never interact inside a tile (mma rows are independent), so the order of rows within a
// bucket (set by atomics; the forward never asks for the canonical order) cannot change any result.
#include <algorithm>
#include <climits>
#include <cmath>

#include "common/error.h"
#include "kernels/cuda/attention_scratch.h"
#include "kernels/cuda/moba_common.cuh"

namespace moba::cuda {
namespace attn {
namespace {

// ---- attention kernels -----------------------------------------------------------------------------------------
struct ForwardArgs {
  bf16* out;             // (Nq, H, D)
  float* lse;            // (Nq, H)
  float* o_part;         // (entries of the chunk, D) normalised partial outputs of the selected blocks
  float* lse_part;       // (entries of the chunk) their natural-log LSE; both indexed by entry - entry_base
  const bf16* q;         // (Nq, H, D)
  const bf16* k;         // (Nk, Hkv, D)
  const bf16* v;         // (Nk, Hkv, D)
  const int32_t* selected;  // (Nq, H, top_k)
  const int32_t* cu_seqlens;
  const int32_t* q_rows;    // (Nq) or nullptr
  Dispatch dispatch;      // of the chunk being processed
  int n_segments;
  int64_t Nq;
  int H, Hkv, D, B, top_k;
  float scale_log2;      // softmax_scale * log2(e)
  int tile_offset;       // current-block pass: the chunk's first 64-row tile
  int64_t row_end;       // current-block pass: one past the chunk's last query row
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
      cp_async_16(stage + r * LDF + c, ok ? a.o_part + entry * a.D + c : a.o_part, ok);
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
  float sums[2] = {l0, l1};
  reduce_row_sums(sums);
  l0 = sums[0];
  l1 = sums[1];
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
  int* s_row = s_hi + 64;                                // (64) query row i * H + h, or -1
  int* s_aux = s_row + 64;  // (64) SELECTED: partial entry; else: the row's current block index
  __shared__ int s_range[2];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  int kv_head;
  if (!tile_rows<SELECTED>(a, s_row, s_aux, s_lo, s_hi, s_range, &kv_head)) return;
  const int key_begin = s_range[0], key_end = s_range[1];
  const int n_tiles = (key_end - key_begin + kKeyTile - 1) / kKeyTile;

  load_gathered_rows<DP>(sQ, a.q, s_row, a.D);
  // K and V of a key tile travel in separate cp.async groups, so S = Q K^T starts while V is still in flight and
  // the next K arrives during P V (FlashAttention-2's load schedule).
  auto load_tile = [&](bf16* dst, const bf16* src, int tile, int buf) {
    const int k0 = key_begin + tile * kKeyTile;
    for (int idx = tid; idx < kKeyTile * (DP / 8); idx += 128) {
      const int r = idx / (DP / 8), c = idx % (DP / 8) * 8;
      const bool ok = k0 + r < key_end && c < a.D;
      const int64_t off = (static_cast<int64_t>(k0 + r) * a.Hkv + kv_head) * a.D + c;
      cp_async_16(dst + (buf * 64 + r) * LD + c, ok ? src + off : src, ok);
    }
  };
  load_tile(sK, a.k, 0, 0);
  cp_async_commit();  // Q + K of tile 0
  load_tile(sV, a.v, 0, 0);
  cp_async_commit();  // V of tile 0

  const int r0 = warp * 16 + (lane >> 2), r1 = r0 + 8, quad_col = 2 * (lane & 3);
  const int lo[2] = {s_lo[r0], s_lo[r1]}, hi[2] = {s_hi[r0], s_hi[r1]};
  float o[DT][4];
#pragma unroll
  for (int d = 0; d < DT; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.0f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};  // log2 units; this thread's partial sums

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
    mma_rows_times_rows<DP, kKeyTile>(s, sQ, warp * 16, k_s, LD, lane);
    const int k0 = key_begin + tile * kKeyTile;
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = k0 + j * 8 + quad_col + (e & 1);
        if (key < lo[e >> 1] || key >= hi[e >> 1]) s[j][e] = -INFINITY;
      }
    rescale_rows(o, online_softmax(s, row_max, row_sum, a.scale_log2));
    if (more)
      cp_async_wait<1>();  // this tile's V is in (the next K may still be in flight)
    else
      cp_async_wait<0>();
    __syncthreads();
    if (more) {
      load_tile(sV, a.v, tile + 1, (tile + 1) & 1);
      cp_async_commit();
    }
    mma_accumulators_times_rows<kKeyTile, DP>(o, s, v_s, LD, 0, lane);
  }

  // Row sums, then the partials (selected pass) or the merge (current-block pass); sK and sV become the staging.
  finish_rows<SELECTED, 64, 128, DP, DP + 8>(a, o, row_max[0], row_sum[0], row_max[1], row_sum[1], r0, r1, quad_col,
                                             s_row, s_aux, reinterpret_cast<float*>(s_aux + 64),
                                             reinterpret_cast<float*>(sK));
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
  using QTile = WgTile<kRows>;     // (kRows, 128); warpgroup w reads rows [64w, 64w + 64)
  using KVTile = WgTile<kKeyTile>;  // (64, 128)
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
  const uint32_t s_q = (smem_address(smem) + 1023) & ~1023u;
  unsigned char* tiles = smem + (s_q - smem_address(smem));
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
      const CurrentBlockRow r = current_block_row(
          a, static_cast<int64_t>(a.tile_offset) * 64 + static_cast<int64_t>(blockIdx.x) * kRows + tid, h, a.row_end);
      my_lo = r.lo;
      my_hi = r.hi;
      s_row[tid] = r.row;
      s_lo[tid] = r.lo;
      s_hi[tid] = r.hi;
      s_aux[tid] = r.current;
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
    cp_async_16(s_q + QTile::offset(r, c), ok ? a.q + static_cast<int64_t>(row) * a.D + c * 8 : a.q, ok);
  }
  const int64_t kv_stride = static_cast<int64_t>(a.Hkv) * a.D;
  auto s_k = [&](int stage) { return s_q + QTile::kBytes + stage * 2 * KVTile::kBytes; };
  auto s_v = [&](int stage) { return s_k(stage) + KVTile::kBytes; };
  auto load_kv = [&](int j, int stage) {
    const int k0 = key_origin + j * kKeyTile;
    const int64_t off = static_cast<int64_t>(k0) * kv_stride + static_cast<int64_t>(kv_head) * a.D;
    const int rows = min(kKeyTile, cta_hi - k0);
    load_tile<KVTile, kThreads>(s_k(stage), a.k + off, kv_stride, rows, a.D, true, tid);
    load_tile<KVTile, kThreads>(s_v(stage), a.v + off, kv_stride, rows, a.D, true, tid);
  };
  load_kv(0, 0);
  cp_async_commit();  // Q + K/V of tile 0

  const int r0 = warp * 16 + g, r1 = r0 + 8;  // the thread's two accumulator rows (CTA row index)
  const int lo0 = s_lo[r0], hi0 = s_hi[r0], lo1 = s_lo[r1], hi1 = s_hi[r1];
  float o[DT][4];
#pragma unroll
  for (int d = 0; d < DT; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.0f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};  // log2 units; this thread's partial sums
  const uint32_t q_tile = s_q + wg * 64 * QTile::kRowBytes;

  for (int j = 0; j < n_tiles; ++j) {
    const int stage = j & 1;
    next_tile_loads(j + 1 < n_tiles, [&] { load_kv(j + 1, stage ^ 1); });
    fence_proxy_async();  // cp.async (generic proxy) writes before wgmma (async proxy) reads
    __syncthreads();
    const int k0 = key_origin + j * kKeyTile;
    if (k0 < wg_hi && k0 + kKeyTile > wg_lo) {  // uniform per warpgroup: some row of it sees a key of the tile
      // ---- S = Q K^T: 8 k-steps of 16 channels (32 bytes of a 128-byte swizzled row) ----
      float s[NT][4];
#pragma unroll
      for (int n = 0; n < NT; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
      fence_registers(s);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 8; ++kk) wgmma_k_major_step<QTile, KVTile, kKeyTile>(s, q_tile, s_k(stage), kk);
      wgmma_commit();
      wgmma_wait_all();
      fence_registers(s);
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
      rescale_rows(o, online_softmax(s, row_max, row_sum, a.scale_log2));
      // ---- O += P V (P from the accumulators; V MN-major: 16 keys = 2048 bytes per step) ----
      uint32_t pa[kPSteps][4];
#pragma unroll
      for (int ks = 0; ks < kPSteps; ++ks) accumulators_to_a(pa[ks], s[2 * ks], s[2 * ks + 1]);
      fence_registers(o);
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < kPSteps; ++ks)
        wgmma_m64n128k16_rs<1>(
            o, pa[ks], wgmma_descriptor(s_v(stage) + ks * 16 * KVTile::kRowBytes, KVTile::kBlockBytes, 1024));
      wgmma_commit();
      wgmma_wait_all();
      fence_registers(o);
      fence_registers(pa);
    }
    __syncthreads();  // this stage is refilled by the next iteration's prefetch
  }

  // Row sums, then the partials (selected pass) or the merge (current-block pass), over the Q/K/V tiles.
  finish_rows<SELECTED, kRows, kThreads, 128, Shape::kStageLd>(a, o, row_max[0], row_sum[0], row_max[1], row_sum[1],
                                                              r0, r1, 2 * tig, s_row, s_aux,
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


// One pass over the query rows [row_begin, row_end) (current block) or over the chunk's dispatch items (selected):
// wgmma kernels (two warpgroups x 64 rows per CTA) on sm_90 for head dims above 64, moba_forward_kernel otherwise.
template <bool SELECTED>
void launch_pass(const ForwardArgs& a, bool wgmma, int64_t row_begin, int64_t row_end, cudaStream_t stream) {
  constexpr int kWg = 2;
  auto grid = [&](int rows) {
    return SELECTED ? dim3(static_cast<unsigned>(a.dispatch.max_items))
                    : dim3(static_cast<unsigned>((row_end - row_begin + rows - 1) / rows), a.H);
  };
  if (wgmma) launch_forward_wgmma<kWg, SELECTED>(a, grid(64 * kWg), stream);
  else if (a.D <= 64) launch_forward<64, SELECTED>(a, grid(64), stream);
  else launch_forward<128, SELECTED>(a, grid(64), stream);
}

}  // namespace

void check_moba_shape(const char* caller, const AttentionArgs& a) {
  const int64_t Nq = a.n_queries, Nk = a.n_keys;
  MOBA_CHECK(Nq >= 0 && Nk >= 0 && a.n_heads >= 1 && a.n_kv_heads >= 1 && a.n_heads % a.n_kv_heads == 0 &&
                 a.n_segments >= 1,
             cat(caller, " (cuda): invalid shape Nq=", Nq, " Nk=", Nk, " H=", a.n_heads, " Hkv=", a.n_kv_heads, " segments=",
                 a.n_segments),
             "need at least one segment, and kv heads dividing the query heads");
  MOBA_CHECK(a.head_dim >= 8 && a.head_dim <= 128 && a.head_dim % 8 == 0,
             cat(caller, " (cuda): head_dim ", a.head_dim, " is not supported"),
             "the CUDA MoBA kernels take head dims 8..128 in steps of 8 (16-byte rows); use the cpu backend");
  MOBA_CHECK(a.block_size >= 1 && a.top_k >= 1, cat(caller, " (cuda): block_size ", a.block_size, ", top_k ", a.top_k),
             "need block_size >= 1 and top_k >= 1");
  MOBA_CHECK(Nq * a.n_heads * static_cast<int64_t>(a.top_k) < (int64_t{1} << 31) && Nk < (int64_t{1} << 31),
             cat(caller, " (cuda): Nq * H * top_k = ", Nq * a.n_heads * a.top_k, " does not fit 32-bit indices"),
             "split the batch into smaller micro-batches");
}

}  // namespace attn

void moba_attention_forward(const CudaContext& ctx, const AttentionArgs& args) {
  using namespace attn;
  check_moba_shape("moba_attention_forward", args);
  const int64_t Nq = args.n_queries;
  const int H = args.n_heads, D = args.head_dim, top_k = args.top_k;
  if (Nq == 0) return;
  ForwardArgs a{args.out, args.lse, nullptr, nullptr, args.q, args.k, args.v, args.selected, args.cu_seqlens,
                args.q_rows, Dispatch{}, args.n_segments, Nq, H, args.n_kv_heads, D, args.block_size, top_k,
                args.softmax_scale * kLog2e, 0, Nq};
  const bool wgmma = D > 64 && device_has_wgmma(ctx);
  if (top_k == 1) {  // current block only: no partials
    launch_pass<false>(a, wgmma, 0, Nq, ctx.stream);
    return;
  }
  // Query rows in chunks whose partials fit the entry budget (one chunk at the usual sizes): per chunk, the dispatch
  // of its rows, the selected-block pass, then the current-block pass that merges its partials.
  const int64_t chunk = moba_chunk_rows(Nq, H, top_k, (D + 1) * static_cast<int64_t>(sizeof(float)),
                                        args.settings.entry_budget_bytes);
  const int64_t max_entries = chunk * H * (top_k - 1);
  // Scratch `partials`: o_part (max_entries, D) f32, then lse_part (max_entries) f32.
  float* part = static_cast<float*>(
      scratch(args.scratch.partials, "partials", static_cast<size_t>(max_entries) * (D + 1) * sizeof(float)));
  a.o_part = part;
  a.lse_part = part + max_entries * D;
  for (int64_t row_begin = 0; row_begin < Nq; row_begin += chunk) {
    const int64_t row_end = std::min(Nq, row_begin + chunk);
    a.dispatch = build_dispatch(ctx, args.scratch.dispatch, "dispatch", args, row_begin, row_end, chunk);
    a.tile_offset = static_cast<int>(row_begin / 64);
    a.row_end = row_end;
    launch_pass<true>(a, wgmma, row_begin, row_end, ctx.stream);
    launch_pass<false>(a, wgmma, row_begin, row_end, ctx.stream);
  }
}

}  // namespace moba::cuda
