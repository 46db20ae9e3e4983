// common/: the command-line parser's numeric options (ranges, whole numbers, non-finite and overflowing
// values are usage errors), every numeric flag of every subcommand through the real binary (exit code 2 and a
// message naming the flag, before anything is read or written), and the host-memory readings the CPU memory
// check relies on.
#include <gtest/gtest.h>

#include <filesystem>
#include <limits>

#include "common/cli.h"
#include "common/error.h"
#include "common/host_memory.h"
#include "tests/support/test_util.h"

namespace moba {
namespace {

namespace fs = std::filesystem;

ArgParser parser_with(const std::string& option, const std::string& value) {
  ArgParser ap("test", "a parser for the tests");
  ap.add_option(option, "X", "an option");
  ap.parse({"--" + option, value});
  return ap;
}

// The UsageError message that reading `value` as an integer in [min, max] gives, or "<accepted>".
std::string int_error(const std::string& value, long long min, long long max) {
  try {
    parser_with("n", value).get_int("n", min, max);
  } catch (const UsageError& e) {
    return e.what();
  }
  return "<accepted>";
}

std::string double_error(const std::string& value, double min, double max) {
  try {
    parser_with("x", value).get_double("x", min, max);
  } catch (const UsageError& e) {
    return e.what();
  }
  return "<accepted>";
}

TEST(ArgParser, IntegersAreWholeFiniteAndInRange) {
  EXPECT_EQ(parser_with("n", "42").get_int("n", 1, 100), 42);
  EXPECT_EQ(parser_with("n", "1e6").get_int("n", 1, 10000000), 1000000);
  EXPECT_EQ(parser_with("n", "9223372036854775807").get_int("n", 0, std::numeric_limits<long long>::max()),
            std::numeric_limits<long long>::max());
  const struct {
    const char* value;
    const char* message;
  } bad[] = {
      {"0", "moba test: --n 0 is out of range [1, 100]"},
      {"-5", "--n -5 is out of range [1, 100]"},
      {"101", "--n 101 is out of range [1, 100]"},
      {"99999999999999999999", "--n 99999999999999999999 is out of range [1, 100]"},
      {"1e300", "--n 1e300 is out of range [1, 100]"},
      {"inf", "--n inf is out of range [1, 100]"},
      {"nan", "--n expects a whole number, got 'nan'"},
      {"2.5", "--n expects a whole number, got '2.5'"},
      {"12abc", "--n expects a whole number, got '12abc'"},
      {"", "--n expects a whole number, got ''"},
      {" 7", "--n expects a whole number, got ' 7'"},
  };
  for (const auto& b : bad) EXPECT_NE(int_error(b.value, 1, 100).find(b.message), std::string::npos) << b.value;
}

TEST(ArgParser, NumbersAreFiniteAndInRange) {
  EXPECT_DOUBLE_EQ(parser_with("x", "0.25").get_double("x", 0, 1), 0.25);
  EXPECT_DOUBLE_EQ(parser_with("x", "1e-3").get_double("x", 0, 1), 1e-3);
  const struct {
    const char* value;
    const char* message;
  } bad[] = {
      {"nan", "--x expects a finite number, got 'nan'"},
      {"inf", "--x expects a finite number, got 'inf'"},
      {"-inf", "--x expects a finite number, got '-inf'"},
      {"1e400", "--x expects a finite number, got '1e400'"},
      {"-0.5", "--x -0.5 is out of range [0, 1]"},
      {"1.5", "--x 1.5 is out of range [0, 1]"},
      {"half", "--x expects a number, got 'half'"},
      {"0.5x", "--x expects a number, got '0.5x'"},
  };
  for (const auto& b : bad) EXPECT_NE(double_error(b.value, 0, 1).find(b.message), std::string::npos) << b.value;
}

TEST(ArgParser, CommandLineMistakesAreUsageErrors) {
  ArgParser ap("test", "summary");
  ap.add_option("mode", "M", "a choice", "full");
  ap.add_flag("quick", "a flag");
  ap.add_positional("input", "a file");
  EXPECT_THROW(ap.parse({"in", "--nope", "1"}), UsageError);
  EXPECT_THROW(ArgParser(ap).parse({}), UsageError);                        // missing positional
  EXPECT_THROW(ArgParser(ap).parse({"in", "--quick=1"}), UsageError);       // a flag with a value
  EXPECT_THROW(ArgParser(ap).parse({"in", "--mode"}), UsageError);          // an option without one
  EXPECT_THROW(ArgParser(ap).parse({"in", "extra"}), UsageError);           // one positional too many
  EXPECT_THROW(ArgParser(ap).parse({"in", "--mode", "a", "--mode", "b"}), UsageError);
  ArgParser ok(ap);
  ok.parse({"in", "--mode", "sparse"});
  try {
    ok.get_choice("mode", {"full", "moba"});
    FAIL();
  } catch (const UsageError& e) {
    EXPECT_NE(std::string(e.what()).find("--mode 'sparse' is not allowed"), std::string::npos) << e.what();
    EXPECT_EQ(e.hint(), "allowed: full, moba");
  }
}

// Every numeric (and choice) flag of every subcommand, with values that are not numbers, not finite, negative,
// zero where zero means nothing, or overflowing: exit code 2 and the flag named, before any file is touched.
TEST(CommandLine, EveryNumericFlagRejectsNonsenseWithExitCode2) {
  const std::string dir = test::scratch_dir("cli-flags");
  const std::string prep = "prep " + dir + "/in.jsonl --out " + dir + "/out";
  const std::string train = "train " + test::source_path("recipes/tests/tiny.yaml") + " --set run_dir=" + dir + "/run";
  const std::string eval = "eval --checkpoint " + dir + "/none --data " + dir + "/none.h5";
  const std::string attention = "bench attention --backend cpu";
  const std::string bench_train = "bench train --recipe " + test::source_path("recipes/tests/tiny.yaml");
  const std::string vectors = "check-vectors " + dir + "/none.h5";
  const struct {
    std::string command, flag;
    std::vector<std::string> values;
  } table[] = {
      {prep, "vocab-size", {"nan", "inf", "-1", "0", "299", "99999999999999999999", "1.5", "lots"}},
      {prep, "val-fraction", {"nan", "inf", "-0.1", "1", "1e400", "x"}},
      {prep, "seed", {"-1", "nan", "1e300", "0.5"}},
      {prep, "max-documents", {"0", "-1", "nan", "1e999"}},
      {prep, "max-bytes", {"0", "-5", "inf"}},
      {prep, "tokenizer", {"wordpiece"}},
      {prep, "sp-model-type", {"char"}},
      {train, "max-steps", {"0", "-1", "nan", "inf", "1e30", "2.5"}},
      {train, "fault", {"throw:x:0", "throw:-1:0", "throw:3:-2", "melt:3:0", "throw:99999999999999999999:0"}},
      {eval, "seq-len", {"0", "1", "-5", "nan", "1e12", "4096.5"}},
      {eval, "bucket", {"0", "nan", "5000"}},
      {eval, "trailing", {"0", "-1", "5000"}},
      {eval, "batch-seqs", {"0", "nan", "1e10", "1000000"}},
      {eval, "max-docs", {"0", "-1", "inf"}},
      {eval, "block-size", {"0", "-2", "nan"}},
      {eval, "top-k", {"0", "99999999999"}},
      {eval, "attention", {"sparse"}},
      {attention, "seq", {"0", "nan", "1e10"}},
      {attention, "heads", {"0", "5000", "inf"}},
      {attention, "kv-heads", {"0", "17", "3"}},
      {attention, "head-dim", {"0", "3", "4096"}},
      {attention, "block", {"0", "-512"}},
      {attention, "topk", {"0", "nan"}},
      {attention, "warmup", {"-1", "nan"}},
      {attention, "reps", {"0", "1e30"}},
      {attention, "mode", {"sparse"}},
      {bench_train, "warmup", {"-1", "inf"}},
      {bench_train, "steps", {"0", "nan"}},
      {vectors, "tol-o", {"nan", "-1", "inf"}},
      {vectors, "tol-lse", {"nan", "-0.5"}},
      {vectors, "tol-grad", {"nan", "1e999"}},
      {vectors, "min-selection-agreement", {"nan", "1.5", "-0.1"}},
      {vectors, "backend", {"tpu"}},
  };
  for (const auto& row : table)
    for (const std::string& value : row.values) {
      const std::string args = row.command + " --" + row.flag + " '" + value + "'";
      std::string out;
      EXPECT_EQ(test::run_moba(args, &out), 2) << args << "\n" << out;
      EXPECT_NE(out.find("--" + row.flag), std::string::npos) << args << "\n" << out;
      EXPECT_EQ(out.find("unexpected failure"), std::string::npos) << args << "\n" << out;
    }
  EXPECT_FALSE(fs::exists(dir + "/out"));
  EXPECT_FALSE(fs::exists(dir + "/run"));

  // Other usage mistakes exit 2 as well; errors in what the files say exit 1.
  std::string out;
  EXPECT_EQ(test::run_moba("frobnicate", &out), 2) << out;
  EXPECT_EQ(test::run_moba("train", &out), 2) << out;
  EXPECT_EQ(test::run_moba("bench", &out), 2) << out;
  EXPECT_EQ(test::run_moba(train + " --set novalue", &out), 2) << out;
  EXPECT_EQ(test::run_moba(train + " --set model=", &out), 2) << out;
  EXPECT_EQ(test::run_moba(train + " --set train.tokens=0", &out), 1) << out;
  EXPECT_NE(out.find("--set train.tokens: must be positive"), std::string::npos) << out;
}

TEST(HostMemory, ReadsMemAvailableAndCgroupHeadroom) {
  EXPECT_EQ(meminfo_available_bytes("MemTotal:       24683784 kB\nMemFree:        22000000 kB\n"
                                    "MemAvailable:   24047264 kB\nBuffers: 1 kB\n"),
            std::optional<size_t>(24047264ull * 1024));
  EXPECT_EQ(meminfo_available_bytes("MemTotal: 1 kB\n"), std::nullopt);
  EXPECT_EQ(cgroup_headroom_bytes("8589934592\n", "1073741824\n"), std::optional<size_t>(7516192768ull));
  EXPECT_EQ(cgroup_headroom_bytes("1000\n", "4000\n"), std::optional<size_t>(0));  // over the limit already
  EXPECT_EQ(cgroup_headroom_bytes("max\n", "1073741824\n"), std::nullopt);          // v2: no limit
  EXPECT_EQ(cgroup_headroom_bytes("9223372036854771712\n", "695971840\n"), std::nullopt);  // v1: no limit
  EXPECT_EQ(cgroup_headroom_bytes("", ""), std::nullopt);                            // no such files
  const size_t available = host_available_bytes();
  EXPECT_GT(available, size_t{64} << 20) << "this machine reports less than 64 MiB available";
  EXPECT_LT(available, size_t{1} << 50);
}

}  // namespace
}  // namespace moba
