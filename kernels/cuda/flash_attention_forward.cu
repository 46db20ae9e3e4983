// Dense causal flash-attention forward over packed segments (FlashAttention-2's algorithm 1, Dao 2023): one CTA
// per (tile of kBlockM packed query rows, query head); K/V tiles stream through shared memory (cp.async, double
// buffered), S = Q K^T and O += P V on bf16 tensor cores (mma.sync m16n8k16 with ldmatrix operands; for D = 128 on
// sm_90 warpgroup MMAs, wgmma, as in FlashAttention-3, Shah et al. 2024), online softmax in f32 with exp2 on
// log2(e)-prescaled scores. Writes out (Nq, H, D) bf16 and lse (Nq, H) f32 (natural log).
// Invariants: a query tile may straddle documents (and, with q_rows, jump between key rows); its keys run from the
// document start of its first row's key row to its last row's key row and every element is masked per row (document
// start <= u <= t), so no host knowledge of lengths is needed. Without q_rows (kQueryRows = false) the kernel is the
// plain self-attention one, with the key row of query row i being i.
#include <algorithm>
#include <type_traits>

#include "kernels/cuda/attention.h"
#include "kernels/cuda/attention_primitives.cuh"
#include "kernels/cuda/attention_scratch.h"

namespace moba::cuda {
namespace attn {
namespace {

// Tile constants of one forward instantiation.
// kWgmma (sm_90a, kD = 128, 16-row warps, kBlockN 64 or 128): S and P V on warpgroup MMAs (Hopper wgmma; each
// group of 4 warps owns 64 query rows, K and V feed the tensor cores from shared memory once per warpgroup, not
// per warp), the softmax unchanged (the wgmma accumulator layout is the mma.sync one, warp by warp).
template <int kD_, int kWarps_, int kMTiles_, int kBlockN_, int kMinBlocks_ = 1, bool kWgmma_ = false>
struct ForwardTiles {
  static constexpr int kMinBlocks = kMinBlocks_;  // CTAs per SM the register budget must allow
  static constexpr bool kWgmma = kWgmma_;
  static constexpr int kD = kD_;                  // padded head dim
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kMTiles = kMTiles_;        // 16-row MMA tiles of queries per warp
  static constexpr int kWarpRows = 16 * kMTiles;
  static constexpr int kBlockM = kWarps * kWarpRows;  // query rows per CTA
  static constexpr int kBlockN = kBlockN_;        // keys per K/V tile
  static constexpr bool kQInRegisters = kMTiles == 1 && !kWgmma;  // else Q is re-read from shared memory
  using QTile = std::conditional_t<kWgmma, WgTile<kBlockM>, SmemTile<kBlockM, kD>>;
  using KVTile = std::conditional_t<kWgmma, WgTile<kBlockN>, SmemTile<kBlockN, kD>>;
  static constexpr int kAlign = kWgmma ? 1024 : 128;  // wgmma's swizzle pattern repeats every 1024 bytes
  static constexpr int kSmemBytes = QTile::kBytes + 4 * KVTile::kBytes + kAlign;  // Q, (K, V) x 2 stages
  // Rows that must all precede a key tile for the MMA issuer (a warp, or a warpgroup for wgmma) to skip it.
  static constexpr int kSkipRows = kWgmma ? 64 : kWarpRows;
  static_assert(kD % 16 == 0 && kBlockN % 16 == 0);
  static_assert(!kWgmma || (kD == 128 && kMTiles == 1 && (kBlockN == 64 || kBlockN == 128) && kWarps % 4 == 0));
};

struct ForwardParams {
  bf16* out;              // (Nq, H, D)
  float* lse;             // (Nq, H)
  const bf16* q;          // (Nq, H, D)
  const bf16* k;          // (Nk, Hkv, D)
  const bf16* v;          // (Nk, Hkv, D)
  const int32_t* cu_seqlens;  // (S + 1)
  const int32_t* q_rows;  // (Nq) key row of each query row (kQueryRows only)
  int n_segments, Nq, H, Hkv, D, group, n_tiles;
  float scale_log2;       // softmax_scale * log2(e)
  bool vector;            // D % 8 == 0 and 16-byte aligned pointers: cp.async loads and paired stores
};

// Scores of one 16-row tile (the thread's rows t[0], t[1], fragment layout) set to -inf where key u = n0 + column
// is after the row or before its segment start.
template <int kNTiles>
__device__ __forceinline__ void mask_scores(float (&s)[kNTiles][4], int n0, const int (&row_t)[2],
                                            const int (&row_first_key)[2], int tig) {
#pragma unroll
  for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int u = n0 + nt * 8 + 2 * tig + (e & 1);
      if (u > row_t[e >> 1] || u < row_first_key[e >> 1]) s[nt][e] = -INFINITY;
    }
}

// Epilogue of one 16-row tile: out = O / l, lse = (max + log2 l) * ln 2 for the thread's query rows below Nq (the
// tile's rows row0 and row0 + 8).
template <int kDTiles>
__device__ __forceinline__ void store_output_rows(const ForwardParams& p, const float (&o)[kDTiles][4],
                                                  const float (&row_max)[2], float (&row_sum)[2], int row0, int h,
                                                  int tig) {
  reduce_row_sums(row_sum);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const float sum = row_sum[half];
    const int t = row0 + 8 * half;
    if (t >= p.Nq) continue;
    const float inv = 1.0f / sum;
    bf16* out_row = p.out + (static_cast<int64_t>(t) * p.H + h) * p.D;
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt) {
      const int col = dt * 8 + 2 * tig;
      if (col < p.D) store_bf16_pair(out_row + col, o[dt][2 * half] * inv, o[dt][2 * half + 1] * inv, p.vector);
    }
    if (tig == 0) p.lse[static_cast<int64_t>(t) * p.H + h] = (row_max[half] + log2f(sum)) * kLn2;
  }
}

template <class T, bool kQueryRows>
__global__ void __launch_bounds__(T::kThreads, T::kMinBlocks) flash_forward_kernel(const ForwardParams p) {
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t s_q = (smem_address(smem) + T::kAlign - 1) & ~static_cast<uint32_t>(T::kAlign - 1);
  constexpr int kD = T::kD, kBlockM = T::kBlockM, kBlockN = T::kBlockN, kMTiles = T::kMTiles;
  constexpr int kNTiles = kBlockN / 8, kDTiles = kD / 8, kKSteps = kD / 16, kPSteps = kBlockN / 16;
  using QTile = typename T::QTile;
  using KVTile = typename T::KVTile;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, tig = lane % 4;  // MMA fragment row group and thread-in-group
  // Heavy tiles (most keys) first; the heads of one tile run side by side and share K/V through L2.
  const int tile = p.n_tiles - 1 - static_cast<int>(blockIdx.x / p.H);
  const int h = static_cast<int>(blockIdx.x % p.H), hk = h / p.group;
  const int row0 = tile * kBlockM;
  const int rows_valid = min(kBlockM, p.Nq - row0);
  const int last_row = row0 + rows_valid - 1;
  // The key row of query row i (i itself without q_rows), and of the first/last rows of a group (INT_MIN when the
  // group holds no query row).
  auto key_row = [&](int i) { return kQueryRows ? __ldg(p.q_rows + i) : i; };
  const int last_key_row = key_row(last_row);
  const int key_begin = segment_start(p.cu_seqlens, p.n_segments, key_row(row0));
  const int last_segment_start = segment_start(p.cu_seqlens, p.n_segments, last_key_row);
  const int key_end = last_key_row + 1;
  const int n_key_tiles = (key_end - key_begin + kBlockN - 1) / kBlockN;

  const int64_t q_stride = static_cast<int64_t>(p.H) * p.D, kv_stride = static_cast<int64_t>(p.Hkv) * p.D;
  auto s_k = [&](int stage) { return s_q + QTile::kBytes + stage * 2 * KVTile::kBytes; };
  auto s_v = [&](int stage) { return s_k(stage) + KVTile::kBytes; };

  // This thread's query rows (fragment rows g and g + 8 of each m-tile): their key rows and document starts; padding
  // rows past Nq get an empty key range.
  const int warp_row0 = row0 + warp * T::kWarpRows;
  int row_t[kMTiles][2], row_first_key[kMTiles][2];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int i = warp_row0 + mt * 16 + half * 8 + g;
      row_t[mt][half] = kQueryRows && i >= p.Nq ? INT_MAX : (i < p.Nq ? key_row(i) : i);
      row_first_key[mt][half] = i < p.Nq ? segment_start(p.cu_seqlens, p.n_segments, row_t[mt][half]) : INT32_MAX;
    }
  // Key rows that bound the masks and skips: the warp's first row, and the last row of the MMA issuer (warp or
  // warpgroup) of this thread. Without q_rows they are the rows themselves (padding rows included).
  const int issuer_last = row0 + (warp * T::kWarpRows / T::kSkipRows + 1) * T::kSkipRows - 1;
  const int warp_first_key = !kQueryRows ? warp_row0 : warp_row0 < p.Nq ? key_row(warp_row0) : INT_MIN;
  const int issuer_last_key = !kQueryRows ? issuer_last
                                          : issuer_last - T::kSkipRows + 1 < p.Nq ? key_row(min(issuer_last, p.Nq - 1))
                                                                                  : INT_MIN;

  load_tile<QTile, T::kThreads>(s_q, p.q + row0 * q_stride + static_cast<int64_t>(h) * p.D, q_stride,
                                      rows_valid, p.D, p.vector, tid);
  auto load_kv = [&](int j, int stage) {
    const int n0 = key_begin + j * kBlockN;
    const int64_t offset = n0 * kv_stride + static_cast<int64_t>(hk) * p.D;
    const int rows = min(kBlockN, key_end - n0);
    load_tile<KVTile, T::kThreads>(s_k(stage), p.k + offset, kv_stride, rows, p.D, p.vector, tid);
    load_tile<KVTile, T::kThreads>(s_v(stage), p.v + offset, kv_stride, rows, p.D, p.vector, tid);
  };
  load_kv(0, 0);
  cp_async_commit();

  float o[kMTiles][kDTiles][4] = {};
  float row_max[kMTiles][2], row_sum[kMTiles][2];  // running max (log2 domain) and this thread's partial sum
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      row_max[mt][half] = -INFINITY;
      row_sum[mt][half] = 0.0f;
    }
  uint32_t q_frag[T::kQInRegisters ? kKSteps : 1][4];
  // ldmatrix lane offsets: A (Q rows), B from K (rows = keys), B from V transposed (rows = keys).
  const uint32_t lane_a = QTile::offset(lane & 15, lane >> 4);
  const uint32_t lane_b = KVTile::offset((lane & 7) + ((lane >> 4) << 3), (lane >> 3) & 1);
  const uint32_t lane_bt = KVTile::offset((lane & 7) + ((lane >> 3) & 1) * 8, lane >> 4);

  for (int j = 0; j < n_key_tiles; ++j) {
    const int stage = j & 1;
    next_tile_loads(j + 1 < n_key_tiles, [&] { load_kv(j + 1, stage ^ 1); });
    if constexpr (T::kWgmma) fence_proxy_async();
    __syncthreads();
    if constexpr (T::kQInRegisters) {
      if (j == 0) {
#pragma unroll
        for (int kk = 0; kk < kKSteps; ++kk)
          ldmatrix_x4(q_frag[kk], s_q + QTile::at(lane_a, warp * T::kWarpRows, kk * 2));
      }
    }
    const int n0 = key_begin + j * kBlockN;
    // A warp (warpgroup) whose rows all precede the tile's first key has nothing to do here.
    if (n0 <= issuer_last_key) {
      // ---- S = Q K^T (raw scores) ----
      float s[kMTiles][kNTiles][4] = {};
      if constexpr (T::kWgmma) {
        const uint32_t q_tile = s_q + (warp / 4) * 64 * QTile::kRowBytes;
        fence_registers(s[0]);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kKSteps; ++kk) wgmma_k_major_step<QTile, KVTile, kBlockN>(s[0], q_tile, s_k(stage), kk);
        wgmma_commit();
        wgmma_wait_all();
        fence_registers(s[0]);
      } else {
#pragma unroll
        for (int kk = 0; kk < kKSteps; ++kk) {
          uint32_t a[kMTiles][4];
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) {
            if constexpr (T::kQInRegisters) {
#pragma unroll
              for (int r = 0; r < 4; ++r) a[mt][r] = q_frag[kk][r];
            } else {
              ldmatrix_x4(a[mt], s_q + QTile::at(lane_a, warp * T::kWarpRows + mt * 16, kk * 2));
            }
          }
#pragma unroll
          for (int np = 0; np < kNTiles / 2; ++np) {
            uint32_t b[4];  // n-tile 2np: b[0], b[1]; n-tile 2np + 1: b[2], b[3]
            ldmatrix_x4(b, s_k(stage) + KVTile::at(lane_b, np * 16, kk * 2));
#pragma unroll
            for (int mt = 0; mt < kMTiles; ++mt) {
              mma_bf16_16816(s[mt][2 * np], a[mt], b[0], b[1]);
              mma_bf16_16816(s[mt][2 * np + 1], a[mt], b[2], b[3]);
            }
          }
        }
      }
      // ---- mask: causal near the diagonal, segment starts when the tile straddles segments ----
      if (n0 + kBlockN - 1 > warp_first_key || n0 < last_segment_start) {
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) mask_scores(s[mt], n0, row_t[mt], row_first_key[mt], tig);
      }
      // ---- online softmax (rows are shared by the 4 threads of a quad) ----
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
        rescale_rows(o[mt], online_softmax(s[mt], row_max[mt], row_sum[mt], p.scale_log2));
      // ---- O += P V (P stays in registers as the A operand) ----
      if constexpr (T::kWgmma) {
        uint32_t a[kPSteps][4];
#pragma unroll
        for (int ks = 0; ks < kPSteps; ++ks) accumulators_to_a(a[ks], s[0][2 * ks], s[0][2 * ks + 1]);
        fence_registers(o[0]);
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < kPSteps; ++ks)  // V is MN-major: 16 keys = 2048 bytes per step
          wgmma_m64n128k16_rs<1>(o[0], a[ks],
                                 wgmma_descriptor(s_v(stage) + ks * 16 * KVTile::kRowBytes, KVTile::kBlockBytes, 1024));
        wgmma_commit();
        wgmma_wait_all();
        fence_registers(o[0]);
        fence_registers(a);
      } else {
#pragma unroll
        for (int ks = 0; ks < kPSteps; ++ks) {
          uint32_t a[kMTiles][4];
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) accumulators_to_a(a[mt], s[mt][2 * ks], s[mt][2 * ks + 1]);
#pragma unroll
          for (int dp = 0; dp < kDTiles / 2; ++dp) {
            uint32_t b[4];  // d-tile 2dp: b[0], b[1]; d-tile 2dp + 1: b[2], b[3]
            ldmatrix_x4_trans(b, s_v(stage) + KVTile::at(lane_bt, ks * 16, dp * 2));
#pragma unroll
            for (int mt = 0; mt < kMTiles; ++mt) {
              mma_bf16_16816(o[mt][2 * dp], a[mt], b[0], b[1]);
              mma_bf16_16816(o[mt][2 * dp + 1], a[mt], b[2], b[3]);
            }
          }
        }
      }
    }
    __syncthreads();  // this stage is refilled by the next iteration's prefetch
  }

  // ---- epilogue ----
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
    store_output_rows(p, o[mt], row_max[mt], row_sum[mt], warp_row0 + mt * 16 + g, h, tig);
}

template <class T>
void launch_forward(const CudaContext& ctx, ForwardParams p) {
  p.n_tiles = (p.Nq + T::kBlockM - 1) / T::kBlockM;
  const int64_t blocks = static_cast<int64_t>(p.n_tiles) * p.H;
  auto launch = [&](auto kernel) {
    MOBA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, T::kSmemBytes));
    kernel<<<static_cast<unsigned>(blocks), T::kThreads, T::kSmemBytes, ctx.stream>>>(p);
  };
  if (p.q_rows != nullptr) launch(flash_forward_kernel<T, true>);
  else launch(flash_forward_kernel<T, false>);
  MOBA_CUDA_CHECK(cudaGetLastError());
}

}  // namespace
}  // namespace attn

void flash_attention_forward(const CudaContext& ctx, const AttentionArgs& a) {
  using namespace attn;
  const int H = a.n_heads, Hkv = a.n_kv_heads, D = a.head_dim;
  MOBA_CHECK(D >= 2 && D <= 128 && D % 2 == 0 && H > 0 && Hkv > 0 && H % Hkv == 0 && a.n_segments >= 1 &&
                 a.n_keys < INT32_MAX,
             cat("flash_attention_forward: unsupported shape (Nq ", a.n_queries, ", Nk ", a.n_keys, ", H ", H,
                 ", Hkv ", Hkv, ", D ", D, ")"),
             "the CUDA attention needs an even head dim <= 128 and H divisible by Hkv");
  if (a.n_queries == 0) return;
  ForwardParams p{a.out, a.lse, a.q, a.k, a.v, a.cu_seqlens, a.q_rows, a.n_segments, static_cast<int>(a.n_queries),
                  H, Hkv, D, H / Hkv, 0, a.softmax_scale * kLog2e,
                  D % 8 == 0 && aligned16(a.out) && aligned16(a.q) && aligned16(a.k) && aligned16(a.v)};
  switch (padded_head_dim(D)) {
    case 16: launch_forward<ForwardTiles<16, 4, 1, 64>>(ctx, p); break;
    case 32: launch_forward<ForwardTiles<32, 4, 1, 64>>(ctx, p); break;
    case 64: launch_forward<ForwardTiles<64, 4, 2, 64>>(ctx, p); break;
    default:  // 128: warpgroup MMAs on sm_90, mma.sync elsewhere
      // Two warpgroups x 64 rows and 64-key tiles at 128 registers: two CTAs per SM (measured 9.8 ms at 32K against
      // 10.4 for 128-key tiles at one CTA per SM, 10.5 for three warpgroups; bench/notes/flash_attention.md).
      if (device_has_wgmma(ctx)) launch_forward<ForwardTiles<128, 8, 1, 64, 2, true>>(ctx, p);
      else launch_forward<ForwardTiles<128, 8, 1, 64>>(ctx, p);
      break;
  }
}

}  // namespace moba::cuda
