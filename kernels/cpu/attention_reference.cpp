// Explicit-mask attention in float64: the test oracle for every backend's kernels. Each query row lists the keys it
// may see by testing every key row of its document against the mask (causal, and the selected blocks for MoBA), then
// does the softmax, output and gradients over that list, so it shares no code path with the kernels.
// Invariants: tests only; results are returned, never accumulated; bitwise reproducible for a given thread count
// (rows are split statically and the per-thread dK/dV sums are added in thread order).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/bf16.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/attention_core.h"

namespace moba::cpu {
namespace {

double bf16_round(double x) { return static_cast<double>(round_to_bf16(static_cast<float>(x))); }

// One variant of the results (exact, or the bf16 baseline) with its per-thread dK/dV sums.
struct Variant {
  ReferenceResults* r;
  bool low;                              // the bf16 baseline
  std::vector<std::vector<double>> dk, dv;  // (threads) x (Nk, Hkv, D)
  double round(double x) const { return low ? bf16_round(x) : x; }
};

}  // namespace

ReferenceResults attention_masked_reference(const AttentionArgs& a, ReferenceResults* baseline) {
  const char* caller = "attention_masked_reference";
  detail::validate_attention_inputs(caller, a);
  if (a.selected) {
    detail::validate_moba_params(caller, a);
    detail::validate_moba_selection(caller, a);
  }
  const int H = a.n_heads, Hkv = a.n_kv_heads, D = a.head_dim, group = H / Hkv, top_k = a.top_k;
  const int64_t Nq = a.n_queries, Nk = a.n_keys, rows = Nq * H;
  const double scale = a.softmax_scale;  // the scale the kernels apply
  const bool backward = a.dout != nullptr;
  ReferenceResults exact;
  std::vector<Variant> variants = {{&exact, false, {}, {}}};
  if (baseline) variants.push_back({baseline, true, {}, {}});
  const int threads = omp_get_max_threads();
  for (Variant& var : variants) {
    ReferenceResults& r = *var.r;
    r.out.assign(static_cast<size_t>(Nq * H * D), 0.0);
    r.lse.assign(static_cast<size_t>(Nq * H), 0.0);
    r.dq.assign(backward ? r.out.size() : 0, 0.0);
    r.dk.assign(backward ? static_cast<size_t>(Nk * Hkv * D) : 0, 0.0);
    r.dv.assign(r.dk.size(), 0.0);
    var.dk.assign(static_cast<size_t>(threads), std::vector<double>(r.dk.size(), 0.0));
    var.dv.assign(static_cast<size_t>(threads), std::vector<double>(r.dk.size(), 0.0));
  }

#pragma omp parallel num_threads(threads)
  {
    const int thread = omp_get_thread_num();
    std::vector<int64_t> keys;             // key rows this query row sees
    std::vector<double> p, dp, o(D), dq(D);  // per key: probability, dO . v
    std::vector<char> chosen;              // MoBA: blocks of the row's document it selected
#pragma omp for schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
      const int64_t i = row / H, t = a.key_row(i);
      const int h = static_cast<int>(row % H), hk = h / group;
      const int s = detail::segment_of_token(a.cu_seqlens, a.n_segments, t);
      const int64_t start = a.cu_seqlens[s];
      if (a.selected) {
        chosen.assign(static_cast<size_t>((t - start) / a.block_size + 1), 0);
        for (int slot = 0; slot < top_k; ++slot)
          if (a.selected[row * top_k + slot] >= 0) chosen[a.selected[row * top_k + slot]] = 1;
      }
      keys.clear();
      for (int64_t j = start; j <= t; ++j)
        if (!a.selected || chosen[(j - start) / a.block_size]) keys.push_back(j);
      const float* q_row = a.q + row * D;
      const float* do_row = backward ? a.dout + row * D : nullptr;
      auto k_row = [&](int64_t j) { return a.k + (j * Hkv + hk) * D; };
      auto v_row = [&](int64_t j) { return a.v + (j * Hkv + hk) * D; };
      // p = softmax over the row's keys of scale * q.k, lse = its log-sum-exp.
      p.resize(keys.size());
      double max_score = -std::numeric_limits<double>::infinity();
      for (size_t n = 0; n < keys.size(); ++n) {
        double score = 0;
        for (int d = 0; d < D; ++d) score += static_cast<double>(q_row[d]) * k_row(keys[n])[d];
        p[n] = score * scale;
        max_score = std::max(max_score, p[n]);
      }
      double sum = 0;
      for (double& x : p) sum += (x = std::exp(x - max_score));
      for (double& x : p) x /= sum;
      if (backward) {
        dp.resize(keys.size());
        for (size_t n = 0; n < keys.size(); ++n) {
          double acc = 0;
          for (int d = 0; d < D; ++d) acc += static_cast<double>(do_row[d]) * v_row(keys[n])[d];
          dp[n] = acc;
        }
      }
      for (Variant& var : variants) {
        ReferenceResults& r = *var.r;
        r.lse[row] = max_score + std::log(sum);
        std::fill(o.begin(), o.end(), 0.0);
        for (size_t n = 0; n < keys.size(); ++n)
          for (int d = 0; d < D; ++d) o[d] += var.round(p[n]) * v_row(keys[n])[d];
        for (int d = 0; d < D; ++d) r.out[row * D + d] = o[d];
        if (!backward) continue;
        // dS = P * (dO . v - Delta), Delta = dO . O; dQ = scale dS K, dK += scale dS^T Q, dV += P^T dO.
        double delta = 0;
        for (int d = 0; d < D; ++d) delta += static_cast<double>(do_row[d]) * var.round(o[d]);
        std::fill(dq.begin(), dq.end(), 0.0);
        double* dk = var.dk[thread].data();
        double* dv = var.dv[thread].data();
        for (size_t n = 0; n < keys.size(); ++n) {
          const double ds = var.round(p[n] * (dp[n] - delta)), pn = var.round(p[n]);
          const int64_t kv = (keys[n] * Hkv + hk) * D;
          for (int d = 0; d < D; ++d) {
            dq[d] += scale * ds * k_row(keys[n])[d];
            dk[kv + d] += scale * ds * q_row[d];
            dv[kv + d] += pn * do_row[d];
          }
        }
        for (int d = 0; d < D; ++d) r.dq[row * D + d] = dq[d];
      }
    }
  }
  for (Variant& var : variants) {
    ReferenceResults& r = *var.r;
    for (int thread = 0; thread < threads; ++thread)
      for (size_t e = 0; e < r.dk.size(); ++e) {
        r.dk[e] += var.dk[thread][e];
        r.dv[e] += var.dv[thread][e];
      }
    if (var.low)
      for (std::vector<double>* x : {&r.out, &r.dq, &r.dk, &r.dv})
        for (double& e : *x) e = bf16_round(e);
  }
  return exact;
}

}  // namespace moba::cpu
