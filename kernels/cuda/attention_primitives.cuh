// The device primitives every attention kernel shares (dense flash attention, MoBA routing, forward and backward):
// PTX wrappers for cp.async, ldmatrix, the bf16 tensor-core MMAs (mma.sync.m16n8k16 and Hopper's wgmma), the
// shared-memory tile layouts and loaders, the MMA loops over padded tiles, the one online-softmax step, and the
// lookups of documents (cu_seqlens) and query positions (q_rows).
// Invariants: a swizzled tile is (rows, kD) bf16 with 16-byte chunks XOR-swizzled by row (SmemTile, WgTile); a padded
// tile is (rows, DP + 8) bf16 row-major; columns >= D and rows past the valid ones are zero-filled; kD / DP (the
// padded head dim) is 16, 32, 64 or 128. Fragment layouts follow the PTX ISA ("Matrix Fragments for mma.m16n8k16",
// "ldmatrix", "Matrix Descriptor Format"); the tiling and the online softmax follow FlashAttention-2 (Dao, 2023,
// arXiv 2307.08691) and, for wgmma, FlashAttention-3 (Shah et al., 2024).
#pragma once
#include <cuda_bf16.h>

#include <climits>
#include <cmath>
#include <cstdint>

#include "kernels/cuda/ops.h"

namespace moba::cuda::attn {

inline constexpr float kLog2e = 1.4426950408889634f;
inline constexpr float kLn2 = 0.6931471805599453f;


// ---- documents (cu_seqlens (S + 1) ascending, cu[0] = 0, cu[S] = Nk, empty ones repeat a value) and query rows ----
// The document holding key row t (0 <= t < Nk): the last s with cu[s] <= t (empty documents before it are skipped).
__device__ __forceinline__ int segment_of(const int32_t* cu, int n_segments, int64_t t) {
  int lo = 0, hi = n_segments + 1;  // first index with cu > t, found in [lo, hi)
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (__ldg(cu + mid) > t) hi = mid;
    else lo = mid + 1;
  }
  return lo - 1;
}
// First key row of the document holding key row t, and one past its last.
__device__ __forceinline__ int segment_start(const int32_t* cu, int n_segments, int64_t t) {
  return __ldg(cu + segment_of(cu, n_segments, t));
}
__device__ __forceinline__ int segment_end(const int32_t* cu, int n_segments, int64_t t) {
  return __ldg(cu + segment_of(cu, n_segments, t) + 1);
}
// The key row query row i stands at (q_rows == nullptr: row i at key row i).
__device__ __forceinline__ int query_key_row(const int32_t* q_rows, int64_t i) {
  return q_rows != nullptr ? __ldg(q_rows + i) : static_cast<int>(i);
}
// The first query row standing at key row u or later, u in [0, Nk] (query_index: (Nk + 1) of them, or nullptr for
// q_rows == nullptr, where it is u itself).
__device__ __forceinline__ int first_query_at(const int32_t* query_index, int64_t u) {
  return query_index != nullptr ? __ldg(query_index + u) : static_cast<int>(u);
}

// ---- PTX wrappers ----------------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// 16 bytes global -> shared, asynchronously; !valid writes zeros (src must still be a valid address).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  cp_async_16(smem_address(dst), src, valid);
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
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) { ldmatrix_x4(r, smem_address(smem)); }
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  ldmatrix_x4_trans(r, smem_address(smem));
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
// Two floats as a bf16 pair, `lo` in the low half (the lower column index), and the halves of a pair as floats.
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
__device__ __forceinline__ float bf16_lo(uint32_t x) { return __uint_as_float(x << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t x) { return __uint_as_float(x & 0xFFFF0000u); }
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
// dk or dv (bf16, or f32 with `f32`: partial sums of a query subset) elements [at, at + 2) += (x, y); a CTA owns the
// rows it adds into (read-add-write, no atomics). `vector`: 4-byte aligned bf16 pairs.
__device__ __forceinline__ void add_key_row_pair(void* base, bool f32, int64_t at, float x, float y, bool vector) {
  if (f32) {
    float* p = static_cast<float*>(base) + at;
    p[0] += x;
    p[1] += y;
    return;
  }
  bf16* p = static_cast<bf16*>(base) + at;
  const float2 old = load_bf16_pair(p, vector);
  store_bf16_pair(p, old.x + x, old.y + y, vector);
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

// One k-step (columns 16 kk .. 16 kk + 15 of 128) of acc (64 x kN) += A (the 64 rows at a_rows of a K-major WgTile)
// * B^T (the kN rows at b_rows of a K-major WgTile): S = Q K^T, S^T = K Q^T, dP^T = V dO^T on warpgroup MMAs. The 16
// columns are 32 bytes of a 128-byte swizzled row in column block kk / 4. Asynchronous (see wgmma_fence above);
// callers interleave the steps of two independent products so neither waits on its own accumulator chain.
template <class ATile, class BTile, int kN>
__device__ __forceinline__ void wgmma_k_major_step(float (&acc)[kN / 8][4], uint32_t a_rows, uint32_t b_rows, int kk) {
  const uint64_t desc_a = wgmma_descriptor(a_rows + (kk / 4) * ATile::kBlockBytes + (kk % 4) * 32, 16, 1024);
  const uint64_t desc_b = wgmma_descriptor(b_rows + (kk / 4) * BTile::kBlockBytes + (kk % 4) * 32, 16, 1024);
  if constexpr (kN == 128) wgmma_m64n128k16_ss<0, 0>(acc, desc_a, desc_b);
  else wgmma_m64n64k16_ss<0, 0>(acc, desc_a, desc_b);
}

// Double buffering over tiles: starts the next tile's loads when there is one (load_next issues its cp.async copies)
// and waits until the current tile's have landed (for this thread; the caller's barrier makes them everyone's).
template <typename LoadNext>
__device__ __forceinline__ void next_tile_loads(bool has_next, LoadNext&& load_next) {
  if (has_next) {
    load_next();
    cp_async_commit();
    cp_async_wait<1>();
  } else {
    cp_async_wait<0>();
  }
}

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

// ---- padded tiles (rows of DP + 8 bf16: ldmatrix rows land in distinct banks) and their MMA loops (mma.sync) ------
// A operand (16 rows x 16 cols at r0, c0): registers a0..a3 of mma_bf16_16816.
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const bf16* tile, int ld, int r0, int c0, int lane) {
  ldmatrix_x4(a, tile + (r0 + (lane & 15)) * ld + c0 + (lane >> 4) * 8);
}
// B operand where B[k][n] = tile[n][k] (rows of the tile as columns of B): n-tiles n0 and n0 + 8 of the k-step at c0.
__device__ __forceinline__ void load_b_rows(uint32_t (&b)[4], const bf16* tile, int ld, int n0, int c0, int lane) {
  ldmatrix_x4(b, tile + (n0 + (lane & 7) + ((lane >> 4) << 3)) * ld + c0 + ((lane >> 3) & 1) * 8);
}
// B operand where B[k][n] = tile[k][n] (contraction over rows): k-step rows k0..k0+15, n-tiles at c0 and c0 + 8.
__device__ __forceinline__ void load_b_cols(uint32_t (&b)[4], const bf16* tile, int ld, int k0, int c0, int lane) {
  ldmatrix_x4_trans(b, tile + (k0 + (lane & 15)) * ld + c0 + (lane >> 4) * 8);
}
// 64 gathered rows into a padded (64, DP + 8) tile, asynchronously (cp.async; the caller commits): tile row r is row
// rows[r] (i * H + h, D elements at src + rows[r] * D) of a matrix, zero for rows[r] < 0 and columns >= D. Called by
// the 128 threads of a CTA.
template <int DP>
__device__ __forceinline__ void load_gathered_rows(bf16* tile, const bf16* src, const int* rows, int D) {
  for (int idx = threadIdx.x; idx < 64 * (DP / 8); idx += 128) {
    const int r = idx / (DP / 8), c = idx % (DP / 8) * 8;
    const int row = rows[r];
    const bool ok = row >= 0 && c < D;
    cp_async_16(tile + r * (DP + 8) + c, ok ? src + static_cast<int64_t>(row) * D + c : src, ok);
  }
}
// acc (16 x kCols) += A (16 rows of `a_tile` from row r0) * B^T (kCols rows of `b_tile`): the contraction runs over
// the DP columns of both (S = Q K^T, dP = dO V^T, and their transposes).
template <int DP, int kCols>
__device__ __forceinline__ void mma_rows_times_rows(float (&acc)[kCols / 8][4], const bf16* a_tile, int r0,
                                                    const bf16* b_tile, int ld, int lane) {
#pragma unroll
  for (int ks = 0; ks < DP / 16; ++ks) {
    uint32_t a[4];
    load_a(a, a_tile, ld, r0, ks * 16, lane);
#pragma unroll
    for (int n2 = 0; n2 < kCols / 16; ++n2) {
      uint32_t b[4];
      load_b_rows(b, b_tile, ld, n2 * 16, ks * 16, lane);
      mma_bf16_16816(acc[2 * n2], a, b[0], b[1]);
      mma_bf16_16816(acc[2 * n2 + 1], a, b[2], b[3]);
    }
  }
}
// acc (16 x kCols) += P (16 x kRows: the accumulator fragments p of an earlier product, rounded to bf16 as the A
// operand) * tile (kRows rows, columns [c0, c0 + kCols)): O += P V, dQ += dS K, dV += P^T dO, dK += dS^T Q.
template <int kRows, int kCols>
__device__ __forceinline__ void mma_accumulators_times_rows(float (&acc)[kCols / 8][4], const float (&p)[kRows / 8][4],
                                                            const bf16* tile, int ld, int c0, int lane) {
#pragma unroll
  for (int kk = 0; kk < kRows / 16; ++kk) {
    uint32_t a[4];
    accumulators_to_a(a, p[2 * kk], p[2 * kk + 1]);
#pragma unroll
    for (int n2 = 0; n2 < kCols / 16; ++n2) {
      uint32_t b[4];
      load_b_cols(b, tile, ld, kk * 16, c0 + n2 * 16, lane);
      mma_bf16_16816(acc[2 * n2], a, b[0], b[1]);
      mma_bf16_16816(acc[2 * n2 + 1], a, b[2], b[3]);
    }
  }
}

// ---- the online softmax (FlashAttention-2, Dao 2023, Algorithm 1) -------------------------------------------------
// One key tile for the thread's two accumulator rows (fragment rows g, g + 8; a row's 4 threads are a quad): raw
// scores s (-inf where the key is not visible) become P = exp2(s * scale_log2 - new max); row_max (log2 domain) and
// the thread's partial row_sum move on. Returns the factors by which the rows of O accumulated so far must be
// multiplied: exactly 1 where a row's max did not move, so a tile a row does not see leaves it bitwise unchanged (a
// row's result does not depend on the other rows of its tile).
template <int kNTiles>
__device__ __forceinline__ float2 online_softmax(float (&s)[kNTiles][4], float (&row_max)[2], float (&row_sum)[2],
                                                 float scale_log2) {
  float correction[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float mx = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * half], s[nt][2 * half + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float new_max = fmaxf(row_max[half], mx * scale_log2);
    const float base = new_max == -INFINITY ? 0.0f : new_max;  // a row with no key yet stays at zero
    correction[half] = row_max[half] == new_max ? 1.0f : fast_exp2(row_max[half] - base);
    row_max[half] = new_max;
    float sum = 0.0f;
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
      for (int e = 2 * half; e < 2 * half + 2; ++e) {
        const float pv = fast_exp2(fmaf(s[nt][e], scale_log2, -base));
        s[nt][e] = pv;
        sum += pv;
      }
    row_sum[half] = row_sum[half] * correction[half] + sum;
  }
  return make_float2(correction[0], correction[1]);
}
template <int kDTiles>
__device__ __forceinline__ void rescale_rows(float (&o)[kDTiles][4], float2 correction) {
#pragma unroll
  for (int dt = 0; dt < kDTiles; ++dt) {
    o[dt][0] *= correction.x;
    o[dt][1] *= correction.x;
    o[dt][2] *= correction.y;
    o[dt][3] *= correction.y;
  }
}
// Row sums of a quad: every thread gets the full sum of its two rows' partial sums.
__device__ __forceinline__ void reduce_row_sums(float (&row_sum)[2]) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    row_sum[half] += __shfl_xor_sync(0xffffffffu, row_sum[half], 1);
    row_sum[half] += __shfl_xor_sync(0xffffffffu, row_sum[half], 2);
  }
}

}  // namespace moba::cuda::attn
