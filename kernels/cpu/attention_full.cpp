// Dense causal attention over packed segments (CPU fp32 reference): query t of segment s attends to keys
// [cu_seqlens[s], t]. Forward and dQ are query-major, dK/dV key-major, so every output element is summed by one
// thread in one fixed order: bitwise deterministic for any thread count, no atomics, O(N*H) extra memory.
#include <algorithm>
#include <vector>

#include "kernels/cpu/attention.h"
#include "kernels/cpu/attention_core.h"

namespace moba::cpu {

using detail::KeyRange;

void attention_full_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                            const int32_t* cu_seqlens, int n_segments, const AttentionShape& shape,
                            float softmax_scale) {
  detail::validate_attention_inputs("attention_full_forward", cu_seqlens, n_segments, shape, softmax_scale);
  const int H = shape.n_heads, D = shape.head_dim, group = shape.n_heads / shape.n_kv_heads;
  const int64_t rows = shape.total_tokens * H;  // (t, h) pairs, h fastest
  const int64_t max_keys = detail::longest_segment(cu_seqlens, n_segments);
  const bool parallel = detail::worth_parallel(detail::causal_pairs(cu_seqlens, n_segments) * H * D);
#pragma omp parallel if (parallel)
  {
    std::vector<float> scores(static_cast<size_t>(max_keys));  // (keys of one query), per thread
#pragma omp for schedule(dynamic, 16)
    for (int64_t row = 0; row < rows; ++row) {
      const int64_t t = row / H;
      const int h = static_cast<int>(row % H);
      const KeyRange causal{cu_seqlens[detail::segment_of_token(cu_seqlens, n_segments, t)], t + 1};
      detail::attend_query_forward(out + row * D, lse + row, q + row * D, k, v, h / group, {&causal, 1}, shape,
                                   softmax_scale, scores.data());
    }
  }
}

void attention_full_backward(float* dq, float* dk, float* dv, const float* dout, const float* q, const float* k,
                             const float* v, const float* out, const float* lse, const int32_t* cu_seqlens,
                             int n_segments, const AttentionShape& shape, float softmax_scale) {
  detail::validate_attention_inputs("attention_full_backward", cu_seqlens, n_segments, shape, softmax_scale);
  const int H = shape.n_heads, Hkv = shape.n_kv_heads, D = shape.head_dim, group = H / Hkv;
  const int64_t rows = shape.total_tokens * H;
  std::vector<float> delta(static_cast<size_t>(rows));  // (N, H) rowsum(dO * O)
  detail::compute_softmax_delta(delta.data(), dout, out, shape);
  const bool parallel = detail::worth_parallel(detail::causal_pairs(cu_seqlens, n_segments) * H * D);

  // dQ, query-major: row (t, h) sums over its causal keys.
#pragma omp parallel if (parallel)
  {
    std::vector<float> dq_scratch(static_cast<size_t>(D));
#pragma omp for schedule(dynamic, 16)
    for (int64_t row = 0; row < rows; ++row) {
      const int64_t t = row / H;
      const int h = static_cast<int>(row % H);
      const KeyRange causal{cu_seqlens[detail::segment_of_token(cu_seqlens, n_segments, t)], t + 1};
      detail::attend_query_backward_dq(dq + row * D, q + row * D, dout + row * D, lse[row], delta[row], k, v,
                                       h / group, {&causal, 1}, shape, softmax_scale, dq_scratch.data());
    }
  }

  // dK/dV, key-major: one task per (segment, kv head, tile of kKeyTile keys); its queries t >= tile start come in
  // ascending (t, h) order, each seeing the tile's keys u <= t.
  struct KeyTileTask {
    int segment;
    int kv_head;
    int64_t key_begin, key_end;
  };
  std::vector<KeyTileTask> tasks;
  for (int s = 0; s < n_segments; ++s)
    for (int64_t u0 = cu_seqlens[s]; u0 < cu_seqlens[s + 1]; u0 += detail::kKeyTile)
      for (int hk = 0; hk < Hkv; ++hk)
        tasks.push_back({s, hk, u0, std::min<int64_t>(u0 + detail::kKeyTile, cu_seqlens[s + 1])});
#pragma omp parallel if (parallel)
  {
    std::vector<float> dk_tile(static_cast<size_t>(detail::kKeyTile * D));  // (kKeyTile, D)
    std::vector<float> dv_tile(static_cast<size_t>(detail::kKeyTile * D));  // (kKeyTile, D)
#pragma omp for schedule(dynamic, 1)
    for (size_t i = 0; i < tasks.size(); ++i) {
      const KeyTileTask& task = tasks[i];
      std::fill(dk_tile.begin(), dk_tile.end(), 0.0f);
      std::fill(dv_tile.begin(), dv_tile.end(), 0.0f);
      for (int64_t t = task.key_begin; t < cu_seqlens[task.segment + 1]; ++t) {
        const int64_t visible_end = std::min(task.key_end, t + 1);
        for (int h = task.kv_head * group; h < (task.kv_head + 1) * group; ++h) {
          const int64_t row = t * H + h;
          detail::accumulate_key_grads_from_query(dk_tile.data(), dv_tile.data(), task.key_begin, visible_end,
                                                  q + row * D, dout + row * D, lse[row], delta[row], k, v,
                                                  task.kv_head, shape, softmax_scale);
        }
      }
      detail::add_key_tile(dk, dv, dk_tile.data(), dv_tile.data(), task.key_begin, task.key_end, task.kv_head,
                           shape);
    }
  }
}

}  // namespace moba::cpu
