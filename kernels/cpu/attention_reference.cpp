// Explicit-mask dense attention in float64: the test oracle for the fp32 kernels. It materialises, per segment
// and head, the (n, n) allowed mask, scores, probabilities and dS, so it shares no code path with the kernels.
// Invariant: tests only (O(n^2) memory per segment); outputs are overwritten, never accumulated.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/cpu/attention.h"
#include "kernels/cpu/attention_core.h"

namespace moba::cpu {

void attention_masked_reference(double* out, double* lse, double* dq, double* dk, double* dv, const float* dout,
                                const float* q, const float* k, const float* v, const int32_t* selected, int top_k,
                                int block_size, const int32_t* cu_seqlens, int n_segments,
                                const AttentionShape& shape, double softmax_scale) {
  const char* caller = "attention_masked_reference";
  detail::validate_attention_inputs(caller, cu_seqlens, n_segments, shape, static_cast<float>(softmax_scale));
  const MobaParams params{block_size, top_k};
  if (selected) {
    detail::validate_moba_params(caller, params);
    detail::validate_moba_selection(caller, selected, cu_seqlens, n_segments, shape, params);
  }
  const int H = shape.n_heads, Hkv = shape.n_kv_heads, D = shape.head_dim, group = H / Hkv;
  const int64_t N = shape.total_tokens;
  if (dout) {
    std::fill(dq, dq + N * H * D, 0.0);
    std::fill(dk, dk + N * Hkv * D, 0.0);
    std::fill(dv, dv + N * Hkv * D, 0.0);
  }
  auto q_at = [&](int64_t t, int h, int d) -> double { return q[(t * H + h) * D + d]; };
  auto do_at = [&](int64_t t, int h, int d) -> double { return dout[(t * H + h) * D + d]; };
  auto k_at = [&](int64_t u, int hk, int d) -> double { return k[(u * Hkv + hk) * D + d]; };
  auto v_at = [&](int64_t u, int hk, int d) -> double { return v[(u * Hkv + hk) * D + d]; };

  for (int s = 0; s < n_segments; ++s) {
    const int64_t start = cu_seqlens[s], n = cu_seqlens[s + 1] - cu_seqlens[s];
    for (int h = 0; h < H; ++h) {
      const int hk = h / group;
      // allowed (n, n): causal, and for MoBA the key's block must be one of the query's selected blocks.
      std::vector<char> allowed(static_cast<size_t>(n * n), 0);
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j <= i; ++j) {
          bool in_selection = selected == nullptr;
          for (int slot = 0; !in_selection && slot < top_k; ++slot)
            in_selection = selected[((start + i) * H + h) * top_k + slot] == j / block_size;
          allowed[i * n + j] = in_selection;
        }
      // probabilities (n, n) = softmax over allowed keys of scale * q.k; then out and lse.
      std::vector<double> probs(static_cast<size_t>(n * n), 0.0);
      for (int64_t i = 0; i < n; ++i) {
        double max_score = -std::numeric_limits<double>::infinity();
        for (int64_t j = 0; j < n; ++j) {
          if (!allowed[i * n + j]) continue;
          double score = 0;
          for (int d = 0; d < D; ++d) score += q_at(start + i, h, d) * k_at(start + j, hk, d);
          probs[i * n + j] = score * softmax_scale;
          max_score = std::max(max_score, probs[i * n + j]);
        }
        double sum = 0;
        for (int64_t j = 0; j < n; ++j)
          if (allowed[i * n + j]) sum += std::exp(probs[i * n + j] - max_score);
        for (int64_t j = 0; j < n; ++j)
          probs[i * n + j] = allowed[i * n + j] ? std::exp(probs[i * n + j] - max_score) / sum : 0.0;
        lse[(start + i) * H + h] = max_score + std::log(sum);
        for (int d = 0; d < D; ++d) {
          double acc = 0;
          for (int64_t j = 0; j < n; ++j) acc += probs[i * n + j] * v_at(start + j, hk, d);
          out[((start + i) * H + h) * D + d] = acc;
        }
      }
      if (!dout) continue;
      // dS (n, n) = P * (dO V^T - rowsum(dO * O)); dQ = scale dS K, dK += scale dS^T Q, dV += P^T dO.
      std::vector<double> ds(static_cast<size_t>(n * n), 0.0);
      for (int64_t i = 0; i < n; ++i) {
        double delta = 0;
        for (int d = 0; d < D; ++d) delta += do_at(start + i, h, d) * out[((start + i) * H + h) * D + d];
        for (int64_t j = 0; j < n; ++j) {
          if (!allowed[i * n + j]) continue;
          double dp = 0;
          for (int d = 0; d < D; ++d) dp += do_at(start + i, h, d) * v_at(start + j, hk, d);
          ds[i * n + j] = probs[i * n + j] * (dp - delta);
        }
      }
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < n; ++j) {
          if (!allowed[i * n + j]) continue;
          for (int d = 0; d < D; ++d) {
            dq[((start + i) * H + h) * D + d] += softmax_scale * ds[i * n + j] * k_at(start + j, hk, d);
            dk[((start + j) * Hkv + hk) * D + d] += softmax_scale * ds[i * n + j] * q_at(start + i, h, d);
            dv[((start + j) * Hkv + hk) * D + d] += probs[i * n + j] * do_at(start + i, h, d);
          }
        }
    }
  }
}

}  // namespace moba::cpu
