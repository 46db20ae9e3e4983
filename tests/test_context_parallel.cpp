// Context parallelism under real `mpirun --oversubscribe` on CPU ranks: a sequence cut into zigzag chunks over
// 2, 4 and 8 ranks trains exactly like one rank (the loss, every gradient and the weights after a step from the same
// weights, at the start, mid-run and after a phase switch; the whole curve where the model has no MoBA layer) for
// MoBA, full and hybrid layers with GQA and MQA, on packed documents that cross chunk boundaries; data x context =
// 2 x 2; resuming with another context size; `moba eval --context`; and bad layouts.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>

#include "common/hdf5_io.h"
#include "tests/support/test_util.h"

namespace fs = std::filesystem;

namespace moba {
namespace {

using test::shell;
using Result = test::ShellResult;

std::string json_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\', out += c;
    else if (c == '\n') out += "\\n";
    else if (c == '\t') out += "\\t";
    else if (static_cast<unsigned char>(c) >= 0x20) out += c;
  }
  return out;
}

class ContextParallel : public ::testing::Test {
 protected:
  static std::string short_docs, long_docs;
  static void SetUpTestSuite() {
    // Short documents (real C++: this repository's CPU kernels, one paragraph per document, 20 - 1500 bytes), so
    // packed windows of 128 tokens hold several documents and their boundaries fall inside and across the zigzag
    // chunks of 64, 32 and 16 tokens.
    short_docs = test::scratch_dir("cp-short");
    {
      std::ofstream jsonl(short_docs + "/paragraphs.jsonl");
      for (const auto& e : fs::directory_iterator(test::source_path("kernels/cpu"))) {
        std::ifstream in(e.path());
        std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
        size_t start = 0;
        while (start < text.size()) {
          size_t end = text.find("\n\n", start);
          if (end == std::string::npos) end = text.size();
          if (end - start >= 20) jsonl << "{\"text\": \"" << json_escape(text.substr(start, end - start)) << "\"}\n";
          start = end + 2;
        }
      }
    }
    std::string out;
    ASSERT_EQ(test::run_moba("prep " + short_docs + "/paragraphs.jsonl --out " + short_docs + " --val-fraction 0.1", &out), 0)
        << out;
    if (!fs::exists(test::shared_data("linux-6.1-core.jsonl.xz"))) return;
    long_docs = test::scratch_dir("cp-long");
    ASSERT_EQ(test::run_moba("prep " + test::shared_data("linux-6.1-core.jsonl.xz") + " --out " + long_docs +
                                 " --max-bytes 4000000 --seed 5",
                             &out),
              0)
        << out;
  }

  // The tiny recipe (2 layers, 4 heads over 2 kv heads, MoBA B 16 k 3 in layer 0, full layer 1) for 12 steps.
  static std::string args(const std::string& data, const std::string& run_dir, const std::string& extra) {
    return "train " + test::source_path("recipes/tests/tiny.yaml") + " --set data.train=" + data +
           "/train.h5 --set data.val=" + data + "/val.h5 --set run_dir=" + run_dir +
           " --set train.tokens=1.2e4 --set train.micro_batch_seqs=2 --set checkpoint.every_tokens=4096 " + extra;
  }
  static Result train(int ranks, const std::string& data, const std::string& run_dir, const std::string& extra) {
    return shell(test::mpirun(ranks) + test::moba_binary() + " " + args(data, run_dir, extra));
  }
  static std::vector<float> read(const std::string& file, const std::string& dataset) {
    return h5::File::open_read(file).read<float>(dataset);
  }
  // Every step's loss equal to the reference run's up to the order of floating-point sums (measured ~1e-9).
  static void expect_same_curve(const std::string& run, const std::string& reference, const std::string& what) {
    std::map<int, double> want = test::training_losses(reference), got = test::training_losses(run);
    ASSERT_EQ(got.size(), want.size()) << what;
    for (const auto& [step, loss] : want) EXPECT_NEAR(got[step], loss, 1e-6 * loss) << what << ", step " << step;
  }
  static std::string checkpoint(const std::string& run, int step) {
    char name[32];
    std::snprintf(name, sizeof name, "step_%08d", step);
    return run + "/checkpoints/" + name;
  }
  static void expect_same_weights(const std::string& run, const std::string& reference, const std::string& what,
                                  int step = 12) {
    for (const char* tensor : {"wte", "layers.wqkv", "layers.wo", "layers.w_down", "lm_head"}) {
      const std::string name = std::string("params/") + tensor;
      std::vector<float> a = read(checkpoint(run, step) + "/model.h5", name);
      std::vector<float> b = read(checkpoint(reference, step) + "/model.h5", name);
      EXPECT_LT(test::rel_l2(a.data(), b.data(), a.size()), 1e-5) << what << ": " << tensor;
    }
  }
  // A run directory holding `reference`'s recipe, metrics and its checkpoint at `step` only (none for step 0).
  static std::string start_from(const std::string& reference, int step, const std::string& name) {
    const std::string dir = test::scratch_dir(name);
    fs::remove_all(dir);
    fs::copy(reference, dir, fs::copy_options::recursive);
    for (const auto& e : fs::directory_iterator(dir + "/checkpoints"))
      if (step == 0 || e.path() != fs::path(checkpoint(dir, step))) fs::remove_all(e.path());
    if (step == 0) fs::remove(dir + "/metrics.jsonl");
    return dir;
  }
  // One optimizer step from the reference's weights at `step` (its initial weights for step 0) on 1 and on each of
  // `contexts` ranks: the step's loss, every gradient (AdamW's first moment after one step is 0.1 x the clipped
  // gradient, so after several steps it still differs only by this step's gradient) and the new weights agree up
  // to the order of floating-point sums. MoBA's top-k routing is discontinuous, so two runs that differ by such
  // rounding (~1e-7) may route a query differently steps later and drift apart; from the same weights they may not.
  static void expect_same_step(const std::string& data, const std::string& reference, int step,
                               const std::vector<int>& contexts, const std::string& settings, const std::string& what) {
    const std::string one = start_from(reference, step, "cp-step-one");
    Result r = train(1, data, one, settings + " --max-steps 1");
    ASSERT_EQ(r.rc, 0) << what << "\n" << r.out;
    const std::map<int, double> want = test::training_losses(one);
    const std::vector<float> want_m = read(checkpoint(one, step + 1) + "/shard_00000.h5", "m");
    for (int C : contexts) {
      const std::string at = cat(what, ", context ", C, ", step ", step + 1, " from step ", step);
      const std::string many = start_from(reference, step, cat("cp-step-", C));
      r = train(C, data, many, settings + cat(" --set parallel.context=", C, " --max-steps 1"));
      ASSERT_EQ(r.rc, 0) << at << "\n" << r.out;
      EXPECT_NE(r.out.find(cat("ranks: ", C, " = 1 data x ", C, " context")), std::string::npos) << r.out;
      const std::map<int, double> got = test::training_losses(many);
      ASSERT_TRUE(got.count(step + 1) && want.count(step + 1)) << at;
      EXPECT_NEAR(got.at(step + 1), want.at(step + 1), 1e-6 * want.at(step + 1)) << at;
      const std::vector<float> got_m = read(checkpoint(many, step + 1) + "/shard_00000.h5", "m");
      ASSERT_EQ(got_m.size(), want_m.size()) << at;
      EXPECT_LT(test::rel_l2(got_m.data(), want_m.data(), got_m.size()), 1e-6) << at;
      expect_same_weights(many, one, at, step + 1);
    }
  }
};
std::string ContextParallel::short_docs, ContextParallel::long_docs;

TEST_F(ContextParallel, TwoAndFourRanksEqualOneForMobaFullAndHybridLayers) {
  struct Case {
    const char* name;
    std::string settings;
    std::vector<int> contexts;
    bool moba = true;  // the model has MoBA layers (at some step)
  };
  const std::vector<Case> cases = {
      {"hybrid MoBA + full, GQA", "", {2, 4}},
      {"full attention, GQA", "--set attention.mode=full", {2, 4}, false},
      {"MoBA every layer, MQA", "--set attention.full_layers=none --set model.n_kv_heads=1", {2, 4}},
      {"hybrid, recompute full", "--set train.recompute=full", {2}},
      {"pack: concat (attention across documents)", "--set data.pack=concat", {2}},
      {"phases: MoBA then full", "--set 'phases=[{until: 0.5, attention: {mode: moba, full_layers: none}}, "
                                 "{until: 1.0, attention: {mode: full}}]'", {4}},
      // 8 ranks: chunks of 16 tokens (one MoBA block) need sequences of 2 x 8 x 16.
      {"hybrid, sequences of 256", "--set data.seq_len=256 --set train.global_batch_tokens=1024", {8}},
      {"full attention, sequences of 256",
       "--set attention.mode=full --set data.seq_len=256 --set train.global_batch_tokens=1024", {8}, false}};
  for (const Case& c : cases) {
    // Checkpoints at steps 4, 8 and 12 (4096 tokens each), all kept; the phases case switches to full at step 6.
    const std::string reference = test::scratch_dir("cp-ref");
    Result r = train(1, short_docs, reference, c.settings + " --set checkpoint.keep=3");
    ASSERT_EQ(r.rc, 0) << r.out;
    if (c.moba) {
      for (int step : {0, 4, 8}) expect_same_step(short_docs, reference, step, c.contexts, c.settings, c.name);
      continue;
    }
    for (int C : c.contexts) {  // no routing decision: the whole run stays within rounding of one rank's
      const std::string what = cat(c.name, ", context ", C);
      const std::string run = test::scratch_dir(cat("cp", C));
      r = train(C, short_docs, run, c.settings + cat(" --set parallel.context=", C));
      ASSERT_EQ(r.rc, 0) << what << "\n" << r.out;
      EXPECT_NE(r.out.find(cat("ranks: ", C, " = 1 data x ", C, " context")), std::string::npos) << r.out;
      expect_same_curve(run, reference, what);
      expect_same_weights(run, reference, what);
    }
  }
}

TEST_F(ContextParallel, FirstStepGradientsEqualOneRank) {
  // After one step AdamW's first moment is 0.1 x the (clipped) gradient: every parameter's gradient, compared.
  const std::string reference = test::scratch_dir("cp-grad-ref");
  Result r = train(1, short_docs, reference, "--max-steps 1");
  ASSERT_EQ(r.rc, 0) << r.out;
  const std::vector<float> want = read(reference + "/checkpoints/step_00000001/shard_00000.h5", "m");
  for (int C : {2, 4}) {
    const std::string run = test::scratch_dir(cat("cp-grad", C));
    r = train(C, short_docs, run, cat("--max-steps 1 --set parallel.context=", C));
    ASSERT_EQ(r.rc, 0) << r.out;
    const std::vector<float> got = read(run + "/checkpoints/step_00000001/shard_00000.h5", "m");
    ASSERT_EQ(got.size(), want.size());
    EXPECT_LT(test::rel_l2(got.data(), want.data(), got.size()), 1e-6) << "context " << C;
    // The memory plan (what `moba plan --ranks` prints) is what the rank really allocates, gathered keys included.
    std::smatch m;
    ASSERT_TRUE(std::regex_search(r.out, m, std::regex(R"(memory: ([0-9.]+) MiB allocated .* \(the plan: ([0-9.]+) MiB\))")))
        << r.out;
    EXPECT_NEAR(std::stod(m[1]), std::stod(m[2]), 0.05 * std::stod(m[2])) << r.out;
  }
}

TEST_F(ContextParallel, DataTimesContextAndResumingWithAnotherContextSize) {
  MOBA_REQUIRE_SHARED(test::shared_data("linux-6.1-core.jsonl.xz"));
  const std::string reference = test::scratch_dir("cp-long-ref");
  Result r = train(1, long_docs, reference, "");
  ASSERT_EQ(r.rc, 0) << r.out;
  const std::string grid = test::scratch_dir("cp-2x2");
  r = train(4, long_docs, grid, "--set parallel.context=2");
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("ranks: 4 = 2 data x 2 context"), std::string::npos) << r.out;
  expect_same_curve(grid, reference, "data 2 x context 2");
  expect_same_weights(grid, reference, "data 2 x context 2");
  // Checkpoints do not depend on the context size: 4 steps on 2 ranks, 4 on 4, the rest on 1.
  const std::string run = test::scratch_dir("cp-resume");
  ASSERT_EQ(train(2, long_docs, run, "--set parallel.context=2 --max-steps 4").rc, 0);
  r = train(4, long_docs, run, "--set parallel.context=4 --max-steps 4");
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("resumed from " + run + "/checkpoints/step_00000004 at step 4"), std::string::npos) << r.out;
  r = train(1, long_docs, run, "");
  ASSERT_EQ(r.rc, 0) << r.out;
  expect_same_curve(run, reference, "context 2 -> 4 -> 1");
}

TEST_F(ContextParallel, EvalWithContextEqualsEvalWithout) {
  MOBA_REQUIRE_SHARED(test::shared_data("linux-6.1-core.jsonl.xz"));
  const std::string run = test::scratch_dir("cp-eval");
  ASSERT_EQ(train(1, long_docs, run, "").rc, 0);
  // Position-wise loss of 4 documents at 256 tokens (twice the trained length is fine for equality), MoBA layers.
  auto eval = [&](int ranks, const std::string& extra) {
    const std::string out_dir = test::scratch_dir(cat("cp-eval-out-", ranks));
    Result r = shell(test::mpirun(ranks) + test::moba_binary() +
                     " eval --checkpoint " + run + " --data " + long_docs + "/train.h5 --seq-len 256 --bucket 64 " +
                     "--trailing 64 --max-docs 4 --out " + out_dir + " " + extra);
    EXPECT_EQ(r.rc, 0) << r.out;
    std::string json;
    for (const auto& e : fs::directory_iterator(out_dir))
      if (e.path().extension() == ".json") {
        std::ifstream in(e.path());
        json.assign((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      }
    return json;
  };
  auto field = [](const std::string& json, const std::string& key) {
    std::smatch m;
    return std::regex_search(json, m, std::regex("\"" + key + "\": ([^,}]+|\\[[^\\]]*\\])")) ? std::string(m[1])
                                                                                           : std::string("missing");
  };
  const std::string plain = eval(1, "");
  const double mean = std::stod(field(plain, "mean_loss")), trailing = std::stod(field(plain, "trailing_loss"));
  for (int C : {2, 4, 8}) {  // 8: chunks of 16 tokens, one MoBA block each
    const std::string got = eval(C, cat("--context ", C));
    for (const std::string& key : {"tokens", "full_length_sequences", "sequences"})
      EXPECT_EQ(field(got, key), field(plain, key)) << key << ", context " << C;
    EXPECT_NEAR(std::stod(field(got, "mean_loss")), mean, 1e-5 * mean) << "context " << C;
    EXPECT_NEAR(std::stod(field(got, "trailing_loss")), trailing, 1e-5 * trailing) << "context " << C;
  }
}

TEST_F(ContextParallel, PlanCountsTheTrafficOfTheLayout) {
  // 4 ranks = 2 data x 2 context; each rank holds 2 x 128 / 2 = 128 rows of K and V (2 kv heads of 16, f32 on the
  // CPU) and receives the other rank's: 128 x 32 x 2 (K, V) x 4 bytes per layer; dK/dV the same in f32.
  Result r = shell(test::moba_binary() + " plan " + test::source_path("recipes/tests/tiny.yaml") +
                   " --ranks 4 --set parallel.context=2 --set model.vocab_size=258 --set train.micro_batch_seqs=2");
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("\"data_ranks\": 2, \"context_ranks\": 2, \"rank_tokens\": 128"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("\"kv_gather_bytes_per_layer\": 32768, \"kv_grad_bytes_per_layer\": 32768"), std::string::npos)
      << r.out;
  EXPECT_NE(r.out.find("memory per rank:"), std::string::npos) << r.out;
  r = shell(test::moba_binary() + " plan " + test::source_path("recipes/tests/tiny.yaml") +
            " --ranks 6 --set parallel.context=4 --set model.vocab_size=258");
  EXPECT_NE(r.rc, 0);
  EXPECT_NE(r.out.find("parallel.context = 4 does not divide the world size 6"), std::string::npos) << r.out;
}

TEST_F(ContextParallel, ImpossibleLayoutsNameTheKey) {
  const std::string run = test::scratch_dir("cp-bad");
  Result r = train(2, short_docs, run, "--set parallel.context=2 --set data.seq_len=96 --set train.global_batch_tokens=1152");
  EXPECT_NE(r.rc, 0);
  EXPECT_NE(r.out.find("data.seq_len = 96 is not a multiple of 2 x parallel.context x attention.moba.block_size = "
                       "2 x 2 x 16 = 64"),
            std::string::npos)
      << r.out;
  r = train(4, short_docs, run, "--set parallel.context=4 --set attention.mode=full --set data.seq_len=68 --set train.global_batch_tokens=1088");
  EXPECT_NE(r.rc, 0);
  EXPECT_NE(r.out.find("data.seq_len = 68 is not a multiple of 2 x parallel.context = 8"), std::string::npos) << r.out;
}

}  // namespace
}  // namespace moba
