// Elementwise GPU helpers: bf16 in-place add, f32 in-place scale, f32 <-> bf16 conversion and strided row copies.
// Invariant: no reductions; every output element is written by exactly one thread (copies go through the copy
// engine's 2-D memcpy), and arithmetic is f32 rounded once to the output type.
#include "kernels/cuda/dense_util.cuh"
#include "kernels/cuda/ops.h"

namespace moba::cuda {
namespace {

constexpr int kThreads = 256;

unsigned blocks_for(int64_t threads_total) { return static_cast<unsigned>((threads_total + kThreads - 1) / kThreads); }

// dst (n) += src (n), one thread per kVec elements.
template <int kVec>
__global__ void add_bf16_kernel(bf16* dst, const bf16* src, int64_t n) {
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kVec;
  if (i >= n) return;
  float a[kVec], b[kVec];
  load_bf16<kVec>(a, dst + i);
  load_bf16<kVec>(b, src + i);
#pragma unroll
  for (int k = 0; k < kVec; ++k) a[k] += b[k];
  store_bf16<kVec>(dst + i, a);
}

// x (n) *= s
template <int kVec>
__global__ void scale_f32_kernel(float* x, int64_t n, float s) {
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kVec;
  if (i >= n) return;
  float v[kVec];
  load_f32<kVec>(v, x + i);
#pragma unroll
  for (int k = 0; k < kVec; ++k) v[k] *= s;
  store_f32<kVec>(x + i, v);
}

// dst (n) bf16 = src (n) f32 rounded to nearest even
template <int kVec>
__global__ void f32_to_bf16_kernel(bf16* dst, const float* src, int64_t n) {
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kVec;
  if (i >= n) return;
  float v[kVec];
  load_f32<kVec>(v, src + i);
  store_bf16<kVec>(dst + i, v);
}

// dst (n) f32 = src (n) bf16 (exact)
template <int kVec>
__global__ void bf16_to_f32_kernel(float* dst, const bf16* src, int64_t n) {
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kVec;
  if (i >= n) return;
  float v[kVec];
  load_bf16<kVec>(v, src + i);
  store_f32<kVec>(dst + i, v);
}

}  // namespace

void add_inplace(const CudaContext& ctx, bf16* dst, const bf16* src, int64_t n) {
  if (n == 0) return;
  if (n % 8 == 0 && aligned_16({dst, src})) {
    add_bf16_kernel<8><<<blocks_for(n / 8), kThreads, 0, ctx.stream>>>(dst, src, n);
  } else {
    add_bf16_kernel<1><<<blocks_for(n), kThreads, 0, ctx.stream>>>(dst, src, n);
  }
  MOBA_CUDA_CHECK(cudaGetLastError());
}

void scale(const CudaContext& ctx, float* x, int64_t n, float s) {
  if (n == 0) return;
  if (n % 4 == 0 && aligned_16({x})) {
    scale_f32_kernel<4><<<blocks_for(n / 4), kThreads, 0, ctx.stream>>>(x, n, s);
  } else {
    scale_f32_kernel<1><<<blocks_for(n), kThreads, 0, ctx.stream>>>(x, n, s);
  }
  MOBA_CUDA_CHECK(cudaGetLastError());
}

// dst (rows, cols; row stride dst_stride) = src (rows, cols; row stride src_stride), strides in elements.
void copy_rows(const CudaContext& ctx, void* dst, int64_t dst_stride, const void* src, int64_t src_stride, int64_t rows,
               int64_t cols, int elem_bytes) {
  if (rows == 0 || cols == 0) return;
  const size_t width = static_cast<size_t>(cols) * elem_bytes;
  if (dst_stride == cols && src_stride == cols) {
    MOBA_CUDA_CHECK(cudaMemcpyAsync(dst, src, width * rows, cudaMemcpyDeviceToDevice, ctx.stream));
  } else {
    MOBA_CUDA_CHECK(cudaMemcpy2DAsync(dst, static_cast<size_t>(dst_stride) * elem_bytes, src,
                                      static_cast<size_t>(src_stride) * elem_bytes, width, static_cast<size_t>(rows),
                                      cudaMemcpyDeviceToDevice, ctx.stream));
  }
}

// dst (n) = src (n) converted; f32 <-> bf16, or a plain copy when the dtypes match.
void convert(const CudaContext& ctx, void* dst, DType dst_dtype, const void* src, DType src_dtype, int64_t n) {
  if (n == 0) return;
  if (dst_dtype == src_dtype) {
    MOBA_CUDA_CHECK(cudaMemcpyAsync(dst, src, static_cast<size_t>(n) * dtype_size(dst_dtype), cudaMemcpyDeviceToDevice,
                                    ctx.stream));
    return;
  }
  const bool packed = n % 8 == 0 && aligned_16({dst, src});
  if (dst_dtype == DType::bf16 && src_dtype == DType::f32) {
    auto* out = static_cast<bf16*>(dst);
    const auto* in = static_cast<const float*>(src);
    if (packed) {
      f32_to_bf16_kernel<8><<<blocks_for(n / 8), kThreads, 0, ctx.stream>>>(out, in, n);
    } else {
      f32_to_bf16_kernel<1><<<blocks_for(n), kThreads, 0, ctx.stream>>>(out, in, n);
    }
  } else if (dst_dtype == DType::f32 && src_dtype == DType::bf16) {
    auto* out = static_cast<float*>(dst);
    const auto* in = static_cast<const bf16*>(src);
    if (packed) {
      bf16_to_f32_kernel<8><<<blocks_for(n / 8), kThreads, 0, ctx.stream>>>(out, in, n);
    } else {
      bf16_to_f32_kernel<1><<<blocks_for(n), kThreads, 0, ctx.stream>>>(out, in, n);
    }
  } else {
    throw Error(cat("cuda convert: ", dtype_name(src_dtype), " -> ", dtype_name(dst_dtype), " is not supported"),
                "convert only between f32 and bf16");
  }
  MOBA_CUDA_CHECK(cudaGetLastError());
}

}  // namespace moba::cuda
