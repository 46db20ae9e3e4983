// Softmax cross-entropy over bf16 logits (N, V) on the GPU, one block per row, all arithmetic in f32.
// Invariant: a row's max and sum of exponentials come from an online (max, sum) merge in a fixed order, so results
// are deterministic; masked rows write a zero loss and get no gradient. The loss total is summed in double by one
// block in a fixed order and is the only host synchronisation (scratch slot 0). cross_entropy_fused is the loss
// head of training: loss and gradient in one pass, the gradient written over the logits.
// The online-softmax merge follows llm.c's fused classifier and Milakov & Gimelshein (2018).
#include <cmath>

#include "kernels/cuda/dense_util.cuh"
#include "kernels/cuda/ops.h"

namespace moba::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kSumThreads = 1024;

// Running softmax statistics of a set of logits: max, and sum of exp(logit - max). The empty set is (-inf, 0).
struct SoftmaxStats {
  float max;
  float sum;
};

__device__ __forceinline__ SoftmaxStats merge(SoftmaxStats a, SoftmaxStats b) {
  const float max = fmaxf(a.max, b.max);
  if (max == -INFINITY) return a;  // both empty
  return {max, a.sum * expf(a.max - max) + b.sum * expf(b.max - max)};
}

// Statistics of row (V) over the whole block; every thread gets them. Thread j reads packs j, j + blockDim, ...
template <int kVec>
__device__ SoftmaxStats row_softmax_stats(const bf16* row, int V) {
  SoftmaxStats stats{-INFINITY, 0.0f};
  for (int v = threadIdx.x * kVec; v < V; v += blockDim.x * kVec) {
    float x[kVec];
    load_bf16<kVec>(x, row + v);
    float pack_max = x[0];
#pragma unroll
    for (int k = 1; k < kVec; ++k) pack_max = fmaxf(pack_max, x[k]);
    const float max = fmaxf(stats.max, pack_max);
    float sum = stats.sum * expf(stats.max - max);
#pragma unroll
    for (int k = 0; k < kVec; ++k) sum += expf(x[k] - max);
    stats = {max, sum};
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    const SoftmaxStats other{__shfl_xor_sync(0xffffffffu, stats.max, offset),
                             __shfl_xor_sync(0xffffffffu, stats.sum, offset)};
    stats = merge(stats, other);
  }
  __shared__ SoftmaxStats warp_stats[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_stats[warp] = stats;
  __syncthreads();
  if (warp == 0) {
    stats = lane < static_cast<int>(blockDim.x / 32) ? warp_stats[lane] : SoftmaxStats{-INFINITY, 0.0f};
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      const SoftmaxStats other{__shfl_xor_sync(0xffffffffu, stats.max, offset),
                               __shfl_xor_sync(0xffffffffu, stats.sum, offset)};
      stats = merge(stats, other);
    }
    if (lane == 0) warp_stats[0] = stats;
  }
  __syncthreads();
  return warp_stats[0];
}

// losses[t] = log(sum exp(logits - max)) + max - logits[target], or 0 where masked.
template <int kVec>
__global__ void __launch_bounds__(kThreads)
    cross_entropy_forward_kernel(float* losses, const bf16* logits, const int32_t* targets, const uint8_t* mask,
                                 int V) {
  const int64_t t = blockIdx.x;
  if (mask != nullptr && mask[t] == 0) {
    if (threadIdx.x == 0) losses[t] = 0.0f;
    return;
  }
  const bf16* row = logits + t * V;
  const SoftmaxStats stats = row_softmax_stats<kVec>(row, V);
  if (threadIdx.x == 0) losses[t] = logf(stats.sum) + stats.max - __bfloat162float(row[targets[t]]);
}

// total[0] = sum of losses (N) in double, by one block in a fixed order.
__global__ void __launch_bounds__(kSumThreads) sum_losses_kernel(double* total, const float* losses, int64_t N) {
  double sum = 0.0;
  for (int64_t t = threadIdx.x; t < N; t += blockDim.x) sum += losses[t];
  sum = block_sum(sum);
  if (threadIdx.x == 0) total[0] = sum;
}

// dlogits[t] += (softmax(logits[t]) - onehot(targets[t])) * grad_scale, unmasked rows only.
template <int kVec>
__global__ void __launch_bounds__(kThreads)
    cross_entropy_backward_kernel(bf16* dlogits, const bf16* logits, const int32_t* targets, const uint8_t* mask,
                                  float grad_scale, int V) {
  const int64_t t = blockIdx.x;
  if (mask != nullptr && mask[t] == 0) return;
  const bf16* row = logits + t * V;
  bf16* drow = dlogits + t * V;
  const SoftmaxStats stats = row_softmax_stats<kVec>(row, V);
  const float inv_sum = 1.0f / stats.sum;
  const int target = targets[t];
  for (int v = threadIdx.x * kVec; v < V; v += blockDim.x * kVec) {
    float x[kVec], d[kVec];
    load_bf16<kVec>(x, row + v);
    load_bf16<kVec>(d, drow + v);
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const float prob = expf(x[k] - stats.max) * inv_sum;
      const float indicator = v + k == target ? 1.0f : 0.0f;
      d[k] += (prob - indicator) * grad_scale;
    }
    store_bf16<kVec>(drow + v, d);
  }
}

// The fused head's loss and gradient in one pass over the row: losses[t] as the forward kernel, then (when
// grad_scale != 0) the row is overwritten by its gradient (softmax - onehot) * grad_scale, 0 where masked. Each
// thread rewrites only the packs it read, after the block has agreed on the row's statistics.
template <int kVec>
__global__ void __launch_bounds__(kThreads)
    cross_entropy_fused_kernel(float* losses, bf16* logits, const int32_t* targets, const uint8_t* mask,
                               float grad_scale, int V) {
  const int64_t t = blockIdx.x;
  bf16* row = logits + t * V;
  if (mask != nullptr && mask[t] == 0) {
    if (threadIdx.x == 0) losses[t] = 0.0f;
    if (grad_scale != 0.0f) {
      const float zeros[kVec] = {};
      for (int v = threadIdx.x * kVec; v < V; v += blockDim.x * kVec) store_bf16<kVec>(row + v, zeros);
    }
    return;
  }
  const SoftmaxStats stats = row_softmax_stats<kVec>(row, V);
  const int target = targets[t];
  if (threadIdx.x == 0) losses[t] = logf(stats.sum) + stats.max - __bfloat162float(row[target]);
  if (grad_scale == 0.0f) return;
  __syncthreads();  // row[target] is read above before any thread overwrites it
  const float inv_sum = 1.0f / stats.sum;
  for (int v = threadIdx.x * kVec; v < V; v += blockDim.x * kVec) {
    float x[kVec];
    load_bf16<kVec>(x, row + v);
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const float prob = expf(x[k] - stats.max) * inv_sum;
      const float indicator = v + k == target ? 1.0f : 0.0f;
      x[k] = (prob - indicator) * grad_scale;
    }
    store_bf16<kVec>(row + v, x);
  }
}

}  // namespace

// losses (N) f32, logits (N, V) bf16, targets (N), mask (N) or nullptr; returns sum of losses (synchronises).
double cross_entropy_forward(const CudaContext& ctx, float* losses, const bf16* logits, const int32_t* targets,
                             const uint8_t* mask, int64_t N, int V) {
  if (N == 0) return 0.0;
  const unsigned blocks = static_cast<unsigned>(N);
  if (V % 8 == 0 && aligned_16({logits})) {
    cross_entropy_forward_kernel<8><<<blocks, kThreads, 0, ctx.stream>>>(losses, logits, targets, mask, V);
  } else {
    cross_entropy_forward_kernel<1><<<blocks, kThreads, 0, ctx.stream>>>(losses, logits, targets, mask, V);
  }
  MOBA_CUDA_CHECK(cudaGetLastError());
  return sum(ctx, losses, N);
}

void cross_entropy_fused(const CudaContext& ctx, float* losses, bf16* logits, const int32_t* targets,
                         const uint8_t* mask, float grad_scale, int64_t N, int V) {
  if (N == 0) return;
  const unsigned blocks = static_cast<unsigned>(N);
  if (V % 8 == 0 && aligned_16({logits})) {
    cross_entropy_fused_kernel<8><<<blocks, kThreads, 0, ctx.stream>>>(losses, logits, targets, mask, grad_scale, V);
  } else {
    cross_entropy_fused_kernel<1><<<blocks, kThreads, 0, ctx.stream>>>(losses, logits, targets, mask, grad_scale, V);
  }
  MOBA_CUDA_CHECK(cudaGetLastError());
}

double sum(const CudaContext& ctx, const float* x, int64_t n) {
  if (n == 0) return 0.0;
  auto* total_device = static_cast<double*>(ctx.scratch(0, sizeof(double)));
  sum_losses_kernel<<<1, kSumThreads, 0, ctx.stream>>>(total_device, x, n);
  MOBA_CUDA_CHECK(cudaGetLastError());
  double total = 0.0;
  MOBA_CUDA_CHECK(cudaMemcpyAsync(&total, total_device, sizeof(double), cudaMemcpyDeviceToHost, ctx.stream));
  MOBA_CUDA_CHECK(cudaStreamSynchronize(ctx.stream));
  return total;
}

// dlogits (N, V) bf16 += (softmax - onehot) * grad_scale * mask
void cross_entropy_backward(const CudaContext& ctx, bf16* dlogits, const bf16* logits, const int32_t* targets,
                            const uint8_t* mask, float grad_scale, int64_t N, int V) {
  if (N == 0) return;
  const unsigned blocks = static_cast<unsigned>(N);
  if (V % 8 == 0 && aligned_16({logits, dlogits})) {
    cross_entropy_backward_kernel<8>
        <<<blocks, kThreads, 0, ctx.stream>>>(dlogits, logits, targets, mask, grad_scale, V);
  } else {
    cross_entropy_backward_kernel<1>
        <<<blocks, kThreads, 0, ctx.stream>>>(dlogits, logits, targets, mask, grad_scale, V);
  }
  MOBA_CUDA_CHECK(cudaGetLastError());
}

}  // namespace moba::cuda
