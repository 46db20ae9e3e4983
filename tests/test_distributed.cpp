// Data parallelism under real `mpirun --oversubscribe` on CPU ranks: N ranks equal one rank (losses and final
// weights, ZeRO-1 and zero 0, MoBA and full layers), resuming on another rank count continues the same curve, a
// killed save leaves the previous checkpoint, every kind of failing rank ends the job with its own message, stop
// signals checkpoint and exit 0, and start-up refuses bad layouts, mismatched recipes and a locked run directory.
// Runs that must happen "mid-run" are made deterministic with `--fault pause:STEP:RANK` (the rank waits there for
// a stop signal), never by racing a timer.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <thread>

#include "common/hdf5_io.h"
#include "tests/support/test_util.h"

namespace fs = std::filesystem;

namespace moba {
namespace {

using test::shell;
using Result = test::ShellResult;

// A command started in the background (its own process group), with its output in a file.
struct Background {
  pid_t pid = -1;
  std::string log;
  Background(const std::string& cmd, const std::string& log_path) : log(log_path) {
    pid = fork();
    if (pid == 0) {
      setpgid(0, 0);
      execl("/bin/sh", "sh", "-c", ("exec env " + cmd + " > " + log_path + " 2>&1").c_str(), static_cast<char*>(nullptr));
      _exit(127);
    }
  }
  // Waits until the log contains `text` (the process announces it reached a point; no timing assumed).
  bool wait_for(const std::string& text) {
    while (true) {
      std::ifstream in(log);
      std::string s((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      if (s.find(text) != std::string::npos) return true;
      int status = 0;
      if (waitpid(pid, &status, WNOHANG) == pid) {
        pid = -1;
        return false;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }
  int wait() {
    int status = 0;
    waitpid(pid, &status, 0);
    pid = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }
  std::string output() const {
    std::ifstream in(log);
    return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  }
};

class DataParallel : public ::testing::Test {
 protected:
  static std::string data_dir, baseline;
  static void SetUpTestSuite() {
    if (!fs::exists(test::shared_data("linux-6.1-core.jsonl.xz"))) return;
    data_dir = test::scratch_dir("dp-data");
    std::string out;
    ASSERT_EQ(test::run_moba("prep " + test::shared_data("linux-6.1-core.jsonl.xz") + " --out " + data_dir +
                                 " --max-bytes 8000000 --seed 3",
                             &out),
              0)
        << out;
    baseline = test::scratch_dir("dp-baseline");  // one rank, the reference of every comparison
    ASSERT_EQ(test::run_moba(args(baseline), &out), 0) << out;
  }
  void SetUp() override { MOBA_REQUIRE_SHARED(test::shared_data("linux-6.1-core.jsonl.xz")); }

  // The tiny recipe (MoBA layer 0, full layer 1, GQA) for 12 steps of 1024 tokens, 2 sequences per micro-batch, so
  // 1, 2 and 4 data-parallel ranks all split the global batch.
  static std::string args(const std::string& run_dir, const std::string& extra = "") {
    return "train " + test::source_path("recipes/tests/tiny.yaml") + " --set data.train=" + data_dir +
           "/train.h5 --set data.val=" + data_dir + "/val.h5 --set run_dir=" + run_dir +
           " --set train.tokens=1.2e4 --set train.micro_batch_seqs=2 --set checkpoint.every_tokens=4096 " + extra;
  }
  static std::string mpirun(int ranks, const std::string& run_dir, const std::string& extra = "") {
    return test::mpirun(ranks) + test::moba_binary() + " " + args(run_dir, extra);
  }
  static std::vector<float> final_weights(const std::string& run_dir, const std::string& tensor) {
    h5::File f = h5::File::open_read(run_dir + "/checkpoints/step_00000012/model.h5");
    return f.read<float>("params/" + tensor);
  }
  // Same curve as the one-rank baseline: only the order of floating-point sums differs (measured ~1e-9).
  static void expect_baseline_curve(const std::string& run_dir, const std::string& what) {
    std::map<int, double> want = test::training_losses(baseline), got = test::training_losses(run_dir);
    ASSERT_EQ(got.size(), want.size()) << what;
    for (const auto& [step, loss] : want) EXPECT_NEAR(got[step], loss, 1e-6 * loss) << what << ", step " << step;
  }
};
std::string DataParallel::data_dir, DataParallel::baseline;

TEST_F(DataParallel, RanksEqualOneRankForZeroOneAndZeroZero) {
  for (const auto& [ranks, zero] : std::vector<std::pair<int, int>>{{2, 1}, {4, 1}, {8, 1}, {2, 0}, {4, 0}}) {
    const std::string what = cat(ranks, " ranks, zero ", zero);
    std::string run = test::scratch_dir(cat("dp", ranks, "z", zero));
    // 8 ranks take one sequence each of the 8 in a global batch (the baseline: 4 micro-batches of 2).
    Result r = shell(mpirun(ranks, run, cat("--set parallel.zero=", zero,
                                            ranks == 8 ? " --set train.micro_batch_seqs=1" : "")));
    ASSERT_EQ(r.rc, 0) << what << "\n" << r.out;
    EXPECT_NE(r.out.find(cat("ranks: ", ranks, " = ", ranks, " data x 1 context; ZeRO ", zero)), std::string::npos)
        << r.out;
    expect_baseline_curve(run, what);
    for (const char* tensor : {"wte", "layers.wqkv", "layers.w_down", "lm_head"}) {
      std::vector<float> a = final_weights(run, tensor), b = final_weights(baseline, tensor);
      EXPECT_LT(test::rel_l2(a.data(), b.data(), a.size()), 1e-5) << what << ": " << tensor;
    }
  }
}

TEST_F(DataParallel, ResumesOnAnotherRankCountAlongTheSameCurve) {
  std::string run = test::scratch_dir("dp-reshard");
  Result r = shell(mpirun(2, run, "--max-steps 4"));
  ASSERT_EQ(r.rc, 0) << r.out;
  r = shell(mpirun(4, run, "--max-steps 4"));  // 2 -> 4 ranks
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("resumed from " + run + "/checkpoints/step_00000004 at step 4"), std::string::npos) << r.out;
  r = shell(mpirun(1, run));  // 4 -> 1
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("resumed from " + run + "/checkpoints/step_00000008 at step 8"), std::string::npos) << r.out;
  expect_baseline_curve(run, "2 -> 4 -> 1 ranks");
}

TEST_F(DataParallel, KillDuringShardedSaveLeavesThePreviousCheckpoint) {
  std::string run = test::scratch_dir("dp-killsave");
  // Rank 1 is SIGKILLed after writing its shard of step 8, before the checkpoint is complete.
  Result r = shell(mpirun(2, run, "--fault save:8:1"));
  ASSERT_NE(r.rc, 0) << r.out;
  EXPECT_LT(r.seconds, 60) << r.out;
  EXPECT_TRUE(fs::exists(run + "/checkpoints/step_00000004/manifest.yaml"));
  EXPECT_FALSE(fs::exists(run + "/checkpoints/step_00000008"));
  r = shell(mpirun(2, run));
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("resumed from " + run + "/checkpoints/step_00000004 at step 4"), std::string::npos) << r.out;
  EXPECT_FALSE(fs::exists(run + "/checkpoints/step_00000008.tmp"));  // the next save replaced it
  expect_baseline_curve(run, "resumed after a killed save");
}

TEST_F(DataParallel, AFailingRankEndsTheJobWithItsMessage) {
  struct Case {
    std::string fault, extra, needle;
  };
  const std::vector<Case> cases = {
      {"throw:3:1", "", "[rank 1] error: fault injected by --fault at step 3 on rank 1"},
      {"nan:3:1", "", "[rank 1] error: the loss is nan at step 3"},
      {"exit:3:1", "", "[rank 1] error: exiting with code 3 at step 3"},
      {"kill:3:1", "", "rank 1 with PID"},  // mpirun names the rank a signal killed
      {"hang:3:1", "--set parallel.timeout_s=3", "did not complete within 3 s"}};
  for (const Case& c : cases) {
    std::string run = test::scratch_dir("dp-fault");
    Result r = shell(mpirun(2, run, "--fault " + c.fault + " " + c.extra));
    EXPECT_NE(r.rc, 0) << c.fault << "\n" << r.out;
    EXPECT_LT(r.seconds, 60) << c.fault << "\n" << r.out;
    EXPECT_NE(r.out.find(c.needle), std::string::npos) << c.fault << ": expected '" << c.needle << "' in\n" << r.out;
  }
}

TEST_F(DataParallel, AKilledRankOfFourEndsTheJobAndTheCheckpointResumesOnTwo) {
  // SIGKILL of rank 2 of 4 at step 6: mpirun ends the job naming it; the checkpoint of step 4 resumes on 2 ranks
  // along the one-rank curve.
  std::string run = test::scratch_dir("dp-kill4");
  Result r = shell(mpirun(4, run, "--fault kill:6:2"));
  EXPECT_NE(r.rc, 0) << r.out;
  EXPECT_LT(r.seconds, 60) << r.out;
  EXPECT_NE(r.out.find("rank 2 with PID"), std::string::npos) << r.out;
  EXPECT_TRUE(fs::exists(run + "/checkpoints/step_00000004/manifest.yaml"));
  r = shell(mpirun(2, run));
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("resumed from " + run + "/checkpoints/step_00000004 at step 4"), std::string::npos) << r.out;
  expect_baseline_curve(run, "4 ranks, rank 2 killed, resumed on 2");
}

TEST_F(DataParallel, StopSignalsCheckpointExitZeroAndResumeExactly) {
  // SIGTERM and SIGINT to a plain run, SIGUSR1 to mpirun (which forwards it to every rank), each while rank 0 waits
  // at step 5: the step finishes, a checkpoint lands, exit 0; the next launch continues the same curve.
  struct Case {
    int ranks, signal;
    const char* name;
  };
  for (const Case& c : {Case{1, SIGTERM, "SIGTERM"}, Case{1, SIGINT, "SIGINT"}, Case{2, SIGUSR1, "SIGUSR1"}}) {
    std::string run = test::scratch_dir(cat("dp-signal-", c.name));
    const std::string cmd = c.ranks == 1 ? test::moba_binary() + " " + args(run, "--fault pause:5:0")
                                         : mpirun(c.ranks, run, "--fault pause:5:0");
    Background job(cmd, run + "/first.log");
    ASSERT_TRUE(job.wait_for("paused at step 5")) << job.output();
    kill(job.pid, c.signal);
    EXPECT_EQ(job.wait(), 0) << c.name << "\n" << job.output();
    EXPECT_NE(job.output().find(cat("received ", c.name, ": stopped after step 5 with a checkpoint")),
              std::string::npos)
        << job.output();
    EXPECT_TRUE(fs::exists(run + "/checkpoints/step_00000005/manifest.yaml"));
    Result r = shell(c.ranks == 1 ? test::moba_binary() + " " + args(run) : mpirun(c.ranks, run));
    ASSERT_EQ(r.rc, 0) << r.out;
    EXPECT_NE(r.out.find("resumed from " + run + "/checkpoints/step_00000005 at step 5"), std::string::npos) << r.out;
    expect_baseline_curve(run, c.name);
  }
}

TEST_F(DataParallel, StartUpIsSafe) {
  // Two ranks into a fresh run directory start every time (rank 1 never writes before rank 0 made it).
  for (int i = 0; i < 5; ++i) {
    std::string run = test::scratch_dir(cat("dp-fresh", i)) + "/not/yet/there";
    Result r = shell(mpirun(2, run, "--max-steps 1"));
    ASSERT_EQ(r.rc, 0) << "attempt " << i << "\n" << r.out;
  }
  // Ranks launched with different recipes stop before allocating anything.
  std::string run = test::scratch_dir("dp-mismatch");
  Result r = shell(test::mpirun(1) + test::moba_binary() + " " + args(run, "--set seed=1") +
                   " : -np 1 " + test::moba_binary() + " " + args(run, "--set seed=2"));
  EXPECT_NE(r.rc, 0);
  EXPECT_NE(r.out.find("rank(s) 1 resolved a different recipe than rank 0"), std::string::npos) << r.out;
  // A second job on a run directory that a running job holds is refused; the first job is not disturbed.
  std::string held = test::scratch_dir("dp-locked");
  Background first(test::moba_binary() + " " + args(held, "--fault pause:2:0"), held + "/../first.log");
  ASSERT_TRUE(first.wait_for("paused at step 2")) << first.output();
  r = shell(test::moba_binary() + " " + args(held));
  EXPECT_EQ(r.rc, 1) << r.out;
  EXPECT_NE(r.out.find("is in use by another job (pid " + std::to_string(first.pid)), std::string::npos) << r.out;
  kill(first.pid, SIGTERM);
  EXPECT_EQ(first.wait(), 0) << first.output();
}

TEST_F(DataParallel, BadLayoutsNameTheKey) {
  std::string run = test::scratch_dir("dp-layout");
  struct Case {
    int ranks;
    std::string extra, needle;
  };
  const std::vector<Case> cases = {
      {2, "--set parallel.context=3", "parallel.context = 3 does not divide the world size 2"},
      {2, "--set parallel.data=4", "parallel.data = 4 but 2 ranks"},
      {1, "--set parallel.zero=2", "parallel.zero"},
      {1, "--set parallel.timeout_s=0", "parallel.timeout_s"},
      {1, "--set parallel.transport=nccl", "parallel.transport: nccl needs backend: cuda"},
      {4, "--set train.micro_batch_seqs=4", "train.global_batch_tokens = 1024 is less than one micro-batch"}};
  for (const Case& c : cases) {
    Result r = shell(mpirun(c.ranks, run, c.extra));
    EXPECT_NE(r.rc, 0) << c.extra;
    EXPECT_NE(r.out.find(c.needle), std::string::npos) << c.extra << ": expected '" << c.needle << "' in\n" << r.out;
  }
}

TEST(Launch, PlainRunNeedsNoMpiDaemon) {
  // Without a launcher MPI is never initialised: no Open MPI singleton session directory is created, so two plain
  // runs started at once cannot race on it.
  std::string tmp = test::scratch_dir("plain-tmp");
  Result r = shell("TMPDIR=" + tmp + " " + test::moba_binary() + " bench train --recipe " +
                   test::source_path("recipes/tests/tiny.yaml") + " --set model.vocab_size=64 --warmup 0 --steps 1");
  ASSERT_EQ(r.rc, 0) << r.out;
  for (const auto& e : fs::directory_iterator(tmp))
    EXPECT_EQ(e.path().filename().string().rfind("ompi", 0), std::string::npos) << "MPI session dir " << e.path();
}

TEST(BenchComm, ChecksThenTimesEveryCollectiveOnThreeRanks) {
  // `moba bench comm` first checks each collective's result element by element (it exits non-zero on a wrong
  // sum), then times it; three ranks make the block split and the bus-bandwidth factors non-trivial.
  const std::string out = test::scratch_dir("bench-comm") + "/comm.jsonl";
  Result r = shell(test::mpirun(3) + test::moba_binary() + " bench comm --backend cpu --bytes 4K,64K --warmup 1 " +
                   "--iters 2 --out " + out);
  ASSERT_EQ(r.rc, 0) << r.out;
  std::ifstream in(out);
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  ASSERT_EQ(lines.size(), 6u) << r.out;  // rank 0 alone writes: 2 sizes x 3 collectives
  const std::vector<std::string> ops = {"all_reduce", "reduce_scatter", "all_gather"};
  for (size_t i = 0; i < lines.size(); ++i) {
    const std::string& line = lines[i];
    EXPECT_NE(line.find("\"op\": \"" + ops[i % 3] + "\""), std::string::npos) << line;
    EXPECT_NE(line.find("\"ranks\": 3,"), std::string::npos) << line;
    EXPECT_NE(line.find("\"checked\": true"), std::string::npos) << line;
    std::smatch m;
    ASSERT_TRUE(std::regex_search(line, m, std::regex("\"bytes\": ([0-9]+), .*\"algbw_gbps\": ([0-9.e+-]+), "
                                                      "\"busbw_gbps\": ([0-9.e+-]+)")))
        << line;
    const long long bytes = std::stoll(m[1]);
    const double algbw = std::stod(m[2]), busbw = std::stod(m[3]);
    EXPECT_EQ(bytes, i < 3 ? 4092 : 65532) << line;  // whole f32 values, one block per rank
    EXPECT_GT(algbw, 0) << line;
    EXPECT_NEAR(busbw / algbw, ops[i % 3] == "all_reduce" ? 4.0 / 3 : 2.0 / 3, 1e-9) << line;
  }
  r = shell(test::moba_binary() + " bench comm --backend cpu --bytes 12Q");
  EXPECT_NE(r.rc, 0);
  EXPECT_NE(r.out.find("--bytes: '12Q' is not a size"), std::string::npos) << r.out;
}

}  // namespace
}  // namespace moba
