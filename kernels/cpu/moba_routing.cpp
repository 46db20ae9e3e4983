// MoBA routing (CPU fp32 reference): per query row and head, the current block plus the top-(k-1) complete past blocks
// of the same segment by the gate <q, bf16(mean of the block's keys)> (Lu et al., MoBA, arXiv 2502.13189; exact
// semantics in ../shared/docs/moba-spec.md). Ties go to the lower block index; rows are ascending, -1 padded,
// and the same for any thread count and any query subset (each row is routed by one thread against the block means
// of the whole key sequence, summed in sequence order).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common/error.h"
#include "kernels/bf16.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/attention_core.h"

namespace moba::cpu {
namespace {

// Throws naming the first (query row, head, channel) of q that is NaN or Inf: routing on it would pick arbitrary blocks.
void check_queries_finite(const AttentionArgs& a) {
  const int64_t n = a.n_queries * a.n_heads * a.head_dim;
  int64_t first_bad = n;
#pragma omp parallel for schedule(static) reduction(min : first_bad) if (detail::worth_parallel(n))
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(a.q[i])) first_bad = std::min(first_bad, i);
  if (first_bad == n) return;
  const int64_t i = first_bad / (int64_t{a.n_heads} * a.head_dim), t = a.key_row(i);
  const int64_t h = first_bad / a.head_dim % a.n_heads;
  const int s = detail::segment_of_token(a.cu_seqlens, a.n_segments, t);
  throw Error(cat("moba_select_blocks: q is ", std::isnan(a.q[first_bad]) ? "NaN" : "Inf", " at token ", t,
                  " (segment ", s, ", position ", t - a.cu_seqlens[s], "), head ", h, ", channel ",
                  first_bad % a.head_dim, "; MoBA cannot route on it"),
              "the activations diverged before attention: lower the learning rate or check the data and inputs");
}

}  // namespace

void moba_select_blocks(const AttentionArgs& a) {
  const char* caller = "moba_select_blocks";
  detail::validate_attention_inputs(caller, a);
  detail::validate_moba_params(caller, a);
  check_queries_finite(a);
  const int H = a.n_heads, Hkv = a.n_kv_heads, D = a.head_dim, group = H / Hkv;
  const int B = a.block_size, top_k = a.top_k;
  const int32_t* cu = a.cu_seqlens;
  const int64_t rows = a.n_queries * H;
  const bool parallel = detail::worth_parallel(rows * D * (detail::longest_segment(cu, a.n_segments) / B + 1));

  // Block means of the complete blocks of the whole key sequence. Segment s owns global blocks
  // [first_block[s], first_block[s+1]). Sum in fp32 in sequence order, divide, round to bf16: on the pinned vectors
  // this reproduces every official selection (so do pairwise and float64 sums; skipping the bf16 rounding does not:
  // 99.85% agreement on gqa_8q_2kv).
  const std::vector<int64_t> first_block = detail::complete_block_offsets(a);
  const int64_t n_blocks = first_block[a.n_segments];
  std::vector<float> block_means(static_cast<size_t>(n_blocks * Hkv * D));  // (n_blocks, Hkv, D), bf16 values
  std::vector<int> block_segment(static_cast<size_t>(n_blocks));              // (n_blocks)
  for (int s = 0; s < a.n_segments; ++s)
    for (int64_t b = first_block[s]; b < first_block[s + 1]; ++b) block_segment[b] = s;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t b = 0; b < n_blocks; ++b) {
    const int s = block_segment[b];
    const int64_t first_token = cu[s] + (b - first_block[s]) * B;
    float* mean = block_means.data() + b * Hkv * D;  // (Hkv, D)
    std::fill(mean, mean + int64_t{Hkv} * D, 0.0f);
    for (int64_t u = first_token; u < first_token + B; ++u) {  // fp32 sum in sequence order
      const float* k_row = a.k + u * Hkv * D;
      for (int64_t i = 0; i < int64_t{Hkv} * D; ++i) mean[i] += k_row[i];
    }
    for (int64_t i = 0; i < int64_t{Hkv} * D; ++i) mean[i] = round_to_bf16(mean[i] / static_cast<float>(B));
  }
  for (int64_t i = 0; i < n_blocks * Hkv * D; ++i) {
    if (std::isfinite(block_means[i])) continue;
    const int64_t b = i / (int64_t{Hkv} * D);
    const int s = block_segment[b];
    throw Error(cat(caller, ": the mean of k over block ", b - first_block[s], " of segment ", s, " (tokens ",
                    cu[s] + (b - first_block[s]) * B, "..", cu[s] + (b - first_block[s] + 1) * B - 1,
                    "), kv head ", i / D % Hkv, " is not finite; MoBA cannot route on it"),
                "k holds NaN/Inf (or overflows fp32): lower the learning rate or check the inputs");
  }

  // Gate and top-(k-1) per (i, h) row. The running list is ordered by score descending, then block ascending;
  // a later (higher) block enters only with a strictly greater score, so ties keep the lower block index.
  const int past_slots = top_k - 1;
#pragma omp parallel if (parallel)
  {
    std::vector<float> best_score(static_cast<size_t>(past_slots));
    std::vector<int32_t> best_block(static_cast<size_t>(past_slots));
#pragma omp for schedule(dynamic, 64)
    for (int64_t row = 0; row < rows; ++row) {
      const int64_t t = a.key_row(row / H);
      const int h = static_cast<int>(row % H);
      const int s = detail::segment_of_token(cu, a.n_segments, t);
      const int32_t current_block = static_cast<int32_t>((t - cu[s]) / B);
      const float* q_row = a.q + row * D;
      int n_best = 0;
      for (int32_t j = 0; j < current_block && past_slots > 0; ++j) {  // candidates: complete past blocks
        const float score = detail::dot(q_row, block_means.data() + ((first_block[s] + j) * Hkv + h / group) * D, D);
        if (n_best == past_slots && !(score > best_score[n_best - 1])) continue;
        int pos = n_best < past_slots ? n_best++ : n_best - 1;  // slot freed at the end, then moved up
        while (pos > 0 && best_score[pos - 1] < score) {
          best_score[pos] = best_score[pos - 1];
          best_block[pos] = best_block[pos - 1];
          --pos;
        }
        best_score[pos] = score;
        best_block[pos] = j;
      }
      int32_t* out = a.selected + row * top_k;  // (top_k): ascending past blocks, current block, -1 padding
      std::copy(best_block.begin(), best_block.begin() + n_best, out);
      std::sort(out, out + n_best);
      out[n_best] = current_block;
      std::fill(out + n_best + 1, out + top_k, -1);
    }
  }
}

}  // namespace moba::cpu
