// The whole decoder on the CUDA backend (bf16 activations, f32 master weights and gradients) against the
// CPU reference (f32) on the same weights and batch: loss and every weight gradient; then training through
// the binary: the GPU loss curve follows the CPU's, and checkpoints move between backends both ways; and deterministic
// GPU training (train.deterministic) is bitwise reproducible.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <regex>

#include "kernels/backend.h"
#include "model/transformer.h"
#include "trainer/train_step.h"
#include "tests/support/test_util.h"

namespace fs = std::filesystem;

namespace moba {
namespace {

struct ModelRun {
  double loss = 0;
  std::vector<float> grads;
};

ModelRun run_model(Backend& be, const model::ModelConfig& c, const std::vector<float>& params, const model::TokenBatch& b,
                   const std::vector<AttentionParams>& attention, double count,
                   const model::TransformerOptions& options = {3, model::Recompute::none, 0},
                   bool head_backward_in_forward = false) {
  model::Transformer m(be, c, b.num_tokens, options);
  m.set_weights_from_host(params);
  m.zero_grads();
  ModelRun r;
  r.loss = m.forward(b, attention, head_backward_in_forward ? static_cast<float>(1.0 / count) : 0.0f) / count;
  m.backward(static_cast<float>(1.0 / count));
  r.grads.resize(static_cast<size_t>(m.layout().total()));
  be.download(r.grads.data(), m.grads());
  return r;
}

class ModelGpu : public ::testing::TestWithParam<AttentionMode> {};

TEST_P(ModelGpu, LossAndGradientsMatchTheCpuReference) {
  MOBA_REQUIRE_GPU();
  model::ModelConfig c;
  c.vocab_size = 50;
  c.d_model = 64;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 16;
  c.ffn_hidden = 96;
  const int64_t N = 160;
  std::vector<int32_t> cu{0, 100, 160}, inputs(N), targets(N), positions(N);
  std::vector<uint8_t> mask(N, 1);
  std::mt19937 rng(9);
  for (int64_t t = 0; t < N; ++t) {
    inputs[t] = static_cast<int32_t>(rng() % 50);
    targets[t] = static_cast<int32_t>((inputs[t] * 7 + 3) % 50);
    positions[t] = static_cast<int32_t>(t < 100 ? t : t - 100);
  }
  mask[5] = 0;
  model::TokenBatch b{inputs.data(), targets.data(), mask.data(), positions.data(), cu.data(), N, 2};
  std::vector<AttentionParams> attention(2, AttentionParams{GetParam(), 16, 3, 0.25f});
  attention[1].mode = AttentionMode::full;

  auto cpu = make_cpu_backend();
  auto gpu = make_backend("cuda");
  model::Transformer shape_only(*cpu, c, 1, 0);
  std::vector<float> params;
  model::initialize_parameters(shape_only.layout(), c, 0.1f, 4, params);
  test::round_to_bf16(params);  // both backends start from weights that bf16 represents exactly
  ModelRun ref = run_model(*cpu, c, params, b, attention, N - 1);
  ModelRun got = run_model(*gpu, c, params, b, attention, N - 1);
  EXPECT_NEAR(got.loss, ref.loss, 1e-2 * ref.loss);
  const model::ParameterLayout& layout = shape_only.layout();
  for (const model::ParamTensor& t : layout.tensors()) {
    const std::vector<float> g = layout.read_tensor(got.grads, t), want = layout.read_tensor(ref.grads, t);
    double err = test::rel_l2(g.data(), want.data(), g.size());
    // bf16 activations through two layers: measured errors are reported by the failure message.
    EXPECT_LT(err, 5e-2) << t.name;
  }
  // The trainer's path on the GPU: LM head in chunks of 48 rows with its backward in forward. Other GEMM shapes
  // round the bf16 logits differently (measured 2.0e-3 on an H200: bf16 noise, within the CPU tolerance).
  ModelRun chunked = run_model(*gpu, c, params, b, attention, N - 1, {3, model::Recompute::none, 48}, true);
  EXPECT_NEAR(chunked.loss, got.loss, 1e-4 * got.loss);
  const double chunk_err = test::rel_l2(chunked.grads.data(), got.grads.data(), got.grads.size());
  std::printf("[ rel-L2   ] chunked head: gradients vs one-chunk GPU run %.2e\n", chunk_err);
  EXPECT_LT(chunk_err, 1e-2);
  // Recomputation rebuilds the forward's activations bitwise: only float atomics in the backward (RMSNorm weight
  // gradients, attention dQ) can separate these runs from the chunked one.
  for (model::Recompute rc : {model::Recompute::attention, model::Recompute::full}) {
    ModelRun alt = run_model(*gpu, c, params, b, attention, N - 1, {3, rc, 48}, true);
    EXPECT_EQ(alt.loss, chunked.loss) << model::recompute_name(rc);
    const double err = test::rel_l2(alt.grads.data(), chunked.grads.data(), got.grads.size());
    std::printf("[ rel-L2   ] recompute %-10s gradients vs recompute none %.2e\n", model::recompute_name(rc), err);
    EXPECT_LT(err, 1e-5) << model::recompute_name(rc);
  }
}

INSTANTIATE_TEST_SUITE_P(Attention, ModelGpu, ::testing::Values(AttentionMode::full, AttentionMode::moba),
                         [](const auto& info) { return std::string(attention_mode_name(info.param)); });

// train.deterministic on the GPU (BackendSettings and AttentionParams): a GQA model of two MoBA layers (past blocks
// chosen: 64-token blocks, top_k 3) and a full layer, trained 4 optimizer steps twice from the same weights on the
// same batches, gives bitwise-identical losses and master weights. A 12-token vocabulary repeats every id many times
// (the embedding backward's runs span its 128-position pieces).
TEST(ModelGpuDeterministic, TrainingIsBitwiseReproducible) {
  MOBA_REQUIRE_GPU();
  model::ModelConfig c;
  c.vocab_size = 12;
  c.d_model = 128;
  c.n_layers = 3;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 32;
  c.ffn_hidden = 256;
  const int64_t N = 1000;
  const int kSteps = 4;
  std::vector<int32_t> cu{0, 600, 1000};
  std::vector<std::vector<int32_t>> inputs(kSteps, std::vector<int32_t>(N)), targets = inputs;
  std::vector<int32_t> positions(N);
  std::vector<uint8_t> mask(N, 1);
  std::mt19937 rng(17);
  for (int s = 0; s < kSteps; ++s)
    for (int64_t t = 0; t < N; ++t) {
      inputs[s][t] = static_cast<int32_t>(rng() % 12);
      targets[s][t] = static_cast<int32_t>((inputs[s][t] * 5 + 1) % 12);
    }
  for (int64_t t = 0; t < N; ++t) positions[t] = static_cast<int32_t>(t < 600 ? t : t - 600);
  std::vector<AttentionParams> attention(3, AttentionParams{AttentionMode::moba, 64, 3, 1.0f / std::sqrt(32.0f)});
  attention[2].mode = AttentionMode::full;
  for (AttentionParams& p : attention) p.deterministic = true;

  auto cpu = make_cpu_backend();
  model::Transformer shape_only(*cpu, c, 1, 0);
  std::vector<float> params;
  model::initialize_parameters(shape_only.layout(), c, 0.1f, 5, params);
  struct Run {
    std::vector<double> losses;
    std::vector<float> master;
  };
  auto train = [&] {
    auto gpu = make_cuda_backend(0, {OpProfile::off, true});
    model::Transformer m(*gpu, c, N, model::TransformerOptions{3, model::Recompute::none, 0, 1, 64});
    AdamW optimizer(*gpu, m, OptimizerSettings{});
    optimizer.set_master_from_host(params);
    Run r;
    for (int s = 0; s < kSteps; ++s) {
      const model::TokenBatch b{inputs[s].data(), targets[s].data(), mask.data(), positions.data(), cu.data(), N, 2};
      r.losses.push_back(train_step(m, optimizer, nullptr, {b}, attention, 1e-2, 1.0, s).loss);
    }
    r.master = optimizer.state_to_host(AdamW::State::master);
    return r;
  };
  const Run first = train(), second = train();
  for (int s = 0; s < kSteps; ++s) std::printf("step %d loss %.9f / %.9f\n", s, first.losses[s], second.losses[s]);
  EXPECT_EQ(first.losses, second.losses);
  EXPECT_NE(first.losses.front(), first.losses.back()) << "the weights did not move";
  ASSERT_EQ(first.master.size(), second.master.size());
  EXPECT_EQ(std::memcmp(first.master.data(), second.master.data(), first.master.size() * sizeof(float)), 0)
      << "master weights differ after " << kSteps << " deterministic steps";
}

// ---- training through the binary -------------------------------------------------------------------------

std::vector<double> losses(const std::string& run_dir) {
  std::vector<double> out;
  std::ifstream in(run_dir + "/metrics.jsonl");
  std::regex re(R"re("loss": ([-0-9.e]+))re");
  for (std::string line; std::getline(in, line);) {
    std::smatch m;
    if (std::regex_search(line, m, re)) out.push_back(std::stod(m[1]));
  }
  return out;
}

class TrainGpu : public ::testing::Test {
 protected:
  static std::string data_dir, skip_reason;
  // The Linux slice: prepared here from ../shared/data, or (on a GPU machine whose moba has no liblzma, or without
  // ../shared) taken from $MOBA_PREPARED_DATA, a directory holding train.h5/val.h5 that `moba prep` made from the
  // corpus (scripts/gpu/linux_slice.sh).
  static void SetUpTestSuite() {
    if (const char* prepared = std::getenv("MOBA_PREPARED_DATA"); prepared && fs::exists(std::string(prepared) + "/train.h5")) {
      data_dir = prepared;
      return;
    }
    skip_reason = "no Linux slice: ../shared/data is absent and MOBA_PREPARED_DATA is unset";
    if (!test::gpu_available() || !fs::exists(test::shared_data("linux-6.1-core.jsonl.xz"))) return;
    const std::string dir = test::scratch_dir("gpu-train-data");
    std::string out;
    if (test::run_moba("prep " + test::shared_data("linux-6.1-core.jsonl.xz") + " --out " + dir +
                           " --max-bytes 8000000 --seed 3",
                       &out) == 0) {
      data_dir = dir;
    } else if (out.find("without liblzma") != std::string::npos) {
      skip_reason = "this moba cannot read .xz (built without liblzma): set MOBA_PREPARED_DATA to a prepared slice "
                    "(scripts/gpu/linux_slice.sh makes one)";
    } else {
      skip_reason.clear();
      ADD_FAILURE() << "moba prep of the Linux slice failed:\n" << out;
    }
  }
  void SetUp() override {
    MOBA_REQUIRE_GPU();
    if (data_dir.empty() && !skip_reason.empty()) GTEST_SKIP() << skip_reason;
    ASSERT_FALSE(data_dir.empty()) << "the Linux slice could not be prepared (see the failure above)";
  }
  static std::string tiny(const std::string& run_dir, const std::string& extra) {
    return "train " + test::source_path("recipes/tests/tiny.yaml") + " --set data.train=" + data_dir +
           "/train.h5 --set data.val=" + data_dir + "/val.h5 --set run_dir=" + run_dir + " " + extra;
  }
};
std::string TrainGpu::data_dir, TrainGpu::skip_reason;

TEST_F(TrainGpu, LossCurveFollowsTheCpuBackend) {
  std::string cpu_run = test::scratch_dir("curve-cpu"), gpu_run = test::scratch_dir("curve-gpu");
  std::string out;
  ASSERT_EQ(test::run_moba(tiny(cpu_run, "--set backend=cpu"), &out), 0) << out;
  ASSERT_EQ(test::run_moba(tiny(gpu_run, "--set backend=cuda"), &out), 0) << out;
  std::vector<double> a = losses(cpu_run), b = losses(gpu_run);
  ASSERT_EQ(a.size(), b.size());
  ASSERT_GE(a.size(), 40u);
  double max_diff = 0;
  for (size_t i = 0; i < a.size(); ++i) max_diff = std::max(max_diff, std::abs(a[i] - b[i]) / a[i]);
  std::printf("cpu vs gpu loss: first %.4f / %.4f, last %.4f / %.4f, max relative difference %.4f\n", a.front(),
              b.front(), a.back(), b.back(), max_diff);
  EXPECT_LT(std::abs(a.front() - b.front()) / a.front(), 1e-2);
  EXPECT_LT(std::abs(a.back() - b.back()) / a.back(), 3e-2);  // bf16 noise accumulated over 40 steps
}

TEST_F(TrainGpu, CheckpointsMoveBetweenBackends) {
  std::string gpu_first = test::scratch_dir("gpu-then-cpu"), cpu_first = test::scratch_dir("cpu-then-gpu");
  std::string out;
  ASSERT_EQ(test::run_moba(tiny(gpu_first, "--set backend=cuda --max-steps 20"), &out), 0) << out;
  ASSERT_EQ(test::run_moba(tiny(gpu_first, "--set backend=cpu"), &out), 0) << out;
  EXPECT_NE(out.find("resumed from"), std::string::npos) << out;
  ASSERT_EQ(test::run_moba(tiny(cpu_first, "--set backend=cpu --max-steps 20"), &out), 0) << out;
  ASSERT_EQ(test::run_moba(tiny(cpu_first, "--set backend=cuda"), &out), 0) << out;
  EXPECT_NE(out.find("resumed from"), std::string::npos) << out;
  std::vector<double> a = losses(gpu_first), b = losses(cpu_first);
  ASSERT_EQ(a.size(), 40u);
  ASSERT_EQ(b.size(), 40u);
  EXPECT_LT(std::abs(a.back() - b.back()) / a.back(), 3e-2);
}

}  // namespace
}  // namespace moba
