// MoBA dK/dV (and the atomic dQ) for D = 128 on sm_90a with warpgroup MMAs: the work of moba_dkv_kernel in
// moba_backward.cu (same row tiles, same masks, same results up to summation order) on the machinery of the dense
// flash backward (flash_attention_backward.cu): one CTA of two warpgroups owns 128 keys of one kv head, K and V stay
// in 128-byte-swizzled shared tiles, and per step of 64 query rows
//   S^T = K Q^T, dP^T = V dO^T       wgmma m64n64k16, both operands from shared memory (warpgroup w: keys 64 w..)
//   P^T, dS^T                        in registers (the accumulator layout is mma.sync's, warp by warp)
//   dV += P^T dO, dK += dS^T Q       wgmma m64n128k16 with A from registers, B MN-major from shared memory
//   dQ = dS K                        wgmma m64n64k16 (warpgroup w: columns 64 w..), dS^T through shared memory,
//                                    added per gathered row into dq_acc with 16-byte vector reductions.
// What differs from the dense kernel is where the rows come from: a selected tile gathers the rows of a bucket (one
// cp.async per 16-byte chunk from each row's own address), so the row ids of tile j + 2 are read from the dispatch
// while tile j computes, and tile j + 1's Q/dO are in flight (FlashAttention-3's structure of asynchronous loads
// under the MMAs, Shah et al. 2024, here with cp.async instead of TMA because the rows are scattered).
// Invariants: keys past N and rows past a tile's end load as zeros; their P is masked (or multiplies zeros), and
// nothing is stored for them. dk/dv rows belong to one CTA (read-add-write); dq_acc is zeroed by the caller.
#include <cuda_bf16.h>

#include <algorithm>
#include <climits>

#include "kernels/cuda/attention_primitives.cuh"
#include "kernels/cuda/moba_backward.cuh"

namespace moba::cuda::attn {
namespace {

constexpr int kWgKeys = 128;  // keys per CTA: two warpgroups x 64
constexpr int kWgRows = 64;   // query rows per step
constexpr int kWgThreads = 256;
using KeyTile = WgTile<kWgKeys>;                // K, V: (128 keys, 128) bf16
using RowTile = WgTile<kWgRows>;                // Q, dO: (64 rows, 128) bf16
using DsTile = SmemTile<kWgKeys, kWgRows>;      // dS^T (128 keys, 64 rows) bf16: 128-byte swizzled rows

// Shared memory, from a 1024-byte aligned base (the 128-byte swizzle repeats every 1024 bytes).
struct WgSmem {
  static constexpr int kK = 0;
  static constexpr int kV = kK + KeyTile::kBytes;
  static constexpr int kQ = kV + KeyTile::kBytes;          // (2 stages)
  static constexpr int kDout = kQ + 2 * RowTile::kBytes;   // (2 stages)
  static constexpr int kDs = kDout + 2 * RowTile::kBytes;
  static constexpr int kLse = kDs + DsTile::kBytes;        // (2, 64) f32, natural log; +inf past the tile's rows
  static constexpr int kDelta = kLse + 2 * kWgRows * 4;    // (2, 64) f32
  static constexpr int kToken = kDelta + 2 * kWgRows * 4;  // (4, 64) int: token of each row, -1 past the rows
  static constexpr int kRow = kToken + 4 * kWgRows * 4;    // (4, 64) int: row t * H + h, -1 past the rows
  static constexpr int kEntry = kRow + 4 * kWgRows * 4;    // (2, 64) int: dispatch entries of tiles ahead
  static constexpr int kKeyStart = kEntry + 2 * kWgRows * 4;   // (128) int: block start of each key
  static constexpr int kKeyRowEnd = kKeyStart + kWgKeys * 4;   // (128) int: end of each key's causal rows
  // (8 warps, 16 rows, kStagePitch) f32: each warp's dQ accumulators of the previous step, waiting for their
  // reductions (row pitch 72 floats: the 8-byte stores of one instruction hit distinct banks per half-warp).
  static constexpr int kStagePitch = 72;
  static constexpr int kStage = kKeyRowEnd + kWgKeys * 4;
  static constexpr int kBytes = kStage + 8 * 16 * kStagePitch * 4 + 1024;
  // After the main loop: dk and dv as bf16 (128 keys, kOutPitch) over the K/V and Q/dO tiles (conflict-free pitch).
  static constexpr int kOutPitch = 136;
  static constexpr int kDkOut = kK, kDvOut = kQ;
  static_assert(kWgKeys * kOutPitch * 2 <= kQ - kK && kWgKeys * kOutPitch * 2 <= kDs - kQ);
};

// Eight bf16 sums in f32, rounded once (x + y per element, as the old read-add-write of pairs did).
__device__ __forceinline__ uint4 add_bf16x8(uint4 x, uint4 y) {
  const uint32_t xs[4] = {x.x, x.y, x.z, x.w}, ys[4] = {y.x, y.y, y.z, y.w};
  uint32_t r[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) r[i] = pack_bf16(bf16_lo(xs[i]) + bf16_lo(ys[i]), bf16_hi(xs[i]) + bf16_hi(ys[i]));
  return make_uint4(r[0], r[1], r[2], r[3]);
}

template <bool FUSED_DQ>
__global__ void __launch_bounds__(kWgThreads, 1) moba_dkv_wgmma_kernel(const BackwardArgs a) {
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t raw = smem_address(smem);
  const uint32_t base = (raw + 1023) & ~1023u;
  unsigned char* base_ptr = smem + (base - raw);
  const uint32_t s_k = base + WgSmem::kK, s_v = base + WgSmem::kV, s_ds = base + WgSmem::kDs;
  auto s_q = [&](int stage) { return base + WgSmem::kQ + stage * RowTile::kBytes; };
  auto s_do = [&](int stage) { return base + WgSmem::kDout + stage * RowTile::kBytes; };
  float* s_lse = reinterpret_cast<float*>(base_ptr + WgSmem::kLse);
  float* s_delta = reinterpret_cast<float*>(base_ptr + WgSmem::kDelta);
  int* s_token = reinterpret_cast<int*>(base_ptr + WgSmem::kToken);
  int* s_row = reinterpret_cast<int*>(base_ptr + WgSmem::kRow);
  int* s_entry = reinterpret_cast<int*>(base_ptr + WgSmem::kEntry);
  int* s_key_start = reinterpret_cast<int*>(base_ptr + WgSmem::kKeyStart);
  int* s_key_row_end = reinterpret_cast<int*>(base_ptr + WgSmem::kKeyRowEnd);
  __shared__ KeyTileWork<kWgKeys, kWgRows> work;

  constexpr int kD = 128, kRowTiles = kWgRows / 8, kDTiles = kD / 8, kKStepsD = kD / 16, kKStepsM = kWgRows / 16;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, tig = lane % 4;
  const int wg = warp / 4;
  // Launch order: groups of a block's key tiles (B / 128 of them, which read the same gathered rows, so they run
  // side by side and share them in L2), heads next, blocks last: every head's heavy early blocks (chosen by the most
  // rows) start in the first wave. Head-major order left the last heads' heavy tiles for the tail (8K backward
  // 0.77 vs 0.88 ms); heads fastest split a block's CTAs across the GPU (1M, B 16384: 1709 vs 1530 ms).
  const int tiles = static_cast<int>((a.Nk + kWgKeys - 1) / kWgKeys);
  const int per_block = max(1, a.B / kWgKeys);
  const int group = static_cast<int>(blockIdx.x) / (a.Hkv * per_block), within = static_cast<int>(blockIdx.x) % (a.Hkv * per_block);
  const int kv_head = within / per_block;
  const int tile_index = group * per_block + within % per_block;
  if (tile_index >= tiles) return;  // the last group may be partial
  const int key_begin = tile_index * kWgKeys;
  const int key_end = static_cast<int>(min(static_cast<int64_t>(key_begin) + kWgKeys, a.Nk));
  if (warp == 0) work.build(a, key_begin, key_end, kv_head, lane);

  const int64_t kv_stride = static_cast<int64_t>(a.Hkv) * a.D;
  const int64_t kv_offset = static_cast<int64_t>(key_begin) * kv_stride + static_cast<int64_t>(kv_head) * a.D;
  load_tile<KeyTile, kWgThreads>(s_k, a.k + kv_offset, kv_stride, key_end - key_begin, a.D, true, tid);
  load_tile<KeyTile, kWgThreads>(s_v, a.v + kv_offset, kv_stride, key_end - key_begin, a.D, true, tid);
  cp_async_commit();
  __syncthreads();  // work
  const int n_tiles = work.n_tiles(a);
  // The epilogue reads dk/dv rows back (+=): bring them into L2 now, so a short CTA does not wait on DRAM there.
  for (int i = tid; i < 2 * (key_end - key_begin) * 2; i += kWgThreads) {  // (dk | dv, key, 128-byte half)
    const int which = i & 1, half = (i >> 1) & 1, key = key_begin + (i >> 2);
    const int64_t element = (static_cast<int64_t>(key) * a.Hkv + kv_head) * a.D + half * 64;
    const char* p = static_cast<const char*>(which ? a.dv : a.dk) + element * (a.dkv_f32 ? 4 : 2);
    if (half * 64 < a.D) asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
  }

  // Per key of the tile: its block's start and the end of its causal rows (INT_MIN past N), for the masks.
  if (tid < kWgKeys) {
    int start = INT_MIN, row_end = INT_MIN;
    if (key_begin + tid < key_end) {
      const TokenBlock tb = token_block(a.cu_seqlens, a.n_segments, key_begin + tid, a.B);
      start = static_cast<int>(tb.block_start);
      row_end = static_cast<int>(min(tb.block_start + a.B, tb.segment_end));
    }
    s_key_start[tid] = start;
    s_key_row_end[tid] = row_end;
  }
  // Row ids run two tiles ahead of the data: s_row[tile & 3] is published during step tile - 2 (threads < 64, one
  // row each, while the tensor cores run that step's dV/dK; four slots, so no barrier orders it against readers of
  // the rows of tiles tile - 2 and tile - 1). A gathered tile's dispatch entries reach s_entry by cp.async one step
  // before that, so neither the entry load nor the row tile's load stalls a step, and no register holds them.
  auto fetch = [&](int tile) {  // (threads < 64) tile's entry into s_entry[tile & 1], or its row straight to s_row
    if (tile >= n_tiles) return;
    const auto src = work.source(a, tile, kv_head);
    if (src.entries != nullptr && tid < src.n)
      cp_async_4(base + WgSmem::kEntry + ((tile & 1) * kWgRows + tid) * 4, src.entries + tid, true);
  };
  auto publish = [&](int tile) {  // (threads < 64) after fetch(tile)'s copy has landed
    int row = -1;
    if (tile < n_tiles) {
      const auto src = work.source(a, tile, kv_head);
      if (tid < src.n)
        row = src.entries != nullptr ? s_entry[(tile & 1) * kWgRows + tid] / (a.top_k - 1) : (src.t0 + tid) * a.H + src.h;
    }
    s_row[(tile & 3) * kWgRows + tid] = row;
    s_token[(tile & 3) * kWgRows + tid] = row_key_row(a, row);
  };
  // Q, dO rows and their lse, Delta of tile `tile` into stage `stage` (cp.async; the caller commits).
  const int chunk = tid % 16, row_in_pass = tid / 16;  // 16 chunks of 16 bytes per row, 16 rows per pass
  auto load_rows = [&](int tile) {
    const int stage = tile & 1, slot = tile & 3;
#pragma unroll
    for (int pass = 0; pass < kWgRows / 16; ++pass) {
      const int r = row_in_pass + pass * 16;
      const int row = s_row[slot * kWgRows + r];
      const bool ok = row >= 0 && chunk * 8 < a.D;
      const int64_t offset = static_cast<int64_t>(row) * a.D + chunk * 8;
      cp_async_16(s_q(stage) + RowTile::offset(r, chunk), ok ? a.q + offset : a.q, ok);
      cp_async_16(s_do(stage) + RowTile::offset(r, chunk), ok ? a.dout + offset : a.dout, ok);
    }
    if (tid < kWgRows) {
      const int row = s_row[slot * kWgRows + tid];
      const uint32_t lse_dst = base + WgSmem::kLse + (stage * kWgRows + tid) * 4;
      if (row >= 0) cp_async_4(lse_dst, a.lse + row, true);
      else st_shared_4(lse_dst, __float_as_uint(INFINITY));
      cp_async_4(base + WgSmem::kDelta + (stage * kWgRows + tid) * 4, a.delta + (row >= 0 ? row : 0), row >= 0);
    }
  };
  if (tid < kWgRows) {
    fetch(0);
    fetch(1);
  }
  cp_async_commit();
  cp_async_wait<0>();  // (also K and V)
  if (tid < kWgRows) {
    publish(0);
    publish(1);
  }
  __syncthreads();
  if (n_tiles > 0) load_rows(0);
  cp_async_commit();  // L(0)
  if (tid < kWgRows) fetch(2);
  cp_async_commit();  // E(2)

  // dQ of a step leaves in two halves: its accumulators go to this warp's staging rows (stage_dq), and one step
  // later, after that step's proxy fences (which would otherwise wait for the reductions to complete), they are
  // added into dq_acc (flush_dq): two rows of 64 columns per warp instruction, 16 bytes per lane, whole 256-byte
  // row segments per reduction as in the dense kernel's tile order (scattered 8-byte reductions throttled the LSU).
  const uint32_t s_stage = base + WgSmem::kStage + warp * 16 * WgSmem::kStagePitch * 4;
  auto stage_dq = [&](const float (&acc)[8][4]) {
    __syncwarp();  // the previous flush's reads of these rows are done
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const uint32_t col = (j * 8 + 2 * tig) * 4;
      asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(s_stage + g * WgSmem::kStagePitch * 4 + col),
                   "f"(acc[j][0]), "f"(acc[j][1]));
      asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(s_stage + (g + 8) * WgSmem::kStagePitch * 4 + col),
                   "f"(acc[j][2]), "f"(acc[j][3]));
    }
    __syncwarp();
  };
  auto flush_dq = [&](int tile) {  // the staged rows of `tile` (its row ids are still in slot tile & 3)
    const int* row_s = s_row + (tile & 3) * kWgRows + (warp % 4) * 16;
    const int c4 = (lane & 15) * 4;
    float v[8][4];
    int rows[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {  // all shared loads first: one latency for the eight
      const int r = 2 * i + (lane >> 4);
      rows[i] = row_s[r];
      asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];\n"
                   : "=f"(v[i][0]), "=f"(v[i][1]), "=f"(v[i][2]), "=f"(v[i][3])
                   : "r"(s_stage + (r * WgSmem::kStagePitch + c4) * 4));
    }
#pragma unroll
    for (int i = 0; i < 8; ++i)
      if (rows[i] >= 0 && wg * 64 + c4 < a.D)
        red_add_f32x4(a.dq_acc + static_cast<int64_t>(rows[i]) * a.D + wg * 64 + c4, v[i]);
  };

  float dk[kDTiles][4] = {}, dv[kDTiles][4] = {};
  const uint32_t key_rows = wg * 64 * KeyTile::kRowBytes;  // this warpgroup's 64 keys inside each column block
  for (int tile = 0; tile < n_tiles; ++tile) {
    const int stage = tile & 1;
    // Groups in flight, oldest first: L(tile), E(tile + 2).
    cp_async_wait<1>();
    fence_proxy_async();
    __syncthreads();  // tile's data and the row ids of tile + 1 are visible; stage ^ 1 is free
    if (tile + 1 < n_tiles) load_rows(tile + 1);
    cp_async_commit();  // L(tile + 1)

    // ---- S^T = K Q^T and dP^T = V dO^T: this warpgroup's 64 keys x the 64 rows ----
    float s[kRowTiles][4] = {}, dp[kRowTiles][4] = {};
    fence_registers(s);
    fence_registers(dp);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kKStepsD; ++kk) {
      wgmma_k_major_step<KeyTile, RowTile, kWgRows>(s, s_k + key_rows, s_q(stage), kk);
      wgmma_k_major_step<KeyTile, RowTile, kWgRows>(dp, s_v + key_rows, s_do(stage), kk);
    }
    wgmma_commit();
    // ---- while the tensor cores run: the row ids of tile + 2, the dispatch entries of tile + 3 ----
    cp_async_wait<1>();  // E(tile + 2) has landed (L(tile + 1) may still be in flight)
    if (tid < kWgRows) {
      publish(tile + 2);
      fetch(tile + 3);
    }
    cp_async_commit();  // E(tile + 3)
    wgmma_wait_all();
    fence_registers(s);
    fence_registers(dp);

    // ---- P^T = exp2(S^T * scale * log2 e - lse * log2 e) where the row sees the key, dS^T = P^T (dP^T - Delta) ----
    const int b = work.selected_block(tile);
    const int sel_start = b >= 0 ? work.sel_start[b] : 0;
    int2 vis[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int key = warp * 16 + half * 8 + g;  // this thread's keys: rows g, g + 8 of the warp's 16 in S^T
      vis[half] = visible_rows(key_begin + key, s_key_start[key], s_key_row_end[key], b >= 0, sel_start);
    }
    // A selected tile whose 64 rows are all present and whose keys (this warp's 16) all lie in the block needs no
    // mask; rows past the tile's end have lse = +inf (P = 0) in any case.
    const bool all_visible = b >= 0 && vis[0].x == 0 && vis[0].y == INT_MAX && vis[1].x == 0 && vis[1].y == INT_MAX;
    const bool need_mask = !__all_sync(0xFFFFFFFFu, all_visible);
    const float* lse_s = s_lse + stage * kWgRows;
    const float* delta_s = s_delta + stage * kWgRows;
    const int* token_s = s_token + (tile & 3) * kWgRows;
#pragma unroll
    for (int nt = 0; nt < kRowTiles; ++nt) {
      const int col = nt * 8 + 2 * tig;  // rows col, col + 1 of the tile
      const float2 lse = *reinterpret_cast<const float2*>(lse_s + col);
      const float2 delta = *reinterpret_cast<const float2*>(delta_s + col);
      const int2 token = *reinterpret_cast<const int2*>(token_s + col);
      const float lse2[2] = {lse.x * kLog2e, lse.y * kLog2e};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float pv = fast_exp2(fmaf(s[nt][e], a.scale_log2, -lse2[e & 1]));
        if (need_mask) {
          const int t = (e & 1) ? token.y : token.x;
          const int2 v = vis[e >> 1];
          if (t < v.x || t >= v.y) pv = 0.0f;
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
    fence_registers(dv);
    fence_registers(dk);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < kKStepsM; ++ks) {  // dO and Q are MN-major here: 16 rows = 2048 bytes per step
      const uint32_t rows = ks * 16 * RowTile::kRowBytes;
      wgmma_m64n128k16_rs<1>(dv, a_p[ks], wgmma_descriptor(s_do(stage) + rows, RowTile::kBlockBytes, 1024));
      wgmma_m64n128k16_rs<1>(dk, a_ds[ks], wgmma_descriptor(s_q(stage) + rows, RowTile::kBlockBytes, 1024));
    }
    wgmma_commit();
    if constexpr (FUSED_DQ) {
      // ---- dS^T to shared memory (bf16); dQ sums over all 128 keys of the CTA ----
#pragma unroll
      for (int ks = 0; ks < kKStepsM; ++ks)
#pragma unroll
        for (int r = 0; r < 4; ++r)  // a_ds[ks][r]: key row g + 8 (r & 1), row columns 16 ks + 8 (r >> 1) + 2 tig
          st_shared_4(s_ds + DsTile::offset(warp * 16 + (r & 1) * 8 + g, 2 * ks + (r >> 1)) + tig * 4, a_ds[ks][r]);
      fence_proxy_async();
      __syncthreads();
      // ---- dQ (64 rows, 128) = dS K: warpgroup wg takes columns [64 wg, 64 wg + 64) ----
      float acc[8][4] = {};
      fence_registers(acc);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kWgKeys / 16; ++kk) {  // 16 keys = 2048 bytes per step; A = dS read MN-major out of dS^T
        const uint32_t rows = kk * 16 * KeyTile::kRowBytes;
        wgmma_m64n64k16_ss<1, 1>(acc, wgmma_descriptor(s_ds + rows, DsTile::kBytes, 1024),
                                     wgmma_descriptor(s_k + wg * KeyTile::kBlockBytes + rows,
                                                          KeyTile::kBlockBytes, 1024));
      }
      wgmma_commit();
      if (tile > 0) flush_dq(tile - 1);  // under the dQ MMAs
      wgmma_wait_all();
      fence_registers(acc);
      fence_registers(dv);
      fence_registers(dk);
      fence_registers(a_p);
      fence_registers(a_ds);
      stage_dq(acc);
    } else {
      wgmma_wait_all();
      fence_registers(dv);
      fence_registers(dk);
      fence_registers(a_p);
      fence_registers(a_ds);
    }
  }
  if constexpr (FUSED_DQ) {
    if (n_tiles > 0) flush_dq(n_tiles - 1);
  }
  cp_async_wait<0>();  // n_tiles == 0: the K/V group is still committed
  __syncthreads();         // every warpgroup is done with K, V, Q and dO: they become the output staging

  // ---- f32 partial sums (a query subset under context parallelism): straight from the accumulators ----
  if (a.dkv_f32) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int key = key_begin + warp * 16 + half * 8 + g;
      if (key >= key_end) continue;
      const int64_t row = (static_cast<int64_t>(key) * a.Hkv + kv_head) * a.D;
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        const int col = dt * 8 + 2 * tig;
        if (col >= a.D) continue;
        add_key_row_pair(a.dk, true, row + col, dk[dt][2 * half] * a.scale, dk[dt][2 * half + 1] * a.scale, true);
        add_key_row_pair(a.dv, true, row + col, dv[dt][2 * half], dv[dt][2 * half + 1], true);
      }
    }
    return;
  }
  // ---- dK (scaled) and dV added into the bf16 outputs, through shared memory: 16-byte accesses per row ----
  bf16* out_k = static_cast<bf16*>(a.dk);
  bf16* out_v = static_cast<bf16*>(a.dv);
  const uint32_t s_dk = base + WgSmem::kDkOut, s_dv = base + WgSmem::kDvOut;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int key = warp * 16 + half * 8 + g;
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt) {
      const uint32_t at = (key * WgSmem::kOutPitch + dt * 8 + 2 * tig) * 2;
      st_shared_4(s_dk + at, pack_bf16(dk[dt][2 * half] * a.scale, dk[dt][2 * half + 1] * a.scale));
      st_shared_4(s_dv + at, pack_bf16(dv[dt][2 * half], dv[dt][2 * half + 1]));
    }
  }
  __syncthreads();
  constexpr int kPasses = kWgKeys * 16 / kWgThreads;  // 16-byte chunks per row
  const int c8 = (tid % 16) * 8, key0 = tid / 16;
  uint4 old_k[kPasses], old_v[kPasses];
#pragma unroll
  for (int i = 0; i < kPasses; ++i) {  // every load in flight before the first add
    const int key = key0 + i * (kWgThreads / 16);
    const int64_t at = (static_cast<int64_t>(key_begin + key) * a.Hkv + kv_head) * a.D + c8;
    const bool ok = key_begin + key < key_end && c8 < a.D;
    old_k[i] = ok ? *reinterpret_cast<const uint4*>(out_k + at) : make_uint4(0, 0, 0, 0);
    old_v[i] = ok ? *reinterpret_cast<const uint4*>(out_v + at) : make_uint4(0, 0, 0, 0);
  }
#pragma unroll
  for (int i = 0; i < kPasses; ++i) {
    const int key = key0 + i * (kWgThreads / 16);
    if (key_begin + key >= key_end || c8 >= a.D) continue;
    const int64_t at = (static_cast<int64_t>(key_begin + key) * a.Hkv + kv_head) * a.D + c8;
    const uint32_t from = (key * WgSmem::kOutPitch + c8) * 2;
    uint4 nk, nv;
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n" : "=r"(nk.x), "=r"(nk.y), "=r"(nk.z), "=r"(nk.w) : "r"(s_dk + from));
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n" : "=r"(nv.x), "=r"(nv.y), "=r"(nv.z), "=r"(nv.w) : "r"(s_dv + from));
    *reinterpret_cast<uint4*>(out_k + at) = add_bf16x8(old_k[i], nk);
    *reinterpret_cast<uint4*>(out_v + at) = add_bf16x8(old_v[i], nv);
  }
}

template <bool FUSED_DQ>
void launch(const BackwardArgs& a, cudaStream_t stream) {
  static const bool configured = [] {
    MOBA_CUDA_CHECK(cudaFuncSetAttribute(moba_dkv_wgmma_kernel<FUSED_DQ>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         WgSmem::kBytes));
    return true;
  }();
  (void)configured;
  const int64_t tiles = (a.Nk + kWgKeys - 1) / kWgKeys, per_block = std::max(1, a.B / kWgKeys);
  const dim3 grid(static_cast<unsigned>((tiles + per_block - 1) / per_block * per_block * a.Hkv));
  moba_dkv_wgmma_kernel<FUSED_DQ><<<grid, kWgThreads, WgSmem::kBytes, stream>>>(a);
  MOBA_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void launch_dkv_wgmma(const BackwardArgs& a, cudaStream_t stream, bool fused_dq) {
  if (fused_dq) launch<true>(a, stream);
  else launch<false>(a, stream);
}

}  // namespace moba::cuda::attn
