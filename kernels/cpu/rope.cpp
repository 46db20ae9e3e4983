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

}  // namespace

// out (N, n_heads, D) contiguous; inp row t at inp + t * in_row_stride holding (n_heads, D); pos (N).
void rope_forward(float* out, const float* inp, int64_t in_row_stride, const int32_t* pos, int64_t N, int n_heads,
                  int D, float theta) {
  const int half = D / 2;
#pragma omp parallel
  {
    std::vector<float> cos_table(half), sin_table(half);  // (D/2) for the current row
#pragma omp for schedule(static)
    for (int64_t t = 0; t < N; ++t) {
      rope_angles(cos_table.data(), sin_table.data(), pos[t], D, theta);
      for (int h = 0; h < n_heads; ++h) {
        const float* x = inp + t * in_row_stride + static_cast<int64_t>(h) * D;
        float* y = out + (t * n_heads + h) * D;
        for (int i = 0; i < half; ++i) {
          const float c = cos_table[i], s = sin_table[i];
          y[i] = x[i] * c - x[i + half] * s;
          y[i + half] = x[i + half] * c + x[i] * s;
        }
      }
    }
  }
}

// The rotation is orthogonal, so its adjoint is the inverse rotation (angle -> -angle):
//   dinp[i] += dout[i] cos + dout[i + D/2] sin;  dinp[i + D/2] += dout[i + D/2] cos - dout[i] sin.
void rope_backward(float* dinp, int64_t din_row_stride, const float* dout, const int32_t* pos, int64_t N,
                   int n_heads, int D, float theta) {
  const int half = D / 2;
#pragma omp parallel
  {
    std::vector<float> cos_table(half), sin_table(half);  // (D/2) for the current row
#pragma omp for schedule(static)
    for (int64_t t = 0; t < N; ++t) {
      rope_angles(cos_table.data(), sin_table.data(), pos[t], D, theta);
      for (int h = 0; h < n_heads; ++h) {
        const float* dy = dout + (t * n_heads + h) * D;
        float* dx = dinp + t * din_row_stride + static_cast<int64_t>(h) * D;
        for (int i = 0; i < half; ++i) {
          const float c = cos_table[i], s = sin_table[i];
          dx[i] += dy[i] * c + dy[i + half] * s;
          dx[i + half] += dy[i + half] * c - dy[i] * s;
        }
      }
    }
  }
}

}  // namespace moba::cpu
