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
  m.set_params_from_host(params);
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
    m.set_params_from_host(params);
    return m.forward(batch, frozen) / count;
  };
  // Check a spread of entries inside every named tensor.
  for (const model::ParamTensor& t : m.layout().tensors()) {
    std::vector<float> sub(params.begin() + t.offset, params.begin() + t.offset + t.numel);
    std::vector<float> sub_grad(grad.begin() + t.offset, grad.begin() + t.offset + t.numel);
    auto sub_loss = [&]() {
      std::copy(sub.begin(), sub.end(), params.begin() + t.offset);
      return loss();
    };
    test::GradCheckResult r = test::check_gradient(sub, sub_grad, sub_loss, 12, 1e-2f, 1e-2);
    std::copy(sub.begin(), sub.end(), params.begin() + t.offset);
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

TEST(Model, FreshModelLossIsNearLogVocab) {
  model::ModelConfig c{97, 32, 2, 4, 2, 8, 64};
  auto backend = make_cpu_backend();
  const int64_t N = 64;
  model::Transformer m(*backend, c, N, 0);
  std::vector<float> params;
  model::initialize_parameters(m.layout(), c, 0.02f, 3, params);
  m.set_params_from_host(params);
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
