// CPU SwiGLU forward and backward: out = silu(gate) * up, with [gate | up] side by side in each input row.
// Invariant: purely elementwise per row (no reductions), so any thread count gives the same bits.
#include <cmath>

#include "kernels/cpu/ops.h"

namespace moba::cpu {

// out (N, F); inp (N, 2F) = [gate (F) | up (F)] per row.
void swiglu_forward(float* out, const float* inp, int64_t N, int F) {
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < N; ++t) {
    const float* gate = inp + t * 2 * F;
    const float* up = gate + F;
    float* y = out + t * F;
    for (int i = 0; i < F; ++i) {
      const float sigmoid = 1.0f / (1.0f + std::exp(-gate[i]));
      y[i] = gate[i] * sigmoid * up[i];
    }
  }
}

// silu'(g) = sigmoid(g) * (1 + g * (1 - sigmoid(g))).
// dgate += dout * up * silu'(gate);  dup += dout * silu(gate).  dinp (N, 2F), dout (N, F).
void swiglu_backward(float* dinp, const float* dout, const float* inp, int64_t N, int F) {
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < N; ++t) {
    const float* gate = inp + t * 2 * F;
    const float* up = gate + F;
    const float* dy = dout + t * F;
    float* dgate = dinp + t * 2 * F;
    float* dup = dgate + F;
    for (int i = 0; i < F; ++i) {
      const float g = gate[i];
      const float sigmoid = 1.0f / (1.0f + std::exp(-g));
      const float silu = g * sigmoid;
      const float dsilu = sigmoid * (1.0f + g * (1.0f - sigmoid));
      dgate[i] += dy[i] * up[i] * dsilu;
      dup[i] += dy[i] * silu;
    }
  }
}

}  // namespace moba::cpu
