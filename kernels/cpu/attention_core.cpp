// Per-query attention arithmetic and input checks shared by dense causal attention and MoBA (see
// attention_core.h). Invariant: nothing here depends on the thread count; callers parallelise over independent
// output rows or key tiles and every sum below runs in one fixed order.
#include "kernels/cpu/attention_core.h"

#include <algorithm>
#include <limits>
#include <string>

#include "common/error.h"

namespace moba::cpu::detail {

void validate_attention_inputs(const char* caller, const AttentionArgs& a) {
  MOBA_CHECK(a.n_queries >= 0 && a.n_keys >= 0 && a.n_heads > 0 && a.n_kv_heads > 0 && a.head_dim > 0,
             cat(caller, ": bad shape Nq=", a.n_queries, " Nk=", a.n_keys, " H=", a.n_heads, " Hkv=", a.n_kv_heads,
                 " D=", a.head_dim),
             "heads, kv heads and head_dim must be positive");
  MOBA_CHECK(a.n_heads % a.n_kv_heads == 0,
             cat(caller, ": n_heads=", a.n_heads, " is not a multiple of n_kv_heads=", a.n_kv_heads),
             "GQA needs H = g * Hkv for an integer group size g");
  MOBA_CHECK(std::isfinite(a.softmax_scale), cat(caller, ": softmax_scale is not finite"), "use 1/sqrt(head_dim)");
  MOBA_CHECK(a.n_segments >= 1 && a.cu_seqlens != nullptr, cat(caller, ": need at least one segment"),
             "cu_seqlens holds n_segments + 1 offsets, from 0 to Nk");
  const int32_t* cu = a.cu_seqlens;
  MOBA_CHECK(cu[0] == 0 && cu[a.n_segments] == a.n_keys,
             cat(caller, ": cu_seqlens must run from 0 to Nk=", a.n_keys, ", got ", cu[0], " .. ", cu[a.n_segments]),
             "every key row belongs to exactly one segment");
  for (int s = 0; s < a.n_segments; ++s)
    MOBA_CHECK(cu[s] <= cu[s + 1],
               cat(caller, ": cu_seqlens decreases at segment ", s, " (", cu[s], " > ", cu[s + 1], ")"),
               "cu_seqlens are cumulative offsets; empty segments (equal neighbours) are fine");
  if (a.q_rows == nullptr) {
    MOBA_CHECK(a.n_queries == a.n_keys,
               cat(caller, ": ", a.n_queries, " query rows against ", a.n_keys, " key rows without q_rows"),
               "pass q_rows, the key row each query row stands at");
    return;
  }
  for (int64_t i = 0; i < a.n_queries; ++i) {
    const int64_t t = a.q_rows[i];
    MOBA_CHECK(t >= 0 && t < a.n_keys && (i == 0 || a.q_rows[i - 1] < t),
               cat(caller, ": q_rows[", i, "] = ", t, (t < 0 || t >= a.n_keys) ? cat(" is outside the ", a.n_keys, " key rows")
                                                                              : cat(" does not follow q_rows[", i - 1, "] = ", a.q_rows[i - 1])),
               "q_rows must be strictly ascending key rows (a rank's chunks in sequence order)");
  }
}

void validate_moba_params(const char* caller, const AttentionArgs& a) {
  MOBA_CHECK(a.block_size >= 1, cat(caller, ": block_size must be >= 1, got ", a.block_size),
             "set moba block_size (typically 64..4096)");
  MOBA_CHECK(a.top_k >= 1, cat(caller, ": top_k must be >= 1 (it counts the current block), got ", a.top_k),
             "set moba top_k (typically 2..16)");
}

void validate_moba_selection(const char* caller, const AttentionArgs& a) {
  const int H = a.n_heads, top_k = a.top_k;
  for (int64_t i = 0; i < a.n_queries; ++i) {
    const int64_t t = a.key_row(i);
    const int s = segment_of_token(a.cu_seqlens, a.n_segments, t);
    const int64_t current_block = (t - a.cu_seqlens[s]) / a.block_size;
    for (int h = 0; h < H; ++h) {
      const int32_t* row = a.selected + (i * H + h) * top_k;
      int n_valid = 0;
      while (n_valid < top_k && row[n_valid] >= 0) ++n_valid;
      bool ok = n_valid >= 1 && row[n_valid - 1] == current_block;
      for (int j = 1; j < n_valid; ++j) ok = ok && row[j - 1] < row[j];
      for (int j = n_valid; j < top_k; ++j) ok = ok && row[j] == -1;
      if (ok) continue;
      std::string got;
      for (int j = 0; j < top_k; ++j) got += cat(j ? "," : "", row[j]);
      throw Error(cat(caller, ": invalid MoBA selection at query row ", i, " (key row ", t, ", segment ", s,
                      ", position ", t - a.cu_seqlens[s], "), head ", h, ": [", got,
                      "]; expected ascending past blocks ending with the current block ", current_block,
                      ", then -1 padding"),
                  "pass the `selected` written by moba_select_blocks with the same block_size and top_k");
    }
  }
}

int segment_of_token(const int32_t* cu_seqlens, int n_segments, int64_t t) {
  // The last s with cu_seqlens[s] <= t; empty segments before it share its start and are skipped.
  const int32_t* after = std::upper_bound(cu_seqlens, cu_seqlens + n_segments + 1, t);
  return static_cast<int>(after - cu_seqlens) - 1;
}

int64_t longest_segment(const int32_t* cu_seqlens, int n_segments) {
  int64_t longest = 0;
  for (int s = 0; s < n_segments; ++s) longest = std::max<int64_t>(longest, cu_seqlens[s + 1] - cu_seqlens[s]);
  return longest;
}

int64_t causal_pairs(const int32_t* cu_seqlens, int n_segments) {
  int64_t pairs = 0;
  for (int s = 0; s < n_segments; ++s) {
    const int64_t n = cu_seqlens[s + 1] - cu_seqlens[s];
    pairs += n * (n + 1) / 2;
  }
  return pairs;
}

std::vector<int64_t> complete_block_offsets(const AttentionArgs& a) {
  std::vector<int64_t> first(static_cast<size_t>(a.n_segments) + 1, 0);
  for (int s = 0; s < a.n_segments; ++s)
    first[s + 1] = first[s] + (a.cu_seqlens[s + 1] - a.cu_seqlens[s]) / a.block_size;
  return first;
}

int64_t first_query_at(const AttentionArgs& a, int64_t t) {
  if (a.q_rows == nullptr) return std::min(t, a.n_queries);
  return std::lower_bound(a.q_rows, a.q_rows + a.n_queries, t) - a.q_rows;
}

void attend_query_forward(float* out_row, float* lse, const float* q_row, int kv_head, std::span<const KeyRange> ranges,
                          const AttentionArgs& a, float* scores_scratch) {
  const int D = a.head_dim;
  const int64_t kv_stride = static_cast<int64_t>(a.n_kv_heads) * D;  // between consecutive key rows
  const float* k_head = a.k + static_cast<int64_t>(kv_head) * D;
  const float* v_head = a.v + static_cast<int64_t>(kv_head) * D;
  const float scale = a.softmax_scale;

  // Pass 1: scaled scores and their maximum.
  float max_score = -std::numeric_limits<float>::infinity();
  int64_t n = 0;
  for (const KeyRange& r : ranges)
    for (int64_t u = r.begin; u < r.end; ++u) {
      const float s = dot(q_row, k_head + u * kv_stride, D) * scale;
      scores_scratch[n++] = s;
      max_score = std::max(max_score, s);
    }
  // Pass 2: unnormalised probabilities, their sum, and the probability-weighted values.
  std::fill(out_row, out_row + D, 0.0f);
  float sum = 0.0f;
  n = 0;
  for (const KeyRange& r : ranges)
    for (int64_t u = r.begin; u < r.end; ++u) {
      const float p = std::exp(scores_scratch[n++] - max_score);
      sum += p;
      const float* v_row = v_head + u * kv_stride;
      for (int d = 0; d < D; ++d) out_row[d] += p * v_row[d];
    }
  for (int d = 0; d < D; ++d) out_row[d] /= sum;
  *lse = max_score + std::log(sum);
}

void compute_softmax_delta(float* delta, const AttentionArgs& a) {
  const int64_t rows = a.n_queries * a.n_heads;
  const int D = a.head_dim;
#pragma omp parallel for schedule(static) if (worth_parallel(rows * D))
  for (int64_t row = 0; row < rows; ++row) delta[row] = dot(a.dout + row * D, a.out + row * D, D);
}

void attend_query_backward_dq(float* dq_row, const float* q_row, const float* dout_row, float lse, float delta,
                              int kv_head, std::span<const KeyRange> ranges, const AttentionArgs& a, float* dq_scratch) {
  const int D = a.head_dim;
  const int64_t kv_stride = static_cast<int64_t>(a.n_kv_heads) * D;
  const float* k_head = a.k + static_cast<int64_t>(kv_head) * D;
  const float* v_head = a.v + static_cast<int64_t>(kv_head) * D;
  std::fill(dq_scratch, dq_scratch + D, 0.0f);
  for (const KeyRange& r : ranges)
    for (int64_t u = r.begin; u < r.end; ++u) {
      const float* k_row = k_head + u * kv_stride;
      const PairGrad g =
          softmax_pair_grad(q_row, dout_row, k_row, v_head + u * kv_stride, lse, delta, a.softmax_scale, D);
      const float coeff = g.ds * a.softmax_scale;
      for (int d = 0; d < D; ++d) dq_scratch[d] += coeff * k_row[d];
    }
  for (int d = 0; d < D; ++d) dq_row[d] += dq_scratch[d];
}

void accumulate_key_grads_from_query(float* dk_rows, float* dv_rows, int64_t key_begin, int64_t key_end,
                                     const float* q_row, const float* dout_row, float lse, float delta, int kv_head,
                                     const AttentionArgs& a) {
  const int D = a.head_dim;
  const int64_t kv_stride = static_cast<int64_t>(a.n_kv_heads) * D;
  const float* k_head = a.k + static_cast<int64_t>(kv_head) * D;
  const float* v_head = a.v + static_cast<int64_t>(kv_head) * D;
  for (int64_t u = key_begin; u < key_end; ++u) {
    const PairGrad g = softmax_pair_grad(q_row, dout_row, k_head + u * kv_stride, v_head + u * kv_stride, lse, delta,
                                         a.softmax_scale, D);
    const float coeff = g.ds * a.softmax_scale;
    float* dk_row = dk_rows + (u - key_begin) * D;
    float* dv_row = dv_rows + (u - key_begin) * D;
    for (int d = 0; d < D; ++d) {
      dk_row[d] += coeff * q_row[d];
      dv_row[d] += g.p * dout_row[d];
    }
  }
}

void add_key_tile(const AttentionArgs& a, const float* dk_tile, const float* dv_tile, const KeyTileTask& task) {
  const int D = a.head_dim;
  for (int64_t u = task.key_begin; u < task.key_end; ++u) {
    const int64_t offset = (u * a.n_kv_heads + task.kv_head) * D;
    const int64_t tile_offset = (u - task.key_begin) * D;
    for (int d = 0; d < D; ++d) {
      a.dk[offset + d] += dk_tile[tile_offset + d];
      a.dv[offset + d] += dv_tile[tile_offset + d];
    }
  }
}

}  // namespace moba::cpu::detail
