// CPU softmax cross-entropy over logits (N, V), forward (per-row losses) and backward (into dlogits).
// Invariant: numerically stable (max subtracted before exp, sums in double); masked rows (mask[t] == 0) write a
// zero loss and receive no gradient; the returned total is summed in index order, independent of threads.
#include <algorithm>
#include <cmath>

#include "kernels/cpu/ops.h"

namespace moba::cpu {
namespace {

struct RowSoftmax {
  float max;       // max_v logits[v]
  double sum_exp;  // sum_v exp(logits[v] - max)
};

RowSoftmax row_softmax_stats(const float* logits, int V) {
  float max = logits[0];
  for (int v = 1; v < V; ++v) max = logits[v] > max ? logits[v] : max;
  double sum_exp = 0.0;
  for (int v = 0; v < V; ++v) sum_exp += std::exp(logits[v] - max);
  return {max, sum_exp};
}

bool row_active(const uint8_t* mask, int64_t t) { return mask == nullptr || mask[t] != 0; }

}  // namespace

// losses (N), logits (N, V), targets (N), mask (N) or nullptr.
// loss_t = log(sum_v exp(logits_v - max)) + max - logits[target].
double cross_entropy_forward(float* losses, const float* logits, const int32_t* targets, const uint8_t* mask,
                             int64_t N, int V) {
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < N; ++t) {
    if (!row_active(mask, t)) {
      losses[t] = 0.0f;
      continue;
    }
    const float* row = logits + t * V;
    const RowSoftmax stats = row_softmax_stats(row, V);
    const double log_sum_exp = std::log(stats.sum_exp) + stats.max;
    losses[t] = static_cast<float>(log_sum_exp - row[targets[t]]);
  }
  double total = 0.0;
  for (int64_t t = 0; t < N; ++t) total += losses[t];
  return total;
}

// dlogits (N, V) += (softmax(logits[t]) - onehot(targets[t])) * grad_scale, unmasked rows only.
void cross_entropy_backward(float* dlogits, const float* logits, const int32_t* targets, const uint8_t* mask,
                            float grad_scale, int64_t N, int V) {
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < N; ++t) {
    if (!row_active(mask, t)) continue;
    const float* row = logits + t * V;
    float* drow = dlogits + t * V;
    const RowSoftmax stats = row_softmax_stats(row, V);
    const float inv_sum = static_cast<float>(1.0 / stats.sum_exp);
    const int target = targets[t];
    for (int v = 0; v < V; ++v) {
      const float prob = std::exp(row[v] - stats.max) * inv_sum;
      const float indicator = v == target ? 1.0f : 0.0f;
      drow[v] += (prob - indicator) * grad_scale;
    }
  }
}

void cross_entropy_fused(float* losses, float* logits, const int32_t* targets, const uint8_t* mask, float grad_scale,
                         int64_t N, int V) {
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < N; ++t) {
    float* row = logits + t * V;
    if (!row_active(mask, t)) {
      losses[t] = 0.0f;
      if (grad_scale != 0.0f) std::fill(row, row + V, 0.0f);
      continue;
    }
    const RowSoftmax stats = row_softmax_stats(row, V);
    const int target = targets[t];
    losses[t] = static_cast<float>(std::log(stats.sum_exp) + stats.max - row[target]);
    if (grad_scale == 0.0f) continue;
    const float inv_sum = static_cast<float>(1.0 / stats.sum_exp);
    for (int v = 0; v < V; ++v) {
      const float prob = std::exp(row[v] - stats.max) * inv_sum;
      const float indicator = v == target ? 1.0f : 0.0f;
      row[v] = 0.0f + (prob - indicator) * grad_scale;
    }
  }
}

}  // namespace moba::cpu
