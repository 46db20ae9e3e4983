// Whole-model checks on the CPU backend: the hand-written backward of the full decoder against central
// finite differences (full attention, MoBA, GQA, MQA, tied embeddings), and the loss of a fresh model.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "kernels/backend.h"
#include "model/transformer.h"
#include "tests/support/test_util.h"

namespace moba {
namespace {

struct Case {
  const char* name;
  int heads, kv_heads;
  AttentionMode mode;
  bool tied;
};

class ModelGradient : public ::testing::TestWithParam<Case> {};

TEST_P(ModelGradient, MatchesFiniteDifferences) {
  const Case& tc = GetParam();
  model::ModelConfig c;
  c.vocab_size = 23;
  c.d_model = 16;
  c.n_layers = 2;
  c.n_heads = tc.heads;
  c.n_kv_heads = tc.kv_heads;
  c.head_dim = 8;
  c.ffn_hidden = 24;
  c.tie_embeddings = tc.tied;
  // Two packed segments (21 and 19 tokens): routing sees several complete blocks of 4.
  const int64_t N = 40;
  std::vector<int32_t> cu{0, 21, 40};
  std::vector<int32_t> inputs(N), targets(N), positions(N);
  std::vector<uint8_t> mask(N, 1);
  std::mt19937 rng(5);
  for (int64_t t = 0; t < N; ++t) {
    inputs[t] = static_cast<int32_t>(rng() % c.vocab_size);
    targets[t] = static_cast<int32_t>(rng() % c.vocab_size);
    positions[t] = static_cast<int32_t>(t < 21 ? t : t - 21);
  }
  mask[3] = mask[30] = 0;  // masked targets contribute nothing
  model::TokenBatch batch{inputs.data(), targets.data(), mask.data(), positions.data(), cu.data(), N, 2};

  auto backend = make_cpu_backend();
  model::Transformer m(*backend, c, N, 2);
  std::vector<float> params;
  // A larger init than training's makes gradients large against fp32 finite-difference noise.
  model::initialize_parameters(m.layout(), c, 0.3f, 11, params);
  m.set_weights_from_host(params);
  std::vector<AttentionParams> attention(2);
  for (auto& p : attention) p = AttentionParams{tc.mode, 4, 2, 1.0f / std::sqrt(8.0f)};
  attention[1].mode = tc.mode == AttentionMode::moba ? AttentionMode::full : tc.mode;  // hybrid when moba

  double count = 0;
  for (uint8_t x : mask) count += x;
  m.zero_grads();
  m.forward(batch, attention);
  m.backward(static_cast<float>(1.0 / count));
  std::vector<float> grad(static_cast<size_t>(m.layout().total()));
  backend->download(grad.data(), m.grads());

  // Routing is frozen at the unperturbed selection (no gradient flows through top-k; a perturbation that
  // flipped a selection would make the finite difference meaningless).
  std::vector<AttentionParams> frozen = attention;
  for (auto& p : frozen) p.reuse_routing = true;
  auto loss = [&]() {
    m.set_weights_from_host(params);
    return m.forward(batch, frozen) / count;
  };
  // Check a spread of entries inside every named tensor.
  const model::ParameterLayout& layout = m.layout();
  for (const model::ParamTensor& t : layout.tensors()) {
    std::vector<float> sub = layout.read_tensor(params, t), sub_grad = layout.read_tensor(grad, t);
    auto sub_loss = [&]() {
      layout.write_tensor(params, t, sub);
      return loss();
    };
    test::GradCheckResult r = test::check_gradient(sub, sub_grad, sub_loss, 12, 1e-2f, 1e-2);
    layout.write_tensor(params, t, sub);
    // fp32 forward, step 1e-2: errors measured ~1e-4..3e-3; a wrong term gives O(1).
    EXPECT_LT(r.max_rel_error, 2e-2) << tc.name << " " << t.name << ": " << r.worst;
  }
}

INSTANTIATE_TEST_SUITE_P(Attention, ModelGradient,
                         ::testing::Values(Case{"full_mha", 2, 2, AttentionMode::full, false},
                                           Case{"full_gqa_tied", 4, 2, AttentionMode::full, true},
                                           Case{"moba_mha", 2, 2, AttentionMode::moba, false},
                                           Case{"moba_gqa", 4, 2, AttentionMode::moba, false},
                                           Case{"moba_mqa", 4, 1, AttentionMode::moba, true}),
                         [](const auto& info) { return std::string(info.param.name); });

// A 3-layer hybrid model (MoBA, full, MoBA; GQA) on two packed segments, shared by the checks below.
struct SmallModel {
  model::ModelConfig c{37, 16, 3, 4, 2, 8, 24};
  static constexpr int64_t N = 45;
  std::vector<int32_t> cu{0, 26, 45}, inputs, targets, positions;
  std::vector<uint8_t> mask;
  std::vector<AttentionParams> attention;
  std::vector<float> params;
  SmallModel() : inputs(N), targets(N), positions(N), mask(N, 1), attention(3) {
    std::mt19937 rng(9);
    for (int64_t t = 0; t < N; ++t) {
      inputs[t] = static_cast<int32_t>(rng() % c.vocab_size);
      targets[t] = static_cast<int32_t>(rng() % c.vocab_size);
      positions[t] = static_cast<int32_t>(t < 26 ? t : t - 26);
    }
    mask[2] = mask[40] = 0;
    for (auto& p : attention) p = AttentionParams{AttentionMode::moba, 4, 3, 1.0f / std::sqrt(8.0f)};
    attention[1].mode = AttentionMode::full;
    model::ParameterLayout layout(c);
    model::initialize_parameters(layout, c, 0.2f, 4, params);
  }
  model::TokenBatch batch() { return {inputs.data(), targets.data(), mask.data(), positions.data(), cu.data(), N, 2}; }
  // Loss sum and gradients of one forward + backward under `options`; grad_scale_in_forward runs the LM head's
  // backward inside forward (the trainer's path).
  std::pair<double, std::vector<float>> run(Backend& be, const model::TransformerOptions& options,
                                            bool grad_scale_in_forward) {
    model::Transformer m(be, c, N, options);
    m.set_weights_from_host(params);
    m.zero_grads();
    const float scale = 1.0f / 43.0f;
    const double loss = m.forward(batch(), attention, grad_scale_in_forward ? scale : 0.0f);
    m.backward(scale);
    std::vector<float> grad(static_cast<size_t>(m.layout().total()));
    be.download(grad.data(), m.grads());
    return {loss, grad};
  }
};

// Recomputing activations in backward rebuilds bitwise what the forward had (routing frozen), so the gradients
// are bitwise those of keeping everything.
TEST(Model, RecomputeGivesBitwiseTheSameGradients) {
  SmallModel sm;
  auto be = make_cpu_backend();
  const auto [loss0, grad0] = sm.run(*be, {3, model::Recompute::none, 0}, true);
  for (model::Recompute r : {model::Recompute::attention, model::Recompute::full}) {
    const auto [loss, grad] = sm.run(*be, {3, r, 0}, true);
    EXPECT_EQ(loss, loss0) << model::recompute_name(r);
    ASSERT_EQ(grad.size(), grad0.size());
    size_t differing = 0;
    for (size_t i = 0; i < grad.size(); ++i) differing += grad[i] != grad0[i];
    EXPECT_EQ(differing, 0u) << model::recompute_name(r) << ": gradients differ from recompute none";
  }
}

// The chunked LM head (a few rows of logits at a time, loss and gradient in one op) and the head's backward run
// in forward give the loss and gradients of the one-chunk head run in backward, up to f32 summation order.
TEST(Model, ChunkedHeadMatchesTheWholeHead) {
  SmallModel sm;
  auto be = make_cpu_backend();
  const auto [loss0, grad0] = sm.run(*be, {3, model::Recompute::none, SmallModel::N}, false);
  for (int64_t rows : {int64_t{7}, int64_t{16}, SmallModel::N}) {
    for (bool in_forward : {false, true}) {
      const auto [loss, grad] = sm.run(*be, {3, model::Recompute::none, rows}, in_forward);
      EXPECT_EQ(loss, loss0) << rows << " rows per chunk";  // per-row losses are independent of chunking
      double num = 0, den = 0;
      for (size_t i = 0; i < grad.size(); ++i) {
        num += (grad[i] - grad0[i]) * (grad[i] - grad0[i]);
        den += grad0[i] * grad0[i];
      }
      EXPECT_LT(std::sqrt(num / den), 1e-6) << rows << " rows per chunk, head backward in forward: " << in_forward;
      EXPECT_GT(den, 0.0);
    }
  }
}

// The printed plan is what the constructor allocates (up to per-buffer padding), for every recompute setting.
TEST(Model, MemoryPlanMatchesTheAllocations) {
  SmallModel sm;
  for (model::Recompute r : {model::Recompute::none, model::Recompute::attention, model::Recompute::full}) {
    auto be = make_cpu_backend();
    const model::TransformerOptions options{3, r, 16};
    size_t planned = 0;
    for (const model::MemoryItem& m : model::Transformer::memory_plan(sm.c, SmallModel::N, options, *be))
      planned += m.bytes;
    model::Transformer m(*be, sm.c, SmallModel::N, options);
    const double allocated = static_cast<double>(be->allocated_bytes());
    EXPECT_NEAR(static_cast<double>(planned), allocated, 0.05 * allocated) << model::recompute_name(r);
  }
}

TEST(Model, MemoryPlanShrinksWithRecompute) {
  model::ModelConfig c{32000, 1792, 14, 14, 14, 128, 4864};
  const auto be = make_cpu_backend();  // f32 activations; only the plan is computed, nothing is allocated
  auto total = [&](model::Recompute r) {
    size_t sum = 0;
    for (const model::MemoryItem& m : model::Transformer::memory_plan(c, 8192, {0, r, 0}, *be)) sum += m.bytes;
    return sum;
  };
  const size_t none = total(model::Recompute::none), attention = total(model::Recompute::attention),
               full = total(model::Recompute::full);
  EXPECT_LT(attention, none);
  EXPECT_LT(full, attention);
  // Full recompute keeps the (N, C) residual per layer and one layer's activations: the other 13 layers' attention
  // and MLP activations (13 x 8192 x (7 x 1792 + 3 x 4864) x 4 bytes = 10.6 GiB in f32) are not allocated.
  EXPECT_GT(none - full, size_t{10} << 30);
}

TEST(Model, FreshModelLossIsNearLogVocab) {
  model::ModelConfig c{97, 32, 2, 4, 2, 8, 64};
  auto backend = make_cpu_backend();
  const int64_t N = 64;
  model::Transformer m(*backend, c, N, 0);
  std::vector<float> params;
  model::initialize_parameters(m.layout(), c, 0.02f, 3, params);
  m.set_weights_from_host(params);
  std::vector<int32_t> ids(N), pos(N), cu{0, static_cast<int32_t>(N)};
  std::vector<uint8_t> mask(N, 1);
  for (int64_t t = 0; t < N; ++t) ids[t] = static_cast<int32_t>((t * 7) % 97), pos[t] = static_cast<int32_t>(t);
  model::TokenBatch b{ids.data(), ids.data(), mask.data(), pos.data(), cu.data(), N, 1};
  std::vector<AttentionParams> att(2, AttentionParams{AttentionMode::full, 0, 0, 1.0f / std::sqrt(8.0f)});
  double loss = m.forward(b, att) / N;
  EXPECT_NEAR(loss, std::log(97.0), 0.05);
}

}  // namespace
}  // namespace moba
