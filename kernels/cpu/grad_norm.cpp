// CPU sum of squares of a gradient buffer (for global-norm clipping), in double.
// Invariant: the buffer is cut into fixed-size blocks, each summed in index order by one thread, and the block
// sums are then added in block order: the result never depends on the OpenMP thread count.
#include <vector>

#include "kernels/cpu/ops.h"

namespace moba::cpu {

// g (n) -> sum_i g_i^2
double sum_of_squares(const float* g, int64_t n) {
  constexpr int64_t kBlock = 1 << 14;
  const int64_t n_blocks = (n + kBlock - 1) / kBlock;
  std::vector<double> block_sums(n_blocks);  // (n_blocks)
#pragma omp parallel for schedule(static) if (n_blocks > 1)
  for (int64_t b = 0; b < n_blocks; ++b) {
    const int64_t end = (b + 1) * kBlock < n ? (b + 1) * kBlock : n;
    double sum = 0.0;
    for (int64_t i = b * kBlock; i < end; ++i) sum += static_cast<double>(g[i]) * g[i];
    block_sums[b] = sum;
  }
  double total = 0.0;
  for (double s : block_sums) total += s;
  return total;
}

}  // namespace moba::cpu
