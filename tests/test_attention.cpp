// CPU reference attention (dense causal and MoBA): finite-difference gradients, agreement with the float64
// explicit-mask reference over the edge cases of ../shared/docs/moba-spec.md, routing rules (ties, padding,
// segments, NaN), the full-vs-MoBA identities, accumulation and bitwise determinism across thread counts.
// Invariant: shapes stay small so the whole executable runs in a few seconds on 2 cores.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include "common/error.h"
#include "kernels/cpu/attention.h"
#include "tests/support/test_util.h"

namespace moba::cpu {
namespace {

// One packed batch of bf16-valued random inputs.
struct Problem {
  std::vector<int32_t> cu_seqlens;   // (segments + 1)
  int64_t tokens = 0;                // N
  int heads = 0, kv_heads = 0, head_dim = 0, block_size = 0, top_k = 0;
  float scale = 0;
  std::vector<float> q, k, v, dout;  // (N, H, D), (N, Hkv, D), (N, Hkv, D), (N, H, D)
  int segments() const { return static_cast<int>(cu_seqlens.size()) - 1; }
  // The call over every query row (outputs and gradients filled in by the caller).
  AttentionArgs args(const int32_t* selected = nullptr) const {
    AttentionArgs a;
    a.n_queries = a.n_keys = tokens;
    a.n_heads = heads;
    a.n_kv_heads = kv_heads;
    a.head_dim = head_dim;
    a.q = q.data();
    a.k = k.data();
    a.v = v.data();
    a.cu_seqlens = cu_seqlens.data();
    a.n_segments = segments();
    a.block_size = block_size;
    a.top_k = top_k;
    a.softmax_scale = scale;
    a.selected = const_cast<int32_t*>(selected);
    a.dout = dout.data();
    return a;
  }
};

Problem make_problem(std::vector<int32_t> cu_seqlens, int heads, int kv_heads, int head_dim, int block_size,
                     int top_k, uint64_t seed) {
  Problem p;
  p.cu_seqlens = std::move(cu_seqlens);
  p.tokens = p.cu_seqlens.back();
  p.heads = heads;
  p.kv_heads = kv_heads;
  p.head_dim = head_dim;
  p.block_size = block_size;
  p.top_k = top_k;
  p.scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  const size_t n_q = static_cast<size_t>(p.tokens) * heads * head_dim;
  const size_t n_kv = static_cast<size_t>(p.tokens) * kv_heads * head_dim;
  p.q = test::random_vector(n_q, seed, -1.5f, 1.5f);
  p.k = test::random_vector(n_kv, seed + 1, -1.5f, 1.5f);
  p.v = test::random_vector(n_kv, seed + 2);
  p.dout = test::random_vector(n_q, seed + 3);
  for (auto* x : {&p.q, &p.k, &p.v, &p.dout}) test::round_to_bf16(*x);
  return p;
}

std::vector<int32_t> route(const Problem& p) {
  std::vector<int32_t> selected(static_cast<size_t>(p.tokens) * p.heads * p.top_k);
  moba_select_blocks(p.args(selected.data()));
  return selected;
}

// Forward and backward results in fp32 (gradients start at zero).
struct Results {
  std::vector<float> out, lse, dq, dk, dv;
};

// selected == nullptr: dense causal attention; otherwise MoBA over that selection.
Results run_attention(const Problem& p, const int32_t* selected, bool with_backward = true) {
  const size_t n_q = p.q.size(), n_kv = p.k.size();
  Results r{std::vector<float>(n_q), std::vector<float>(n_q / p.head_dim), std::vector<float>(n_q, 0.0f),
            std::vector<float>(n_kv, 0.0f), std::vector<float>(n_kv, 0.0f)};
  AttentionArgs a = p.args(selected);
  a.out = r.out.data();
  a.lse = r.lse.data();
  a.dq = r.dq.data();
  a.dk = r.dk.data();
  a.dv = r.dv.data();
  if (selected) {
    moba_attention_forward(a);
    if (with_backward) moba_attention_backward(a);
  } else {
    attention_full_forward(a);
    if (with_backward) attention_full_backward(a);
  }
  return r;
}

ReferenceResults run_reference(const Problem& p, const int32_t* selected) {
  return attention_masked_reference(p.args(selected));
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// fp32 against float64 over every output: relative L2 well below bf16 noise, at fp32 rounding level.
constexpr double kFp32Tolerance = 5e-6;

void expect_matches_reference(const Results& r, const ReferenceResults& ref) {
  EXPECT_LE(test::rel_l2(r.out.data(), ref.out.data(), r.out.size()), kFp32Tolerance);
  EXPECT_LE(test::rel_l2(r.lse.data(), ref.lse.data(), r.lse.size()), kFp32Tolerance);
  EXPECT_LE(test::rel_l2(r.dq.data(), ref.dq.data(), r.dq.size()), kFp32Tolerance);
  EXPECT_LE(test::rel_l2(r.dk.data(), ref.dk.data(), r.dk.size()), kFp32Tolerance);
  EXPECT_LE(test::rel_l2(r.dv.data(), ref.dv.data(), r.dv.size()), kFp32Tolerance);
}

// Checks dq/dk/dv of `attention` (selected fixed) by central differences of loss = sum(out * dout).
void expect_gradients_match_finite_differences(Problem& p, const int32_t* selected) {
  const Results analytic = run_attention(p, selected);
  auto loss = [&]() {
    const Results r = run_attention(p, selected, /*with_backward=*/false);
    double sum = 0;
    for (size_t i = 0; i < r.out.size(); ++i) sum += static_cast<double>(r.out[i]) * p.dout[i];
    return sum;
  };
  struct Input {
    const char* name;
    std::vector<float>* x;
    const std::vector<float>* grad;
  };
  for (const Input& in : {Input{"q", &p.q, &analytic.dq}, Input{"k", &p.k, &analytic.dk},
                          Input{"v", &p.v, &analytic.dv}}) {
    const test::GradCheckResult g = test::check_gradient(*in.x, *in.grad, loss, 96, 1e-2f);
    EXPECT_LT(g.max_rel_error, 2e-2) << "d" << in.name << " worst " << g.worst;
    EXPECT_GE(g.checked, 48);
  }
}

// ---- gradients ---------------------------------------------------------------------------------------------------

TEST(AttentionGradients, FullMatchesFiniteDifferences) {
  Problem p = make_problem({0, 5, 5, 14}, 4, 2, 8, 4, 3, 11);
  expect_gradients_match_finite_differences(p, nullptr);
}

TEST(AttentionGradients, MobaMatchesFiniteDifferences) {
  // Routing is a constant of the backward: fix `selected` from one call, then perturb q, k, v.
  Problem p = make_problem({0, 23, 40}, 4, 2, 8, 4, 3, 12);
  const std::vector<int32_t> selected = route(p);
  expect_gradients_match_finite_differences(p, selected.data());
}

// ---- agreement with the float64 explicit-mask reference ---------------------------------------------------------

struct EdgeCase {
  const char* name;
  std::vector<int32_t> cu_seqlens;
  int heads, kv_heads, head_dim, block_size, top_k;
};

const std::vector<EdgeCase>& edge_cases() {
  static const std::vector<EdgeCase> cases = {
      {"n_less_than_block", {0, 20}, 2, 2, 8, 64, 3},
      {"n_not_multiple_of_block", {0, 150}, 2, 1, 12, 16, 3},  // head_dim 12: the dot product's tail
      {"packed_with_empty_segments", {0, 0, 40, 40, 97, 160, 160}, 4, 2, 8, 16, 3},
      {"k1_current_block_only", {0, 100}, 2, 2, 8, 16, 1},
      {"k_above_block_count", {0, 100}, 2, 2, 8, 16, 20},
      {"gqa_g1", {0, 70, 130}, 4, 4, 8, 8, 3},
      {"gqa_g2", {0, 70, 130}, 4, 2, 8, 8, 3},
      {"gqa_g4", {0, 70, 130}, 8, 2, 8, 8, 3},
      {"gqa_g8", {0, 70, 130}, 16, 2, 8, 8, 3},
      {"mqa_4q_1kv", {0, 70, 130}, 4, 1, 8, 8, 2},
      {"block_size_4", {0, 50}, 2, 2, 8, 4, 3},
      {"block_size_64", {0, 300}, 2, 2, 16, 64, 3},
      {"block_size_1", {0, 30}, 2, 1, 8, 1, 4},
      {"block_size_16384", {0, 40}, 2, 2, 8, 16384, 3},
      {"every_segment_empty", {0, 0, 0}, 2, 2, 8, 16, 3},
  };
  return cases;
}

TEST(AttentionReference, MobaMatchesMaskedReferenceOnEdgeCases) {
  uint64_t seed = 100;
  for (const EdgeCase& c : edge_cases()) {
    SCOPED_TRACE(c.name);
    const Problem p = make_problem(c.cu_seqlens, c.heads, c.kv_heads, c.head_dim, c.block_size, c.top_k, seed += 10);
    const std::vector<int32_t> selected = route(p);
    expect_matches_reference(run_attention(p, selected.data()), run_reference(p, selected.data()));
  }
}

TEST(AttentionReference, FullMatchesMaskedReferenceOnEdgeCases) {
  uint64_t seed = 200;
  for (const EdgeCase& c : edge_cases()) {
    SCOPED_TRACE(c.name);
    const Problem p = make_problem(c.cu_seqlens, c.heads, c.kv_heads, c.head_dim, c.block_size, c.top_k, seed += 10);
    expect_matches_reference(run_attention(p, nullptr), run_reference(p, nullptr));
  }
}

// ---- full attention as a special case of MoBA ----------------------------------------------------------------------

TEST(MobaAttention, EqualsFullAttentionWhenEveryBlockIsSelected) {
  // k >= number of blocks: every past block is selected, so the key sets, and (by construction of the shared
  // per-query code, attention_core.h) the very bits, are those of dense causal attention.
  const Problem p = make_problem({0, 37, 37, 100}, 4, 2, 8, 8, 9, 300);
  const std::vector<int32_t> selected = route(p);
  const Results moba = run_attention(p, selected.data()), full = run_attention(p, nullptr);
  EXPECT_TRUE(same_bits(moba.out, full.out));
  EXPECT_TRUE(same_bits(moba.lse, full.lse));
  EXPECT_TRUE(same_bits(moba.dq, full.dq));
  EXPECT_TRUE(same_bits(moba.dk, full.dk));
  EXPECT_TRUE(same_bits(moba.dv, full.dv));
}

TEST(MobaAttention, EqualsFullAttentionWhileFewerThanKBlocks) {
  // Positions < k*B have at most k-1 past blocks, all taken: their out, lse and dq rows are those of full attention.
  const Problem p = make_problem({0, 90, 200}, 4, 2, 8, 8, 3, 301);
  const std::vector<int32_t> selected = route(p);
  const Results moba = run_attention(p, selected.data()), full = run_attention(p, nullptr);
  const int H = p.heads, D = p.head_dim, kB = p.top_k * p.block_size;
  int rows_compared = 0, rows_differing_later = 0;
  for (int s = 0; s < p.segments(); ++s)
    for (int64_t t = p.cu_seqlens[s]; t < p.cu_seqlens[s + 1]; ++t)
      for (int h = 0; h < H; ++h) {
        const int64_t row = t * H + h;
        const bool same = std::memcmp(&moba.out[row * D], &full.out[row * D], D * sizeof(float)) == 0 &&
                          moba.lse[row] == full.lse[row] &&
                          std::memcmp(&moba.dq[row * D], &full.dq[row * D], D * sizeof(float)) == 0;
        if (t - p.cu_seqlens[s] < kB) {
          EXPECT_TRUE(same) << "token " << t << " head " << h;
          ++rows_compared;
        } else {
          rows_differing_later += !same;
        }
      }
  EXPECT_EQ(rows_compared, 2 * kB * H);
  EXPECT_GT(rows_differing_later, 0);  // beyond k*B, MoBA is genuinely sparse
}

// ---- routing ------------------------------------------------------------------------------------------------------

TEST(MobaRouting, SelectionInvariants) {
  const Problem p = make_problem({0, 7, 7, 90, 200, 203}, 4, 2, 16, 8, 4, 400);
  const std::vector<int32_t> selected = route(p);
  const int H = p.heads, top_k = p.top_k, B = p.block_size;
  for (int s = 0; s < p.segments(); ++s)
    for (int64_t t = p.cu_seqlens[s]; t < p.cu_seqlens[s + 1]; ++t)
      for (int h = 0; h < H; ++h) {
        const int32_t* row = &selected[(t * H + h) * top_k];
        const int current = static_cast<int>((t - p.cu_seqlens[s]) / B);
        const int expected_count = std::min(top_k, current + 1);
        for (int i = 0; i < top_k; ++i) {
          if (i < expected_count - 1) {
            EXPECT_GE(row[i], 0);
            EXPECT_LT(row[i], current);  // complete past block of this segment: (row[i] + 1) * B <= position
            if (i > 0) EXPECT_LT(row[i - 1], row[i]);
          } else if (i == expected_count - 1) {
            EXPECT_EQ(row[i], current) << "current block always included, last";
          } else {
            EXPECT_EQ(row[i], -1) << "padding";
          }
        }
      }
}

TEST(MobaRouting, MatchesBruteForceTopK) {
  // Independent routing: block means in float64 rounded to bf16, gate in float64, full sort with the tie rule.
  // Rows whose (k-1)-th and k-th best scores are within 1e-3 could flip on summation order and are skipped.
  const Problem p = make_problem({0, 130, 260}, 4, 2, 16, 8, 4, 500);
  const std::vector<int32_t> selected = route(p);
  const int H = p.heads, Hkv = p.kv_heads, D = p.head_dim;
  const int B = p.block_size, top_k = p.top_k, group = H / Hkv;
  int checked = 0, skipped = 0;
  for (int s = 0; s < p.segments(); ++s) {
    const int64_t start = p.cu_seqlens[s], n = p.cu_seqlens[s + 1] - start;
    std::vector<float> means(static_cast<size_t>(n / B) * Hkv * D);  // (blocks, Hkv, D)
    for (int64_t j = 0; j < n / B; ++j)
      for (int i = 0; i < Hkv * D; ++i) {
        double sum = 0;
        for (int64_t u = j * B; u < (j + 1) * B; ++u) sum += p.k[(start + u) * Hkv * D + i];
        means[j * Hkv * D + i] = static_cast<float>(sum / B);
      }
    test::round_to_bf16(means);
    for (int64_t pos = 0; pos < n; ++pos)
      for (int h = 0; h < H; ++h) {
        const int current = static_cast<int>(pos / B);
        std::vector<std::pair<double, int>> scored;  // (-score, block): sorts best first, lower block on ties
        for (int j = 0; j < current; ++j) {
          double score = 0;
          for (int d = 0; d < D; ++d)
            score += double(p.q[((start + pos) * H + h) * D + d]) * means[(j * Hkv + h / group) * D + d];
          scored.push_back({-score, j});
        }
        std::sort(scored.begin(), scored.end());
        const size_t take = std::min<size_t>(scored.size(), top_k - 1);
        if (take < scored.size() && std::abs(scored[take].first - scored[take - 1].first) < 1e-3) {
          ++skipped;
          continue;
        }
        std::vector<int32_t> expected;
        for (size_t i = 0; i < take; ++i) expected.push_back(scored[i].second);
        std::sort(expected.begin(), expected.end());
        expected.push_back(current);
        expected.resize(top_k, -1);
        const int32_t* row = &selected[((start + pos) * H + h) * top_k];
        EXPECT_EQ(std::vector<int32_t>(row, row + top_k), expected) << "segment " << s << " position " << pos;
        ++checked;
      }
  }
  EXPECT_GT(checked, 20 * skipped);
}

TEST(MobaRouting, TiesGoToTheLowerBlockIndex) {
  // Keys constant inside each block, with x-component means {0.5, 0.25, 0.5, 0.5, 0.75(current)} and y = 0;
  // q has x > 0, so blocks 0, 2, 3 tie for the best score. Segment 1 (after a 3-token segment 0) checks that
  // indices are relative to the segment start.
  const int B = 4;
  const std::vector<float> block_x = {0.5f, 0.25f, 0.5f, 0.5f, 0.75f};
  Problem p = make_problem({0, 3, 3 + 5 * B}, 1, 1, 2, B, 3, 600);
  for (int64_t u = 3; u < p.tokens; ++u) {
    p.k[u * 2 + 0] = block_x[(u - 3) / B];
    p.k[u * 2 + 1] = 0.0f;
  }
  for (int64_t t = 0; t < p.tokens; ++t) p.q[t * 2] = std::abs(p.q[t * 2]) + 0.25f;
  for (int top_k : {2, 3, 4, 6}) {
    SCOPED_TRACE(top_k);
    p.top_k = top_k;
    const std::vector<int32_t> selected = route(p);
    for (int64_t pos = 4 * B; pos < 5 * B; ++pos) {  // queries of block 4: candidates 0..3
      std::vector<int32_t> expected;
      if (top_k == 2) expected = {0, 4};
      if (top_k == 3) expected = {0, 2, 4};
      if (top_k == 4) expected = {0, 2, 3, 4};
      if (top_k == 6) expected = {0, 1, 2, 3, 4, -1};
      const int32_t* row = &selected[(3 + pos) * top_k];
      EXPECT_EQ(std::vector<int32_t>(row, row + top_k), expected) << "position " << pos;
    }
  }
}

TEST(MobaRouting, NonFiniteQueryThrowsNamingTokenAndHead) {
  Problem p = make_problem({0, 20, 64}, 4, 2, 8, 8, 3, 700);
  const int64_t token = 37, head = 2;
  for (float bad : {std::nanf(""), INFINITY}) {
    p.q[(token * 4 + head) * 8 + 5] = bad;
    try {
      route(p);
      ADD_FAILURE() << "expected moba::Error for " << bad;
    } catch (const Error& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find("token 37"), std::string::npos) << what;
      EXPECT_NE(what.find("head 2"), std::string::npos) << what;
    }
  }
}

TEST(MobaRouting, NonFiniteKeyBlockMeanThrows) {
  Problem p = make_problem({0, 64}, 2, 2, 8, 8, 3, 701);
  p.k[(10 * 2 + 1) * 8 + 3] = std::nanf("");
  EXPECT_THROW(route(p), Error);
}

// ---- query subsets (context parallelism) ----------------------------------------------------------------------------

// The query rows of rank r of C under zigzag context parallelism: chunks r and 2C - 1 - r of the 2C equal chunks of
// the N rows, ascending.
std::vector<int32_t> zigzag_rows(int64_t N, int C, int r) {
  const int64_t chunk = N / (2 * C);
  std::vector<int32_t> rows;
  for (int64_t c : {int64_t{r}, int64_t{2 * C - 1 - r}})
    for (int64_t t = c * chunk; t < (c + 1) * chunk; ++t) rows.push_back(static_cast<int32_t>(t));
  return rows;
}

// rows (n) of x, a (N, width) matrix.
template <typename T>
std::vector<T> gather_rows(const std::vector<T>& x, const std::vector<int32_t>& rows, int64_t width) {
  std::vector<T> out;
  for (int32_t t : rows) out.insert(out.end(), x.begin() + t * width, x.begin() + (t + 1) * width);
  return out;
}

// Every rank's query rows against the whole K/V give the whole sequence's rows of out, lse, dQ and (MoBA) routing bit
// for bit, and the ranks' partial dK/dV sum to the whole dK/dV (up to fp32 reassociation of the per-rank sums).
void expect_subsets_equal_whole(const Problem& p, bool moba, int ranks) {
  const int H = p.heads, D = p.head_dim;
  const std::vector<int32_t> selected = moba ? route(p) : std::vector<int32_t>();
  const Results whole = run_attention(p, moba ? selected.data() : nullptr);
  std::vector<double> dk_sum(p.k.size(), 0.0), dv_sum(p.v.size(), 0.0);
  for (int r = 0; r < ranks; ++r) {
    SCOPED_TRACE(cat("rank ", r, " of ", ranks));
    const std::vector<int32_t> rows = zigzag_rows(p.tokens, ranks, r);
    const int64_t n = static_cast<int64_t>(rows.size());
    const std::vector<float> q = gather_rows(p.q, rows, H * D), dout = gather_rows(p.dout, rows, H * D);
    std::vector<int32_t> sel(static_cast<size_t>(n * H * p.top_k));
    std::vector<float> out(q.size()), lse(static_cast<size_t>(n * H)), dq(q.size(), 0.0f);
    std::vector<float> dk(p.k.size(), 0.0f), dv(p.v.size(), 0.0f);
    AttentionArgs a = p.args(moba ? sel.data() : nullptr);
    a.n_queries = n;
    a.q_rows = rows.data();
    a.q = q.data();
    a.dout = dout.data();
    a.out = out.data();
    a.lse = lse.data();
    a.dq = dq.data();
    a.dk = dk.data();
    a.dv = dv.data();
    if (moba) {
      moba_select_blocks(a);
      EXPECT_EQ(sel, gather_rows(selected, rows, H * p.top_k)) << "routing of the subset";
      moba_attention_forward(a);
      moba_attention_backward(a);
    } else {
      attention_full_forward(a);
      attention_full_backward(a);
    }
    EXPECT_TRUE(same_bits(out, gather_rows(whole.out, rows, H * D))) << "out";
    EXPECT_TRUE(same_bits(lse, gather_rows(whole.lse, rows, H))) << "lse";
    EXPECT_TRUE(same_bits(dq, gather_rows(whole.dq, rows, H * D))) << "dq";
    for (size_t e = 0; e < dk.size(); ++e) {
      dk_sum[e] += dk[e];
      dv_sum[e] += dv[e];
    }
  }
  // Each key's fp32 sum over up to ~8K query rows is split into per-rank sums: ~sqrt(8K) * 2^-24 relative apart.
  std::vector<float> dk_total(dk_sum.begin(), dk_sum.end()), dv_total(dv_sum.begin(), dv_sum.end());
  EXPECT_LE(test::rel_l2(dk_total.data(), whole.dk.data(), dk_total.size()), 1e-5) << "sum of the partial dk";
  EXPECT_LE(test::rel_l2(dv_total.data(), whole.dv.data(), dv_total.size()), 1e-5) << "sum of the partial dv";
}

TEST(QuerySubsets, ZigzagChunksEqualTheWholeSequenceRows) {
  // Documents cross the chunk boundaries (chunks of 64 rows at 2 ranks, 32 at 4); blocks of 16 and 32 divide the
  // chunks. GQA 4:1 and MQA; top_k from 2 to every block (17 > 16 blocks).
  struct Case {
    const char* name;
    std::vector<int32_t> cu;
    int heads, kv_heads, block, top_k;
  };
  const Case cases[] = {{"gqa4_b16_k3", {0, 50, 130, 256}, 8, 2, 16, 3},
                        {"mqa_b32_k2", {0, 200, 256}, 4, 1, 32, 2},
                        {"mha_b16_every_block", {0, 256}, 2, 2, 16, 17},
                        {"packed_empty_b16_k4", {0, 0, 31, 31, 190, 256}, 4, 2, 16, 4}};
  uint64_t seed = 1200;
  for (const Case& c : cases)
    for (int ranks : {2, 4}) {
      SCOPED_TRACE(cat(c.name, ", ", ranks, " ranks"));
      const Problem p = make_problem(c.cu, c.heads, c.kv_heads, 16, c.block, c.top_k, seed += 10);
      expect_subsets_equal_whole(p, /*moba=*/true, ranks);
      expect_subsets_equal_whole(p, /*moba=*/false, ranks);
    }
}

TEST(QuerySubsets, LargeBlocksEqualTheWholeSequenceRows) {
  // B = 4096: chunks of one block at 2 ranks; the second document starts inside chunk 2.
  const Problem p = make_problem({0, 10000, 16384}, 1, 1, 8, 4096, 3, 1300);
  expect_subsets_equal_whole(p, /*moba=*/true, 2);
}

// ---- interface contracts -------------------------------------------------------------------------------------------

TEST(MobaAttention, InvalidSelectionThrows) {
  const Problem p = make_problem({0, 40}, 2, 2, 8, 8, 3, 800);
  std::vector<int32_t> selected = route(p);
  std::vector<float> out(p.q.size()), lse(p.q.size() / 8);
  const int64_t row = 30 * 2 + 1;  // token 30 (block 3), head 1
  for (std::vector<int32_t> bad : {std::vector<int32_t>{1, 0, 3}, {0, 1, 2}, {0, 4, -1}, {-1, 0, 3}, {3, -1, 3}}) {
    std::vector<int32_t> broken = selected;
    std::copy(bad.begin(), bad.end(), broken.begin() + row * 3);
    AttentionArgs a = p.args(broken.data());
    a.out = out.data();
    a.lse = lse.data();
    EXPECT_THROW(moba_attention_forward(a), Error);
  }
  const std::vector<int32_t> bad_cu = {0, 50};
  AttentionArgs a = p.args();
  a.out = out.data();
  a.lse = lse.data();
  a.cu_seqlens = bad_cu.data();
  EXPECT_THROW(attention_full_forward(a), Error);
  // Query rows must stand at strictly ascending key rows inside the key sequence.
  for (std::vector<int32_t> bad_rows : {std::vector<int32_t>{3, 2}, {5, 5}, {-1, 4}, {38, 40}}) {
    AttentionArgs sub = p.args();
    sub.out = out.data();
    sub.lse = lse.data();
    sub.n_queries = 2;
    sub.q_rows = bad_rows.data();
    EXPECT_THROW(attention_full_forward(sub), Error) << bad_rows[0] << "," << bad_rows[1];
  }
}

TEST(AttentionBackward, AccumulatesIntoGradients) {
  const Problem p = make_problem({0, 30, 50}, 4, 2, 8, 8, 2, 900);
  const std::vector<int32_t> selected = route(p);
  for (const int32_t* sel : {static_cast<const int32_t*>(nullptr), selected.data()}) {
    const Results fresh = run_attention(p, sel);
    Results acc = fresh;
    for (auto* g : {&acc.dq, &acc.dk, &acc.dv}) std::fill(g->begin(), g->end(), 1.0f);
    AttentionArgs a = p.args(sel);
    a.out = const_cast<float*>(fresh.out.data());
    a.lse = const_cast<float*>(fresh.lse.data());
    a.dq = acc.dq.data();
    a.dk = acc.dk.data();
    a.dv = acc.dv.data();
    if (sel) moba_attention_backward(a);
    else attention_full_backward(a);
    for (auto [a, f] : {std::pair{&acc.dq, &fresh.dq}, {&acc.dk, &fresh.dk}, {&acc.dv, &fresh.dv}})
      for (size_t i = 0; i < a->size(); ++i) ASSERT_EQ((*a)[i], 1.0f + (*f)[i]) << i;
  }
}

TEST(AttentionBackward, BitwiseDeterministicAcrossThreadCounts) {
  // Large enough that every kernel takes its parallel path (detail::worth_parallel).
  const Problem p = make_problem({0, 100, 100, 230}, 4, 2, 32, 16, 3, 1000);
  const std::vector<int32_t> selected = route(p);
  const int saved = omp_get_max_threads();
  std::vector<Results> by_threads;
  std::vector<std::vector<int32_t>> selections;
  for (int threads : {1, 2, 3}) {
    omp_set_num_threads(threads);
    selections.push_back(route(p));
    by_threads.push_back(run_attention(p, selected.data()));
    by_threads.push_back(run_attention(p, nullptr));
  }
  omp_set_num_threads(saved);
  for (size_t i = 2; i < by_threads.size(); ++i) {
    const Results &a = by_threads[i], &b = by_threads[i % 2];
    EXPECT_TRUE(same_bits(a.out, b.out) && same_bits(a.lse, b.lse)) << "forward, run " << i;
    EXPECT_TRUE(same_bits(a.dq, b.dq) && same_bits(a.dk, b.dk) && same_bits(a.dv, b.dv)) << "backward, run " << i;
  }
  for (const auto& s : selections) EXPECT_EQ(s, selected);
}

}  // namespace
}  // namespace moba::cpu
