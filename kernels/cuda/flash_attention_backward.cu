// Dense causal flash-attention backward over packed segments (FlashAttention-2's algorithm 2, Dao 2023), in three
// launches on ctx.stream: (1) Delta = rowsum(dO * O) and lse * log2(e), both laid out (H, N); (2) one CTA per
// (tile of kBlockN keys, kv head) loops over the query heads of its GQA group and the query tiles that can see its
// keys, recomputes P^T = exp2(K Q^T * scale * log2 e - lse2) on tensor cores, accumulates dV = P^T dO and
// dK = dS^T Q in registers and adds dQ = dS K into an f32 buffer; (3) dq += dq_accum * scale.
// On sm_90 with D = 128 the five products run on warpgroup MMAs (wgmma, as FlashAttention-3 does; Shah et al.
// 2024), elsewhere on mma.sync; both share the masking, softmax recomputation and epilogues. dq_accum is laid out
// in the order of the MMA accumulators (dq_tile_index), so each thread adds its four dQ values of a 16x8 tile with
// one 16-byte vector reduction and a warp's reductions cover whole contiguous 512-byte ranges.
// Query rows may stand at any ascending key rows (q_rows): the query rows that see a key tile are a contiguous range
// [first_query_at(tile start), first_query_at(end of its last key's document)), walked in tiles from a multiple of 64.
// settings.deterministic: step (2) leaves dQ out and causal_dq_ordered (moba_backward.cu) adds it query-major,
// without atomics (3 more products per pair: S, dP and dS K recomputed per query tile).
// Invariants: dK/dV of a (key tile, kv head) are owned by one CTA (no atomics, plain read-add-write into bf16 or
// f32), so they are bitwise reproducible; the atomic dQ is not (f32 adds in run order); the dq accumulation buffer
// (scratch `partials`, layout in dq_tile_index) is zeroed at every call; scratch `row_stats` holds Delta and lse2;
// query tiles start at multiples of 64 (kBlockM) for every key tile.
#include <algorithm>
#include <type_traits>

#include "kernels/cuda/attention.h"
#include "kernels/cuda/attention_primitives.cuh"
#include "kernels/cuda/attention_scratch.h"

namespace moba::cuda {
namespace attn {
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
  static constexpr int kKeyRowBytes = 2 * kBlockM * 4;  // with q_rows: (2 stages, kBlockM) key rows of the query rows
  // mma.sync dQ (kBlockM, kD) = dS K is split over the warps: kMTilesQ row tiles, each shared by kWarps / kMTilesQ
  // warps that split its columns, computed in passes of at most 64 columns (32 accumulators).
  static constexpr int kMTilesQ = kBlockM / 16;
  static constexpr int kDqCols = kD / (kWarps / kMTilesQ);
  static constexpr int kDqPassCols = kDqCols < 64 ? kDqCols : 64;
  static_assert(kD % 16 == 0 && kBlockM == 64 && kWarps % kMTilesQ == 0 && kDqPassCols % 16 == 0);
  static_assert(!kWgmma || (kD == 128 && kWarps == 8 && kBlockM == 64));
};

struct BackwardParams {
  void* dk;                  // (Nk, Hkv, D) +=, bf16 (or f32 with dkv_f32)
  void* dv;                  // (Nk, Hkv, D) +=
  float* dq_accum;           // (H, ceil(Nq / 64), 64 * kD) f32, unscaled sum of dS K (dq_tile_index)
  const bf16* q;             // (Nq, H, D)
  const bf16* k;             // (Nk, Hkv, D)
  const bf16* v;             // (Nk, Hkv, D)
  const bf16* dout;          // (Nq, H, D)
  const float* lse2;         // (H, Nq) lse * log2(e)
  const float* delta;        // (H, Nq) rowsum(dO * O)
  const int32_t* cu_seqlens;  // (S + 1)
  const int32_t* q_rows;      // (Nq) key row of each query row (kQueryRows only)
  const int32_t* query_index;  // (Nk + 1) first query row at or after each key row (kQueryRows only)
  int n_segments, Nq, Nk, H, Hkv, D, group, dq_tiles;  // dq_tiles = ceil(Nq / 64) per head
  float scale_log2, scale;
  bool vector;
  bool dkv_f32;
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
template <class T, bool kQueryRows>
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
  const int keys_valid = min(kBlockN, p.Nk - n0);
  // Query rows standing at key rows [n0, q_end) see the keys: [m_begin, m_end), walked from a multiple of 64.
  const int q_end = segment_end(p.cu_seqlens, p.n_segments, n0 + keys_valid - 1);
  const int first_segment_end = segment_end(p.cu_seqlens, p.n_segments, n0);
  const int m_begin = kQueryRows ? first_query_at(p.query_index, n0) & ~(kBlockM - 1) : n0;
  const int m_end = kQueryRows ? first_query_at(p.query_index, q_end) : q_end;
  const int n_q_tiles = max(0, (m_end - m_begin + kBlockM - 1) / kBlockM);
  const int steps = p.group * n_q_tiles;

  // This thread's keys (fragment rows g, g + 8 of the warp's 16) and the ends of their segments.
  int key_u[2], key_last_query[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    key_u[half] = n0 + warp * 16 + half * 8 + g;
    key_last_query[half] = key_u[half] < p.Nk ? segment_end(p.cu_seqlens, p.n_segments, key_u[half]) - 1 : -1;
  }

  const int64_t q_stride = static_cast<int64_t>(p.H) * p.D, kv_stride = static_cast<int64_t>(p.Hkv) * p.D;
  const uint32_t s_v = s_k + KVTile::kBytes;
  auto s_q = [&](int stage) { return s_k + 2 * KVTile::kBytes + stage * 2 * QTile::kBytes; };
  auto s_do = [&](int stage) { return s_q(stage) + QTile::kBytes; };
  const uint32_t s_ds = s_k + 2 * KVTile::kBytes + 4 * QTile::kBytes;
  auto s_lse = [&](int stage) { return s_k + T::kStatsOffset + stage * 2 * kBlockM * 4; };
  auto s_delta = [&](int stage) { return s_lse(stage) + kBlockM * 4; };
  auto s_key_row = [&](int stage) { return s_k + T::kSmemBytes - T::kAlign + stage * kBlockM * 4; };  // kQueryRows

  const int64_t kv_offset = static_cast<int64_t>(n0) * kv_stride + static_cast<int64_t>(hk) * p.D;
  load_tile<KVTile, T::kThreads>(s_k, p.k + kv_offset, kv_stride, keys_valid, p.D, p.vector, tid);
  load_tile<KVTile, T::kThreads>(s_v, p.v + kv_offset, kv_stride, keys_valid, p.D, p.vector, tid);
  cp_async_commit();
  auto load_step = [&](int step, int stage) {
    const int h = hk * p.group + step / n_q_tiles, m0 = m_begin + (step % n_q_tiles) * kBlockM;
    const int64_t offset = static_cast<int64_t>(m0) * q_stride + static_cast<int64_t>(h) * p.D;
    const int rows = min(kBlockM, p.Nq - m0);
    load_tile<QTile, T::kThreads>(s_q(stage), p.q + offset, q_stride, rows, p.D, p.vector, tid);
    load_tile<QTile, T::kThreads>(s_do(stage), p.dout + offset, q_stride, rows, p.D, p.vector, tid);
    const int64_t stats = static_cast<int64_t>(h) * p.Nq + m0;
    for (int i = tid; i < kBlockM; i += T::kThreads) {
      const bool valid = i < rows;
      cp_async_4(s_lse(stage) + i * 4, p.lse2 + (valid ? stats + i : 0), valid);
      cp_async_4(s_delta(stage) + i * 4, p.delta + (valid ? stats + i : 0), valid);
      if constexpr (kQueryRows) {  // rows past Nq stand nowhere: masked
        if (valid) cp_async_4(s_key_row(stage) + i * 4, p.q_rows + m0 + i, true);
        else st_shared_4(s_key_row(stage) + i * 4, static_cast<uint32_t>(INT_MAX));
      }
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
    const int h = hk * p.group + step / n_q_tiles, m0 = m_begin + (step % n_q_tiles) * kBlockM;
    next_tile_loads(step + 1 < steps, [&] { load_step(step + 1, stage ^ 1); });
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
      for (int kk = 0; kk < kKStepsD; ++kk) {
        wgmma_k_major_step<KVTile, QTile, kBlockM>(s, s_k + key_rows, s_q(stage), kk);
        wgmma_k_major_step<KVTile, QTile, kBlockM>(dp, s_v + key_rows, s_do(stage), kk);
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
    // Key rows of the step's first and last query rows: every pair is visible when the first follows the warp's
    // last key and the last precedes the end of the first key's document.
    const int first_t = kQueryRows ? __ldg(p.q_rows + m0) : m0;
    const int last_t = kQueryRows ? (m0 + kBlockM <= p.Nq ? __ldg(p.q_rows + m0 + kBlockM - 1) : INT_MAX)
                                  : m0 + kBlockM - 1;
    const bool need_mask = first_t < n0 + warp * 16 + 15 || last_t >= first_segment_end;
#pragma unroll
    for (int nt = 0; nt < kQTiles; ++nt) {
      const float2 lse2 = ld_shared_f32x2(s_lse(stage) + (nt * 8 + 2 * tig) * 4);  // columns 2 tig, 2 tig + 1
      const float2 delta = ld_shared_f32x2(s_delta(stage) + (nt * 8 + 2 * tig) * 4);
      int2 t2 = make_int2(m0 + nt * 8 + 2 * tig, m0 + nt * 8 + 2 * tig + 1);  // the two columns' key rows
      if constexpr (kQueryRows) {
        if (need_mask) {
          const float2 raw = ld_shared_f32x2(s_key_row(stage) + (nt * 8 + 2 * tig) * 4);
          t2 = make_int2(__float_as_int(raw.x), __float_as_int(raw.y));
        }
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float pv = fast_exp2(fmaf(s[nt][e], p.scale_log2, -((e & 1) ? lse2.y : lse2.x)));
        if (need_mask) {
          const int t = (e & 1) ? t2.y : t2.x;
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
    // ---- dS^T to shared memory (bf16) for dQ, which sums over all the CTA's keys (no dq_accum: the deterministic
    //      dQ is a separate pass, causal_dq_ordered) ----
    const bool fused_dq = p.dq_accum != nullptr;  // uniform over the CTA
    if (fused_dq) {
#pragma unroll
      for (int ks = 0; ks < kKStepsM; ++ks)
#pragma unroll
        for (int r = 0; r < 4; ++r)  // a_ds[ks][r]: key row g + 8 (r & 1), query columns 16 ks + 8 (r >> 1) + 2 tig
          st_shared_4(s_ds + DSTile::offset(warp * 16 + (r & 1) * 8 + g, 2 * ks + (r >> 1)) + tig * 4, a_ds[ks][r]);
    }
    if constexpr (T::kWgmma) fence_proxy_async();
    __syncthreads();
    // ---- dQ (kBlockM, kD) += dS K, then vector reductions into dq_accum ----
    if (fused_dq) {
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
  }

  // ---- dK (scaled) and dV added into the outputs (bf16, or f32 partial sums); each (key, kv head) row belongs to
  //      this CTA alone ----
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int u = key_u[half];
    if (u >= p.Nk) continue;
    const int64_t row = (static_cast<int64_t>(u) * p.Hkv + hk) * p.D;
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt) {
      const int col = dt * 8 + 2 * tig;
      if (col >= p.D) continue;
      add_key_row_pair(p.dk, p.dkv_f32, row + col, dk[dt][2 * half] * p.scale, dk[dt][2 * half + 1] * p.scale,
                       p.vector);
      add_key_row_pair(p.dv, p.dkv_f32, row + col, dv[dt][2 * half], dv[dt][2 * half + 1], p.vector);
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
  const int64_t blocks = static_cast<int64_t>((p.Nk + T::kBlockN - 1) / T::kBlockN) * p.Hkv;
  auto launch = [&](auto kernel, int smem) {
    MOBA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    kernel<<<static_cast<unsigned>(blocks), T::kThreads, smem, ctx.stream>>>(p);
  };
  if (p.q_rows != nullptr) launch(flash_backward_kernel<T, true>, T::kSmemBytes + T::kKeyRowBytes);
  else launch(flash_backward_kernel<T, false>, T::kSmemBytes);
  MOBA_CUDA_CHECK(cudaGetLastError());
}

}  // namespace
}  // namespace attn

void flash_attention_backward(const CudaContext& ctx, const AttentionArgs& a) {
  using namespace attn;
  const int64_t Nq = a.n_queries, Nk = a.n_keys;
  const int H = a.n_heads, Hkv = a.n_kv_heads, D = a.head_dim;
  MOBA_CHECK(D >= 2 && D <= 128 && D % 2 == 0 && H > 0 && Hkv > 0 && H % Hkv == 0 && a.n_segments >= 1 &&
                 Nk < INT32_MAX,
             cat("flash_attention_backward: unsupported shape (Nq ", Nq, ", Nk ", Nk, ", H ", H, ", Hkv ", Hkv, ", D ",
                 D, ")"),
             "the CUDA attention needs an even head dim <= 128 and H divisible by Hkv");
  if (Nq == 0 && Nk == 0) return;
  const int kD = padded_head_dim(D), dq_tiles = static_cast<int>((Nq + 63) / 64);
  // Deterministic: the key-major kernel leaves dQ out (no dq_accum) and causal_dq_ordered adds it without atomics.
  const bool ordered_dq = a.settings.deterministic;
  const size_t dq_accum_bytes = static_cast<size_t>(H) * dq_tiles * 64 * kD * sizeof(float);
  float* dq_accum = ordered_dq ? nullptr  // else (H, dq_tiles, 64 kD)
                               : static_cast<float*>(scratch(a.scratch.partials, "partials", dq_accum_bytes));
  float* stats = static_cast<float*>(scratch(a.scratch.row_stats, "row_stats", 2 * Nq * H * sizeof(float)));
  float* delta = stats;          // (H, Nq)
  float* lse2 = stats + Nq * H;  // (H, Nq)
  const int32_t* query_index = a.q_rows != nullptr ? build_query_index(ctx, a) : nullptr;
  if (!ordered_dq) MOBA_CUDA_CHECK(cudaMemsetAsync(dq_accum, 0, dq_accum_bytes, ctx.stream));

  constexpr int kPreprocessWarps = 8;
  const int64_t rows = Nq * H;
  if (rows > 0) {
    flash_backward_preprocess_kernel<<<static_cast<unsigned>((rows + kPreprocessWarps - 1) / kPreprocessWarps),
                                       kPreprocessWarps * 32, 0, ctx.stream>>>(delta, lse2, a.dout, a.out, a.lse,
                                                                              static_cast<int>(Nq), H, D);
    MOBA_CUDA_CHECK(cudaGetLastError());
  }

  const bool vector = D % 8 == 0 && aligned16(a.dq) && aligned16(a.dk) && aligned16(a.dv) && aligned16(a.dout) &&
                      aligned16(a.q) && aligned16(a.k) && aligned16(a.v);
  const BackwardParams p{a.dk, a.dv, dq_accum, a.q, a.k, a.v, a.dout, lse2, delta, a.cu_seqlens, a.q_rows, query_index,
                         a.n_segments, static_cast<int>(Nq), static_cast<int>(Nk), H, Hkv, D, H / Hkv, dq_tiles,
                         a.softmax_scale * kLog2e, a.softmax_scale, vector, a.dkv_f32};
  switch (kD) {
    case 16: launch_backward<BackwardTiles<16, 4, 64>>(ctx, p); break;
    case 32: launch_backward<BackwardTiles<32, 4, 64>>(ctx, p); break;
    case 64: launch_backward<BackwardTiles<64, 4, 64>>(ctx, p); break;
    default:  // 128: warpgroup MMAs on sm_90, mma.sync elsewhere
      if (device_has_wgmma(ctx)) launch_backward<BackwardTiles<128, 8, 64, true>>(ctx, p);
      else launch_backward<BackwardTiles<128, 8, 64>>(ctx, p);
      break;
  }

  if (ordered_dq) {  // after the key-major kernel in stream order: it overwrites row_stats with its own Delta
    causal_dq_ordered(ctx, a);
    return;
  }
  const int64_t vectors = static_cast<int64_t>(H) * dq_tiles * 16 * kD;
  if (vectors == 0) return;
  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>(
      std::min<int64_t>((vectors + threads - 1) / threads, static_cast<int64_t>(ctx.sm_count) * 16));
  auto finish_dq = [&](auto kernel) {
    kernel<<<blocks, threads, 0, ctx.stream>>>(a.dq, dq_accum, static_cast<int>(Nq), H, D, dq_tiles, a.softmax_scale,
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
