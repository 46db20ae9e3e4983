// Row gather on the GPU (the embedding lookup out = wte[tokens], and any reordering of rows), and the embedding's
// scatter-add of dout into the f32 gradient (backward).
// Invariant: the gather is an exact copy. Backward adds with f32 atomics, so rows with a repeated token id add in a
// run-dependent order: results agree with the CPU's ordered sums to f32 rounding, not bitwise.
#include "kernels/cuda/dense_util.cuh"
#include "kernels/cuda/ops.h"

namespace moba::cuda {
namespace {

constexpr int kMaxThreads = 256;

// One block per row t: out[t] = src[rows[t]], copied as Chunk-sized pieces (uint4 = 16 bytes, or 2 or 1 bytes).
template <typename Chunk>
__global__ void gather_rows_kernel(Chunk* out, const int32_t* rows, const Chunk* src, int chunks_per_row) {
  const int64_t t = blockIdx.x;
  const Chunk* from = src + static_cast<int64_t>(rows[t]) * chunks_per_row;
  Chunk* dst = out + t * chunks_per_row;
  for (int i = threadIdx.x; i < chunks_per_row; i += blockDim.x) dst[i] = from[i];
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

// out (N, row_bytes) = src (M, row_bytes) [rows (N)]
void gather_rows(const CudaContext& ctx, void* out, const int32_t* rows, const void* src, int64_t N, int64_t row_bytes) {
  if (N == 0 || row_bytes == 0) return;
  const unsigned blocks = static_cast<unsigned>(N);
  if (row_bytes % 16 == 0 && aligned_16({out, src})) {
    const int chunks = static_cast<int>(row_bytes / 16);
    gather_rows_kernel<<<blocks, threads_for(chunks), 0, ctx.stream>>>(
        static_cast<uint4*>(out), rows, static_cast<const uint4*>(src), chunks);
  } else if (row_bytes % 2 == 0) {
    const int chunks = static_cast<int>(row_bytes / 2);
    gather_rows_kernel<<<blocks, threads_for(chunks), 0, ctx.stream>>>(
        static_cast<uint16_t*>(out), rows, static_cast<const uint16_t*>(src), chunks);
  } else {
    const int chunks = static_cast<int>(row_bytes);
    gather_rows_kernel<<<blocks, threads_for(chunks), 0, ctx.stream>>>(
        static_cast<uint8_t*>(out), rows, static_cast<const uint8_t*>(src), chunks);
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
