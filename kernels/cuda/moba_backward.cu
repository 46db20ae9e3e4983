// MoBA attention backward on the GPU (moba-spec.md, Backward): with P = exp(scale * S - LSE), Delta = rowsum(dO * O),
// dS = P * (dO V^T - Delta): dQ = scale * dS K, dK = scale * dS^T Q, dV = P^T dO, over the same union of keys as
// the forward, for query rows standing at any ascending key rows (q_rows). Kernels, in stream order:
//   delta             Delta (Nq, H) f32 (and the zeroing of the atomic dQ buffer).
//   dk/dv             per (tile of keys, kv head): every row that chose one of the tile's blocks (the dispatch of
//                     all rows), then the causal queries of the keys' own blocks (all heads of the group),
//                     accumulated in registers and added into dk/dv (bf16, or f32 partial sums) once. On sm_90 with
//                     D = 128 this is the warpgroup-MMA kernel of moba_backward_wgmma.cu (128 keys per CTA), else
//                     moba_dkv_kernel below (64 keys, mma.sync); settings.moba_dkv_kernel = mma_sync forces the latter.
// dQ, deterministic = false (what the backend uses): the dK/dV kernel also computes dS K per row tile and adds it
//   into an f32 buffer with atomics (FlashAttention-2's backward, 5 matrix products per pair); a last pass adds
//   scale times the buffer into dq (bf16).
// dQ, deterministic = true: two extra passes per chunk of query tokens recompute P and dS query-major (7 products
//   per pair): per dispatch item the selected block's dQ -> a per-(row, selection slot) f32 part; per (64-token
//   tile, head) the causal current-block dQ + the row's parts in selection order, added into dq. No atomics:
//   bitwise reproducible. Chunks keep the parts within the settings' entry budget.
// The same current-block dQ pass, with one block spanning every document, is the deterministic dQ of the dense
// backward (causal_dq_ordered).
// Invariant: dK/dV have a single owner per element (no atomics); the selected part sums the rows of a block in
// dispatch order, which atomics set unless deterministic, where the dispatch of all rows is built canonical (entries
// in ascending id, moba_dispatch.cuh). So deterministic = true gives dq, dk, dv bitwise reproducible run to run on a
// GPU; deterministic = false gives dK/dV and dQ that may differ in the last bits run to run.
#include <algorithm>
#include <climits>
#include <cmath>
#include <type_traits>

#include "common/error.h"
#include "kernels/cuda/attention_scratch.h"
#include "kernels/cuda/moba_backward.cuh"

namespace moba::cuda {
namespace attn {
namespace {

// Delta (rows) = rowsum(dout * out) in f32; DP / 8 threads per row, 8 channels each. With dq_acc (the atomic dQ
// path), also zeroes its rows: one pass instead of a separate memset.
template <int DP>
__global__ void delta_kernel(float* __restrict__ delta, float* __restrict__ dq_acc, const bf16* __restrict__ out,
                             const bf16* __restrict__ dout, int64_t rows, int D) {
  constexpr int kThreadsPerRow = DP / 8;
  const int64_t gid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t row = gid / kThreadsPerRow;
  const int c = static_cast<int>(gid % kThreadsPerRow) * 8;
  float sum = 0.0f;
  if (row < rows && c < D) {
    const uint4 o = *reinterpret_cast<const uint4*>(out + row * D + c);
    const uint4 g = *reinterpret_cast<const uint4*>(dout + row * D + c);
    const uint32_t ow[4] = {o.x, o.y, o.z, o.w}, gw[4] = {g.x, g.y, g.z, g.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) sum += bf16_lo(ow[i]) * bf16_lo(gw[i]) + bf16_hi(ow[i]) * bf16_hi(gw[i]);
    if (dq_acc != nullptr) {
      float4* z = reinterpret_cast<float4*>(dq_acc + row * D + c);
      z[0] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      z[1] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
  }
#pragma unroll
  for (int d = kThreadsPerRow / 2; d > 0; d >>= 1) sum += __shfl_xor_sync(0xFFFFFFFFu, sum, d);
  if (row < rows && c == 0) delta[row] = sum;
}

// ---- dQ ------------------------------------------------------------------------------------------------------
template <int DP>
constexpr size_t dq_smem_bytes() {
  return size_t{6} * 64 * (DP + 8) * sizeof(bf16) + 6 * 64 * sizeof(int);
}

// Row setup as the forward kernel (SELECTED: gathered rows of a dispatch item, keys = the block; else a 64-token
// tile of head blockIdx.y, row t sees [block_start(t), t]); loops over the key tiles accumulating dQ.
template <int DP, bool SELECTED>
__global__ void __launch_bounds__(128) moba_dq_kernel(const BackwardArgs a) {
  constexpr int LD = DP + 8;
  constexpr int NT = kKeyTile / 8;
  constexpr int DT = DP / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  bf16* sQ = reinterpret_cast<bf16*>(smem);  // (64, LD)
  bf16* sG = sQ + 64 * LD;                   // (64, LD) dO rows
  bf16* sK = sG + 64 * LD;                   // (2, 64, LD)
  bf16* sV = sK + 2 * 64 * LD;               // (2, 64, LD)
  int* s_lo = reinterpret_cast<int*>(sV + 2 * 64 * LD);  // (64)
  int* s_hi = s_lo + 64;                                 // (64)
  int* s_row = s_hi + 64;                                // (64) t * H + h or -1
  int* s_aux = s_row + 64;                               // (64) SELECTED: entry; else current block
  float* s_lse2 = reinterpret_cast<float*>(s_aux + 64);  // (64) lse * log2(e); +inf for padding rows
  float* s_delta = s_lse2 + 64;                          // (64)
  __shared__ int s_range[2];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int past_slots = a.top_k - 1;

  int kv_head;
  if (!tile_rows<SELECTED>(a, s_row, s_aux, s_lo, s_hi, s_range, &kv_head)) return;
  if (tid < 64) {
    const int row = s_row[tid];
    s_lse2[tid] = row >= 0 ? a.lse[row] * kLog2e : INFINITY;
    s_delta[tid] = row >= 0 ? a.delta[row] : 0.0f;
  }
  const int key_begin = s_range[0], key_end = s_range[1];
  const int n_tiles = (key_end - key_begin + kKeyTile - 1) / kKeyTile;

  load_gathered_rows<DP>(sQ, a.q, s_row, a.D);
  load_gathered_rows<DP>(sG, a.dout, s_row, a.D);
  auto load_kv = [&](int tile, int buf) {
    const int k0 = key_begin + tile * kKeyTile;
    for (int idx = tid; idx < kKeyTile * (DP / 8); idx += 128) {
      const int r = idx / (DP / 8), c = idx % (DP / 8) * 8;
      const bool ok = k0 + r < key_end && c < a.D;
      const int64_t off = (static_cast<int64_t>(k0 + r) * a.Hkv + kv_head) * a.D + c;
      cp_async_16(sK + (buf * 64 + r) * LD + c, ok ? a.k + off : a.k, ok);
      cp_async_16(sV + (buf * 64 + r) * LD + c, ok ? a.v + off : a.v, ok);
    }
  };
  load_kv(0, 0);
  cp_async_commit();
  __syncthreads();  // s_lse2 / s_delta

  const int r0 = warp * 16 + (lane >> 2), r1 = r0 + 8, quad_col = 2 * (lane & 3);
  const int lo0 = s_lo[r0], hi0 = s_hi[r0], lo1 = s_lo[r1], hi1 = s_hi[r1];
  const float lse0 = s_lse2[r0], lse1 = s_lse2[r1], delta0 = s_delta[r0], delta1 = s_delta[r1];
  float dq[DT][4];
#pragma unroll
  for (int d = 0; d < DT; ++d) dq[d][0] = dq[d][1] = dq[d][2] = dq[d][3] = 0.0f;

  for (int tile = 0; tile < n_tiles; ++tile) {
    next_tile_loads(tile + 1 < n_tiles, [&] { load_kv(tile + 1, (tile + 1) & 1); });
    __syncthreads();
    const bf16* k_s = sK + (tile & 1) * 64 * LD;
    const bf16* v_s = sV + (tile & 1) * 64 * LD;
    float s[NT][4], dp[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] = dp[j][e] = 0.0f;
    mma_rows_times_rows<DP, kKeyTile>(s, sQ, warp * 16, k_s, LD, lane);    // S = Q K^T
    mma_rows_times_rows<DP, kKeyTile>(dp, sG, warp * 16, v_s, LD, lane);   // dP = dO V^T
    const int k0 = key_begin + tile * kKeyTile;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = k0 + j * 8 + quad_col + (e & 1);
        const bool visible = e < 2 ? (key >= lo0 && key < hi0) : (key >= lo1 && key < hi1);
        const float p = visible ? exp2f(s[j][e] * a.scale_log2 - (e < 2 ? lse0 : lse1)) : 0.0f;
        s[j][e] = p * (dp[j][e] - (e < 2 ? delta0 : delta1));  // dS
      }
    }
    mma_accumulators_times_rows<kKeyTile, DP>(dq, s, k_s, LD, 0, lane);  // dQ += dS K
    __syncthreads();
  }

#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = half ? r1 : r0;
    const int row = s_row[r];
    if (row < 0) continue;
    if constexpr (SELECTED) {
      float* dst = a.dq_part + (static_cast<int64_t>(s_aux[r]) - a.dispatch.entry_base) * a.D;
#pragma unroll
      for (int d = 0; d < DT; ++d) {
        const int col = d * 8 + quad_col;
        if (col < a.D)
          *reinterpret_cast<float2*>(dst + col) =
              make_float2(dq[d][2 * half] * a.scale, dq[d][2 * half + 1] * a.scale);
      }
    } else {
      const TokenBlock tb = token_block(a.cu_seqlens, a.n_segments, row_key_row(a, row), a.B);
      const int current = static_cast<int>((tb.block_start - tb.segment_start) / a.B);
      const int32_t* sel = a.selected + static_cast<int64_t>(row) * a.top_k;
      int n_past = 0;
      while (n_past < past_slots && sel[n_past] >= 0 && sel[n_past] < current) ++n_past;
      bf16* dst = a.dq + static_cast<int64_t>(row) * a.D;
      const int64_t part = (static_cast<int64_t>(row) * past_slots - a.dispatch.entry_base) * a.D;
#pragma unroll
      for (int d = 0; d < DT; ++d) {
        const int col = d * 8 + quad_col;
        if (col >= a.D) continue;
        float x0 = dq[d][2 * half] * a.scale, x1 = dq[d][2 * half + 1] * a.scale;
        for (int i = 0; i < n_past; ++i) {  // selection order: fixed summation order
          const float2 p =
              *reinterpret_cast<const float2*>(a.dq_part + part + static_cast<int64_t>(i) * a.D + col);
          x0 += p.x;
          x1 += p.y;
        }
        __nv_bfloat162* g = reinterpret_cast<__nv_bfloat162*>(dst + col);
        const float2 old = __bfloat1622float2(*g);
        *g = __floats2bfloat162_rn(old.x + x0, old.y + x1);
      }
    }
  }
}

// ---- dK / dV (and dQ with atomics) -------------------------------------------------------------------------------
template <int DP>
constexpr int kv_row_tile() {
  return DP == 128 ? 32 : 64;  // rows per iteration; keeps dK + dV + S^T + dP^T in registers
}
inline constexpr int kKvWarps = 4;                // dK/dV CTAs: 4 warps x 16 keys (8 measured no faster)
inline constexpr int kKvKeys = 16 * kKvWarps;      // keys per dK/dV CTA
template <int DP>
constexpr size_t dkv_smem_bytes() {
  constexpr int RT = kv_row_tile<DP>();
  return (size_t{2} * kKvKeys + size_t{4} * RT) * (DP + 8) * sizeof(bf16) +
         size_t{kKvKeys} * (RT + 8) * sizeof(bf16) + 2 * 4 * RT * sizeof(float);
}

// A operand (16 rows x 16 k at r0, k0) from a tile stored transposed, tile[k][row] with row stride ld.
__device__ __forceinline__ void load_a_transposed(uint32_t (&a)[4], const bf16* tile, int ld, int r0, int k0, int lane) {
  ldmatrix_x4_trans(a, tile + (k0 + (lane & 7) + ((lane >> 4) << 3)) * ld + r0 + ((lane >> 3) & 1) * 8);
}

// dq (rows) += scale * dq_acc in bf16, 8 channels per thread (D % 8 == 0).
__global__ void add_dq_kernel(bf16* __restrict__ dq, const float* __restrict__ dq_acc, int64_t n_vectors, float scale) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n_vectors) return;
  uint4 g = reinterpret_cast<uint4*>(dq)[i];
  const float4 x0 = reinterpret_cast<const float4*>(dq_acc)[2 * i], x1 = reinterpret_cast<const float4*>(dq_acc)[2 * i + 1];
  g.x = pack_bf16(fmaf(x0.x, scale, bf16_lo(g.x)), fmaf(x0.y, scale, bf16_hi(g.x)));
  g.y = pack_bf16(fmaf(x0.z, scale, bf16_lo(g.y)), fmaf(x0.w, scale, bf16_hi(g.y)));
  g.z = pack_bf16(fmaf(x1.x, scale, bf16_lo(g.z)), fmaf(x1.y, scale, bf16_hi(g.z)));
  g.w = pack_bf16(fmaf(x1.z, scale, bf16_lo(g.w)), fmaf(x1.w, scale, bf16_hi(g.w)));
  reinterpret_cast<uint4*>(dq)[i] = g;
}

// One CTA per (64-key tile, kv head): blockIdx.x = key tile, blockIdx.y = kv head. Row tiles, in this order:
//  - selected: for each complete block overlapping the key tile (one when B and the segments are 64-aligned), every
//    row of its bucket (rows that chose the block); a row sees the keys of that block only;
//  - causal: tokens t of each head of the group with key <= t < end of the key's block.
// Selected rows first: the B / 64 CTAs of a block are launched together and stream the same gathered Q/dO rows in
// step, so all but the first read them from L2 (causal rows first desynchronised them: 25-35% slower backward).
// dK/dV of both parts accumulate in registers and are added into dk/dv (bf16) once: no f32 (N, Hkv, D) buffer.
// FUSED_DQ (deterministic = false): each row tile also adds its dS K (dQ before the scale) into dq_acc with f32 atomics
// (FlashAttention-2's backward: 5 matrix products per pair instead of 7 with the separate dQ pass), float4 atomics
// (half the atomic operations of float2; measured neutral at D = 128, see bench/notes/moba_kernels.md).
template <int DP, bool FUSED_DQ>
__global__ void __launch_bounds__(32 * kKvWarps) moba_dkv_kernel(const BackwardArgs a) {
  constexpr int LD = DP + 8;
  constexpr int RT = kv_row_tile<DP>();
  constexpr int NT = RT / 8;  // n-tiles of S^T per warp
  constexpr int DT = DP / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  constexpr int KT = kKvKeys;
  constexpr int kThreads = 32 * kKvWarps;
  bf16* sK = reinterpret_cast<bf16*>(smem);  // (KT, LD)
  bf16* sV = sK + KT * LD;                   // (KT, LD)
  bf16* sQ = sV + KT * LD;                   // (2, RT, LD)
  bf16* sG = sQ + 2 * RT * LD;               // (2, RT, LD) dO rows
  float* s_lse2 = reinterpret_cast<float*>(sG + 2 * RT * LD);  // (2, RT)
  float* s_delta = s_lse2 + 2 * RT;                            // (2, RT)
  int* s_tok = reinterpret_cast<int*>(s_delta + 2 * RT);       // (2, RT) token of each row (mask), or -1
  int* s_rowid = s_tok + 2 * RT;                               // (2, RT) query row t * H + h, or -1
  bf16* sdS = reinterpret_cast<bf16*>(s_rowid + 2 * RT);        // (KT, RT + 8) dS^T of the row tile (FUSED_DQ)
  constexpr int LDS = RT + 8;
  __shared__ KeyTileWork<KT, RT> work;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  const int kv_head = blockIdx.y;
  const int key_begin = blockIdx.x * KT;  // this CTA's keys [key_begin, key_end)
  const int key_end = static_cast<int>(min(static_cast<int64_t>(key_begin) + KT, a.Nk));
  if (warp == 0) work.build(a, key_begin, key_end, kv_head, lane);
  __syncthreads();
  const int n_tiles = work.n_tiles(a);

  for (int idx = tid; idx < KT * (DP / 8); idx += kThreads) {
    const int r = idx / (DP / 8), c = idx % (DP / 8) * 8;
    const bool ok = key_begin + r < key_end && c < a.D;
    const int64_t off = (static_cast<int64_t>(key_begin + r) * a.Hkv + kv_head) * a.D + c;
    cp_async_16(sK + r * LD + c, ok ? a.k + off : a.k, ok);
    cp_async_16(sV + r * LD + c, ok ? a.v + off : a.v, ok);
  }
  // Row tile `tile` into buffer `buf`: Q and dO rows by cp.async, lse/delta/token by plain stores (visible to the
  // other warps after the __syncthreads that precedes their use).
  static_assert(RT * (DP / 8) % kThreads == 0, "whole row-tile copies per thread");
  auto load_rows = [&](int tile, int buf) {
    const auto src = work.source(a, tile, kv_head);
    if (tid < RT) {
      const int row = source_row(a, src, tid);
      s_tok[buf * RT + tid] = row_key_row(a, row);
      s_rowid[buf * RT + tid] = row;
      s_lse2[buf * RT + tid] = row >= 0 ? a.lse[row] * kLog2e : INFINITY;
      s_delta[buf * RT + tid] = row >= 0 ? a.delta[row] : 0.0f;
    }
#pragma unroll
    for (int i = 0; i < RT * (DP / 8) / kThreads; ++i) {
      const int idx = tid + i * kThreads;
      const int r = idx / (DP / 8), c = idx % (DP / 8) * 8;
      const int row = source_row(a, src, r);
      const bool ok = row >= 0 && c < a.D;
      const int64_t off = static_cast<int64_t>(row) * a.D + c;
      cp_async_16(sQ + (buf * RT + r) * LD + c, ok ? a.q + off : a.q, ok);
      cp_async_16(sG + (buf * RT + r) * LD + c, ok ? a.dout + off : a.dout, ok);
    }
  };
  if (n_tiles > 0) load_rows(0, 0);
  cp_async_commit();

  // This thread's two keys (rows g and g + 8 of the warp's 16), their blocks' first tokens and ends.
  const int kr0 = warp * 16 + (lane >> 2), kr1 = kr0 + 8, quad_col = 2 * (lane & 3);
  const int key0 = key_begin + kr0, key1 = key_begin + kr1;
  const bool key0_ok = key0 < key_end, key1_ok = key1 < key_end;
  int end0 = INT_MIN, end1 = INT_MIN;      // causal part: row t sees key u iff u <= t < end(u)
  int start0 = INT_MIN, start1 = INT_MIN;  // selected part: a row of block b sees key u iff start(u) = b's start
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int key = half ? key1 : key0;
    if (!(half ? key1_ok : key0_ok)) continue;
    const TokenBlock tb = token_block(a.cu_seqlens, a.n_segments, key, a.B);
    (half ? end1 : end0) = static_cast<int>(min(tb.block_start + a.B, tb.segment_end));
    (half ? start1 : start0) = static_cast<int>(tb.block_start);
  }

  float dk[DT][4], dv[DT][4];
#pragma unroll
  for (int d = 0; d < DT; ++d)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[d][e] = dv[d][e] = 0.0f;

  for (int tile = 0; tile < n_tiles; ++tile) {
    next_tile_loads(tile + 1 < n_tiles, [&] { load_rows(tile + 1, (tile + 1) & 1); });
    __syncthreads();
    const int buf = tile & 1;
    const bf16* q_s = sQ + buf * RT * LD;
    const bf16* g_s = sG + buf * RT * LD;
    const float* lse_s = s_lse2 + buf * RT;
    const float* delta_s = s_delta + buf * RT;
    const int* tok_s = s_tok + buf * RT;
    // Rows of this tile that see each of this thread's keys: tokens [lo, hi) (visible_rows).
    const int b = work.selected_block(tile);
    const int sel_start = b >= 0 ? work.sel_start[b] : 0;
    const int2 vis0 = visible_rows(key0, start0, end0, b >= 0, sel_start);
    const int2 vis1 = visible_rows(key1, start1, end1, b >= 0, sel_start);
    const int lo0 = vis0.x, hi0 = vis0.y, lo1 = vis1.x, hi1 = vis1.y;

    float st[NT][4], dpt[NT][4];  // S^T and dP^T: (16 keys of this warp) x (RT rows)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) st[j][e] = dpt[j][e] = 0.0f;
    mma_rows_times_rows<DP, RT>(st, sK, warp * 16, q_s, LD, lane);   // S^T = K Q^T
    mma_rows_times_rows<DP, RT>(dpt, sV, warp * 16, g_s, LD, lane);  // dP^T = V dO^T
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = j * 8 + quad_col + (e & 1);
        const int token = tok_s[r];
        const bool visible = e < 2 ? (lo0 <= token && token < hi0) : (lo1 <= token && token < hi1);
        const float p = visible ? exp2f(st[j][e] * a.scale_log2 - lse_s[r]) : 0.0f;
        st[j][e] = p;
        dpt[j][e] = p * (dpt[j][e] - delta_s[r]);  // dS^T
      }
    }
    mma_accumulators_times_rows<RT, DP>(dv, st, g_s, LD, 0, lane);   // dV += P^T dO
    mma_accumulators_times_rows<RT, DP>(dk, dpt, q_s, LD, 0, lane);  // dK += dS^T Q
    if constexpr (FUSED_DQ) {
      // dS^T (16 keys of this warp x RT rows) -> sdS, then dQ (RT x DP) = dS (RT x KT keys) K, each warp one
      // 16-row m-tile x DP / (warps / m-tiles) columns, 32 columns at a time, added with float4 atomics.
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const int r = j * 8 + quad_col;
        *reinterpret_cast<uint32_t*>(sdS + kr0 * LDS + r) = pack_bf16(dpt[j][0], dpt[j][1]);
        *reinterpret_cast<uint32_t*>(sdS + kr1 * LDS + r) = pack_bf16(dpt[j][2], dpt[j][3]);
      }
      __syncthreads();
      constexpr int kMTiles = RT / 16, kCols = DP / (kKvWarps / kMTiles);
      const int m0 = (warp % kMTiles) * 16, col_base = (warp / kMTiles) * kCols;
      const int row_a = s_rowid[buf * RT + m0 + (lane >> 2)], row_b = s_rowid[buf * RT + m0 + (lane >> 2) + 8];
      const bool even = (lane & 1) == 0;  // float4 atomics: even lanes take row a, odd lanes row b of a lane pair
      const int my_row = even ? row_a : row_b;
#pragma unroll
      for (int part = 0; part < kCols / 32; ++part) {
        float acc[4][4];
#pragma unroll
        for (int n = 0; n < 4; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < KT / 16; ++ks) {
          uint32_t sa[4];
          load_a_transposed(sa, sdS, LDS, m0, ks * 16, lane);
#pragma unroll
          for (int n2 = 0; n2 < 2; ++n2) {
            uint32_t b[4];
            load_b_cols(b, sK, LD, ks * 16, col_base + part * 32 + n2 * 16, lane);
            mma_bf16_16816(acc[2 * n2], sa, b[0], b[1]);
            mma_bf16_16816(acc[2 * n2 + 1], sa, b[2], b[3]);
          }
        }
#pragma unroll
        for (int n = 0; n < 4; ++n) {
          // Lane pair (c, c ^ 1) swaps halves: the even lane gets row a, columns 4 * (c / 2) .. + 3, the odd lane row b.
          const float give0 = even ? acc[n][2] : acc[n][0], give1 = even ? acc[n][3] : acc[n][1];
          const float got0 = __shfl_xor_sync(0xFFFFFFFFu, give0, 1), got1 = __shfl_xor_sync(0xFFFFFFFFu, give1, 1);
          const float4 v = even ? make_float4(acc[n][0], acc[n][1], got0, got1) : make_float4(got0, got1, acc[n][2], acc[n][3]);
          const int col = col_base + part * 32 + n * 8 + ((lane & 3) >> 1) * 4;
          if (my_row >= 0 && col < a.D)
            atomicAdd(reinterpret_cast<float4*>(a.dq_acc + static_cast<int64_t>(my_row) * a.D + col),
                      v);  // unscaled: add_dq_kernel applies the scale
        }
      }
    }
    __syncthreads();
  }
  cp_async_wait<0>();  // n_tiles == 0: the K/V group is still committed

#pragma unroll
  for (int half = 0; half < 2; ++half) {
    if (!(half ? key1_ok : key0_ok)) continue;
    const int64_t base = (static_cast<int64_t>(half ? key1 : key0) * a.Hkv + kv_head) * a.D;
#pragma unroll
    for (int d = 0; d < DT; ++d) {
      const int col = d * 8 + quad_col;
      if (col >= a.D) continue;
      add_key_row_pair(a.dk, a.dkv_f32, base + col, dk[d][2 * half] * a.scale, dk[d][2 * half + 1] * a.scale, true);
      add_key_row_pair(a.dv, a.dkv_f32, base + col, dv[d][2 * half], dv[d][2 * half + 1], true);
    }
  }
}

template <typename Kernel>
void set_smem(Kernel kernel, size_t bytes) {
  MOBA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

template <int DP>
void launch_backward(BackwardArgs a, const CudaContext& ctx, const AttentionArgs& args) {
  static const bool configured = [] {
    set_smem(moba_dq_kernel<DP, true>, dq_smem_bytes<DP>());
    set_smem(moba_dq_kernel<DP, false>, dq_smem_bytes<DP>());
    set_smem(moba_dkv_kernel<DP, false>, dkv_smem_bytes<DP>());
    set_smem(moba_dkv_kernel<DP, true>, dkv_smem_bytes<DP>());
    return true;
  }();
  (void)configured;
  cudaStream_t stream = ctx.stream;
  const bool deterministic = args.settings.deterministic;
  // The warpgroup-MMA dK/dV kernel (moba_backward_wgmma.cu) takes D = 128 (padded) on sm_90, unless the settings
  // force the mma.sync kernel (comparisons on the same device).
  const bool wgmma = args.settings.moba_dkv_kernel == AttentionKernelSettings::MobaDkvKernel::automatic && DP == 128 &&
                     device_has_wgmma(ctx) && aligned16(a.dk) && aligned16(a.dv) && aligned16(a.q) &&
                     aligned16(a.k) && aligned16(a.v) && aligned16(a.dout);
  const int64_t rows = a.Nq * a.H;
  const int64_t delta_threads = rows * (DP / 8);
  if (rows > 0) {
    delta_kernel<DP><<<static_cast<unsigned>((delta_threads + 255) / 256), 256, 0, stream>>>(
        a.delta, deterministic ? nullptr : a.dq_acc, a.out, a.dout, rows, a.D);
    MOBA_CUDA_CHECK(cudaGetLastError());
  }
  const dim3 dkv_grid(static_cast<unsigned>((a.Nk + kKvKeys - 1) / kKvKeys), a.Hkv);
  constexpr int kKvThreads = 32 * kKvWarps;
  if (deterministic) {
    // dQ without atomics, per chunk of query rows (parts within the entry budget): the selected blocks' dQ ->
    // per-entry parts, then the current-block pass adds them in selection order. One chunk reuses the dispatch of
    // all rows.
    const int64_t all_rows = (a.Nq + 63) / 64 * 64;
    const int64_t chunk = a.top_k > 1 ? moba_chunk_rows(a.Nq, a.H, a.top_k, a.D * static_cast<int64_t>(sizeof(float)),
                                                        args.settings.entry_budget_bytes)
                                      : all_rows;
    if (a.top_k > 1) {
      const int64_t max_entries = chunk * a.H * (a.top_k - 1);
      // Scratch `partials`: dq_part (max_entries, D) f32.
      a.dq_part = static_cast<float*>(
          scratch(args.scratch.partials, "partials", static_cast<size_t>(max_entries) * a.D * sizeof(float)));
    }
    for (int64_t row_begin = 0; row_begin < a.Nq; row_begin += chunk) {
      const int64_t row_end = std::min(a.Nq, row_begin + chunk);
      BackwardArgs c = a;
      c.tile_offset = static_cast<int>(row_begin / 64);
      if (a.top_k > 1) {
        if (chunk < all_rows)  // scratch `chunk_dispatch` holds the chunk's dispatch
          c.dispatch = build_dispatch(ctx, args.scratch.chunk_dispatch, "chunk_dispatch", args, row_begin, row_end,
                                      chunk);
        moba_dq_kernel<DP, true><<<static_cast<unsigned>(c.dispatch.max_items), 128, dq_smem_bytes<DP>(), stream>>>(c);
        MOBA_CUDA_CHECK(cudaGetLastError());
      }
      const dim3 grid(static_cast<unsigned>((row_end - row_begin + 63) / 64), a.H);
      moba_dq_kernel<DP, false><<<grid, 128, dq_smem_bytes<DP>(), stream>>>(c);
      MOBA_CUDA_CHECK(cudaGetLastError());
    }
    if (wgmma) {
      launch_dkv_wgmma(a, stream, false);
    } else {
      moba_dkv_kernel<DP, false><<<dkv_grid, kKvThreads, dkv_smem_bytes<DP>(), stream>>>(a);
      MOBA_CUDA_CHECK(cudaGetLastError());
    }
    return;
  }
  // dq_acc was zeroed by delta_kernel.
  if (wgmma) {
    launch_dkv_wgmma(a, stream, true);
  } else {
    moba_dkv_kernel<DP, true><<<dkv_grid, kKvThreads, dkv_smem_bytes<DP>(), stream>>>(a);
    MOBA_CUDA_CHECK(cudaGetLastError());
  }
  const int64_t vectors = rows * a.D / 8;
  if (vectors == 0) return;
  add_dq_kernel<<<static_cast<unsigned>((vectors + 255) / 256), 256, 0, stream>>>(a.dq, a.dq_acc, vectors, a.scale);
  MOBA_CUDA_CHECK(cudaGetLastError());
}

}  // namespace
}  // namespace attn

void moba_attention_backward(const CudaContext& ctx, const AttentionArgs& args) {
  using namespace attn;
  check_moba_shape("moba_attention_backward", args);
  const int64_t Nq = args.n_queries, Nk = args.n_keys;
  const int H = args.n_heads, D = args.head_dim, top_k = args.top_k;
  if (Nq == 0 && Nk == 0) return;
  BackwardArgs a{args.dq, args.dk, args.dv, args.dkv_f32, nullptr, nullptr, nullptr, args.dout, args.q, args.k,
                 args.v, args.out, args.lse, args.selected, args.cu_seqlens, args.q_rows, nullptr, Dispatch{},
                 args.n_segments, Nq, Nk, H, args.n_kv_heads, D, args.block_size, top_k, args.softmax_scale,
                 args.softmax_scale * kLog2e, 0};
  // Scratch `row_stats`: delta (Nq, H) f32.
  a.delta = static_cast<float*>(scratch(args.scratch.row_stats, "row_stats", static_cast<size_t>(Nq * H) * sizeof(float)));
  if (args.q_rows != nullptr) a.query_index = build_query_index(ctx, args);
  // Scratch `dispatch`: the dispatch of all rows (dK/dV visit every row of a block's bucket). Deterministic: built
  // canonical, its sort in scratch `partials` (free until the dQ parts below, which follow in stream order).
  if (top_k > 1)
    a.dispatch = build_dispatch(ctx, args.scratch.dispatch, "dispatch", args, 0, Nq, (Nq + 63) / 64 * 64,
                                args.settings.deterministic ? &args.scratch.partials : nullptr, "partials");
  // Scratch `partials`, otherwise: dq_acc (Nq, H, D) f32 (deterministic: per-chunk dQ parts, see launch_backward).
  if (!args.settings.deterministic)
    a.dq_acc = static_cast<float*>(
        scratch(args.scratch.partials, "partials", static_cast<size_t>(Nq * H) * D * sizeof(float)));
  if (D <= 64)
    launch_backward<64>(a, ctx, args);
  else
    launch_backward<128>(a, ctx, args);
}

void causal_dq_ordered(const CudaContext& ctx, const AttentionArgs& args) {
  using namespace attn;
  const int64_t Nq = args.n_queries, Nk = args.n_keys;
  const int H = args.n_heads, D = args.head_dim;
  MOBA_CHECK(D >= 8 && D <= 128 && D % 8 == 0 && Nq * H < (int64_t{1} << 31) && aligned16(args.q) &&
                 aligned16(args.k) && aligned16(args.v) && aligned16(args.out) && aligned16(args.dout),
             cat("attention_backward (cuda): the deterministic full-attention dQ takes head dims 8..128 in steps of 8, "
                 "16-byte aligned rows and Nq * H < 2^31; got D = ", D, ", Nq * H = ", Nq * H),
             "set train.deterministic: false, or use such a model.head_dim");
  if (Nq == 0) return;
  // One "current block" per document: a block size of at least every document's length (Nk), no past blocks.
  BackwardArgs a{args.dq, nullptr, nullptr, false, nullptr, nullptr, nullptr, args.dout, args.q, args.k, args.v,
                 args.out, args.lse, nullptr, args.cu_seqlens, args.q_rows, nullptr, Dispatch{}, args.n_segments, Nq,
                 Nk, H, args.n_kv_heads, D, static_cast<int>(std::max<int64_t>(Nk, 1)), 1, args.softmax_scale,
                 args.softmax_scale * kLog2e, 0};
  // Scratch `row_stats`: delta (Nq, H) f32 (the flash kernel's own Delta / lse2 there are no longer read).
  a.delta = static_cast<float*>(scratch(args.scratch.row_stats, "row_stats", static_cast<size_t>(Nq * H) * sizeof(float)));
  const int64_t rows = Nq * H;
  const dim3 grid(static_cast<unsigned>((Nq + 63) / 64), H);
  auto run = [&](auto dp) {
    constexpr int DP = decltype(dp)::value;
    static const bool configured = [] {
      MOBA_CUDA_CHECK(cudaFuncSetAttribute(moba_dq_kernel<DP, false>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(dq_smem_bytes<DP>())));
      return true;
    }();
    (void)configured;
    delta_kernel<DP><<<static_cast<unsigned>((rows * (DP / 8) + 255) / 256), 256, 0, ctx.stream>>>(
        a.delta, nullptr, a.out, a.dout, rows, a.D);
    MOBA_CUDA_CHECK(cudaGetLastError());
    moba_dq_kernel<DP, false><<<grid, 128, dq_smem_bytes<DP>(), ctx.stream>>>(a);
    MOBA_CUDA_CHECK(cudaGetLastError());
  };
  if (D <= 64) run(std::integral_constant<int, 64>{});
  else run(std::integral_constant<int, 128>{});
}

}  // namespace moba::cuda
