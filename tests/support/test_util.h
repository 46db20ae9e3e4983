// Shared helpers for the GoogleTest suites: shared-data paths (skip when absent), seeded random inputs,
// relative errors, and a finite-difference gradient checker used by every op and by the whole model.
#pragma once
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "trainer/checkpoint.h"
#include "trainer/optimizer.h"

namespace moba::test {

// Path inside ../shared/data (the MOBA_SHARED_DATA env var overrides the configured location).
std::string shared_data(const std::string& name);
// Path inside the source tree / a fresh scratch directory under <build>/test-scratch/<pid>/ (recreated).
std::string source_path(const std::string& rel);
std::string scratch_dir(const std::string& name);
// The built `moba` binary, and a helper that runs it (stdout+stderr captured) returning the exit code.
std::string moba_binary();
int run_moba(const std::string& args, std::string* output = nullptr);

// A shell command's exit code (128 + signal when killed), its stdout+stderr, and its wall time.
struct ShellResult {
  int rc = -1;
  std::string out;
  double seconds = 0;
};
ShellResult shell(const std::string& command);
// `mpirun -np N` with the environment the CPU-rank tests need (root allowed, oversubscribed, 1 OpenMP thread).
std::string mpirun(int ranks);
// step -> loss of the training lines of RUN_DIR/metrics.jsonl.
std::map<int, double> training_losses(const std::string& run_dir);

// Skips the current test with a message when a shared-data file is missing.
#define MOBA_REQUIRE_SHARED(path)                                                                   \
  do {                                                                                              \
    if (!std::filesystem::exists(path)) GTEST_SKIP() << "shared data not found: " << (path)        \
                                                     << " (tests that need ../shared/data skip)";  \
  } while (0)

// True when this build has the CUDA backend and a GPU is usable; GPU tests call MOBA_REQUIRE_GPU() first.
bool gpu_available();
#define MOBA_REQUIRE_GPU()                                                                          \
  do {                                                                                              \
    if (!::moba::test::gpu_available()) GTEST_SKIP() << "no usable GPU (or built without CUDA): GPU test skipped"; \
  } while (0)

// Copies an HDF5 file the way moba wrote files before it added checksums (default file format, contiguous
// datasets without filters), to test that such files still load.
void write_legacy_copy(const std::string& from, const std::string& to);
// A single-file (format 1) checkpoint of the optimizer's master weights and moments, as moba wrote before
// directory checkpoints: params/, optimizer/m/, optimizer/v/ whole arenas and the run's attributes.
void write_single_file_checkpoint(const std::string& path, const AdamW& optimizer, const model::ParameterLayout& layout,
                                  const CheckpointState& state);
// While alive, writes past `bytes` fail (EFBIG, SIGXFSZ ignored) exactly where a full disk fails with ENOSPC.
class FileSizeLimit {
 public:
  explicit FileSizeLimit(rlim_t bytes);
  ~FileSizeLimit();
  FileSizeLimit(const FileSizeLimit&) = delete;
  FileSizeLimit& operator=(const FileSizeLimit&) = delete;

 private:
  rlimit saved_{};
  sighandler_t previous_handler_;
};
// Flips the bits of one byte of a file (XOR 0x5A) in place.
void flip_byte(const std::string& path, size_t offset);
// Where the first chunk of a chunked dataset lies in its file: {byte offset, stored size}.
std::pair<size_t, size_t> first_chunk(const std::string& path, const std::string& dataset);

std::vector<float> random_vector(size_t n, uint64_t seed, float lo = -1.0f, float hi = 1.0f);
// Rounds every value to the nearest bf16 (round-to-nearest-even), as GPU activations would be.
void round_to_bf16(std::vector<float>& x);

// ||a - b|| / ||b|| over n elements (b is the reference).
double rel_l2(const float* a, const double* b, size_t n);
double rel_l2(const float* a, const float* b, size_t n);

struct GradCheckResult {
  double max_rel_error = 0;  // max over checked entries of |num - ana| / max(|num| + |ana|, floor)
  int checked = 0;
  std::string worst;         // description of the worst entry
};
// Central differences of loss() with respect to x[i] for up to max_checks evenly spread indices, compared with
// grad[i]. loss() must recompute from x (which is perturbed in place and restored).
GradCheckResult check_gradient(std::vector<float>& x, const std::vector<float>& grad,
                               const std::function<double()>& loss, int max_checks = 64, float step = 1e-2f,
                               double floor = 1e-3);

}  // namespace moba::test
