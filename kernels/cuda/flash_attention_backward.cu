// Dense causal flash-attention backward over packed segments (FlashAttention-2's algorithm 2, Dao 2023), in three
// launches on ctx.stream: (1) Delta = rowsum(dO * O) and lse * log2(e), both laid out (H, N); (2) one CTA per
// (tile of kBlockN keys, kv head) loops over the query heads of its GQA group and the query tiles that can see its
// keys, recomputes P^T = exp2(K Q^T * scale * log2 e - lse2) on tensor cores, accumulates dV = P^T dO and
// dK = dS^T Q in registers and adds dQ = dS K into an f32 buffer; (3) dq += dq_accum * scale.
// On sm_90 with D = 128 the five products run on warpgroup MMAs (wgmma, as FlashAttention-3 does; Shah et al.
// 2024), elsewhere on mma.sync; both share the masking, softmax recomputation and epilogues. dq_accum is laid out
// in the order of the MMA accumulators (dq_tile_index), so each thread adds its four dQ values of a 16x8 tile with
// one 16-byte vector reduction and a warp's reductions cover whole contiguous 512-byte ranges.
// Invariants: dK/dV of a (key tile, kv head) are owned by one CTA (no atomics, plain read-add-write into bf16); the
// dq accumulation buffer (scratch slot 2, layout in dq_tile_index) is zeroed at every call; scratch slot 3 holds
// Delta and lse2; query tiles start at multiples of 64 (kBlockM) for every key tile.
#include <algorithm>
#include <type_traits>

#include "kernels/cuda/attention.h"
#include "kernels/cuda/flash_attention_common.cuh"

namespace moba::cuda {
namespace flash {
namespace {

// Tile constants of one backward instantiation. Each warp owns 16 keys (rows of S^T = K Q^T); with kWgmma each
// warpgroup (4 warps) owns 64 and issues S^T, dP^T, dV, dK as 64-row wgmmas, then dQ (64 queries) split by columns.
template <int kD_, int kWarps_, int kBlockM_, bool kWgmma_ = false>
struct BackwardTiles {
  static constexpr bool kWgmma = kWgmma_;
  static constexpr int kD = kD_;              // padded head dim
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBlockN = 16 * kWarps;  // keys per CTA
  static constexpr int kBlockM = kBlockM_;     // query rows per step
  using KVTile = std::conditional_t<kWgmma, WgTile<kBlockN>, SmemTile<kBlockN, kD>>;
  using QTile = std::conditional_t<kWgmma, WgTile<kBlockM>, SmemTile<kBlockM, kD>>;
  using DSTile = SmemTile<kBlockN, kBlockM>;  // dS^T (keys, queries) bf16; for wgmma 128-byte rows, MN-major A
  static constexpr int kAlign = kWgmma ? 1024 : 128;
  // K, V, (Q, dO) x 2 stages, dS^T, (lse2, Delta) x 2 stages
  static constexpr int kStatsOffset = 2 * KVTile::kBytes + 4 * QTile::kBytes + DSTile::kBytes;
  static constexpr int kSmemBytes = kStatsOffset + 2 * 2 * kBlockM * 4 + kAlign;
  // mma.sync dQ (kBlockM, kD) = dS K is split over the warps: kMTilesQ row tiles, each shared by kWarps / kMTilesQ
  // warps that split its columns, computed in passes of at most 64 columns (32 accumulators).
  static constexpr int kMTilesQ = kBlockM / 16;
  static constexpr int kDqCols = kD / (kWarps / kMTilesQ);
  static constexpr int kDqPassCols = kDqCols < 64 ? kDqCols : 64;
  static_assert(kD % 16 == 0 && kBlockM == 64 && kWarps % kMTilesQ == 0 && kDqPassCols % 16 == 0);
  static_assert(!kWgmma || (kD == 128 && kWarps == 8 && kBlockM == 64));
};

struct BackwardParams {
  bf16* dk;                  // (N, Hkv, D) +=
  bf16* dv;                  // (N, Hkv, D) +=
  float* dq_accum;           // (H, ceil(N / 64), 64 * kD) f32, unscaled sum of dS K (dq_tile_index)
  const bf16* q;             // (N, H, D)
  const bf16* k;             // (N, Hkv, D)
  const bf16* v;             // (N, Hkv, D)
  const bf16* dout;          // (N, H, D)
  const float* lse2;         // (H, N) lse * log2(e)
  const float* delta;        // (H, N) rowsum(dO * O)
  const int32_t* cu_seqlens;  // (S + 1)
  int n_segments, N, H, Hkv, D, group, dq_tiles;  // dq_tiles = ceil(N / 64) per head
  float scale_log2, scale;
  bool vector;
};

// (1) One warp per (t, h): delta[h][t] = sum_d dout * out; lse2[h][t] = lse[t][h] * log2(e).
__global__ void flash_backward_preprocess_kernel(float* delta, float* lse2, const bf16* dout, const bf16* out,
                                                 const float* lse, int N, int H, int D) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= static_cast<int64_t>(N) * H) return;
  const bf16* a = dout + row * D;
  const bf16* b = out + row * D;
  float sum = 0.0f;
  for (int d = lane; d < D; d += 32) sum += __bfloat162float(a[d]) * __bfloat162float(b[d]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (lane == 0) {
    const int64_t t = row / H, h = row % H;
    delta[h * N + t] = sum;
    lse2[h * N + t] = lse[row] * kLog2e;
  }
}

// Position of dQ element (row r, column c) inside a 64-row tile of dq_accum: the order in which the accumulators of
// 64-column block c / 64 lie in the registers of the warps (16-row band r / 16, 8-column group, lane = 4 (r % 8) +
// c % 8 / 2, then r % 16 / 8, c % 2; the m16n8 accumulator layout that wgmma shares). A thread's 4 accumulators of
// one 16x8 tile are 4 consecutive floats, a warp's 32 lanes 512 contiguous bytes. Tiles are (head, row / 64) in order.
template <int kD>
__device__ __forceinline__ int dq_tile_index(int r, int c) {
  constexpr int kGroups = (kD < 64 ? kD : 64) / 8;  // 8-column groups per column block
  return (((c >> 6) * 4 + (r >> 4)) * kGroups + ((c & 63) >> 3)) * 128 + ((r & 7) * 4 + ((c & 7) >> 1)) * 4 +
         ((r >> 3) & 1) * 2 + (c & 1);
}
__device__ __forceinline__ float* dq_tile(const BackwardParams& p, int kD, int h, int m0) {
  return p.dq_accum + (static_cast<int64_t>(h) * p.dq_tiles + m0 / 64) * 64 * kD;
}

// The dq_accum tile at m0 (head h) += one warp's accumulators of rows 16 band + [0, 16) and columns col0 + [0, 8
// kTiles) (col0 a multiple of 8 kTiles, inside one 64-column block). Rows past the queries that see the keys and
// columns past D hold zeros (P, hence dS, is masked there; K's padding columns are zero), so whole tiles are added
// (the buffer has 64 rows per tile); wasted adds only touch the last, partial query tile of a key tile.
template <int kD, int kTiles>
__device__ __forceinline__ void add_dq_band(const BackwardParams& p, const float (&acc)[kTiles][4], int h, int m0,
                                            int band, int col0, int lane) {
  float* dst = dq_tile(p, kD, h, m0) + dq_tile_index<kD>(band * 16 + lane / 4, col0 + 2 * (lane % 4));
#pragma unroll
  for (int j = 0; j < kTiles; ++j) red_add_f32x4(dst + j * 128, acc[j]);  // column + 8 = index + 128 in a block
}

// (2) dK, dV of one (key tile, kv head) and the dQ contributions of its keys.
template <class T>
__global__ void __launch_bounds__(T::kThreads) flash_backward_kernel(const BackwardParams p) {
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t s_k = (smem_address(smem) + T::kAlign - 1) & ~static_cast<uint32_t>(T::kAlign - 1);
  constexpr int kD = T::kD, kBlockM = T::kBlockM, kBlockN = T::kBlockN;
  constexpr int kQTiles = kBlockM / 8, kDTiles = kD / 8, kKStepsD = kD / 16, kKStepsM = kBlockM / 16;
  using KVTile = typename T::KVTile;
  using QTile = typename T::QTile;
  using DSTile = typename T::DSTile;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, tig = lane % 4;
  const int hk = static_cast<int>(blockIdx.x % p.Hkv);
  const int n0 = static_cast<int>(blockIdx.x / p.Hkv) * kBlockN;  // tile 0 (most queries) launches first
  const int keys_valid = min(kBlockN, p.N - n0);
  const int q_end = segment_end(p.cu_seqlens, p.n_segments, n0 + keys_valid - 1);  // queries [n0, q_end) see keys
  const int first_segment_end = segment_end(p.cu_seqlens, p.n_segments, n0);
  const int n_q_tiles = (q_end - n0 + kBlockM - 1) / kBlockM;
  const int steps = p.group * n_q_tiles;

  // This thread's keys (fragment rows g, g + 8 of the warp's 16) and the ends of their segments.
  int key_u[2], key_last_query[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    key_u[half] = n0 + warp * 16 + half * 8 + g;
    key_last_query[half] = key_u[half] < p.N ? segment_end(p.cu_seqlens, p.n_segments, key_u[half]) - 1 : -1;
  }

  const int64_t q_stride = static_cast<int64_t>(p.H) * p.D, kv_stride = static_cast<int64_t>(p.Hkv) * p.D;
  const uint32_t s_v = s_k + KVTile::kBytes;
  auto s_q = [&](int stage) { return s_k + 2 * KVTile::kBytes + stage * 2 * QTile::kBytes; };
  auto s_do = [&](int stage) { return s_q(stage) + QTile::kBytes; };
  const uint32_t s_ds = s_k + 2 * KVTile::kBytes + 4 * QTile::kBytes;
  auto s_lse = [&](int stage) { return s_k + T::kStatsOffset + stage * 2 * kBlockM * 4; };
  auto s_delta = [&](int stage) { return s_lse(stage) + kBlockM * 4; };

  const int64_t kv_offset = static_cast<int64_t>(n0) * kv_stride + static_cast<int64_t>(hk) * p.D;
  load_tile<KVTile, T::kThreads>(s_k, p.k + kv_offset, kv_stride, keys_valid, p.D, p.vector, tid);
  load_tile<KVTile, T::kThreads>(s_v, p.v + kv_offset, kv_stride, keys_valid, p.D, p.vector, tid);
  cp_async_commit();
  auto load_step = [&](int step, int stage) {
    const int h = hk * p.group + step / n_q_tiles, m0 = n0 + (step % n_q_tiles) * kBlockM;
    const int64_t offset = static_cast<int64_t>(m0) * q_stride + static_cast<int64_t>(h) * p.D;
    const int rows = min(kBlockM, p.N - m0);
    load_tile<QTile, T::kThreads>(s_q(stage), p.q + offset, q_stride, rows, p.D, p.vector, tid);
    load_tile<QTile, T::kThreads>(s_do(stage), p.dout + offset, q_stride, rows, p.D, p.vector, tid);
    const int64_t stats = static_cast<int64_t>(h) * p.N + m0;
    for (int i = tid; i < kBlockM; i += T::kThreads) {
      const bool valid = i < rows;
      cp_async_4(s_lse(stage) + i * 4, p.lse2 + (valid ? stats + i : 0), valid);
      cp_async_4(s_delta(stage) + i * 4, p.delta + (valid ? stats + i : 0), valid);
    }
  };
  load_step(0, 0);
  cp_async_commit();

  float dk[kDTiles][4] = {}, dv[kDTiles][4] = {};
  // ldmatrix lane offsets (Q, dO, K and V tiles share one layout): A rows, B rows, B transposed, dS A transposed.
  const uint32_t lane_a = KVTile::offset(lane & 15, lane >> 4);
  const uint32_t lane_b = KVTile::offset((lane & 7) + ((lane >> 4) << 3), (lane >> 3) & 1);
  const uint32_t lane_bt = KVTile::offset((lane & 7) + ((lane >> 3) & 1) * 8, lane >> 4);
  const uint32_t lane_ds = DSTile::offset((lane & 7) + ((lane >> 4) << 3), (lane >> 3) & 1);
  for (int step = 0; step < steps; ++step) {
    const int stage = step & 1;
    const int h = hk * p.group + step / n_q_tiles, m0 = n0 + (step % n_q_tiles) * kBlockM;
    if (step + 1 < steps) {
      load_step(step + 1, stage ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    if constexpr (T::kWgmma) fence_proxy_async();
    __syncthreads();

    // ---- S^T = K Q^T and dP^T = V dO^T for the warp's 16 keys (rows) and the kBlockM queries (columns) ----
    float s[kQTiles][4] = {}, dp[kQTiles][4] = {};
    if constexpr (T::kWgmma) {
      const uint32_t key_rows = (warp / 4) * 64 * KVTile::kRowBytes;
      fence_registers(s);
      fence_registers(dp);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kKStepsD; ++kk) {  // K-major operands: 16 columns = 32 bytes of a swizzled row
        const uint32_t kv_column = key_rows + (kk / 4) * KVTile::kBlockBytes + (kk % 4) * 32;
        const uint32_t q_column = (kk / 4) * QTile::kBlockBytes + (kk % 4) * 32;
        wgmma_m64n64k16_ss<0, 0>(s, wgmma_descriptor(s_k + kv_column, 16, 1024),
                                 wgmma_descriptor(s_q(stage) + q_column, 16, 1024));
        wgmma_m64n64k16_ss<0, 0>(dp, wgmma_descriptor(s_v + kv_column, 16, 1024),
                                 wgmma_descriptor(s_do(stage) + q_column, 16, 1024));
      }
      wgmma_commit();
      wgmma_wait_all();
      fence_registers(s);
      fence_registers(dp);
    } else {
#pragma unroll
      for (int kk = 0; kk < kKStepsD; ++kk) {
        uint32_t a[4], c[4];
        ldmatrix_x4(a, s_k + KVTile::at(lane_a, warp * 16, kk * 2));
        ldmatrix_x4(c, s_v + KVTile::at(lane_a, warp * 16, kk * 2));
#pragma unroll
        for (int np = 0; np < kQTiles / 2; ++np) {
          uint32_t b[4];
          ldmatrix_x4(b, s_q(stage) + QTile::at(lane_b, np * 16, kk * 2));
          mma_bf16_16816(s[2 * np], a, b[0], b[1]);
          mma_bf16_16816(s[2 * np + 1], a, b[2], b[3]);
          ldmatrix_x4(b, s_do(stage) + QTile::at(lane_b, np * 16, kk * 2));
          mma_bf16_16816(dp[2 * np], c, b[0], b[1]);
          mma_bf16_16816(dp[2 * np + 1], c, b[2], b[3]);
        }
      }
    }
    // ---- P^T = exp2(S^T * scale * log2 e - lse2), zero where the query must not see the key;
    //      dS^T = P^T * (dP^T - Delta) ----
    const bool need_mask = m0 < n0 + warp * 16 + 15 || m0 + kBlockM > first_segment_end;
#pragma unroll
    for (int nt = 0; nt < kQTiles; ++nt) {
      const float2 lse2 = ld_shared_f32x2(s_lse(stage) + (nt * 8 + 2 * tig) * 4);  // columns 2 tig, 2 tig + 1
      const float2 delta = ld_shared_f32x2(s_delta(stage) + (nt * 8 + 2 * tig) * 4);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float pv = fast_exp2(fmaf(s[nt][e], p.scale_log2, -((e & 1) ? lse2.y : lse2.x)));
        if (need_mask) {
          const int t = m0 + nt * 8 + 2 * tig + (e & 1);
          if (t < key_u[e >> 1] || t > key_last_query[e >> 1]) pv = 0.0f;
        }
        s[nt][e] = pv;
        dp[nt][e] = pv * (dp[nt][e] - ((e & 1) ? delta.y : delta.x));
      }
    }
    // ---- dV += P^T dO and dK += dS^T Q (A operands straight from the accumulators) ----
    uint32_t a_p[kKStepsM][4], a_ds[kKStepsM][4];
#pragma unroll
    for (int ks = 0; ks < kKStepsM; ++ks) {
      accumulators_to_a(a_p[ks], s[2 * ks], s[2 * ks + 1]);
      accumulators_to_a(a_ds[ks], dp[2 * ks], dp[2 * ks + 1]);
    }
    if constexpr (T::kWgmma) {
      fence_registers(dv);
      fence_registers(dk);
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < kKStepsM; ++ks) {  // dO and Q are MN-major here: 16 queries = 2048 bytes per step
        const uint32_t rows = ks * 16 * QTile::kRowBytes;
        wgmma_m64n128k16_rs<1>(dv, a_p[ks], wgmma_descriptor(s_do(stage) + rows, QTile::kBlockBytes, 1024));
        wgmma_m64n128k16_rs<1>(dk, a_ds[ks], wgmma_descriptor(s_q(stage) + rows, QTile::kBlockBytes, 1024));
      }
      wgmma_commit();  // completes under the dQ wait below
    } else {
#pragma unroll
      for (int ks = 0; ks < kKStepsM; ++ks) {
#pragma unroll
        for (int dq2 = 0; dq2 < kDTiles / 2; ++dq2) {
          uint32_t b[4];
          ldmatrix_x4_trans(b, s_do(stage) + QTile::at(lane_bt, ks * 16, dq2 * 2));
          mma_bf16_16816(dv[2 * dq2], a_p[ks], b[0], b[1]);
          mma_bf16_16816(dv[2 * dq2 + 1], a_p[ks], b[2], b[3]);
          ldmatrix_x4_trans(b, s_q(stage) + QTile::at(lane_bt, ks * 16, dq2 * 2));
          mma_bf16_16816(dk[2 * dq2], a_ds[ks], b[0], b[1]);
          mma_bf16_16816(dk[2 * dq2 + 1], a_ds[ks], b[2], b[3]);
        }
      }
    }
    // ---- dS^T to shared memory (bf16) for dQ, which sums over all the CTA's keys ----
#pragma unroll
    for (int ks = 0; ks < kKStepsM; ++ks)
#pragma unroll
      for (int r = 0; r < 4; ++r)  // a_ds[ks][r]: key row g + 8 (r & 1), query columns 16 ks + 8 (r >> 1) + 2 tig
        st_shared_4(s_ds + DSTile::offset(warp * 16 + (r & 1) * 8 + g, 2 * ks + (r >> 1)) + tig * 4, a_ds[ks][r]);
    if constexpr (T::kWgmma) fence_proxy_async();
    __syncthreads();
    // ---- dQ (kBlockM, kD) += dS K, then vector reductions into dq_accum ----
    if constexpr (T::kWgmma) {
      // Warpgroup w: all 64 queries, columns [64 w, 64 w + 64); A = dS read MN-major out of dS^T, B = K MN-major.
      float acc[8][4] = {};
      fence_registers(acc);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {  // 16 keys = 2048 bytes per step
        const uint32_t rows = kk * 16 * KVTile::kRowBytes;
        wgmma_m64n64k16_ss<1, 1>(acc, wgmma_descriptor(s_ds + rows, DSTile::kBytes, 1024),
                                 wgmma_descriptor(s_k + (warp / 4) * KVTile::kBlockBytes + rows, KVTile::kBlockBytes,
                                                  1024));
      }
      wgmma_commit();
      wgmma_wait_all();
      fence_registers(acc);
      fence_registers(dv);
      fence_registers(dk);
      fence_registers(a_p);
      fence_registers(a_ds);
      add_dq_band<kD, 8>(p, acc, h, m0, warp % 4, (warp / 4) * 64, lane);
    } else {
      const int mq = warp % T::kMTilesQ, col_begin = (warp / T::kMTilesQ) * T::kDqCols;
#pragma unroll
      for (int pass = 0; pass < T::kDqCols / T::kDqPassCols; ++pass) {
        const int col0 = col_begin + pass * T::kDqPassCols;
        float acc[T::kDqPassCols / 8][4] = {};
#pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk) {
          uint32_t a[4];  // dS (queries, keys) read transposed out of dS^T
          ldmatrix_x4_trans(a, s_ds + DSTile::at(lane_ds, kk * 16, mq * 2));
#pragma unroll
          for (int dq2 = 0; dq2 < T::kDqPassCols / 16; ++dq2) {
            uint32_t b[4];
            ldmatrix_x4_trans(b, s_k + KVTile::at(lane_bt, kk * 16, col0 / 8 + dq2 * 2));
            mma_bf16_16816(acc[2 * dq2], a, b[0], b[1]);
            mma_bf16_16816(acc[2 * dq2 + 1], a, b[2], b[3]);
          }
        }
        add_dq_band<kD, T::kDqPassCols / 8>(p, acc, h, m0, mq, col0, lane);
      }
    }
  }

  // ---- dK (scaled) and dV added into the bf16 outputs; each (key, kv head) row belongs to this CTA alone ----
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int u = key_u[half];
    if (u >= p.N) continue;
    const int64_t row = (static_cast<int64_t>(u) * p.Hkv + hk) * p.D;
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt) {
      const int col = dt * 8 + 2 * tig;
      if (col >= p.D) continue;
      const float2 old_k = load_bf16_pair(p.dk + row + col, p.vector);
      const float2 old_v = load_bf16_pair(p.dv + row + col, p.vector);
      store_bf16_pair(p.dk + row + col, old_k.x + dk[dt][2 * half] * p.scale,
                      old_k.y + dk[dt][2 * half + 1] * p.scale, p.vector);
      store_bf16_pair(p.dv + row + col, old_v.x + dv[dt][2 * half], old_v.y + dv[dt][2 * half + 1], p.vector);
    }
  }
}

// (3) dq (bf16) += dq_accum * scale: each thread step reads 4 consecutive floats of dq_accum, the pairs (r, c),
// (r, c + 1) and (r + 8, c), (r + 8, c + 1) of a tile (dq_tile_index read backwards).
template <int kD>
__global__ void flash_backward_dq_kernel(bf16* dq, const float* dq_accum, int N, int H, int D, int dq_tiles,
                                         float scale, bool vector) {
  constexpr int kGroups = (kD < 64 ? kD : 64) / 8, kVectorsPerTile = 64 * kD / 4;
  const int64_t vectors = static_cast<int64_t>(H) * dq_tiles * kVectorsPerTile;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < vectors;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t tile = i / kVectorsPerTile;
    const int within = static_cast<int>(i % kVectorsPerTile), chunk = within / 32, lane = within % 32;
    const int r = (chunk / kGroups % 4) * 16 + lane / 4;
    const int c = (chunk / (4 * kGroups)) * 64 + (chunk % kGroups) * 8 + (lane % 4) * 2;
    const int h = static_cast<int>(tile / dq_tiles), t = static_cast<int>(tile % dq_tiles) * 64 + r;
    if (c >= D) continue;
    const float4 acc = reinterpret_cast<const float4*>(dq_accum)[i];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      if (t + 8 * half >= N) continue;
      bf16* dst = dq + (static_cast<int64_t>(t + 8 * half) * H + h) * D + c;
      const float2 old = load_bf16_pair(dst, vector);
      store_bf16_pair(dst, old.x + (half ? acc.z : acc.x) * scale, old.y + (half ? acc.w : acc.y) * scale, vector);
    }
  }
}

template <class T>
void launch_backward(const CudaContext& ctx, const BackwardParams& p) {
  constexpr int smem = T::kSmemBytes;
  MOBA_CUDA_CHECK(cudaFuncSetAttribute(flash_backward_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const int64_t blocks = static_cast<int64_t>((p.N + T::kBlockN - 1) / T::kBlockN) * p.Hkv;
  flash_backward_kernel<T><<<static_cast<unsigned>(blocks), T::kThreads, smem, ctx.stream>>>(p);
  MOBA_CUDA_CHECK(cudaGetLastError());
}



}  // namespace
}  // namespace flash

void flash_attention_backward(const CudaContext& ctx, bf16* dq, bf16* dk, bf16* dv, const bf16* dout, const bf16* q,
                              const bf16* k, const bf16* v, const bf16* out, const float* lse,
                              const int32_t* cu_seqlens, int n_segments, int64_t N, int H, int Hkv, int D,
                              float softmax_scale) {
  using namespace flash;
  MOBA_CHECK(D >= 2 && D <= 128 && D % 2 == 0 && H > 0 && Hkv > 0 && H % Hkv == 0 && n_segments >= 1 &&
                 N < INT32_MAX,
             cat("flash_attention_backward: unsupported shape (N ", N, ", H ", H, ", Hkv ", Hkv, ", D ", D, ")"),
             "the CUDA attention needs an even head dim <= 128 and H divisible by Hkv");
  if (N == 0) return;
  const int kD = padded_head_dim(D), dq_tiles = static_cast<int>((N + 63) / 64);
  const size_t dq_accum_bytes = static_cast<size_t>(H) * dq_tiles * 64 * kD * sizeof(float);
  float* dq_accum = static_cast<float*>(ctx.scratch(2, dq_accum_bytes));  // (H, dq_tiles, 64 * kD)
  float* stats = static_cast<float*>(ctx.scratch(3, static_cast<size_t>(2 * N * H) * sizeof(float)));
  float* delta = stats;          // (H, N)
  float* lse2 = stats + N * H;   // (H, N)
  MOBA_CUDA_CHECK(cudaMemsetAsync(dq_accum, 0, dq_accum_bytes, ctx.stream));

  constexpr int kPreprocessWarps = 8;
  const int64_t rows = N * H;
  flash_backward_preprocess_kernel<<<static_cast<unsigned>((rows + kPreprocessWarps - 1) / kPreprocessWarps),
                                     kPreprocessWarps * 32, 0, ctx.stream>>>(delta, lse2, dout, out, lse,
                                                                            static_cast<int>(N), H, D);
  MOBA_CUDA_CHECK(cudaGetLastError());

  const bool vector = D % 8 == 0 && aligned16(dq) && aligned16(dk) && aligned16(dv) && aligned16(dout) &&
                      aligned16(q) && aligned16(k) && aligned16(v);
  const BackwardParams p{dk, dv, dq_accum, q, k, v, dout, lse2, delta, cu_seqlens, n_segments, static_cast<int>(N),
                         H, Hkv, D, H / Hkv, dq_tiles, softmax_scale * kLog2e, softmax_scale, vector};
  switch (kD) {
    case 16: launch_backward<BackwardTiles<16, 4, 64>>(ctx, p); break;
    case 32: launch_backward<BackwardTiles<32, 4, 64>>(ctx, p); break;
    case 64: launch_backward<BackwardTiles<64, 4, 64>>(ctx, p); break;
    default:  // 128: warpgroup MMAs on sm_90, mma.sync elsewhere
      if (device_has_wgmma(ctx)) launch_backward<BackwardTiles<128, 8, 64, true>>(ctx, p);
      else launch_backward<BackwardTiles<128, 8, 64>>(ctx, p);
      break;
  }

  const int64_t vectors = static_cast<int64_t>(H) * dq_tiles * 16 * kD;
  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>(
      std::min<int64_t>((vectors + threads - 1) / threads, static_cast<int64_t>(ctx.sm_count) * 16));
  auto finish_dq = [&](auto kernel) {
    kernel<<<blocks, threads, 0, ctx.stream>>>(dq, dq_accum, static_cast<int>(N), H, D, dq_tiles, softmax_scale,
                                               vector);
  };
  switch (kD) {
    case 16: finish_dq(flash_backward_dq_kernel<16>); break;
    case 32: finish_dq(flash_backward_dq_kernel<32>); break;
    case 64: finish_dq(flash_backward_dq_kernel<64>); break;
    default: finish_dq(flash_backward_dq_kernel<128>); break;
  }
  MOBA_CUDA_CHECK(cudaGetLastError());
}

}  // namespace moba::cuda
