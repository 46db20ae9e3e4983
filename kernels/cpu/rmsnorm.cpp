// CPU RMSNorm forward and backward: out = inp * rstd * weight, rstd = 1 / sqrt(mean(inp^2) + eps) per row.
// Invariant: the row mean of squares and every reduction over rows (dweight) run in double, in index order,
// inside one thread, so results are bitwise identical for any OpenMP thread count.
#include <cmath>

#include "kernels/cpu/ops.h"

namespace moba::cpu {

// out (N, C), rstd (N), inp (N, C), weight (C).
void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int64_t N, int C, float eps) {
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < N; ++t) {
    const float* x = inp + t * C;
    float* y = out + t * C;
    double sum_squares = 0.0;
    for (int c = 0; c < C; ++c) sum_squares += static_cast<double>(x[c]) * x[c];
    const float r = static_cast<float>(1.0 / std::sqrt(sum_squares / C + eps));
    for (int c = 0; c < C; ++c) y[c] = (x[c] * r) * weight[c];
    rstd[t] = r;
  }
}

// With y_c = x_c r w_c and dr/dx_j = -r^3 x_j / C:
//   dinp_j += r * (dout_j w_j - x_j r^2 * sum_c(dout_c w_c x_c) / C);   dweight_c += sum_t dout_tc x_tc r_t.
void rmsnorm_backward(float* dinp, float* dweight, const float* dout, const float* inp, const float* weight,
                      const float* rstd, int64_t N, int C) {
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < N; ++t) {
    const float* x = inp + t * C;
    const float* dy = dout + t * C;
    float* dx = dinp + t * C;
    const double r = rstd[t];
    double dot = 0.0;  // sum_c dout_c w_c x_c
    for (int c = 0; c < C; ++c) dot += static_cast<double>(dy[c]) * weight[c] * x[c];
    const float rf = rstd[t];
    const float coeff = static_cast<float>(r * r * dot / C);
    for (int c = 0; c < C; ++c) dx[c] += rf * (dy[c] * weight[c] - x[c] * coeff);
  }

  // dweight: each thread owns a stripe of columns and sums over t in order (double accumulators).
  constexpr int kStripe = 64;
  const int n_stripes = (C + kStripe - 1) / kStripe;
#pragma omp parallel for schedule(static)
  for (int stripe = 0; stripe < n_stripes; ++stripe) {
    const int c0 = stripe * kStripe;
    const int width = c0 + kStripe < C ? kStripe : C - c0;
    double acc[kStripe] = {};
    for (int64_t t = 0; t < N; ++t) {
      const float* x = inp + t * C + c0;
      const float* dy = dout + t * C + c0;
      const double r = rstd[t];
      for (int c = 0; c < width; ++c) acc[c] += static_cast<double>(dy[c]) * x[c] * r;
    }
    for (int c = 0; c < width; ++c) dweight[c0 + c] += static_cast<float>(acc[c]);
  }
}

}  // namespace moba::cpu
