// SwiGLU on the GPU: out = silu(gate) * up with each input row holding [gate (F) | up (F)]; backward adds into dinp.
// Invariant: elementwise (one thread per kVec outputs of one row, no reductions), f32 arithmetic in the CPU
// reference's order, so results differ from it only by bf16 rounding of the outputs.
#include "kernels/cuda/dense_util.cuh"
#include "kernels/cuda/ops.h"

namespace moba::cuda {
namespace {

constexpr int kThreads = 256;

// out (N, F); inp (N, 2F).
template <int kVec>
__global__ void __launch_bounds__(kThreads) swiglu_forward_kernel(bf16* out, const bf16* inp, int64_t N, int F) {
  const int chunks = F / kVec;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= N * chunks) return;
  const int64_t t = idx / chunks;
  const int f = static_cast<int>(idx % chunks) * kVec;
  const bf16* gate_row = inp + t * 2 * F;
  float gate[kVec], up[kVec], y[kVec];
  load_bf16<kVec>(gate, gate_row + f);
  load_bf16<kVec>(up, gate_row + F + f);
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    const float sigmoid = 1.0f / (1.0f + expf(-gate[k]));
    y[k] = gate[k] * sigmoid * up[k];
  }
  store_bf16<kVec>(out + t * F + f, y);
}

// silu'(g) = sigmoid(g) (1 + g (1 - sigmoid(g))):  dgate += dout * up * silu'(gate);  dup += dout * silu(gate).
template <int kVec>
__global__ void __launch_bounds__(kThreads)
    swiglu_backward_kernel(bf16* dinp, const bf16* dout, const bf16* inp, int64_t N, int F, bool accumulate) {
  const int chunks = F / kVec;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= N * chunks) return;
  const int64_t t = idx / chunks;
  const int f = static_cast<int>(idx % chunks) * kVec;
  const bf16* gate_row = inp + t * 2 * F;
  bf16* dgate_row = dinp + t * 2 * F;
  float gate[kVec], up[kVec], dy[kVec], dgate[kVec], dup[kVec];
  load_bf16<kVec>(gate, gate_row + f);
  load_bf16<kVec>(up, gate_row + F + f);
  load_bf16<kVec>(dy, dout + t * F + f);
  if (accumulate) {
    load_bf16<kVec>(dgate, dgate_row + f);
    load_bf16<kVec>(dup, dgate_row + F + f);
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k) dgate[k] = dup[k] = 0.0f;
  }
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    const float g = gate[k];
    const float sigmoid = 1.0f / (1.0f + expf(-g));
    const float silu = g * sigmoid;
    const float dsilu = sigmoid * (1.0f + g * (1.0f - sigmoid));
    dgate[k] += dy[k] * up[k] * dsilu;
    dup[k] += dy[k] * silu;
  }
  store_bf16<kVec>(dgate_row + f, dgate);
  store_bf16<kVec>(dgate_row + F + f, dup);
}

unsigned blocks_for(int64_t threads_total) { return static_cast<unsigned>((threads_total + kThreads - 1) / kThreads); }

}  // namespace

// out (N, F) bf16 = silu(inp[:, :F]) * inp[:, F:], inp (N, 2F) bf16
void swiglu_forward(const CudaContext& ctx, bf16* out, const bf16* inp, int64_t N, int F) {
  if (N == 0 || F == 0) return;
  if (F % 8 == 0 && aligned_16({out, inp})) {
    swiglu_forward_kernel<8><<<blocks_for(N * F / 8), kThreads, 0, ctx.stream>>>(out, inp, N, F);
  } else {
    swiglu_forward_kernel<1><<<blocks_for(N * F), kThreads, 0, ctx.stream>>>(out, inp, N, F);
  }
  MOBA_CUDA_CHECK(cudaGetLastError());
}

// dinp (N, 2F) bf16 +=, dout (N, F) bf16, inp (N, 2F) bf16
void swiglu_backward(const CudaContext& ctx, bf16* dinp, const bf16* dout, const bf16* inp, int64_t N, int F,
                     bool accumulate) {
  if (N == 0 || F == 0) return;
  if (F % 8 == 0 && aligned_16({dinp, dout, inp})) {
    swiglu_backward_kernel<8><<<blocks_for(N * F / 8), kThreads, 0, ctx.stream>>>(dinp, dout, inp, N, F, accumulate);
  } else {
    swiglu_backward_kernel<1><<<blocks_for(N * F), kThreads, 0, ctx.stream>>>(dinp, dout, inp, N, F, accumulate);
  }
  MOBA_CUDA_CHECK(cudaGetLastError());
}

}  // namespace moba::cuda
