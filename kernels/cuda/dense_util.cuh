// Device helpers shared by the dense op kernels (embedding.cu, rmsnorm.cu, ...): packs of kVec elements moved
// as one access (8 bf16 or 4 f32 = 16 bytes) and converted to f32, and warp reductions.
// Invariant: a pack of kVec > 1 needs its address aligned to the pack's size; launchers check with aligned_16().
#pragma once
#include <cuda_bf16.h>

#include <cstdint>
#include <initializer_list>

namespace moba::cuda {

// True when every pointer is 16-byte aligned; launchers take the packed (kVec > 1) path only then.
inline bool aligned_16(std::initializer_list<const void*> pointers) {
  for (const void* p : pointers)
    if ((reinterpret_cast<uintptr_t>(p) & 15) != 0) return false;
  return true;
}

// dst[0..kVec) = p[0..kVec) as f32; kVec is 1 or 8 (one 16-byte load).
template <int kVec>
__device__ __forceinline__ void load_bf16(float (&dst)[kVec], const __nv_bfloat16* p) {
  static_assert(kVec == 1 || kVec == 8);
  if constexpr (kVec == 8) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __bfloat1622float2(pairs[i]);
      dst[2 * i] = f.x;
      dst[2 * i + 1] = f.y;
    }
  } else {
    dst[0] = __bfloat162float(p[0]);
  }
}

// p[0..kVec) = src rounded to bf16 (nearest even); kVec is 1 or 8 (one 16-byte store).
template <int kVec>
__device__ __forceinline__ void store_bf16(__nv_bfloat16* p, const float (&src)[kVec]) {
  static_assert(kVec == 1 || kVec == 8);
  if constexpr (kVec == 8) {
    uint4 raw;
    __nv_bfloat162* pairs = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) pairs[i] = __floats2bfloat162_rn(src[2 * i], src[2 * i + 1]);
    *reinterpret_cast<uint4*>(p) = raw;
  } else {
    p[0] = __float2bfloat16_rn(src[0]);
  }
}

// dst[0..kVec) = p[0..kVec); kVec is 1, 4 (one 16-byte load) or 8 (two).
template <int kVec>
__device__ __forceinline__ void load_f32(float (&dst)[kVec], const float* p) {
  static_assert(kVec == 1 || kVec % 4 == 0);
  if constexpr (kVec == 1) {
    dst[0] = p[0];
  } else {
#pragma unroll
    for (int i = 0; i < kVec; i += 4) {
      const float4 f = *reinterpret_cast<const float4*>(p + i);
      dst[i] = f.x;
      dst[i + 1] = f.y;
      dst[i + 2] = f.z;
      dst[i + 3] = f.w;
    }
  }
}

template <int kVec>
__device__ __forceinline__ void store_f32(float* p, const float (&src)[kVec]) {
  static_assert(kVec == 1 || kVec % 4 == 0);
  if constexpr (kVec == 1) {
    p[0] = src[0];
  } else {
#pragma unroll
    for (int i = 0; i < kVec; i += 4)
      *reinterpret_cast<float4*>(p + i) = make_float4(src[i], src[i + 1], src[i + 2], src[i + 3]);
  }
}

// Sum / max over the 32 lanes of a warp; every lane gets the result.
template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

// Sum over a block of blockDim.x threads (a multiple of 32, at most 1024); every thread gets the result.
// Uses 32 T of shared memory; a __syncthreads() at the end makes back-to-back calls safe.
template <typename T>
__device__ __forceinline__ T block_sum(T x) {
  __shared__ T warp_sums[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
  x = warp_sum(x);
  if (lane == 0) warp_sums[warp] = x;
  __syncthreads();
  T total = lane < n_warps ? warp_sums[lane] : T(0);
  total = warp_sum(total);
  __syncthreads();
  return total;
}

}  // namespace moba::cuda
