// CPU AdamW step (decoupled weight decay, bias-corrected moments), elementwise over a flat parameter buffer.
// Invariant: bias corrections 1 - beta^step are computed once per call in double (std::pow) and rounded to
// float; everything per element is fp32 in the header's exact order, so any thread count gives the same bits.
#include <cmath>

#include "kernels/cpu/ops.h"

namespace moba::cpu {

// param, grad, m, v (n); step is 1-based.
void adamw_update(float* param, const float* grad, float* m, float* v, int64_t n, float lr, float beta1,
                  float beta2, float eps, float weight_decay, int64_t step, float grad_scale) {
  const float bias_correction1 = static_cast<float>(1.0 - std::pow(static_cast<double>(beta1), step));
  const float bias_correction2 = static_cast<float>(1.0 - std::pow(static_cast<double>(beta2), step));
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float g = grad[i] * grad_scale;
    const float m_new = beta1 * m[i] + (1.0f - beta1) * g;
    const float v_new = beta2 * v[i] + (1.0f - beta2) * (g * g);
    const float m_hat = m_new / bias_correction1;
    const float v_hat = v_new / bias_correction2;
    param[i] -= lr * (m_hat / (std::sqrt(v_hat) + eps) + weight_decay * param[i]);
    m[i] = m_new;
    v[i] = v_new;
  }
}

}  // namespace moba::cpu
