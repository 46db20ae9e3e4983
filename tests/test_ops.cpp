// Tests of the CPU reference ops (kernels/cpu/ops.h): finite-difference gradient checks for every backward,
// forward checks against direct double-precision formulas, accumulate (+=) semantics, and bitwise determinism
// across OpenMP thread counts. Also prints the matmul GFLOP/s (benchmark line, not asserted).
//
// Gradient-check tolerance: the loss is sum(out * random weights) in double over fp32 outputs. Central
// differences with step h = 1e-2 have truncation error O(h^2 * third derivative) ~ 1e-4 relative (none for linear
// ops), and fp32 rounding of the outputs adds ~1e-7 * |loss| / h ~ 1e-5 absolute noise to each numeric derivative.
// That noise dominates for tiny gradient entries, so errors are taken relative to max(|num| + |ana|, 1e-2)
// (check_gradient's floor): measured worst entries are ~1e-3 or below; we assert kGradTolerance = 1e-2.

#include <gtest/gtest.h>
#include <omp.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <vector>

#include "kernels/cpu/ops.h"
#include "tests/support/test_util.h"

namespace moba::cpu {
namespace {

using moba::test::check_gradient;
using moba::test::random_vector;
using moba::test::rel_l2;

constexpr double kGradTolerance = 1e-2;
constexpr float kGradStep = 1e-2f;
constexpr double kGradFloor = 1e-2;

// sum_i out[i] * weights[i] in double: the scalar loss whose gradient wrt out is `weights`.
double weighted_sum(const std::vector<float>& out, const std::vector<float>& weights) {
  double sum = 0.0;
  for (size_t i = 0; i < out.size(); ++i) sum += static_cast<double>(out[i]) * weights[i];
  return sum;
}

void expect_gradient_ok(std::vector<float>& x, const std::vector<float>& grad, const std::function<double()>& loss,
                        const char* what) {
  auto result = check_gradient(x, grad, loss, /*max_checks=*/64, kGradStep, kGradFloor);
  EXPECT_GT(result.checked, 0) << what;
  EXPECT_LT(result.max_rel_error, kGradTolerance) << what << ": worst " << result.worst;
}

// Runs body with the OpenMP thread count set to n_threads, restoring the previous count afterwards.
template <typename Body>
void with_threads(int n_threads, Body body) {
  const int saved = omp_get_max_threads();
  omp_set_num_threads(n_threads);
  body();
  omp_set_num_threads(saved);
}

// Checks that backward(grad) adds into grad: starting from random values g0 it must give g0 + backward(0).
// backward must be deterministic for a given zeroed start.
void expect_accumulates(size_t n, const std::function<void(std::vector<float>&)>& backward, const char* what) {
  std::vector<float> once(n, 0.0f);
  backward(once);
  std::vector<float> twice(n, 0.0f);
  backward(twice);
  backward(twice);
  std::vector<float> initial = random_vector(n, 991);
  std::vector<float> from_initial = initial;
  backward(from_initial);
  double max_once = 0.0;
  for (float g : once) max_once = std::max(max_once, static_cast<double>(std::abs(g)));
  ASSERT_GT(max_once, 0.0) << what << ": backward produced no gradient";
  for (size_t i = 0; i < n; ++i) {
    ASSERT_NEAR(twice[i], 2.0 * once[i], 1e-6 * (1.0 + std::abs(once[i]))) << what << " index " << i;
    ASSERT_NEAR(from_initial[i], initial[i] + once[i], 1e-6 * (1.0 + std::abs(once[i]))) << what << " index " << i;
  }
}

// ---- embedding ---------------------------------------------------------------------------------------------

TEST(Embedding, ForwardGathersRowsAndGradientChecks) {
  const int V = 11, C = 17;
  const std::vector<int32_t> tokens = {3, 0, 3, 10, 7, 3, 0};  // repeated ids 3 and 0
  const int64_t N = static_cast<int64_t>(tokens.size());
  std::vector<float> wte = random_vector(V * C, 1);
  std::vector<float> weights = random_vector(N * C, 2);
  std::vector<float> out(N * C);
  gather_rows(out.data(), tokens.data(), wte.data(), N, C * sizeof(float));
  for (int64_t t = 0; t < N; ++t)
    for (int c = 0; c < C; ++c) ASSERT_EQ(out[t * C + c], wte[tokens[t] * C + c]);

  std::vector<float> dwte(V * C, 0.0f);
  embedding_backward(dwte.data(), weights.data(), tokens.data(), N, C, V);
  auto loss = [&] {
    gather_rows(out.data(), tokens.data(), wte.data(), N, C * sizeof(float));
    return weighted_sum(out, weights);
  };
  expect_gradient_ok(wte, dwte, loss, "embedding dwte");
  // Token 3 appears at t = 0, 2, 5: its gradient row is the sum of those rows; unused ids get nothing.
  for (int c = 0; c < C; ++c) {
    EXPECT_NEAR(dwte[3 * C + c], weights[0 * C + c] + weights[2 * C + c] + weights[5 * C + c], 1e-6);
    EXPECT_EQ(dwte[1 * C + c], 0.0f);
  }
}

TEST(Embedding, BackwardAccumulates) {
  const int V = 9, C = 21;
  const std::vector<int32_t> tokens = {1, 4, 1, 8, 1};
  std::vector<float> dout = random_vector(tokens.size() * C, 3);
  expect_accumulates(V * C, [&](std::vector<float>& dwte) {
    embedding_backward(dwte.data(), dout.data(), tokens.data(), static_cast<int64_t>(tokens.size()), C, V);
  }, "embedding dwte");
}

// ---- RMSNorm -----------------------------------------------------------------------------------------------

TEST(RmsNorm, ForwardMatchesFormulaAndGradientChecks) {
  const int64_t N = 6;
  const int C = 19;
  const float eps = 1e-5f;
  std::vector<float> inp = random_vector(N * C, 4);
  std::vector<float> weight = random_vector(C, 5, 0.5f, 1.5f);
  std::vector<float> weights = random_vector(N * C, 6);
  std::vector<float> out(N * C), rstd(N);
  rmsnorm_forward(out.data(), rstd.data(), inp.data(), weight.data(), N, C, eps);
  for (int64_t t = 0; t < N; ++t) {
    double ms = 0;
    for (int c = 0; c < C; ++c) ms += double(inp[t * C + c]) * inp[t * C + c];
    const double r = 1.0 / std::sqrt(ms / C + eps);
    EXPECT_NEAR(rstd[t], r, 1e-6 * r);
    for (int c = 0; c < C; ++c) EXPECT_NEAR(out[t * C + c], inp[t * C + c] * r * weight[c], 1e-6);
  }

  std::vector<float> dinp(N * C, 0.0f), dweight(C, 0.0f);
  rmsnorm_backward(dinp.data(), dweight.data(), weights.data(), inp.data(), weight.data(), rstd.data(), N, C);
  auto loss = [&] {
    std::vector<float> o(N * C), r(N);
    rmsnorm_forward(o.data(), r.data(), inp.data(), weight.data(), N, C, eps);
    return weighted_sum(o, weights);
  };
  expect_gradient_ok(inp, dinp, loss, "rmsnorm dinp");
  expect_gradient_ok(weight, dweight, loss, "rmsnorm dweight");
}

TEST(RmsNorm, BackwardAccumulates) {
  const int64_t N = 5;
  const int C = 13;
  std::vector<float> inp = random_vector(N * C, 7), weight = random_vector(C, 8), dout = random_vector(N * C, 9);
  std::vector<float> out(N * C), rstd(N);
  rmsnorm_forward(out.data(), rstd.data(), inp.data(), weight.data(), N, C, 1e-5f);
  std::vector<float> scratch_dinp(N * C), scratch_dweight(C);  // receive the gradient not under test
  expect_accumulates(N * C, [&](std::vector<float>& dinp) {
    rmsnorm_backward(dinp.data(), scratch_dweight.data(), dout.data(), inp.data(), weight.data(), rstd.data(), N, C);
  }, "rmsnorm dinp");
  expect_accumulates(C, [&](std::vector<float>& dweight) {
    rmsnorm_backward(scratch_dinp.data(), dweight.data(), dout.data(), inp.data(), weight.data(), rstd.data(), N, C);
  }, "rmsnorm dweight");
}

// ---- matmul ------------------------------------------------------------------------------------------------

TEST(Matmul, GradientChecksOnOddShapes) {
  const int64_t N = 7;
  const int IC = 13, OC = 9;
  std::vector<float> inp = random_vector(N * IC, 10), weight = random_vector(OC * IC, 11);
  std::vector<float> weights = random_vector(N * OC, 12);
  std::vector<float> dinp(N * IC, 0.0f), dweight(OC * IC, 0.0f);
  matmul_backward(dinp.data(), dweight.data(), weights.data(), inp.data(), weight.data(), N, IC, OC);
  auto loss = [&] {
    std::vector<float> out(N * OC);
    matmul_forward(out.data(), inp.data(), weight.data(), N, IC, OC);
    return weighted_sum(out, weights);
  };
  expect_gradient_ok(inp, dinp, loss, "matmul dinp");
  expect_gradient_ok(weight, dweight, loss, "matmul dweight");
}

// Shapes that cross every tile boundary (rows 128, cols 256, depth 512) against a double-precision reference.
TEST(Matmul, MatchesDoubleReferenceAcrossTiles) {
  const int64_t N = 150;
  const int IC = 530, OC = 270;
  std::vector<float> inp = random_vector(N * IC, 13), weight = random_vector(OC * IC, 14);
  std::vector<float> dout = random_vector(N * OC, 15);
  std::vector<float> out(N * OC, 123.0f);  // forward overwrites
  matmul_forward(out.data(), inp.data(), weight.data(), N, IC, OC);
  std::vector<float> dinp = random_vector(N * IC, 16), dweight = random_vector(OC * IC, 17);
  std::vector<double> ref_dinp(dinp.begin(), dinp.end()), ref_dweight(dweight.begin(), dweight.end());
  matmul_backward(dinp.data(), dweight.data(), dout.data(), inp.data(), weight.data(), N, IC, OC);

  std::vector<double> ref_out(N * OC, 0.0);
  for (int64_t t = 0; t < N; ++t)
    for (int o = 0; o < OC; ++o) {
      double s = 0;
      for (int i = 0; i < IC; ++i) s += double(inp[t * IC + i]) * weight[o * IC + i];
      ref_out[t * OC + o] = s;
      for (int i = 0; i < IC; ++i) {
        ref_dinp[t * IC + i] += double(dout[t * OC + o]) * weight[o * IC + i];
        ref_dweight[o * IC + i] += double(dout[t * OC + o]) * inp[t * IC + i];
      }
    }
  EXPECT_LT(rel_l2(out.data(), ref_out.data(), out.size()), 1e-6);
  EXPECT_LT(rel_l2(dinp.data(), ref_dinp.data(), dinp.size()), 1e-6);
  EXPECT_LT(rel_l2(dweight.data(), ref_dweight.data(), dweight.size()), 1e-6);
}

TEST(Matmul, BackwardAccumulatesAndSkipsNullOutputs) {
  const int64_t N = 9;
  const int IC = 20, OC = 11;
  std::vector<float> inp = random_vector(N * IC, 18), weight = random_vector(OC * IC, 19);
  std::vector<float> dout = random_vector(N * OC, 20);
  expect_accumulates(N * IC, [&](std::vector<float>& dinp) {
    matmul_backward(dinp.data(), nullptr, dout.data(), inp.data(), weight.data(), N, IC, OC);
  }, "matmul dinp");
  expect_accumulates(OC * IC, [&](std::vector<float>& dweight) {
    matmul_backward(nullptr, dweight.data(), dout.data(), inp.data(), weight.data(), N, IC, OC);
  }, "matmul dweight");
}

TEST(Matmul, BackwardIsBitwiseDeterministicAcrossThreadCounts) {
  const int64_t N = 300;
  const int IC = 600, OC = 520;
  std::vector<float> inp = random_vector(N * IC, 21), weight = random_vector(OC * IC, 22);
  std::vector<float> dout = random_vector(N * OC, 23);
  auto run = [&](int n_threads, std::vector<float>& out, std::vector<float>& dinp, std::vector<float>& dweight) {
    out.assign(N * OC, 0.0f);
    dinp.assign(N * IC, 0.0f);
    dweight.assign(OC * IC, 0.0f);
    with_threads(n_threads, [&] {
      matmul_forward(out.data(), inp.data(), weight.data(), N, IC, OC);
      matmul_backward(dinp.data(), dweight.data(), dout.data(), inp.data(), weight.data(), N, IC, OC);
    });
  };
  std::vector<float> out1, dinp1, dweight1, out3, dinp3, dweight3;
  run(1, out1, dinp1, dweight1);
  run(3, out3, dinp3, dweight3);
  EXPECT_EQ(out1, out3);
  EXPECT_EQ(dinp1, dinp3);
  EXPECT_EQ(dweight1, dweight3);
}

// Benchmark line (README "speed" claims point here): GFLOP/s for out (1024, 1024) = inp (1024, 256) @ W^T.
TEST(Matmul, ReportsGflops) {
  const int64_t N = 1024;
  const int IC = 256, OC = 1024;
  std::vector<float> inp = random_vector(N * IC, 24), weight = random_vector(OC * IC, 25);
  std::vector<float> dout = random_vector(N * OC, 26);
  std::vector<float> out(N * OC), dinp(N * IC, 0.0f), dweight(OC * IC, 0.0f);
  const double flops = 2.0 * N * IC * OC;
  const int iterations = 5;
  auto seconds = [&](const std::function<void()>& body) {
    body();  // warm-up
    auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < iterations; ++i) body();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / iterations;
  };
  const double forward = seconds([&] { matmul_forward(out.data(), inp.data(), weight.data(), N, IC, OC); });
  const double backward_inp = seconds(
      [&] { matmul_backward(dinp.data(), nullptr, dout.data(), inp.data(), weight.data(), N, IC, OC); });
  const double backward_weight = seconds(
      [&] { matmul_backward(nullptr, dweight.data(), dout.data(), inp.data(), weight.data(), N, IC, OC); });
  std::printf("[ bench    ] matmul N=%lld IC=%d OC=%d, %d threads: forward %.1f, dinp %.1f, dweight %.1f GFLOP/s\n",
              static_cast<long long>(N), IC, OC, omp_get_max_threads(), flops / forward / 1e9,
              flops / backward_inp / 1e9, flops / backward_weight / 1e9);
  RecordProperty("forward_gflops", static_cast<int>(flops / forward / 1e9));
  EXPECT_GT(flops / forward / 1e9, 0.1);  // sanity only: the machine is shared, speed is reported, not asserted
}

// ---- RoPE --------------------------------------------------------------------------------------------------

struct RopeCase {
  int64_t N = 5;
  int n_heads = 3;
  int D = 10;                    // D/2 = 5 pairs: odd
  int64_t in_row_stride = 37;    // > n_heads * D = 30, like q read out of a fused QKV row
  float theta = 10000.0f;
  std::vector<int32_t> pos = {7, 8, 9, 250, 4093};  // not starting at 0, not consecutive, one large
};

TEST(Rope, GradientChecksWithStridedInput) {
  RopeCase rc;
  std::vector<float> inp = random_vector(rc.N * rc.in_row_stride, 27);
  std::vector<float> weights = random_vector(rc.N * rc.n_heads * rc.D, 28);
  std::vector<float> dinp(inp.size(), 0.0f);
  rope_backward(dinp.data(), rc.in_row_stride, weights.data(), rc.pos.data(), rc.N, rc.n_heads, rc.D, rc.theta);
  auto loss = [&] {
    std::vector<float> out(rc.N * rc.n_heads * rc.D);
    rope_forward(out.data(), inp.data(), rc.in_row_stride, rc.pos.data(), rc.N, rc.n_heads, rc.D, rc.theta);
    return weighted_sum(out, weights);
  };
  expect_gradient_ok(inp, dinp, loss, "rope dinp");
  // The padding between rows (columns n_heads * D .. stride) is never written.
  for (int64_t t = 0; t < rc.N; ++t)
    for (int64_t c = rc.n_heads * rc.D; c < rc.in_row_stride; ++c) EXPECT_EQ(dinp[t * rc.in_row_stride + c], 0.0f);
}

TEST(Rope, MatchesFormulaPreservesNormsAndInvertsExactly) {
  RopeCase rc;
  const int half = rc.D / 2;
  std::vector<float> inp = random_vector(rc.N * rc.in_row_stride, 29);
  std::vector<float> out(rc.N * rc.n_heads * rc.D);
  rope_forward(out.data(), inp.data(), rc.in_row_stride, rc.pos.data(), rc.N, rc.n_heads, rc.D, rc.theta);
  for (int64_t t = 0; t < rc.N; ++t)
    for (int h = 0; h < rc.n_heads; ++h) {
      const float* x = inp.data() + t * rc.in_row_stride + h * rc.D;
      const float* y = out.data() + (t * rc.n_heads + h) * rc.D;
      double norm_x = 0, norm_y = 0;
      for (int i = 0; i < half; ++i) {
        const double angle = rc.pos[t] * std::pow(double(rc.theta), -2.0 * i / rc.D);
        EXPECT_NEAR(y[i], x[i] * std::cos(angle) - x[i + half] * std::sin(angle), 1e-5);
        EXPECT_NEAR(y[i + half], x[i + half] * std::cos(angle) + x[i] * std::sin(angle), 1e-5);
      }
      for (int i = 0; i < rc.D; ++i) {
        norm_x += double(x[i]) * x[i];
        norm_y += double(y[i]) * y[i];
      }
      EXPECT_NEAR(std::sqrt(norm_y), std::sqrt(norm_x), 1e-5 * std::sqrt(norm_x)) << "t " << t << " h " << h;
    }
  // Inverse rotation (backward) of the rotated vectors returns the input.
  std::vector<float> back(inp.size(), 0.0f);
  rope_backward(back.data(), rc.in_row_stride, out.data(), rc.pos.data(), rc.N, rc.n_heads, rc.D, rc.theta);
  for (int64_t t = 0; t < rc.N; ++t)
    for (int c = 0; c < rc.n_heads * rc.D; ++c)
      EXPECT_NEAR(back[t * rc.in_row_stride + c], inp[t * rc.in_row_stride + c], 1e-6);
  // Position 0 is the identity.
  std::vector<int32_t> zeros(rc.N, 0);
  rope_forward(out.data(), inp.data(), rc.in_row_stride, zeros.data(), rc.N, rc.n_heads, rc.D, rc.theta);
  for (int64_t t = 0; t < rc.N; ++t)
    for (int c = 0; c < rc.n_heads * rc.D; ++c)
      EXPECT_EQ(out[t * rc.n_heads * rc.D + c], inp[t * rc.in_row_stride + c]);
}

TEST(Rope, BackwardAccumulates) {
  RopeCase rc;
  std::vector<float> dout = random_vector(rc.N * rc.n_heads * rc.D, 30);
  expect_accumulates(rc.N * rc.in_row_stride, [&](std::vector<float>& dinp) {
    rope_backward(dinp.data(), rc.in_row_stride, dout.data(), rc.pos.data(), rc.N, rc.n_heads, rc.D, rc.theta);
  }, "rope dinp");
}

// ---- SwiGLU ------------------------------------------------------------------------------------------------

TEST(SwiGlu, ForwardMatchesFormulaAndGradientChecks) {
  const int64_t N = 5;
  const int F = 11;
  std::vector<float> inp = random_vector(N * 2 * F, 31, -3.0f, 3.0f);
  std::vector<float> weights = random_vector(N * F, 32);
  std::vector<float> out(N * F);
  swiglu_forward(out.data(), inp.data(), N, F);
  for (int64_t t = 0; t < N; ++t)
    for (int i = 0; i < F; ++i) {
      const double g = inp[t * 2 * F + i], u = inp[t * 2 * F + F + i];
      EXPECT_NEAR(out[t * F + i], g / (1.0 + std::exp(-g)) * u, 1e-5);
    }
  std::vector<float> dinp(N * 2 * F, 0.0f);
  swiglu_backward(dinp.data(), weights.data(), inp.data(), N, F);
  auto loss = [&] {
    swiglu_forward(out.data(), inp.data(), N, F);
    return weighted_sum(out, weights);
  };
  expect_gradient_ok(inp, dinp, loss, "swiglu dinp");
}

TEST(SwiGlu, BackwardAccumulates) {
  const int64_t N = 4;
  const int F = 9;
  std::vector<float> inp = random_vector(N * 2 * F, 33), dout = random_vector(N * F, 34);
  expect_accumulates(N * 2 * F, [&](std::vector<float>& dinp) {
    swiglu_backward(dinp.data(), dout.data(), inp.data(), N, F);
  }, "swiglu dinp");
}

// ---- cross-entropy -----------------------------------------------------------------------------------------

struct CrossEntropyCase {
  int64_t N = 6;
  int V = 23;
  std::vector<int32_t> targets = {4, 22, 0, 4, 17, -1};  // masked row 5 carries an invalid (padding) target
  std::vector<uint8_t> mask = {1, 1, 0, 1, 1, 0};
};

TEST(CrossEntropy, ForwardMatchesDirectLogSoftmax) {
  CrossEntropyCase cc;
  std::vector<float> logits = random_vector(cc.N * cc.V, 35, -4.0f, 4.0f);
  logits[1 * cc.V + 3] = 80.0f;  // a large logit: exp would overflow in fp32 without the max subtraction
  std::vector<float> losses(cc.N, -1.0f);
  const double total = cross_entropy_forward(losses.data(), logits.data(), cc.targets.data(), cc.mask.data(),
                                             cc.N, cc.V);
  double expected_total = 0.0;
  for (int64_t t = 0; t < cc.N; ++t) {
    if (!cc.mask[t]) {
      EXPECT_EQ(losses[t], 0.0f);
      continue;
    }
    double sum = 0.0;
    for (int v = 0; v < cc.V; ++v) sum += std::exp(double(logits[t * cc.V + v]) - 80.0);
    const double log_softmax_target = logits[t * cc.V + cc.targets[t]] - 80.0 - std::log(sum);
    EXPECT_NEAR(losses[t], -log_softmax_target, 1e-5 * (1.0 + std::abs(log_softmax_target)));
    expected_total += losses[t];
  }
  EXPECT_DOUBLE_EQ(total, expected_total);
  EXPECT_TRUE(std::isfinite(losses[1]));

  // mask == nullptr means every row counts (targets must then all be valid).
  std::vector<int32_t> valid_targets = {4, 22, 0, 4, 17, 9};
  std::vector<float> all_losses(cc.N);
  cross_entropy_forward(all_losses.data(), logits.data(), valid_targets.data(), nullptr, cc.N, cc.V);
  for (int64_t t = 0; t < cc.N; ++t) EXPECT_GT(all_losses[t], 0.0f);
  EXPECT_EQ(all_losses[0], losses[0]);
}

TEST(CrossEntropy, GradientChecksWithMask) {
  CrossEntropyCase cc;
  const float grad_scale = 0.37f;
  std::vector<float> logits = random_vector(cc.N * cc.V, 36, -3.0f, 3.0f);
  std::vector<float> dlogits(cc.N * cc.V, 0.0f);
  cross_entropy_backward(dlogits.data(), logits.data(), cc.targets.data(), cc.mask.data(), grad_scale, cc.N, cc.V);
  auto loss = [&] {
    std::vector<float> losses(cc.N);
    return grad_scale *
           cross_entropy_forward(losses.data(), logits.data(), cc.targets.data(), cc.mask.data(), cc.N, cc.V);
  };
  auto result = check_gradient(logits, dlogits, loss, /*max_checks=*/cc.N * cc.V, kGradStep, kGradFloor);
  EXPECT_LT(result.max_rel_error, kGradTolerance) << result.worst;
  for (int64_t t = 0; t < cc.N; ++t) {
    double row_sum = 0.0;
    for (int v = 0; v < cc.V; ++v) row_sum += dlogits[t * cc.V + v];
    EXPECT_NEAR(row_sum, 0.0, 1e-6);  // softmax sums to one, minus the one-hot
    if (!cc.mask[t])
      for (int v = 0; v < cc.V; ++v) EXPECT_EQ(dlogits[t * cc.V + v], 0.0f);
  }
}

// The fused head op: bitwise the losses of the forward and the gradient the backward adds to zeros, written over
// the logits; with grad_scale 0 the logits stay untouched.
TEST(CrossEntropy, FusedIsForwardPlusBackwardInPlace) {
  CrossEntropyCase cc;
  const float grad_scale = 0.37f;
  std::vector<float> logits = random_vector(cc.N * cc.V, 38, -3.0f, 3.0f);
  std::vector<float> losses(cc.N), dlogits(cc.N * cc.V, 0.0f);
  cross_entropy_forward(losses.data(), logits.data(), cc.targets.data(), cc.mask.data(), cc.N, cc.V);
  cross_entropy_backward(dlogits.data(), logits.data(), cc.targets.data(), cc.mask.data(), grad_scale, cc.N, cc.V);
  std::vector<float> fused = logits, fused_losses(cc.N, -1.0f);
  cross_entropy_fused(fused_losses.data(), fused.data(), cc.targets.data(), cc.mask.data(), 0.0f, cc.N, cc.V);
  EXPECT_EQ(fused_losses, losses);
  EXPECT_EQ(fused, logits);
  cross_entropy_fused(fused_losses.data(), fused.data(), cc.targets.data(), cc.mask.data(), grad_scale, cc.N, cc.V);
  EXPECT_EQ(fused_losses, losses);
  EXPECT_EQ(fused, dlogits);
}

TEST(CrossEntropy, BackwardAccumulates) {
  CrossEntropyCase cc;
  std::vector<float> logits = random_vector(cc.N * cc.V, 37);
  expect_accumulates(cc.N * cc.V, [&](std::vector<float>& dlogits) {
    cross_entropy_backward(dlogits.data(), logits.data(), cc.targets.data(), cc.mask.data(), 0.5f, cc.N, cc.V);
  }, "cross-entropy dlogits");
}

// ---- optimizer ---------------------------------------------------------------------------------------------

TEST(AdamW, MatchesScalarReferenceOverThreeSteps) {
  const int64_t n = 1000;
  const float lr = 3e-3f, beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f, weight_decay = 0.1f;
  std::vector<float> param = random_vector(n, 38), m(n, 0.0f), v(n, 0.0f);
  std::vector<double> ref_param(param.begin(), param.end()), ref_m(n, 0.0), ref_v(n, 0.0);
  for (int64_t step = 1; step <= 3; ++step) {
    std::vector<float> grad = random_vector(n, 100 + step);
    adamw_update(param.data(), grad.data(), m.data(), v.data(), n, lr, beta1, beta2, eps, weight_decay, step);
    for (int64_t i = 0; i < n; ++i) {
      ref_m[i] = beta1 * ref_m[i] + (1.0 - beta1) * grad[i];
      ref_v[i] = beta2 * ref_v[i] + (1.0 - beta2) * grad[i] * grad[i];
      const double m_hat = ref_m[i] / (1.0 - std::pow(double(beta1), step));
      const double v_hat = ref_v[i] / (1.0 - std::pow(double(beta2), step));
      ref_param[i] -= lr * (m_hat / (std::sqrt(v_hat) + eps) + weight_decay * ref_param[i]);
    }
  }
  // fp32 vs double on O(1) values through 3 steps: differences ~1e-7 relative.
  EXPECT_LT(rel_l2(param.data(), ref_param.data(), n), 1e-6);
  EXPECT_LT(rel_l2(m.data(), ref_m.data(), n), 1e-6);
  EXPECT_LT(rel_l2(v.data(), ref_v.data(), n), 1e-6);
  // The step moved every parameter (first step of Adam moves each by about lr).
  std::vector<float> initial = random_vector(n, 38);
  for (int64_t i = 0; i < n; ++i) EXPECT_NE(param[i], initial[i]);
}

// Clipping folded into the update: bitwise the update on gradients scaled beforehand.
TEST(AdamW, GradScaleEqualsScalingTheGradientsFirst) {
  const int64_t n = 1000;
  const float scale = 0.37f;
  std::vector<float> p1 = random_vector(n, 40), m1(n, 0.0f), v1(n, 0.0f), p2 = p1, m2 = m1, v2 = v1;
  for (int64_t step = 1; step <= 2; ++step) {
    std::vector<float> grad = random_vector(n, 200 + step), scaled = grad;
    for (float& g : scaled) g *= scale;
    adamw_update(p1.data(), scaled.data(), m1.data(), v1.data(), n, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, step);
    adamw_update(p2.data(), grad.data(), m2.data(), v2.data(), n, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, step, scale);
  }
  EXPECT_EQ(p1, p2);
  EXPECT_EQ(m1, m2);
  EXPECT_EQ(v1, v2);
}

TEST(SumOfSquares, MatchesDirectSumAndGradientChecks) {
  const int64_t n = 100003;  // several blocks, last one partial
  std::vector<float> g = random_vector(n, 39);
  double expected = 0.0;
  for (float x : g) expected += double(x) * x;
  EXPECT_NEAR(sum_of_squares(g.data(), n), expected, 1e-12 * expected);
  double one_thread = 0.0, three_threads = 0.0;
  with_threads(1, [&] { one_thread = sum_of_squares(g.data(), n); });
  with_threads(3, [&] { three_threads = sum_of_squares(g.data(), n); });
  EXPECT_EQ(one_thread, three_threads);
  EXPECT_EQ(sum_of_squares(g.data(), 0), 0.0);

  std::vector<float> small = random_vector(37, 40);
  std::vector<float> grad(small.size());
  for (size_t i = 0; i < small.size(); ++i) grad[i] = 2.0f * small[i];  // d/dx sum x^2 = 2x
  expect_gradient_ok(small, grad, [&] { return sum_of_squares(small.data(), small.size()); }, "sum_of_squares");
}

// ---- elementwise -------------------------------------------------------------------------------------------

TEST(Elementwise, AddScaleAndCopyRows) {
  const int64_t n = 70001;  // above the parallel threshold
  std::vector<float> a = random_vector(n, 41), b = random_vector(n, 42), expected(n);
  for (int64_t i = 0; i < n; ++i) expected[i] = (a[i] + b[i]) * 0.25f;
  add_inplace(a.data(), b.data(), n);
  scale_inplace(a.data(), n, 0.25f);
  EXPECT_EQ(a, expected);

  // copy_rows: (3, 4) out of a (3, 7) buffer into a (3, 5) buffer; the rest of dst untouched.
  std::vector<float> src = random_vector(3 * 7, 43), dst(3 * 5, -1.0f);
  copy_rows(dst.data(), 5, src.data() + 2, 7, 3, 4);
  for (int r = 0; r < 3; ++r) {
    for (int c = 0; c < 4; ++c) EXPECT_EQ(dst[r * 5 + c], src[r * 7 + 2 + c]);
    EXPECT_EQ(dst[r * 5 + 4], -1.0f);
  }
}

// ---- determinism of the scatter / reduction backwards ------------------------------------------------------

TEST(Determinism, EmbeddingAndRmsNormBackwardAcrossThreadCounts) {
  const int V = 50, C = 200;
  const int64_t N = 4096;
  std::vector<int32_t> tokens(N);
  for (int64_t t = 0; t < N; ++t) tokens[t] = static_cast<int32_t>((t * 7919) % V);
  std::vector<float> dout = random_vector(N * C, 44), inp = random_vector(N * C, 45), weight = random_vector(C, 46);
  std::vector<float> out(N * C), rstd(N);
  rmsnorm_forward(out.data(), rstd.data(), inp.data(), weight.data(), N, C, 1e-5f);
  auto run = [&](int n_threads, std::vector<float>& dwte, std::vector<float>& dinp, std::vector<float>& dweight) {
    dwte.assign(V * C, 0.0f);
    dinp.assign(N * C, 0.0f);
    dweight.assign(C, 0.0f);
    with_threads(n_threads, [&] {
      embedding_backward(dwte.data(), dout.data(), tokens.data(), N, C, V);
      rmsnorm_backward(dinp.data(), dweight.data(), dout.data(), inp.data(), weight.data(), rstd.data(), N, C);
    });
  };
  std::vector<float> dwte1, dinp1, dweight1, dwte3, dinp3, dweight3;
  run(1, dwte1, dinp1, dweight1);
  run(3, dwte3, dinp3, dweight3);
  EXPECT_EQ(dwte1, dwte3);
  EXPECT_EQ(dinp1, dinp3);
  EXPECT_EQ(dweight1, dweight3);
}

}  // namespace
}  // namespace moba::cpu
