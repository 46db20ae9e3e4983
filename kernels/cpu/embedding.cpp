// CPU row gather (the embedding lookup, and any reordering of rows) and the embedding's scatter-add (backward).
// Invariant: embedding_backward is bitwise deterministic: each thread owns a column stripe of dwte and walks
// the tokens in order of t, so rows with equal ids always add in the same order whatever the thread count.
#include <cstring>

#include "kernels/cpu/ops.h"

namespace moba::cpu {

// out (N, row_bytes) = src (M, row_bytes) [rows (N)]
void gather_rows(void* out, const int32_t* rows, const void* src, int64_t N, int64_t row_bytes) {
  char* dst = static_cast<char*>(out);
  const char* from = static_cast<const char*>(src);
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < N; ++t)
    std::memcpy(dst + t * row_bytes, from + static_cast<int64_t>(rows[t]) * row_bytes, static_cast<size_t>(row_bytes));
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
