// Per-query attention arithmetic and input checks shared by dense causal attention and MoBA (see
// attention_core.h). Invariant: nothing here depends on the thread count; callers parallelise over independent
// output rows or key tiles and every sum below runs in one fixed order.
#include "kernels/cpu/attention_core.h"

#include <algorithm>
#include <limits>

#include "common/error.h"

namespace moba::cpu::detail {

void validate_attention_inputs(const char* caller, const int32_t* cu_seqlens, int n_segments,
                               const AttentionShape& shape, float softmax_scale) {
  MOBA_CHECK(shape.total_tokens >= 0 && shape.n_heads > 0 && shape.n_kv_heads > 0 && shape.head_dim > 0,
             cat(caller, ": bad shape N=", shape.total_tokens, " H=", shape.n_heads, " Hkv=", shape.n_kv_heads,
                 " D=", shape.head_dim),
             "heads, kv heads and head_dim must be positive");
  MOBA_CHECK(shape.n_heads % shape.n_kv_heads == 0,
             cat(caller, ": n_heads=", shape.n_heads, " is not a multiple of n_kv_heads=", shape.n_kv_heads),
             "GQA needs H = g * Hkv for an integer group size g");
  MOBA_CHECK(std::isfinite(softmax_scale), cat(caller, ": softmax_scale is not finite"), "use 1/sqrt(head_dim)");
  MOBA_CHECK(n_segments >= 1 && cu_seqlens != nullptr, cat(caller, ": need at least one segment"),
             "cu_seqlens holds n_segments + 1 offsets, from 0 to N");
  MOBA_CHECK(cu_seqlens[0] == 0 && cu_seqlens[n_segments] == shape.total_tokens,
             cat(caller, ": cu_seqlens must run from 0 to N=", shape.total_tokens, ", got ", cu_seqlens[0], " .. ",
                 cu_seqlens[n_segments]),
             "every token belongs to exactly one segment");
  for (int s = 0; s < n_segments; ++s)
    MOBA_CHECK(cu_seqlens[s] <= cu_seqlens[s + 1],
               cat(caller, ": cu_seqlens decreases at segment ", s, " (", cu_seqlens[s], " > ", cu_seqlens[s + 1], ")"),
               "cu_seqlens are cumulative offsets; empty segments (equal neighbours) are fine");
}

void validate_moba_params(const char* caller, const MobaParams& params) {
  MOBA_CHECK(params.block_size >= 1, cat(caller, ": block_size must be >= 1, got ", params.block_size),
             "set moba block_size (typically 64..4096)");
  MOBA_CHECK(params.top_k >= 1, cat(caller, ": top_k must be >= 1 (it counts the current block), got ", params.top_k),
             "set moba top_k (typically 2..16)");
}

void validate_moba_selection(const char* caller, const int32_t* selected, const int32_t* cu_seqlens,
                             int n_segments, const AttentionShape& shape, const MobaParams& params) {
  const int H = shape.n_heads, top_k = params.top_k;
  for (int s = 0; s < n_segments; ++s) {
    for (int64_t t = cu_seqlens[s]; t < cu_seqlens[s + 1]; ++t) {
      const int64_t current_block = (t - cu_seqlens[s]) / params.block_size;
      for (int h = 0; h < H; ++h) {
        const int32_t* row = selected + (t * H + h) * top_k;
        int n_valid = 0;
        while (n_valid < top_k && row[n_valid] >= 0) ++n_valid;
        bool ok = n_valid >= 1 && row[n_valid - 1] == current_block;
        for (int i = 1; i < n_valid; ++i) ok = ok && row[i - 1] < row[i];
        for (int i = n_valid; i < top_k; ++i) ok = ok && row[i] == -1;
        if (ok) continue;
        std::string got;
        for (int i = 0; i < top_k; ++i) got += cat(i ? "," : "", row[i]);
        throw Error(cat(caller, ": invalid MoBA selection at token ", t, " (segment ", s, ", position ",
                        t - cu_seqlens[s], "), head ", h, ": [", got, "]; expected ascending past blocks ending with "
                        "the current block ", current_block, ", then -1 padding"),
                    "pass the `selected` written by moba_select_blocks with the same block_size and top_k");
      }
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

void attend_query_forward(float* out_row, float* lse, const float* q_row, const float* k, const float* v,
                          int kv_head, std::span<const KeyRange> ranges, const AttentionShape& shape, float scale,
                          float* scores_scratch) {
  const int D = shape.head_dim;
  const int64_t kv_stride = static_cast<int64_t>(shape.n_kv_heads) * D;  // between consecutive tokens
  const float* k_head = k + static_cast<int64_t>(kv_head) * D;
  const float* v_head = v + static_cast<int64_t>(kv_head) * D;

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

void compute_softmax_delta(float* delta, const float* dout, const float* out, const AttentionShape& shape) {
  const int64_t rows = shape.total_tokens * shape.n_heads;
  const int D = shape.head_dim;
#pragma omp parallel for schedule(static) if (worth_parallel(rows * D))
  for (int64_t row = 0; row < rows; ++row) delta[row] = dot(dout + row * D, out + row * D, D);
}

void attend_query_backward_dq(float* dq_row, const float* q_row, const float* dout_row, float lse, float delta,
                              const float* k, const float* v, int kv_head, std::span<const KeyRange> ranges,
                              const AttentionShape& shape, float scale, float* dq_scratch) {
  const int D = shape.head_dim;
  const int64_t kv_stride = static_cast<int64_t>(shape.n_kv_heads) * D;
  const float* k_head = k + static_cast<int64_t>(kv_head) * D;
  const float* v_head = v + static_cast<int64_t>(kv_head) * D;
  std::fill(dq_scratch, dq_scratch + D, 0.0f);
  for (const KeyRange& r : ranges)
    for (int64_t u = r.begin; u < r.end; ++u) {
      const float* k_row = k_head + u * kv_stride;
      const PairGrad g = softmax_pair_grad(q_row, dout_row, k_row, v_head + u * kv_stride, lse, delta, scale, D);
      const float coeff = g.ds * scale;
      for (int d = 0; d < D; ++d) dq_scratch[d] += coeff * k_row[d];
    }
  for (int d = 0; d < D; ++d) dq_row[d] += dq_scratch[d];
}

void accumulate_key_grads_from_query(float* dk_rows, float* dv_rows, int64_t key_begin, int64_t key_end,
                                     const float* q_row, const float* dout_row, float lse, float delta,
                                     const float* k, const float* v, int kv_head, const AttentionShape& shape,
                                     float scale) {
  const int D = shape.head_dim;
  const int64_t kv_stride = static_cast<int64_t>(shape.n_kv_heads) * D;
  const float* k_head = k + static_cast<int64_t>(kv_head) * D;
  const float* v_head = v + static_cast<int64_t>(kv_head) * D;
  for (int64_t u = key_begin; u < key_end; ++u) {
    const PairGrad g =
        softmax_pair_grad(q_row, dout_row, k_head + u * kv_stride, v_head + u * kv_stride, lse, delta, scale, D);
    const float coeff = g.ds * scale;
    float* dk_row = dk_rows + (u - key_begin) * D;
    float* dv_row = dv_rows + (u - key_begin) * D;
    for (int d = 0; d < D; ++d) {
      dk_row[d] += coeff * q_row[d];
      dv_row[d] += g.p * dout_row[d];
    }
  }
}

void add_key_tile(float* dk, float* dv, const float* dk_tile, const float* dv_tile, int64_t key_begin,
                  int64_t key_end, int kv_head, const AttentionShape& shape) {
  const int D = shape.head_dim;
  for (int64_t u = key_begin; u < key_end; ++u) {
    const int64_t offset = (u * shape.n_kv_heads + kv_head) * D;
    const int64_t tile_offset = (u - key_begin) * D;
    for (int d = 0; d < D; ++d) {
      dk[offset + d] += dk_tile[tile_offset + d];
      dv[offset + d] += dv_tile[tile_offset + d];
    }
  }
}

}  // namespace moba::cpu::detail
