// MoBA attention (CPU fp32 reference): query t attends, in one softmax, to every key of its selected past blocks
// and to the causal part [c(t)*B, t] of its current block. Invariant: every output element is summed by one thread
// in one fixed order (no atomics; dK/dV key-major via an inverse index), memory O(N*H*top_k) + per-thread scratch.
#include <algorithm>
#include <vector>

#include "kernels/cpu/attention.h"
#include "kernels/cpu/attention_core.h"

namespace moba::cpu {
namespace {

using detail::KeyRange;

// Key ranges of query t (in segment s) for head row `selection` (top_k entries), ascending: the selected past
// blocks, then the causal part of the current block. Returns how many ranges it wrote.
int moba_key_ranges(KeyRange* ranges, const int32_t* selection, int64_t t, int64_t segment_start,
                    const MobaParams& params) {
  const int64_t B = params.block_size;
  const int64_t current_block = (t - segment_start) / B;
  int n = 0;
  for (int i = 0; i < params.top_k && selection[i] >= 0; ++i) {
    const int64_t block_start = segment_start + selection[i] * B;
    ranges[n++] = {block_start, selection[i] == current_block ? t + 1 : block_start + B};
  }
  return n;
}

// Scratch for the scores of one query: it sees at most top_k blocks of its own segment.
int64_t max_keys_per_query(const int32_t* cu_seqlens, int n_segments, const MobaParams& params) {
  return std::min(detail::longest_segment(cu_seqlens, n_segments),
                  static_cast<int64_t>(params.top_k) * params.block_size);
}

}  // namespace

void moba_attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                            const int32_t* selected, const int32_t* cu_seqlens, int n_segments,
                            const AttentionShape& shape, const MobaParams& params, float softmax_scale) {
  const char* caller = "moba_attention_forward";
  detail::validate_attention_inputs(caller, cu_seqlens, n_segments, shape, softmax_scale);
  detail::validate_moba_params(caller, params);
  detail::validate_moba_selection(caller, selected, cu_seqlens, n_segments, shape, params);
  const int H = shape.n_heads, D = shape.head_dim, group = H / shape.n_kv_heads;
  const int64_t rows = shape.total_tokens * H;
  const int64_t max_keys = max_keys_per_query(cu_seqlens, n_segments, params);
#pragma omp parallel if (detail::worth_parallel(rows * max_keys * D))
  {
    std::vector<float> scores(static_cast<size_t>(max_keys));      // (keys of one query)
    std::vector<KeyRange> ranges(static_cast<size_t>(params.top_k));  // (top_k)
#pragma omp for schedule(dynamic, 16)
    for (int64_t row = 0; row < rows; ++row) {
      const int64_t t = row / H;
      const int h = static_cast<int>(row % H);
      const int64_t segment_start = cu_seqlens[detail::segment_of_token(cu_seqlens, n_segments, t)];
      const int n_ranges = moba_key_ranges(ranges.data(), selected + row * params.top_k, t, segment_start, params);
      detail::attend_query_forward(out + row * D, lse + row, q + row * D, k, v, h / group,
                                   {ranges.data(), static_cast<size_t>(n_ranges)}, shape, softmax_scale,
                                   scores.data());
    }
  }
}

void moba_attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* q, const float* k,
                             const float* v, const float* out, const float* lse, const int32_t* selected,
                             const int32_t* cu_seqlens, int n_segments, const AttentionShape& shape,
                             const MobaParams& params, float softmax_scale) {
  const char* caller = "moba_attention_backward";
  detail::validate_attention_inputs(caller, cu_seqlens, n_segments, shape, softmax_scale);
  detail::validate_moba_params(caller, params);
  detail::validate_moba_selection(caller, selected, cu_seqlens, n_segments, shape, params);
  const int H = shape.n_heads, Hkv = shape.n_kv_heads, D = shape.head_dim, group = H / Hkv;
  const int64_t B = params.block_size;
  const int top_k = params.top_k;
  const int64_t rows = shape.total_tokens * H;
  std::vector<float> delta(static_cast<size_t>(rows));  // (N, H) rowsum(dO * O)
  detail::compute_softmax_delta(delta.data(), dout, out, shape);
  const bool parallel = detail::worth_parallel(rows * max_keys_per_query(cu_seqlens, n_segments, params) * D);

  // dQ, query-major: row (t, h) sums over the same key ranges as the forward.
#pragma omp parallel if (parallel)
  {
    std::vector<float> dq_scratch(static_cast<size_t>(D));
    std::vector<KeyRange> ranges(static_cast<size_t>(top_k));
#pragma omp for schedule(dynamic, 16)
    for (int64_t row = 0; row < rows; ++row) {
      const int64_t t = row / H;
      const int h = static_cast<int>(row % H);
      const int64_t segment_start = cu_seqlens[detail::segment_of_token(cu_seqlens, n_segments, t)];
      const int n_ranges = moba_key_ranges(ranges.data(), selected + row * top_k, t, segment_start, params);
      detail::attend_query_backward_dq(dq + row * D, q + row * D, dout + row * D, lse[row], delta[row], k, v,
                                       h / group, {ranges.data(), static_cast<size_t>(n_ranges)}, shape,
                                       softmax_scale, dq_scratch.data());
    }
  }

  // Inverse index: for every complete block (global index b = first_block[s] + j) and kv head, the query rows
  // (t*H + h) that selected it as a PAST block, in ascending row order (a sequential counting sort).
  std::vector<int64_t> first_block(static_cast<size_t>(n_segments) + 1, 0);
  for (int s = 0; s < n_segments; ++s) first_block[s + 1] = first_block[s] + (cu_seqlens[s + 1] - cu_seqlens[s]) / B;
  const int64_t n_buckets = first_block[n_segments] * Hkv;  // (block, kv head) pairs
  std::vector<int64_t> bucket_start(static_cast<size_t>(n_buckets) + 1, 0);  // (n_buckets + 1) offsets
  auto for_each_past_selection = [&](auto&& visit) {  // visit(bucket, row) in ascending row order
    for (int s = 0; s < n_segments; ++s)
      for (int64_t t = cu_seqlens[s]; t < cu_seqlens[s + 1]; ++t) {
        const int64_t current_block = (t - cu_seqlens[s]) / B;
        for (int h = 0; h < H; ++h) {
          const int64_t row = t * H + h;
          for (int i = 0; i < top_k && selected[row * top_k + i] >= 0; ++i)
            if (selected[row * top_k + i] != current_block)
              visit((first_block[s] + selected[row * top_k + i]) * Hkv + h / group, row);
        }
      }
  };
  for_each_past_selection([&](int64_t bucket, int64_t) { ++bucket_start[bucket + 1]; });
  for (int64_t b = 0; b < n_buckets; ++b) bucket_start[b + 1] += bucket_start[b];
  std::vector<int64_t> selecting_rows(static_cast<size_t>(bucket_start[n_buckets]));  // <= N*H*(top_k-1)
  {
    std::vector<int64_t> fill(bucket_start.begin(), bucket_start.end() - 1);
    for_each_past_selection([&](int64_t bucket, int64_t row) { selecting_rows[fill[bucket]++] = row; });
  }

  // dK/dV, key-major: one task per (segment, block, kv head, tile of <= kKeyTile keys inside the block). Its
  // queries come in ascending (t, h) order: first those of the block itself (causal, keys u <= t), then the
  // later queries that selected the block (all its keys).
  struct KeyTileTask {
    int segment;
    int kv_head;
    int64_t block;  // relative to the segment start
    int64_t key_begin, key_end;
  };
  std::vector<KeyTileTask> tasks;
  for (int s = 0; s < n_segments; ++s)
    for (int64_t block_start = cu_seqlens[s]; block_start < cu_seqlens[s + 1]; block_start += B) {
      const int64_t block_end = std::min<int64_t>(block_start + B, cu_seqlens[s + 1]);
      for (int64_t u0 = block_start; u0 < block_end; u0 += detail::kKeyTile)
        for (int hk = 0; hk < Hkv; ++hk)
          tasks.push_back({s, hk, (block_start - cu_seqlens[s]) / B, u0, std::min(u0 + detail::kKeyTile, block_end)});
    }
#pragma omp parallel if (parallel)
  {
    std::vector<float> dk_tile(static_cast<size_t>(detail::kKeyTile * D));  // (kKeyTile, D)
    std::vector<float> dv_tile(static_cast<size_t>(detail::kKeyTile * D));  // (kKeyTile, D)
#pragma omp for schedule(dynamic, 1)
    for (size_t i = 0; i < tasks.size(); ++i) {
      const KeyTileTask& task = tasks[i];
      std::fill(dk_tile.begin(), dk_tile.end(), 0.0f);
      std::fill(dv_tile.begin(), dv_tile.end(), 0.0f);
      auto add_query = [&](int64_t row, int64_t visible_end) {
        detail::accumulate_key_grads_from_query(dk_tile.data(), dv_tile.data(), task.key_begin, visible_end,
                                                q + row * D, dout + row * D, lse[row], delta[row], k, v,
                                                task.kv_head, shape, softmax_scale);
      };
      const int64_t segment_end = cu_seqlens[task.segment + 1];
      const int64_t block_end = std::min(cu_seqlens[task.segment] + (task.block + 1) * B, segment_end);
      for (int64_t t = task.key_begin; t < block_end; ++t)
        for (int h = task.kv_head * group; h < (task.kv_head + 1) * group; ++h)
          add_query(t * H + h, std::min(task.key_end, t + 1));
      const bool complete = cu_seqlens[task.segment] + (task.block + 1) * B <= segment_end;
      if (complete) {
        const int64_t bucket = (first_block[task.segment] + task.block) * Hkv + task.kv_head;
        for (int64_t e = bucket_start[bucket]; e < bucket_start[bucket + 1]; ++e)
          add_query(selecting_rows[e], task.key_end);
      }
      detail::add_key_tile(dk, dv, dk_tile.data(), dv_tile.data(), task.key_begin, task.key_end, task.kv_head,
                           shape);
    }
  }
}

}  // namespace moba::cpu
