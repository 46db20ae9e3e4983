// CPU token embedding lookup (forward) and its scatter-add (backward).
// Invariant: embedding_backward is bitwise deterministic: each thread owns a column stripe of dwte and walks
// the tokens in order of t, so rows with equal ids always add in the same order whatever the thread count.
#include <cstring>

#include "kernels/cpu/ops.h"

namespace moba::cpu {

// out (N, C) = wte (V, C) [tokens (N)]
void embedding_forward(float* out, const int32_t* tokens, const float* wte, int64_t N, int C) {
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < N; ++t) {
    std::memcpy(out + t * C, wte + static_cast<int64_t>(tokens[t]) * C, sizeof(float) * C);
  }
}

// dwte (V, C) += scatter of dout (N, C) by tokens (N).
void embedding_backward(float* dwte, const float* dout, const int32_t* tokens, int64_t N, int C, int V) {
  constexpr int kStripe = 64;  // columns per work item: one cache line of 16 floats x 4, contiguous per row
  const int n_stripes = (C + kStripe - 1) / kStripe;
#pragma omp parallel for schedule(static)
  for (int stripe = 0; stripe < n_stripes; ++stripe) {
    const int c0 = stripe * kStripe;
    const int c1 = c0 + kStripe < C ? c0 + kStripe : C;
    for (int64_t t = 0; t < N; ++t) {
      float* drow = dwte + static_cast<int64_t>(tokens[t]) * C;
      const float* grow = dout + t * C;
      for (int c = c0; c < c1; ++c) drow[c] += grow[c];
    }
  }
}

}  // namespace moba::cpu
