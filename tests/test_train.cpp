// End-to-end tests of `moba prep` / `moba train` / `moba eval` through the real binary on a slice of the
// Linux corpus: a tiny model learns, kill-and-resume repeats the uninterrupted run bit for bit, mpirun works,
// and bad input (recipes, datasets, layouts, checkpoints) fails with a clear message.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <set>
#include <thread>

#include "common/hdf5_io.h"
#include "tests/support/test_util.h"

namespace fs = std::filesystem;

namespace moba {
namespace {

// Root-friendly OpenMPI environment for the mpirun tests (CI runs as root on 2 cores).
const char* kMpiEnv = "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1 ";

class Train : public ::testing::Test {
 protected:
  static std::string data_dir;
  static void SetUpTestSuite() {
    if (!fs::exists(test::shared_data("linux-6.1-core.jsonl.xz"))) return;
    data_dir = test::scratch_dir("train-data");
    std::string out;
    int rc = test::run_moba("prep " + test::shared_data("linux-6.1-core.jsonl.xz") + " --out " + data_dir +
                                " --max-bytes 8000000 --seed 3",
                            &out);
    ASSERT_EQ(rc, 0) << out;
  }
  void SetUp() override { MOBA_REQUIRE_SHARED(test::shared_data("linux-6.1-core.jsonl.xz")); }

  static std::string tiny(const std::string& run_dir, const std::string& extra = "") {
    return "train " + test::source_path("recipes/tests/tiny.yaml") + " --set data.train=" + data_dir +
           "/train.h5 --set data.val=" + data_dir + "/val.h5 --set run_dir=" + run_dir + " " + extra;
  }
};
std::string Train::data_dir;

// step -> the JSON line of that step in metrics.jsonl (training lines only).
std::map<int, std::string> training_lines(const std::string& run_dir) {
  std::map<int, std::string> lines;
  std::ifstream in(run_dir + "/metrics.jsonl");
  static const std::regex step_re(R"re("step": (\d+))re");
  for (std::string line; std::getline(in, line);) {
    std::smatch m;
    if (line.find("\"loss\"") == std::string::npos || !std::regex_search(line, m, step_re)) continue;
    int step = std::stoi(m[1]);
    EXPECT_EQ(lines.count(step), 0u) << "step " << step << " logged twice in " << run_dir;
    lines[step] = line;
  }
  return lines;
}

std::string field(const std::string& json_line, const std::string& key) {
  std::regex re("\"" + key + "\": ([^,}]+)");
  std::smatch m;
  return std::regex_search(json_line, m, re) ? std::string(m[1]) : "";
}

// Runs `moba ARGS` in the background and SIGKILLs it as soon as RUN_DIR/checkpoints/CHECKPOINT exists. True
// when the process died by the signal with the checkpoint in place (false: it finished first, or never wrote it).
bool killed_after_checkpoint(const std::string& args, const std::string& run_dir, const std::string& checkpoint) {
  pid_t pid = fork();
  if (pid == 0) {
    std::string cmd = test::moba_binary() + " " + args + " > " + run_dir + "/first.log 2>&1";
    execl("/bin/sh", "sh", "-c", ("exec " + cmd).c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  const fs::path target = fs::path(run_dir) / "checkpoints" / checkpoint;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (!fs::exists(target) && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  kill(pid, SIGKILL);
  int status = 0;
  waitpid(pid, &status, 0);
  return fs::exists(target) && WIFSIGNALED(status);
}

// The metrics.jsonl lines recording an attention change.
std::vector<std::string> attention_lines(const std::string& run_dir) {
  std::vector<std::string> lines;
  std::ifstream in(run_dir + "/metrics.jsonl");
  for (std::string line; std::getline(in, line);)
    if (line.find("\"attention\"") != std::string::npos) lines.push_back(line);
  return lines;
}

double last_value(const std::string& run_dir, const std::string& key) {
  std::ifstream in(run_dir + "/metrics.jsonl");
  double v = NAN;
  for (std::string line; std::getline(in, line);)
    if (!field(line, key).empty()) v = std::stod(field(line, key));
  return v;
}

TEST_F(Train, TinyModelLearnsWellBelowUnigramEntropy) {
  std::string run = test::scratch_dir("learn");
  std::string out;
  ASSERT_EQ(test::run_moba(tiny(run, "--set train.tokens=3e5 --set train.optimizer.lr=1e-2 --set eval.every_tokens=1e5"),
                           &out),
            0)
      << out;
  // Unigram entropy (nats per token) of the training slice: what a model that ignores context achieves.
  h5::File f = h5::File::open_read(data_dir + "/train.h5");
  std::vector<uint32_t> tokens = f.read<uint32_t>("tokens");
  std::vector<double> counts(258, 0.0);
  for (uint32_t t : tokens) counts[t] += 1;
  double entropy = 0;
  for (double c : counts)
    if (c > 0) entropy -= c / tokens.size() * std::log(c / tokens.size());
  double val = last_value(run, "val_loss");
  double first_loss = std::stod(field(training_lines(run).begin()->second, "loss"));
  EXPECT_NEAR(first_loss, std::log(258.0), 0.1);  // starts at chance
  // Measured: entropy 3.66 nats, val_loss 2.84 after 300K tokens (0.78 of it).
  EXPECT_LT(val, 0.8 * entropy) << "val_loss " << val << " vs unigram entropy " << entropy;
}

TEST_F(Train, KillAndResumeReproducesTheUninterruptedRunExactly) {
  const std::string settings = "--set train.tokens=1e5 --set checkpoint.every_tokens=2e4";
  std::string full = test::scratch_dir("resume-full"), killed = test::scratch_dir("resume-killed");
  std::string out;
  ASSERT_EQ(test::run_moba(tiny(full, settings), &out), 0) << out;

  // Start the same run, SIGKILL it as soon as its first checkpoint lands, then run the command again.
  ASSERT_TRUE(killed_after_checkpoint(tiny(killed, settings), killed, "step_00000020"))  // renamed once complete
      << "the run finished before it could be killed; the test proves nothing";
  ASSERT_FALSE(fs::exists(fs::path(killed) / "checkpoints" / "step_00000098"));

  ASSERT_EQ(test::run_moba(tiny(killed, settings), &out), 0) << out;
  EXPECT_NE(out.find("resumed from"), std::string::npos) << out;
  std::map<int, std::string> a = training_lines(full), b = training_lines(killed);
  ASSERT_EQ(a.size(), 98u);
  ASSERT_EQ(b.size(), a.size());
  for (const auto& [step, line] : a) {
    EXPECT_EQ(field(line, "loss"), field(b[step], "loss")) << "step " << step;
    EXPECT_EQ(field(line, "grad_norm"), field(b[step], "grad_norm")) << "step " << step;
  }
  // The final weights are identical too.
  h5::File fa = h5::File::open_read(full + "/checkpoints/step_00000098/model.h5");
  h5::File fb = h5::File::open_read(killed + "/checkpoints/step_00000098/model.h5");
  EXPECT_EQ(fa.read<float>("params/layers.wqkv"), fb.read<float>("params/layers.wqkv"));
  h5::File sa = h5::File::open_read(full + "/checkpoints/step_00000098/shard_00000.h5");
  h5::File sb = h5::File::open_read(killed + "/checkpoints/step_00000098/shard_00000.h5");
  EXPECT_EQ(sa.read<float>("v"), sb.read<float>("v"));
  // keep: 2 -> only the two newest checkpoints remain.
  int n = 0;
  for (const auto& e : fs::directory_iterator(fs::path(killed) / "checkpoints")) n += e.is_directory();
  EXPECT_EQ(n, 2);
}

TEST_F(Train, MaxStepsStopsAndTheNextCallFinishesTheSameRun) {
  std::string full = test::scratch_dir("maxsteps-full"), split = test::scratch_dir("maxsteps-split");
  std::string out;
  ASSERT_EQ(test::run_moba(tiny(full), &out), 0) << out;
  ASSERT_EQ(test::run_moba(tiny(split, "--max-steps 7"), &out), 0) << out;
  EXPECT_EQ(training_lines(split).size(), 7u);
  ASSERT_EQ(test::run_moba(tiny(split), &out), 0) << out;
  auto a = training_lines(full), b = training_lines(split);
  ASSERT_EQ(a.size(), b.size());
  for (const auto& [step, line] : a) EXPECT_EQ(field(line, "loss"), field(b[step], "loss")) << "step " << step;
  // Running a finished run again does nothing and succeeds.
  ASSERT_EQ(test::run_moba(tiny(split), &out), 0) << out;
  EXPECT_NE(out.find("already complete"), std::string::npos) << out;
}

TEST_F(Train, MpirunOneRankMatchesPlainRunAndTwoRanksAgree) {
  std::string plain = test::scratch_dir("mpi-plain"), one = test::scratch_dir("mpi-one"),
              two = test::scratch_dir("mpi-two");
  std::string out;
  ASSERT_EQ(test::run_moba(tiny(plain), &out), 0) << out;
  std::string mpirun = std::string(kMpiEnv) + "OMP_NUM_THREADS=1 mpirun -np ";
  int rc = std::system((mpirun + "1 " + test::moba_binary() + " " + tiny(one) + " > " + one + "/log 2>&1").c_str());
  ASSERT_EQ(rc, 0) << "mpirun -np 1 failed; see " << one << "/log";
  auto a = training_lines(plain), b = training_lines(one);
  ASSERT_EQ(a.size(), b.size());
  for (const auto& [step, line] : a) EXPECT_EQ(field(line, "loss"), field(b[step], "loss")) << "step " << step;

  // Two data-parallel ranks see the same global batches; only the order of the gradient sums differs. Full
  // attention here: with MoBA, a last-bit difference can flip a top-k choice after tens of steps (measured:
  // identical to 1e-8 for 34 steps, then 1e-3), which tests routing's discreteness, not data parallelism.
  std::string full_one = test::scratch_dir("mpi-full-one");
  ASSERT_EQ(test::run_moba(tiny(full_one, "--set attention.mode=full"), &out), 0) << out;
  rc = std::system((mpirun + "2 " + test::moba_binary() + " " + tiny(two, "--set attention.mode=full") + " > " + two +
                    "/log 2>&1").c_str());
  ASSERT_EQ(rc, 0) << "mpirun -np 2 failed; see " << two << "/log";
  auto c = training_lines(full_one), d = training_lines(two);
  ASSERT_EQ(c.size(), d.size());
  // Adam amplifies the reordering slowly (measured: 1e-8 over the first steps, 2.5e-5 by step 40).
  for (const auto& [step, line] : c)
    EXPECT_NEAR(std::stod(field(line, "loss")), std::stod(field(d[step], "loss")), step <= 10 ? 1e-6 : 1e-3)
        << "step " << step;
}

TEST_F(Train, EvalWritesPositionWiseAndTrailingLoss) {
  std::string run = test::scratch_dir("eval");
  std::string out;
  ASSERT_EQ(test::run_moba(tiny(run), &out), 0) << out;
  // Two checkpoints in one call: the run directory (its newest, step 40) and the step-30 checkpoint.
  ASSERT_EQ(test::run_moba("eval --checkpoint " + run + " --checkpoint " + run + "/checkpoints/step_00000030" +
                               " --data " + data_dir + "/val.h5 --seq-len 256 --bucket 64 --trailing 64 " +
                               "--attention full --out " + run + "/eval",
                           &out),
            0)
      << out;
  EXPECT_TRUE(fs::exists(run + "/eval/eval_tiny_step30_full_N256.json")) << out;
  std::ifstream json(run + "/eval/eval_tiny_step40_full_N256.json");
  ASSERT_TRUE(json.good()) << out;
  std::string text((std::istreambuf_iterator<char>(json)), std::istreambuf_iterator<char>());
  EXPECT_GT(std::stod(field(text, "full_length_sequences")), 0);
  std::smatch m;
  ASSERT_TRUE(std::regex_search(text, m, std::regex(R"re("position_loss": \[([^\]]*)\])re")));
  std::string buckets = m[1];
  EXPECT_EQ(std::count(buckets.begin(), buckets.end(), ','), 3);  // 4 buckets of 64
  // With --trailing equal to --bucket, the trailing loss is the last bucket.
  EXPECT_EQ(field(text, "trailing_loss"), buckets.substr(buckets.rfind(", ") + 2));
  EXPECT_TRUE(fs::exists(run + "/eval/eval_tiny_step40_full_N256.csv"));
  EXPECT_EQ(field(text, "name"), "\"tiny\"");
}

TEST_F(Train, HybridPhaseSwitchLandsOnTheSameTokenAcrossKillAndResume) {
  // 40 steps of 1024 tokens, MoBA until half of 4e4 tokens: the first step starting at or past 20000 tokens is
  // step 20 (20480 tokens). Whether the run is whole, killed mid-phase, or stopped right on the boundary, the
  // switch lands there, is logged once with its token count, and every loss is the same bit for bit.
  const std::string phases =
      "--set 'phases=[{until: 0.5, attention: {mode: moba, full_layers: none}}, {until: 1.0, attention: {mode: full}}]'";
  std::string whole = test::scratch_dir("phase-whole"), killed = test::scratch_dir("phase-killed"),
              boundary = test::scratch_dir("phase-boundary");
  std::string out;
  ASSERT_EQ(test::run_moba(tiny(whole, phases), &out), 0) << out;
  EXPECT_NE(out.find("attention from step 0: moba(B=16,k=3) [layers 0-1]"), std::string::npos) << out;
  EXPECT_NE(out.find("attention from step 20: full [layers 0-1]"), std::string::npos) << out;
  ASSERT_TRUE(killed_after_checkpoint(tiny(killed, phases), killed, "step_00000010"))
      << "the run finished before it could be killed; the test proves nothing";
  ASSERT_FALSE(fs::exists(fs::path(killed) / "checkpoints" / "step_00000020"));
  ASSERT_EQ(test::run_moba(tiny(killed, phases), &out), 0) << out;
  EXPECT_NE(out.find("resumed from " + killed + "/checkpoints/step_00000010"), std::string::npos) << out;
  ASSERT_EQ(test::run_moba(tiny(boundary, phases + " --max-steps 20"), &out), 0) << out;
  ASSERT_EQ(test::run_moba(tiny(boundary, phases), &out), 0) << out;
  EXPECT_NE(out.find("attention from step 20: full [layers 0-1]"), std::string::npos) << out;

  const std::string expected = "{\"step\": 20, \"tokens\": 20480, \"attention\": \"full [layers 0-1]\"}";
  for (const std::string& run : {whole, killed, boundary}) {
    EXPECT_EQ(attention_lines(run), std::vector<std::string>{expected}) << run;
    auto a = training_lines(whole), b = training_lines(run);
    ASSERT_EQ(b.size(), 40u) << run;
    for (const auto& [step, line] : a) EXPECT_EQ(field(line, "loss"), field(b[step], "loss")) << run << " step " << step;
  }
}

TEST_F(Train, PlanCountsParametersTokensAndFlops) {
  // tiny: d 64, 2 layers, 4 heads (2 kv) of 16, SwiGLU 160: per layer wqkv 64*128 + wo 64*64 + 3*64*160 + 2 norms.
  std::string out;
  std::string plan_path = test::scratch_dir("plan") + "/resolved.yaml";
  ASSERT_EQ(test::run_moba("plan " + test::source_path("recipes/tests/tiny.yaml") + " --set data.train=" + data_dir +
                               "/train.h5 --set attention.full_layers=none --set train.tokens=40000 --write " + plan_path,
                           &out),
            0)
      << out;
  const int64_t per_layer = 64 * 128 + 64 * 64 + 3 * 64 * 160 + 2 * 64;
  EXPECT_EQ(field(out, "non_embedding_parameters"), std::to_string(2 * per_layer + 64)) << out;
  EXPECT_EQ(field(out, "parameters"), std::to_string(2 * per_layer + 64 + 2 * 258 * 64)) << out;
  EXPECT_EQ(field(out, "steps"), "40") << out;
  EXPECT_EQ(field(out, "tokens"), "40960") << out;
  EXPECT_DOUBLE_EQ(std::stod(field(out, "dense_flops")), 6.0 * (2 * per_layer + 64) * 40960) << out;
  // seq 128, B 16, k 3: a query at t attends t%16 + 1 keys of its block plus 16 * min(2, t/16); full: (128+1)/2.
  double moba_keys = 0;
  for (int t = 0; t < 128; ++t) moba_keys += t % 16 + 1 + 16 * std::min(2, t / 16);
  const double per_pair = 12.0 * 4 * 16 * 2 * 40960;  // heads * head_dim, 2 layers, tokens
  EXPECT_NEAR(std::stod(field(out, "attention_flops")), per_pair * moba_keys / 128, 1e-6 * per_pair) << out;
  EXPECT_NEAR(std::stod(field(out, "attention_flops_full")), per_pair * 64.5, 1e-6 * per_pair) << out;
  // The written recipe is what `moba train` resolves: it plans to the same numbers.
  std::string again;
  ASSERT_EQ(test::run_moba("plan " + plan_path, &again), 0) << again;
  EXPECT_EQ(field(again, "attention_flops"), field(out, "attention_flops")) << again;
}

TEST_F(Train, InitFromTakesARunDirectory) {
  std::string base = test::scratch_dir("init-base"), tuned = test::scratch_dir("init-tuned");
  std::string out;
  ASSERT_EQ(test::run_moba(tiny(base), &out), 0) << out;
  ASSERT_EQ(test::run_moba(tiny(tuned, "--set init_from=" + base + " --set train.tokens=2048"), &out), 0) << out;
  EXPECT_NE(out.find("initialised weights from " + base + "/checkpoints/step_00000040"), std::string::npos) << out;
  int rc = test::run_moba(tiny(test::scratch_dir("init-missing"), "--set init_from=" + tuned + "/nothing"), &out);
  EXPECT_EQ(rc, 1) << out;
}

TEST_F(Train, BadInputFailsWithAClearMessage) {
  std::string run = test::scratch_dir("bad");
  std::string out;
  auto expect_error = [&](const std::string& args, const std::string& needle, int exit_code = 1) {
    int rc = test::run_moba(args, &out);
    EXPECT_EQ(rc, exit_code) << args << "\n" << out;
    EXPECT_NE(out.find(needle), std::string::npos) << "expected '" << needle << "' in:\n" << out;
  };
  expect_error(tiny(run, "--set train.optimizer.learning_rate=1"), "unknown key 'train.optimizer.learning_rate'");
  expect_error("train /nonexistent.yaml", "recipe not found");
  expect_error(tiny(run, "--set data.train=/nonexistent/train.h5"), "file not found: /nonexistent/train.h5");
  expect_error(tiny(run, "--set parallel.context=2"), "parallel.context = 2 does not divide the world size 1");
  expect_error(tiny(run, "--set parallel.data=3"), "parallel.data = 3");
  expect_error(tiny(run, "--set model.vocab_size=100"), "smaller than the dataset's vocabulary");
  expect_error(tiny(run, "--set backend=tpu"), "'tpu' is not allowed");
  expect_error("frobnicate", "unknown command 'frobnicate'", 2);  // usage errors exit 2
  expect_error("train", "missing argument recipe", 2);
  const std::string bench = "bench train --recipe " + test::source_path("recipes/tests/tiny.yaml") +
                            " --set model.vocab_size=64 --warmup 0 --steps 1 --profile-ops ";
  expect_error(bench + "all", "--profile-ops 'all' is not allowed", 2);
  expect_error(bench + "totals", "per-op profiling times CUDA events: backend 'cpu' has none");

  // A truncated dataset (first half of the bytes) is rejected, not read as garbage.
  std::string truncated = run + "/truncated.h5";
  {
    std::ifstream in(data_dir + "/train.h5", std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::ofstream(truncated, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size() / 2));
  }
  expect_error(tiny(run, "--set data.train=" + truncated), truncated);

  // Token ids beyond the vocabulary are caught when the dataset opens.
  std::string bad_ids = run + "/bad_ids.h5";
  {
    h5::File f = h5::File::create(bad_ids);
    std::vector<uint16_t> tokens(4096, 7);
    tokens[1234] = 300;
    f.write("tokens", tokens);
    f.write("doc_offsets", std::vector<uint64_t>{0, 4096});
    f.set_attr("/", "format_version", int64_t{1});
    f.set_attr("/", "vocab_size", int64_t{258});
    f.set_attr("/", "eos_id", int64_t{256});
    f.set_attr("/", "tokenizer", std::string("byte"));
    f.set_attr("/", "source", std::string("test"));
    f.set_attr("/", "split", std::string("train"));
  }
  expect_error(tiny(run, "--set data.train=" + bad_ids), "tokens[1234] = 300 is not below vocab_size 258");
}

TEST_F(Train, SftTrainsOnResponsesOnly) {
  // Prompt/response pairs where the response is a fixed function of the prompt: only responses count.
  std::string dir = test::scratch_dir("sft");
  {
    std::ofstream jsonl(dir + "/pairs.jsonl");
    for (int i = 0; i < 400; ++i) {
      std::string word = "item" + std::to_string(i % 37);
      jsonl << "{\"prompt\": \"Repeat twice: " << word << "\\n\", \"response\": \"" << word << " " << word
            << "\"}\n";
    }
  }
  std::string out;
  ASSERT_EQ(test::run_moba("prep " + dir + "/pairs.jsonl --sft --out " + dir + "/data --val-fraction 0.1", &out), 0)
      << out;
  const std::string recipe = "train " + test::source_path("recipes/tests/tiny.yaml") + " --set data.train=" + dir +
                             "/data/train.h5 --set data.val=" + dir + "/data/val.h5 --set data.sft=true" +
                             " --set data.seq_len=64 --set train.global_batch_tokens=512 --set run_dir=" + dir + "/run";
  ASSERT_EQ(test::run_moba(recipe + " --set train.tokens=6e4", &out), 0) << out;
  // Loss only over response tokens: a model that learns to copy the prompt's word gets far below chance.
  EXPECT_LT(last_value(dir + "/run", "val_loss"), 1.5) << out;
  // sft: true on a dataset without a loss mask is refused.
  int rc = test::run_moba(tiny(dir + "/run2", "--set data.sft=true"), &out);
  EXPECT_EQ(rc, 1);
  EXPECT_NE(out.find("has no loss_mask"), std::string::npos) << out;
}

TEST_F(Train, CorruptNewestCheckpointFallsBackToThePreviousOne) {
  std::string run = test::scratch_dir("corrupt-ckpt");
  std::string out;
  ASSERT_EQ(test::run_moba(tiny(run, "--max-steps 20"), &out), 0) << out;  // checkpoints at 10 and 20
  fs::path newest = fs::path(run) / "checkpoints" / "step_00000020" / "model.h5";
  ASSERT_TRUE(fs::exists(newest));
  fs::resize_file(newest, fs::file_size(newest) / 3);  // as if the disk filled mid-copy
  fs::create_directories(fs::path(run) / "checkpoints" / "step_00000030.tmp");  // a crash mid-write
  std::ofstream(fs::path(run) / "checkpoints" / "step_00000030.tmp" / "shard_00000.h5") << "partial";
  ASSERT_EQ(test::run_moba(tiny(run), &out), 0) << out;
  EXPECT_NE(out.find("skipping unreadable checkpoint"), std::string::npos) << out;
  EXPECT_NE(out.find("resumed from " + run + "/checkpoints/step_00000010"), std::string::npos) << out;
  EXPECT_EQ(training_lines(run).size(), 40u);
}

// A few flipped bytes inside a checkpoint's master weights are a checksum error: the run resumes from the
// checkpoint before it instead of training on from damaged weights.
TEST_F(Train, CheckpointWithFlippedWeightBytesIsNotResumedFrom) {
  std::string run = test::scratch_dir("flipped-ckpt");
  std::string out;
  ASSERT_EQ(test::run_moba(tiny(run, "--max-steps 20"), &out), 0) << out;
  const std::string newest = run + "/checkpoints/step_00000020", shard = newest + "/shard_00000.h5";
  auto [chunk, size] = test::first_chunk(shard, "master");
  for (size_t i = 0; i < 64; ++i) test::flip_byte(shard, chunk + size / 3 + i * 37 % size);
  ASSERT_EQ(test::run_moba(tiny(run), &out), 0) << out;
  EXPECT_NE(out.find("skipping unreadable checkpoint " + newest + ": " + shard +
                     ": cannot read dataset 'master': the file is corrupt, a checksum does not match"),
            std::string::npos)
      << out;
  EXPECT_NE(out.find("resumed from " + run + "/checkpoints/step_00000010"), std::string::npos) << out;
  EXPECT_TRUE(fs::exists(run + "/checkpoints/unreadable/step_00000020/shard_00000.h5"));
}

// Plans that cannot fit the machine stop before anything is allocated, with the settings to change (before,
// the CPU backend allocated until the OOM killer or the allocator gave up). The sizes are far beyond any
// machine, so even without the check the first allocation fails at once instead of swapping the machine out.
TEST_F(Train, MemoryPlansLargerThanTheMachineStopBeforeAllocating) {
  std::string run = test::scratch_dir("memory");
  std::string out;
  ASSERT_EQ(test::run_moba(tiny(run, "--set model.d_model=32768 --set model.n_heads=256 --set model.n_kv_heads=0 "
                                     "--set model.ffn_hidden=0 --set model.n_layers=64"),
                           &out),
            1)
      << out;
  EXPECT_NE(out.find("training (micro-batch of 512 tokens, recompute: none) needs "), std::string::npos) << out;
  EXPECT_NE(out.find("MiB but this machine has "), std::string::npos) << out;
  EXPECT_NE(out.find("lower train.micro_batch_seqs (4) or data.seq_len (128)"), std::string::npos) << out;
  EXPECT_FALSE(fs::exists(run + "/checkpoints"));

  ASSERT_EQ(test::run_moba(tiny(run, "--max-steps 1"), &out), 0) << out;
  ASSERT_EQ(test::run_moba("eval --checkpoint " + run + " --data " + data_dir + "/val.h5 --seq-len 256 "
                           "--batch-seqs 8000000",
                           &out),
            1)
      << out;
  EXPECT_NE(out.find("evaluation (8000000 x 256 tokens per forward pass) needs "), std::string::npos) << out;
  EXPECT_NE(out.find("lower --seq-len (256) or --batch-seqs (8000000)"), std::string::npos) << out;
}

// An evaluation length no document reaches is an error before any work (it used to run through the whole dataset
// and warn at the end that the position-wise losses were empty).
TEST_F(Train, EvalRefusesASequenceLengthNoDocumentReaches) {
  std::string dir = test::scratch_dir("eval-short");
  {
    std::ofstream jsonl(dir + "/short.jsonl");
    for (int i = 0; i < 300; ++i) jsonl << "{\"text\": \"document number " << i << " is short\"}\n";
  }
  std::string out;
  ASSERT_EQ(test::run_moba("prep " + dir + "/short.jsonl --out " + dir + "/data --val-fraction 0.3", &out), 0) << out;
  std::string run = test::scratch_dir("eval-short-run");
  ASSERT_EQ(test::run_moba(tiny(run, "--max-steps 1"), &out), 0) << out;
  ASSERT_EQ(test::run_moba("eval --checkpoint " + run + " --data " + dir + "/data/val.h5 --seq-len 512", &out), 1) << out;
  EXPECT_NE(out.find(dir + "/data/val.h5: no document reaches --seq-len 512 tokens (the longest gives 28)"),
            std::string::npos)
      << out;
  EXPECT_NE(out.find("use --seq-len 28 or less"), std::string::npos) << out;
  EXPECT_EQ(out.find("evaluating"), std::string::npos) << out;
}

// Makes `path` a checkpoint this moba cannot read: a copy of a good one claiming format_version 99.
void write_future_checkpoint(const std::string& good, const std::string& path) {
  fs::copy(good, path, fs::copy_options::recursive);
  h5::File::open_write(path + "/model.h5").set_attr("/", "format_version", int64_t{99});
}

std::set<std::string> names_in(const std::string& dir) {
  std::set<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.insert(e.path().filename().string());
  return names;
}

// Unreadable checkpoints with higher steps (truncated, or from another format version) neither stop the run
// from resuming the newest readable one nor count towards checkpoint.keep: they are set aside, and the new
// checkpoints are kept. (Before, keep: 2 deleted every new checkpoint as it was written.)
TEST_F(Train, UnreadableNewerCheckpointsAreSetAsideAndNeverCountedInKeep) {
  std::string run = test::scratch_dir("rotation");
  std::string out;
  ASSERT_EQ(test::run_moba(tiny(run, "--max-steps 10"), &out), 0) << out;
  const std::string dir = run + "/checkpoints";
  write_future_checkpoint(dir + "/step_00000010", dir + "/step_00000200");
  fs::copy(dir + "/step_00000010", dir + "/step_00000100", fs::copy_options::recursive);
  fs::resize_file(dir + "/step_00000100/model.h5", fs::file_size(dir + "/step_00000100/model.h5") / 2);
  ASSERT_EQ(test::run_moba(tiny(run), &out), 0) << out;
  EXPECT_NE(out.find("resumed from " + dir + "/step_00000010"), std::string::npos) << out;
  EXPECT_NE(out.find("checkpoint format 99 is not supported"), std::string::npos) << out;
  EXPECT_EQ(names_in(dir), (std::set<std::string>{"step_00000030", "step_00000040", "unreadable"}));
  EXPECT_EQ(names_in(dir + "/unreadable"), (std::set<std::string>{"step_00000100", "step_00000200"}));
  EXPECT_EQ(training_lines(run).size(), 40u);
}

// With nothing readable beside unreadable checkpoints, starting from step 0 needs the user's flag; without it
// nothing in the run directory changes.
TEST_F(Train, StartingOverBesideUnreadableCheckpointsNeedsTheFlag) {
  std::string run = test::scratch_dir("start-over");
  std::string out;
  ASSERT_EQ(test::run_moba(tiny(run, "--max-steps 10"), &out), 0) << out;
  const std::string dir = run + "/checkpoints";
  write_future_checkpoint(dir + "/step_00000010", dir + "/step_00000020");
  fs::remove_all(dir + "/step_00000010");
  std::ifstream metrics_before(run + "/metrics.jsonl");
  const std::string metrics((std::istreambuf_iterator<char>(metrics_before)), std::istreambuf_iterator<char>());
  ASSERT_EQ(test::run_moba(tiny(run), &out), 1) << out;
  EXPECT_NE(out.find(dir + " holds 1 checkpoint(s) that cannot be read and none that can"), std::string::npos) << out;
  EXPECT_NE(out.find("pass --ignore-unreadable-checkpoints"), std::string::npos) << out;
  std::ifstream metrics_after(run + "/metrics.jsonl");
  EXPECT_EQ(std::string((std::istreambuf_iterator<char>(metrics_after)), std::istreambuf_iterator<char>()), metrics);
  EXPECT_EQ(names_in(dir), (std::set<std::string>{"step_00000020"}));

  ASSERT_EQ(test::run_moba(tiny(run, "--ignore-unreadable-checkpoints"), &out), 0) << out;
  EXPECT_EQ(names_in(dir + "/unreadable"), (std::set<std::string>{"step_00000020", "metrics.jsonl"}));
  EXPECT_TRUE(fs::exists(dir + "/step_00000040"));
  EXPECT_EQ(training_lines(run).size(), 40u);
}

}  // namespace
}  // namespace moba
