// Token embedding on the GPU: gather rows of wte (forward) and scatter-add dout into the f32 gradient (backward).
// Invariant: forward is an exact copy. Backward adds with f32 atomics, so rows with a repeated token id add in a
// run-dependent order: results agree with the CPU's ordered sums to f32 rounding, not bitwise.
#include "kernels/cuda/dense_util.cuh"
#include "kernels/cuda/ops.h"

namespace moba::cuda {
namespace {

constexpr int kMaxThreads = 256;

// One block per token row t: out[t] = wte[tokens[t]], copied as Chunk-sized pieces (uint4 = 8 bf16, or one bf16).
template <typename Chunk>
__global__ void embedding_forward_kernel(Chunk* out, const int32_t* tokens, const Chunk* wte, int chunks_per_row) {
  const int64_t t = blockIdx.x;
  const Chunk* src = wte + static_cast<int64_t>(tokens[t]) * chunks_per_row;
  Chunk* dst = out + t * chunks_per_row;
  for (int i = threadIdx.x; i < chunks_per_row; i += blockDim.x) dst[i] = src[i];
}

// One block per token row t: dwte[tokens[t]] += dout[t] with f32 atomics (RED instructions, no return value).
template <int kVec>
__global__ void embedding_backward_kernel(float* dwte, const bf16* dout, const int32_t* tokens, int C) {
  const int64_t t = blockIdx.x;
  float* drow = dwte + static_cast<int64_t>(tokens[t]) * C;
  const bf16* grow = dout + t * C;
  for (int c = threadIdx.x * kVec; c < C; c += blockDim.x * kVec) {
    float g[kVec];
    load_bf16<kVec>(g, grow + c);
#pragma unroll
    for (int k = 0; k < kVec; ++k) atomicAdd(drow + c + k, g[k]);
  }
}

int threads_for(int work_items) { return work_items >= kMaxThreads ? kMaxThreads : (work_items + 31) / 32 * 32; }

}  // namespace

// out (N, C) bf16 = wte (V, C) bf16 [tokens (N)]
void embedding_forward(const CudaContext& ctx, bf16* out, const int32_t* tokens, const bf16* wte, int64_t N, int C) {
  if (N == 0 || C == 0) return;
  if (C % 8 == 0 && aligned_16({out, wte})) {
    const int chunks = C / 8;
    embedding_forward_kernel<<<static_cast<unsigned>(N), threads_for(chunks), 0, ctx.stream>>>(
        reinterpret_cast<uint4*>(out), tokens, reinterpret_cast<const uint4*>(wte), chunks);
  } else {
    embedding_forward_kernel<<<static_cast<unsigned>(N), threads_for(C), 0, ctx.stream>>>(out, tokens, wte, C);
  }
  MOBA_CUDA_CHECK(cudaGetLastError());
}

// dwte (V, C) f32 += scatter of dout (N, C) bf16 by tokens (N)
void embedding_backward(const CudaContext& ctx, float* dwte, const bf16* dout, const int32_t* tokens, int64_t N, int C,
                        int V) {
  if (N == 0 || C == 0) return;
  if (C % 8 == 0 && aligned_16({dout})) {
    embedding_backward_kernel<8>
        <<<static_cast<unsigned>(N), threads_for(C / 8), 0, ctx.stream>>>(dwte, dout, tokens, C);
  } else {
    embedding_backward_kernel<1><<<static_cast<unsigned>(N), threads_for(C), 0, ctx.stream>>>(dwte, dout, tokens, C);
  }
  MOBA_CUDA_CHECK(cudaGetLastError());
}

}  // namespace moba::cuda
