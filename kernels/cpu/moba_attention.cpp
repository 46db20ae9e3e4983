// MoBA attention (CPU fp32 reference): the query at key row t attends, in one softmax, to every key of its selected
// past blocks and to the causal part [c(t)*B, t] of its current block. Invariant: every output element is summed by
// one thread in one fixed order (no atomics; dK/dV key-major via an inverse index), memory O(Nq*H*top_k) + per-thread
// scratch.
#include <algorithm>
#include <vector>

#include "kernels/cpu/attention.h"
#include "kernels/cpu/attention_core.h"

namespace moba::cpu {
namespace {

using detail::KeyRange;

// Key ranges of query row i for its head row `selection` (top_k entries), ascending: the selected past blocks, then
// the causal part of the current block. Returns how many ranges it wrote.
int moba_key_ranges(KeyRange* ranges, const int32_t* selection, int64_t i, const AttentionArgs& a) {
  const int64_t t = a.key_row(i);
  const int64_t segment_start = a.cu_seqlens[detail::segment_of_token(a.cu_seqlens, a.n_segments, t)];
  const int64_t B = a.block_size;
  const int64_t current_block = (t - segment_start) / B;
  int n = 0;
  for (int j = 0; j < a.top_k && selection[j] >= 0; ++j) {
    const int64_t block_start = segment_start + selection[j] * B;
    ranges[n++] = {block_start, selection[j] == current_block ? t + 1 : block_start + B};
  }
  return n;
}

// Scratch for the scores of one query: it sees at most top_k blocks of its own segment.
int64_t max_keys_per_query(const AttentionArgs& a) {
  return std::min(detail::longest_segment(a.cu_seqlens, a.n_segments), static_cast<int64_t>(a.top_k) * a.block_size);
}

void validate(const char* caller, const AttentionArgs& a) {
  detail::validate_attention_inputs(caller, a);
  detail::validate_moba_params(caller, a);
  detail::validate_moba_selection(caller, a);
}

}  // namespace

void moba_attention_forward(const AttentionArgs& a) {
  validate("moba_attention_forward", a);
  const int H = a.n_heads, D = a.head_dim, group = H / a.n_kv_heads;
  const int64_t rows = a.n_queries * H;
  const int64_t max_keys = max_keys_per_query(a);
#pragma omp parallel if (detail::worth_parallel(rows * max_keys * D))
  {
    std::vector<float> scores(static_cast<size_t>(max_keys));     // (keys of one query)
    std::vector<KeyRange> ranges(static_cast<size_t>(a.top_k));  // (top_k)
#pragma omp for schedule(dynamic, 16)
    for (int64_t row = 0; row < rows; ++row) {
      const int h = static_cast<int>(row % H);
      const int n_ranges = moba_key_ranges(ranges.data(), a.selected + row * a.top_k, row / H, a);
      detail::attend_query_forward(a.out + row * D, a.lse + row, a.q + row * D, h / group,
                                   {ranges.data(), static_cast<size_t>(n_ranges)}, a, scores.data());
    }
  }
}

void moba_attention_backward(const AttentionArgs& a) {
  validate("moba_attention_backward", a);
  const int H = a.n_heads, Hkv = a.n_kv_heads, D = a.head_dim, group = H / Hkv;
  const int64_t B = a.block_size;
  const int top_k = a.top_k;
  const int64_t rows = a.n_queries * H;
  std::vector<float> delta(static_cast<size_t>(rows));  // (Nq, H) rowsum(dO * O)
  detail::compute_softmax_delta(delta.data(), a);
  const bool parallel = detail::worth_parallel(rows * max_keys_per_query(a) * D);

  // dQ, query-major: row (i, h) sums over the same key ranges as the forward.
#pragma omp parallel if (parallel)
  {
    std::vector<float> dq_scratch(static_cast<size_t>(D));
    std::vector<KeyRange> ranges(static_cast<size_t>(top_k));
#pragma omp for schedule(dynamic, 16)
    for (int64_t row = 0; row < rows; ++row) {
      const int h = static_cast<int>(row % H);
      const int n_ranges = moba_key_ranges(ranges.data(), a.selected + row * top_k, row / H, a);
      detail::attend_query_backward_dq(a.dq + row * D, a.q + row * D, a.dout + row * D, a.lse[row], delta[row],
                                       h / group, {ranges.data(), static_cast<size_t>(n_ranges)}, a,
                                       dq_scratch.data());
    }
  }

  // Inverse index: for every complete block (global index b = first_block[s] + j) and kv head, the query rows
  // (i*H + h) that selected it as a PAST block, in ascending row order (a sequential counting sort).
  const std::vector<int64_t> first_block = detail::complete_block_offsets(a);
  const int64_t n_buckets = first_block[a.n_segments] * Hkv;  // (block, kv head) pairs
  std::vector<int64_t> bucket_start(static_cast<size_t>(n_buckets) + 1, 0);  // (n_buckets + 1) offsets
  auto for_each_past_selection = [&](auto&& visit) {  // visit(bucket, row) in ascending row order
    for (int64_t i = 0; i < a.n_queries; ++i) {
      const int64_t t = a.key_row(i);
      const int s = detail::segment_of_token(a.cu_seqlens, a.n_segments, t);
      const int64_t current_block = (t - a.cu_seqlens[s]) / B;
      for (int h = 0; h < H; ++h) {
        const int64_t row = i * H + h;
        for (int j = 0; j < top_k && a.selected[row * top_k + j] >= 0; ++j)
          if (a.selected[row * top_k + j] != current_block)
            visit((first_block[s] + a.selected[row * top_k + j]) * Hkv + h / group, row);
      }
    }
  };
  for_each_past_selection([&](int64_t bucket, int64_t) { ++bucket_start[bucket + 1]; });
  for (int64_t b = 0; b < n_buckets; ++b) bucket_start[b + 1] += bucket_start[b];
  std::vector<int64_t> selecting_rows(static_cast<size_t>(bucket_start[n_buckets]));  // <= Nq*H*(top_k-1)
  {
    std::vector<int64_t> fill(bucket_start.begin(), bucket_start.end() - 1);
    for_each_past_selection([&](int64_t bucket, int64_t row) { selecting_rows[fill[bucket]++] = row; });
  }

  // dK/dV, key-major: one task per (document, block, kv head, tile of <= kKeyTile keys inside the block). Its
  // queries come in ascending (i, h) order: first the rows standing in the block itself (causal, keys u <= t), then
  // the later rows that selected the block (all its keys).
  std::vector<detail::KeyTileTask> tasks;
  for (int s = 0; s < a.n_segments; ++s)
    for (int64_t block_start = a.cu_seqlens[s]; block_start < a.cu_seqlens[s + 1]; block_start += B) {
      const int64_t block_end = std::min<int64_t>(block_start + B, a.cu_seqlens[s + 1]);
      for (int64_t u0 = block_start; u0 < block_end; u0 += detail::kKeyTile)
        for (int hk = 0; hk < Hkv; ++hk)
          tasks.push_back({s, hk, (block_start - a.cu_seqlens[s]) / B, u0, std::min(u0 + detail::kKeyTile, block_end)});
    }
  detail::run_key_tiles(tasks, a, delta.data(), parallel, [&](const detail::KeyTileTask& task, auto&& add_query) {
    const int64_t segment_end = a.cu_seqlens[task.segment + 1];
    const int64_t block_end = std::min(a.cu_seqlens[task.segment] + (task.block + 1) * B, segment_end);
    const int64_t causal_end = detail::first_query_at(a, block_end);
    for (int64_t i = detail::first_query_at(a, task.key_begin); i < causal_end; ++i)
      for (int h = task.kv_head * group; h < (task.kv_head + 1) * group; ++h)
        add_query(i * H + h, std::min(task.key_end, a.key_row(i) + 1));
    const bool complete = a.cu_seqlens[task.segment] + (task.block + 1) * B <= segment_end;
    if (complete) {
      const int64_t bucket = (first_block[task.segment] + task.block) * Hkv + task.kv_head;
      for (int64_t e = bucket_start[bucket]; e < bucket_start[bucket + 1]; ++e)
        add_query(selecting_rows[e], task.key_end);
    }
  });
}

}  // namespace moba::cpu
