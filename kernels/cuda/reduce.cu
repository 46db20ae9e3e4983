// Sum of squares of an f32 buffer (for global-norm gradient clipping) on the GPU, returned to the host in double.
// Invariant: two fixed-order stages (per-block partial sums in double, then one block adding them in block order),
// no atomics, so the result is deterministic for a given GPU; the partials live in scratch slot 1.
#include <algorithm>

#include "kernels/cuda/dense_util.cuh"
#include "kernels/cuda/ops.h"

namespace moba::cuda {
namespace {

constexpr int kThreads = 512;

// partials[b] = sum over this block's grid-stride share of x (n) of x_i^2, products and sums in double.
template <int kVec>
__global__ void __launch_bounds__(kThreads) sum_squares_partial_kernel(double* partials, const float* x, int64_t n) {
  double sum = 0.0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * kVec;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kVec; i < n; i += stride) {
    float v[kVec];
    load_f32<kVec>(v, x + i);
#pragma unroll
    for (int k = 0; k < kVec; ++k) sum += static_cast<double>(v[k]) * v[k];
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) partials[blockIdx.x] = sum;
}

// partials[n_partials] = sum of partials[0, n_partials), one block.
__global__ void __launch_bounds__(kThreads) sum_partials_kernel(double* partials, int n_partials) {
  double sum = 0.0;
  for (int i = threadIdx.x; i < n_partials; i += blockDim.x) sum += partials[i];
  sum = block_sum(sum);
  if (threadIdx.x == 0) partials[n_partials] = sum;
}

}  // namespace

// x (n) -> sum_i x_i^2 (synchronises)
double sum_of_squares(const CudaContext& ctx, const float* x, int64_t n) {
  if (n == 0) return 0.0;
  const bool packed = n % 4 == 0 && aligned_16({x});
  const int64_t per_block = static_cast<int64_t>(kThreads) * (packed ? 4 : 1);
  // Four blocks per multiprocessor keep enough loads in flight; the number of blocks fixes the summation order.
  const int blocks =
      static_cast<int>(std::min<int64_t>((n + per_block - 1) / per_block, 4 * std::max(ctx.sm_count, 1)));
  auto* partials = static_cast<double*>(ctx.scratch(1, sizeof(double) * (blocks + 1)));  // (blocks + 1)
  if (packed) {
    sum_squares_partial_kernel<4><<<blocks, kThreads, 0, ctx.stream>>>(partials, x, n);
  } else {
    sum_squares_partial_kernel<1><<<blocks, kThreads, 0, ctx.stream>>>(partials, x, n);
  }
  MOBA_CUDA_CHECK(cudaGetLastError());
  sum_partials_kernel<<<1, kThreads, 0, ctx.stream>>>(partials, blocks);
  MOBA_CUDA_CHECK(cudaGetLastError());
  double total = 0.0;
  MOBA_CUDA_CHECK(cudaMemcpyAsync(&total, partials + blocks, sizeof(double), cudaMemcpyDeviceToHost, ctx.stream));
  MOBA_CUDA_CHECK(cudaStreamSynchronize(ctx.stream));
  return total;
}

}  // namespace moba::cuda
