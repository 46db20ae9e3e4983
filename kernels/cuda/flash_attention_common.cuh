// Shared pieces of the dense flash-attention kernels (flash_attention_forward.cu, flash_attention_backward.cu):
// PTX wrappers for cp.async, ldmatrix and the bf16 tensor-core MMA (mma.sync.m16n8k16), the XOR-swizzled
// shared-memory tile layout, tile loaders and the segment lookups over cu_seqlens.
// Invariants: every tile in shared memory is (rows, kD) bf16 with 16-byte chunks swizzled by row (SmemTile),
// columns >= D and rows past the valid ones are zero-filled, and kD (the padded head dim) is 16, 32, 64 or 128.
// Fragment layouts follow the PTX ISA's description of mma.m16n8k16 and ldmatrix (Section "Matrix Fragments for
// mma.m16n8k16"); the tiling and the online softmax follow FlashAttention-2 (Dao, 2023, arXiv 2307.08691).
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

#include "kernels/cuda/ops.h"

namespace moba::cuda::flash {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// The tensor-core tiles work on 16-column steps: a head dim D runs in the kernel instantiated for the next of
// 16, 32, 64, 128, its extra columns zero (they add 0 to every dot product and are never stored).
inline int padded_head_dim(int D) { return D <= 16 ? 16 : D <= 32 ? 32 : D <= 64 ? 64 : 128; }

// ---- segments: cu_seqlens (S + 1) ascending, cu[0] = 0, cu[S] = N, empty segments repeat a value ----------------
__device__ __forceinline__ int first_index_greater(const int32_t* cu, int count, int x) {
  int lo = 0, hi = count;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (__ldg(cu + mid) > x) hi = mid;
    else lo = mid + 1;
  }
  return lo;
}
// First token of the segment holding token t (0 <= t < N).
__device__ __forceinline__ int segment_start(const int32_t* cu, int n_segments, int t) {
  return __ldg(cu + first_index_greater(cu, n_segments + 1, t) - 1);
}
// One past the last token of the segment holding token u (0 <= u < N).
__device__ __forceinline__ int segment_end(const int32_t* cu, int n_segments, int u) {
  return __ldg(cu + first_index_greater(cu, n_segments + 1, u));
}

// ---- PTX wrappers ----------------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// 16 bytes global -> shared, asynchronously; src_bytes 0 writes zeros (the source is not read).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_4(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most `pending` of this thread's committed groups are still in flight.
template <int pending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(pending));
}
__device__ __forceinline__ void st_shared_16(uint32_t dst, uint4 v) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(dst), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w));
}
__device__ __forceinline__ void st_shared_4(uint32_t dst, uint32_t v) {
  asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(dst), "r"(v));
}
__device__ __forceinline__ float2 ld_shared_f32x2(uint32_t src) {
  float2 v;
  asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(v.x), "=f"(v.y) : "r"(src));
  return v;
}

// Shared memory written through the generic proxy (cp.async, st.shared) before the async proxy (wgmma) reads it.
__device__ __forceinline__ void fence_proxy_async() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
// global[dst, dst + 4) += v element-wise as one 16-byte vector reduction (red.global.add.v4.f32, sm_90; PTX ISA
// "red"), dst 16-byte aligned; four scalar atomics before sm_90.
__device__ __forceinline__ void red_add_f32x4(float* dst, const float (&v)[4]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(dst), "f"(v[0]), "f"(v[1]), "f"(v[2]), "f"(v[3])
               : "memory");
#else
  for (int i = 0; i < 4; ++i) atomicAdd(dst + i, v[i]);
#endif
}
// Four 8x8 bf16 matrices; lanes 8i..8i+7 give the row addresses of matrix i; register i of every lane holds
// (row lane/4, columns 2*(lane%4), +1) of matrix i, or with .trans (rows 2*(lane%4), +1; column lane/4).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
// d (16x8 f32) += a (16x16 bf16, row-major) * b (16x8 bf16, column-major).
// Lane l = 4*g + i holds a {(g, 2i..), (g+8, 2i..), (g, 2i+8..), (g+8, 2i+8..)}, b {(2i.., g), (2i+8.., g)},
// d {(g, 2i), (g, 2i+1), (g+8, 2i), (g+8, 2i+1)}.
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// Two floats as a bf16 pair, `lo` in the low half (the lower column index).
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
// The accumulator fragments of two adjacent n8 tiles (columns 16k..16k+15 of a 16-row tile) as the A operand
// (16x16) of the next MMA: the register-level reuse of P that FlashAttention-2 uses for P V.
__device__ __forceinline__ void accumulators_to_a(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = pack_bf16(c0[0], c0[1]);
  a[1] = pack_bf16(c0[2], c0[3]);
  a[2] = pack_bf16(c1[0], c1[1]);
  a[3] = pack_bf16(c1[2], c1[3]);
}
// Stores the bf16 pair (a, b) at p (4-byte aligned when `vector`).
__device__ __forceinline__ void store_bf16_pair(bf16* p, float a, float b, bool vector) {
  if (vector) {
    *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
  } else {
    p[0] = __float2bfloat16(a);
    p[1] = __float2bfloat16(b);
  }
}
__device__ __forceinline__ float2 load_bf16_pair(const bf16* p, bool vector) {
  if (vector) return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
  return make_float2(__bfloat162float(p[0]), __bfloat162float(p[1]));
}

// 2^x with the hardware approximation (flush-to-zero; 2^-inf = 0), as FlashAttention does for the softmax.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// ---- Hopper warpgroup MMA (sm_90a only; other targets trap, and the host selects these kernels on sm_90 only) ----
// Descriptor of a shared-memory operand in the 128-byte-swizzle layout: start address, leading and stride byte
// offsets (PTX ISA "Matrix Descriptor Format"; K-major: stride = 1024 between 8-row groups, leading unused;
// MN-major: leading = distance between 64-element column blocks, stride = 1024 between 8-row groups of K).
__device__ __forceinline__ uint64_t wgmma_descriptor(uint32_t address, uint32_t leading_bytes, uint32_t stride_bytes) {
  return static_cast<uint64_t>((address >> 4) & 0x3FFF) | (static_cast<uint64_t>((leading_bytes >> 4) & 0x3FFF) << 16) |
         (static_cast<uint64_t>((stride_bytes >> 4) & 0x3FFF) << 32) | (1ull << 62);
}
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MOBA_FLASH_HAVE_WGMMA 1
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
// d (64 x N f32; each warp holds its 16 rows in the mma.m16n8 accumulator layout, n8 tile by n8 tile) +=
// A (64 x 16) * B (16 x N). B from a shared-memory descriptor (kTransB = 1: B is MN-major); A from a descriptor
// (_ss; kTransA = 1: A is MN-major) or from registers in the mma.m16n8k16 A fragment layout (_rs). Asynchronous:
// wgmma_fence before, wgmma_commit and wgmma_wait_all after.
template <int kTransA, int kTransB>
__device__ __forceinline__ void wgmma_m64n64k16_ss(float (&d)[8][4], uint64_t desc_a, uint64_t desc_b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, %35, %36;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
      : "l"(desc_a), "l"(desc_b), "r"(1), "n"(kTransA), "n"(kTransB));
}
template <int kTransA, int kTransB>
__device__ __forceinline__ void wgmma_m64n128k16_ss(float (&d)[16][4], uint64_t desc_a, uint64_t desc_b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, %67, %68;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
      : "l"(desc_a), "l"(desc_b), "r"(1), "n"(kTransA), "n"(kTransB));
}
template <int kTransB>
__device__ __forceinline__ void wgmma_m64n128k16_rs(float (&d)[16][4], const uint32_t (&a)[4], uint64_t desc_b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1), "n"(kTransB));
}
#else
__device__ __forceinline__ void wgmma_fence() { __trap(); }
__device__ __forceinline__ void wgmma_commit() { __trap(); }
__device__ __forceinline__ void wgmma_wait_all() { __trap(); }
template <int kTransA, int kTransB>
__device__ __forceinline__ void wgmma_m64n64k16_ss(float (&)[8][4], uint64_t, uint64_t) { __trap(); }
template <int kTransA, int kTransB>
__device__ __forceinline__ void wgmma_m64n128k16_ss(float (&)[16][4], uint64_t, uint64_t) { __trap(); }
template <int kTransB>
__device__ __forceinline__ void wgmma_m64n128k16_rs(float (&)[16][4], const uint32_t (&)[4], uint64_t) { __trap(); }
#endif
// Pins registers that an asynchronous MMA reads or writes, so the compiler neither reuses nor reads them early.
template <int R, int C>
__device__ __forceinline__ void fence_registers(float (&d)[R][C]) {
#pragma unroll
  for (int i = 0; i < R; ++i)
#pragma unroll
    for (int j = 0; j < C; ++j) asm volatile("" : "+f"(d[i][j])::"memory");
}
template <int R, int C>
__device__ __forceinline__ void fence_registers(uint32_t (&d)[R][C]) {
#pragma unroll
  for (int i = 0; i < R; ++i)
#pragma unroll
    for (int j = 0; j < C; ++j) asm volatile("" : "+r"(d[i][j])::"memory");
}

// ---- shared-memory tiles ---------------------------------------------------------------------------------------
// (kRows, kCols) bf16, row-major, 16-byte chunks XOR-swizzled by the row's low bits: the 8 rows an ldmatrix
// phase reads (same logical chunk) land in 8 different bank groups.
template <int kRows_, int kCols_>
struct SmemTile {
  static constexpr int kRows = kRows_, kCols = kCols_;
  static constexpr int kChunks = kCols / 8;
  static constexpr int kSwizzle = kChunks < 8 ? kChunks : 8;
  static constexpr int kBytes = kRows * kCols * 2;
  static constexpr int kRowBytes = kCols * 2;
  __device__ __forceinline__ static uint32_t offset(int row, int chunk) {
    return static_cast<uint32_t>(row * kRowBytes + ((chunk ^ (row & (kSwizzle - 1))) << 4));
  }
  // offset(row0 + r, chunk0 + c) from a lane's lane_offset = offset(r, c) with c in {0, 1}, for row0 a multiple of
  // 8 and chunk0 even: the swizzle then reduces to one XOR and an add, so the ldmatrix addresses of an unrolled
  // loop cost no registers beyond the few lane offsets (hoisting offset() per (row0, chunk0) pair spilled).
  __device__ __forceinline__ static uint32_t at(uint32_t lane_offset, int row0, int chunk0) {
    return (lane_offset ^ static_cast<uint32_t>(chunk0 << 4)) + static_cast<uint32_t>(row0 * kRowBytes);
  }
};

// (kRows, 128) bf16 as two column blocks of (kRows, 64), rows of 128 bytes whose 16-byte chunks are XOR-swizzled by
// row % 8: the canonical 128-byte-swizzle layout that wgmma reads through a descriptor (tile 1024-byte aligned;
// K-major for Q and K, MN-major for V), and that ldmatrix also reads conflict-free.
template <int kRows_>
struct WgTile {
  static constexpr int kRows = kRows_, kCols = 128;
  static constexpr int kRowBytes = 128;  // row pitch inside a column block
  static constexpr int kBlockBytes = kRows * 128;
  static constexpr int kBytes = 2 * kBlockBytes;
  static constexpr int kSwizzle = 8;
  __device__ __forceinline__ static uint32_t offset(int row, int chunk) {
    return static_cast<uint32_t>((chunk >> 3) * kBlockBytes + row * 128 + (((chunk & 7) ^ (row & 7)) << 4));
  }
};

// Rows [0, kRows) of a bf16 matrix (row r at src + r * row_stride, D columns) into a swizzled (kRows, kD) tile,
// asynchronously (cp.async, caller commits) when `vector` (D % 8 == 0 and 16-byte aligned rows), else with plain
// loads and stores. Rows >= rows_valid and columns >= D become zero. Each thread keeps one column chunk and walks
// down the rows with one pointer (precomputing every row's address would hold registers through the main loop).
template <class Tile, int kThreads>
__device__ __forceinline__ void load_tile(uint32_t tile, const bf16* src, int64_t row_stride, int rows_valid, int D,
                                          bool vector, int tid) {
  constexpr int kRows = Tile::kRows, kChunks = Tile::kCols / 8, kRowsPerPass = kThreads / kChunks;
  static_assert(kThreads % kChunks == 0 && kRowsPerPass % Tile::kSwizzle == 0);
  const int c = tid % kChunks, r0 = tid / kChunks;
  const bool column_valid = c * 8 < D;
  const bf16* p = src + r0 * row_stride + c * 8;
  const int64_t step = kRowsPerPass * row_stride;
  uint32_t dst = tile + Tile::offset(r0, c);
#pragma unroll
  for (int pass = 0; pass < (kRows + kRowsPerPass - 1) / kRowsPerPass; ++pass) {
    if (kRows % kRowsPerPass != 0 && r0 + pass * kRowsPerPass >= kRows) break;
    const bool valid = column_valid && r0 + pass * kRowsPerPass < rows_valid;
    if (vector) {
      cp_async_16(dst, valid ? p : src, valid);
    } else {
      union {
        uint4 v;
        unsigned short e[8];
      } u;
#pragma unroll
      for (int j = 0; j < 8; ++j)
        u.e[j] = valid && c * 8 + j < D ? __bfloat16_as_ushort(p[j]) : static_cast<unsigned short>(0);
      st_shared_16(dst, u.v);
    }
    p += step;
    dst += kRowsPerPass * Tile::kRowBytes;
  }
}

}  // namespace moba::cuda::flash
