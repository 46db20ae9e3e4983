// Dense causal attention over packed documents (CPU fp32 reference): the query at key row t of document s attends
// to key rows [cu_seqlens[s], t]. Forward and dQ are query-major, dK/dV key-major, so every output element is summed
// by one thread in one fixed order: bitwise deterministic for any thread count, no atomics, O(Nq*H) extra memory.
#include <algorithm>
#include <vector>

#include "kernels/cpu/attention.h"
#include "kernels/cpu/attention_core.h"

namespace moba::cpu {
namespace {

using detail::KeyRange;

// The keys query row i sees: its document's rows up to its own key row.
KeyRange causal_range(const AttentionArgs& a, int64_t i) {
  const int64_t t = a.key_row(i);
  return {a.cu_seqlens[detail::segment_of_token(a.cu_seqlens, a.n_segments, t)], t + 1};
}

bool worth_parallel(const AttentionArgs& a) {
  const int64_t pairs = detail::causal_pairs(a.cu_seqlens, a.n_segments) * a.n_queries / std::max<int64_t>(a.n_keys, 1);
  return detail::worth_parallel(pairs * a.n_heads * a.head_dim);
}

}  // namespace

void attention_full_forward(const AttentionArgs& a) {
  detail::validate_attention_inputs("attention_full_forward", a);
  const int H = a.n_heads, D = a.head_dim, group = a.n_heads / a.n_kv_heads;
  const int64_t rows = a.n_queries * H;  // (i, h) pairs, h fastest
  const int64_t max_keys = detail::longest_segment(a.cu_seqlens, a.n_segments);
#pragma omp parallel if (worth_parallel(a))
  {
    std::vector<float> scores(static_cast<size_t>(max_keys));  // (keys of one query), per thread
#pragma omp for schedule(dynamic, 16)
    for (int64_t row = 0; row < rows; ++row) {
      const int h = static_cast<int>(row % H);
      const KeyRange causal = causal_range(a, row / H);
      detail::attend_query_forward(a.out + row * D, a.lse + row, a.q + row * D, h / group, {&causal, 1}, a,
                                   scores.data());
    }
  }
}

void attention_full_backward(const AttentionArgs& a) {
  detail::validate_attention_inputs("attention_full_backward", a);
  const int H = a.n_heads, Hkv = a.n_kv_heads, D = a.head_dim, group = H / Hkv;
  const int64_t rows = a.n_queries * H;
  std::vector<float> delta(static_cast<size_t>(rows));  // (Nq, H) rowsum(dO * O)
  detail::compute_softmax_delta(delta.data(), a);
  const bool parallel = worth_parallel(a);

  // dQ, query-major: row (i, h) sums over its causal keys.
#pragma omp parallel if (parallel)
  {
    std::vector<float> dq_scratch(static_cast<size_t>(D));
#pragma omp for schedule(dynamic, 16)
    for (int64_t row = 0; row < rows; ++row) {
      const int h = static_cast<int>(row % H);
      const KeyRange causal = causal_range(a, row / H);
      detail::attend_query_backward_dq(a.dq + row * D, a.q + row * D, a.dout + row * D, a.lse[row], delta[row],
                                       h / group, {&causal, 1}, a, dq_scratch.data());
    }
  }

  // dK/dV, key-major: one task per (document, kv head, tile of kKeyTile keys); its queries are the rows standing in
  // [tile start, document end), in ascending (i, h) order, each seeing the tile's keys u <= its key row.
  std::vector<detail::KeyTileTask> tasks;
  for (int s = 0; s < a.n_segments; ++s)
    for (int64_t u0 = a.cu_seqlens[s]; u0 < a.cu_seqlens[s + 1]; u0 += detail::kKeyTile)
      for (int hk = 0; hk < Hkv; ++hk)
        tasks.push_back({s, hk, 0, u0, std::min<int64_t>(u0 + detail::kKeyTile, a.cu_seqlens[s + 1])});
  detail::run_key_tiles(tasks, a, delta.data(), parallel, [&](const detail::KeyTileTask& task, auto&& add_query) {
    const int64_t end = detail::first_query_at(a, a.cu_seqlens[task.segment + 1]);
    for (int64_t i = detail::first_query_at(a, task.key_begin); i < end; ++i) {
      const int64_t visible_end = std::min(task.key_end, a.key_row(i) + 1);
      for (int h = task.kv_head * group; h < (task.kv_head + 1) * group; ++h) add_query(i * H + h, visible_end);
    }
  });
}

}  // namespace moba::cpu
