// AdamW on the GPU in one pass over flat f32 buffers: moments, master weights and (optionally) the bf16 working copy.
// Invariant: the formula and operation order of kernels/cpu/ops.h (bias corrections computed once in double on the
// host and rounded to f32), so each element matches the CPU up to fused multiply-adds; no reductions.
#include <cmath>

#include "kernels/cuda/dense_util.cuh"
#include "kernels/cuda/ops.h"

namespace moba::cuda {
namespace {

constexpr int kThreads = 256;

struct AdamwParams {
  float lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2;
  float grad_scale;  // multiplies every gradient first (clipping)
};

// param, grad, m, v (n) f32; param_working (n) bf16 or nullptr. One thread per kVec elements.
template <int kVec>
__global__ void __launch_bounds__(kThreads)
    adamw_kernel(float* param, bf16* param_working, const float* grad, float* m, float* v, int64_t n, AdamwParams p) {
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kVec;
  if (i >= n) return;
  float w[kVec], g[kVec], m_k[kVec], v_k[kVec];
  load_f32<kVec>(w, param + i);
  load_f32<kVec>(g, grad + i);
  load_f32<kVec>(m_k, m + i);
  load_f32<kVec>(v_k, v + i);
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    g[k] *= p.grad_scale;  // gradient clipping, folded in (x 1 is exact)
    m_k[k] = p.beta1 * m_k[k] + (1.0f - p.beta1) * g[k];
    v_k[k] = p.beta2 * v_k[k] + (1.0f - p.beta2) * (g[k] * g[k]);
    const float m_hat = m_k[k] / p.bias_correction1;
    const float v_hat = v_k[k] / p.bias_correction2;
    w[k] -= p.lr * (m_hat / (sqrtf(v_hat) + p.eps) + p.weight_decay * w[k]);
  }
  store_f32<kVec>(param + i, w);
  store_f32<kVec>(m + i, m_k);
  store_f32<kVec>(v + i, v_k);
  if (param_working != nullptr) {
#pragma unroll
    for (int k = 0; k < kVec; ++k) param_working[i + k] = __float2bfloat16_rn(w[k]);
  }
}

}  // namespace

void adamw_update(const CudaContext& ctx, float* param, bf16* param_working, const float* grad, float* m, float* v,
                  int64_t n, float lr, float beta1, float beta2, float eps, float weight_decay, int64_t step,
                  float grad_scale) {
  if (n == 0) return;
  const AdamwParams p{lr,
                      beta1,
                      beta2,
                      eps,
                      weight_decay,
                      static_cast<float>(1.0 - std::pow(static_cast<double>(beta1), step)),
                      static_cast<float>(1.0 - std::pow(static_cast<double>(beta2), step)),
                      grad_scale};
  if (n % 4 == 0 && aligned_16({param, grad, m, v})) {
    const unsigned blocks = static_cast<unsigned>((n / 4 + kThreads - 1) / kThreads);
    adamw_kernel<4><<<blocks, kThreads, 0, ctx.stream>>>(param, param_working, grad, m, v, n, p);
  } else {
    const unsigned blocks = static_cast<unsigned>((n + kThreads - 1) / kThreads);
    adamw_kernel<1><<<blocks, kThreads, 0, ctx.stream>>>(param, param_working, grad, m, v, n, p);
  }
  MOBA_CUDA_CHECK(cudaGetLastError());
}

}  // namespace moba::cuda
