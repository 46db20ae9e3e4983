// CPU rotary position embedding, "rotate-half" (GPT-NeoX) convention, forward and inverse (backward).
// Invariant: angles are computed in double (pos * theta^(-2i/D)) and cos/sin rounded once to float, so large
// positions lose no precision; each row is independent, so any thread count gives the same bits.
#include <cmath>
#include <vector>

#include "kernels/cpu/ops.h"

namespace moba::cpu {
namespace {

// cos_out, sin_out (D/2) for position pos: angle_i = pos * theta^(-2i/D).
void rope_angles(float* cos_out, float* sin_out, int32_t pos, int D, float theta) {
  const int half = D / 2;
  for (int i = 0; i < half; ++i) {
    const double inv_freq = std::pow(static_cast<double>(theta), -2.0 * i / D);
    const double angle = static_cast<double>(pos) * inv_freq;
    cos_out[i] = static_cast<float>(std::cos(angle));
    sin_out[i] = static_cast<float>(std::sin(angle));
  }
}

// The rotation of every (row, head) pair by the row's angles, one implementation for both directions: forward
// writes y = R x from x rows at src + t * src_stride into dst rows (n_heads, D) at dst + t * dst_stride; kInverse adds
// R^T x = R(-angle) x into dst (the adjoint of an orthogonal rotation is its inverse).
template <bool kInverse>
void rotate_rows(float* dst, int64_t dst_stride, const float* src, int64_t src_stride, const int32_t* pos, int64_t N,
                 int n_heads, int D, float theta) {
  const int half = D / 2;
#pragma omp parallel
  {
    std::vector<float> cos_table(half), sin_table(half);  // (D/2) for the current row
#pragma omp for schedule(static)
    for (int64_t t = 0; t < N; ++t) {
      rope_angles(cos_table.data(), sin_table.data(), pos[t], D, theta);
      for (int h = 0; h < n_heads; ++h) {
        const float* x = src + t * src_stride + static_cast<int64_t>(h) * D;
        float* y = dst + t * dst_stride + static_cast<int64_t>(h) * D;
        for (int i = 0; i < half; ++i) {
          const float c = cos_table[i], s = kInverse ? -sin_table[i] : sin_table[i];
          const float lo = x[i] * c - x[i + half] * s, hi = x[i + half] * c + x[i] * s;
          y[i] = kInverse ? y[i] + lo : lo;
          y[i + half] = kInverse ? y[i + half] + hi : hi;
        }
      }
    }
  }
}

}  // namespace

// out (N, n_heads, D) contiguous; inp row t at inp + t * in_row_stride holding (n_heads, D); pos (N).
void rope_forward(float* out, const float* inp, int64_t in_row_stride, const int32_t* pos, int64_t N, int n_heads,
                  int D, float theta) {
  rotate_rows<false>(out, int64_t{n_heads} * D, inp, in_row_stride, pos, N, n_heads, D, theta);
}

// dinp[i] += dout[i] cos + dout[i + D/2] sin;  dinp[i + D/2] += dout[i + D/2] cos - dout[i] sin.
void rope_backward(float* dinp, int64_t din_row_stride, const float* dout, const int32_t* pos, int64_t N,
                   int n_heads, int D, float theta) {
  rotate_rows<true>(dinp, din_row_stride, dout, int64_t{n_heads} * D, pos, N, n_heads, D, theta);
}

}  // namespace moba::cpu
