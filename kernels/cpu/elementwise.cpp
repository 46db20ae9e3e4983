// CPU elementwise helpers: in-place add and scale, and strided row copies.
// Invariant: no reductions, every output element is written by exactly one thread.
#include <cstring>

#include "kernels/cpu/ops.h"

namespace moba::cpu {
namespace {
constexpr int64_t kParallelMin = 1 << 15;  // below this many elements a thread team costs more than it saves
}  // namespace

// dst (n) += src (n)
void add_inplace(float* dst, const float* src, int64_t n) {
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
}

// x (n) *= s
void scale_inplace(float* x, int64_t n, float s) {
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) x[i] *= s;
}

// dst (n_rows, cols; row stride dst_stride) = src (n_rows, cols; row stride src_stride)
void copy_rows(float* dst, int64_t dst_stride, const float* src, int64_t src_stride, int64_t n_rows, int64_t cols) {
#pragma omp parallel for schedule(static) if (n_rows * cols >= kParallelMin)
  for (int64_t r = 0; r < n_rows; ++r) {
    std::memcpy(dst + r * dst_stride, src + r * src_stride, sizeof(float) * cols);
  }
}

}  // namespace moba::cpu
