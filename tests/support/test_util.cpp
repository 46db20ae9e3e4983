#include "tests/support/test_util.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <random>

#include <unistd.h>

#if MOBA_HAVE_CUDA
#include <cuda_runtime.h>
#endif

namespace moba::test {

std::string shared_data(const std::string& name) {
  const char* env = std::getenv("MOBA_SHARED_DATA");
  return std::string(env ? env : MOBA_SHARED_DATA) + "/" + name;
}

std::string source_path(const std::string& rel) { return std::string(MOBA_SOURCE_DIR) + "/" + rel; }

std::string scratch_dir(const std::string& name) {
  // Per process: ctest runs test processes concurrently and each must own its directories.
  std::filesystem::path p = std::filesystem::current_path() / "test-scratch" / std::to_string(getpid()) / name;
  std::filesystem::remove_all(p);
  std::filesystem::create_directories(p);
  return p.string();
}

std::string moba_binary() { return MOBA_BINARY; }

int run_moba(const std::string& args, std::string* output) {
  std::string cmd = moba_binary() + " " + args + " 2>&1";
  FILE* pipe = popen(cmd.c_str(), "r");
  if (!pipe) return -1;
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, pipe)) > 0) out.append(buf, n);
  int status = pclose(pipe);
  if (output) *output = out;
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

bool gpu_available() {
#if MOBA_HAVE_CUDA
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
#else
  return false;
#endif
}

std::vector<float> random_vector(size_t n, uint64_t seed, float lo, float hi) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

void round_to_bf16(std::vector<float>& x) {
  for (float& f : x) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    u += 0x7FFF + ((u >> 16) & 1);
    u &= 0xFFFF0000u;
    std::memcpy(&f, &u, 4);
  }
}

double rel_l2(const float* a, const double* b, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; ++i) {
    double d = static_cast<double>(a[i]) - b[i];
    num += d * d;
    den += b[i] * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

double rel_l2(const float* a, const float* b, size_t n) {
  std::vector<double> bd(b, b + n);
  return rel_l2(a, bd.data(), n);
}

GradCheckResult check_gradient(std::vector<float>& x, const std::vector<float>& grad,
                               const std::function<double()>& loss, int max_checks, float step, double floor) {
  GradCheckResult r;
  size_t n = x.size();
  size_t stride = std::max<size_t>(1, n / static_cast<size_t>(max_checks));
  for (size_t i = stride / 2; i < n && r.checked < max_checks; i += stride) {
    float orig = x[i];
    x[i] = orig + step;
    double lp = loss();
    x[i] = orig - step;
    double lm = loss();
    x[i] = orig;
    double num = (lp - lm) / (2.0 * step);
    double ana = grad[i];
    double err = std::abs(num - ana) / std::max(std::abs(num) + std::abs(ana), floor);
    if (err > r.max_rel_error) {
      r.max_rel_error = err;
      char buf[160];
      std::snprintf(buf, sizeof buf, "index %zu: numeric %.6g analytic %.6g", i, num, ana);
      r.worst = buf;
    }
    ++r.checked;
  }
  return r;
}

}  // namespace moba::test
