#include "tests/support/test_util.h"

#include <sys/wait.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <regex>

#include "common/hdf5_io.h"

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

ShellResult shell(const std::string& command) {
  ShellResult r;
  const auto t0 = std::chrono::steady_clock::now();
  FILE* pipe = popen((command + " 2>&1").c_str(), "r");
  if (!pipe) return r;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, pipe)) > 0) r.out.append(buf, n);
  const int status = pclose(pipe);
  r.rc = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

std::string mpirun(int ranks) {
  return "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1 "
         "OMP_NUM_THREADS=1 mpirun -np " + std::to_string(ranks) + " ";
}

std::map<int, double> training_losses(const std::string& run_dir) {
  std::map<int, double> out;
  std::ifstream in(run_dir + "/metrics.jsonl");
  static const std::regex re(R"re("step": (\d+), "tokens": [^,]+, "loss": ([^,]+),)re");
  for (std::string line; std::getline(in, line);) {
    std::smatch m;
    if (std::regex_search(line, m, re)) out[std::stoi(m[1])] = std::stod(m[2]);
  }
  return out;
}

bool gpu_available() {
#if MOBA_HAVE_CUDA
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
#else
  return false;
#endif
}

namespace {

// Copies every attribute of src_obj to dst_obj with its stored type.
herr_t copy_attribute(hid_t src_obj, const char* name, const H5A_info_t*, void* dst_obj) {
  hid_t a = H5Aopen(src_obj, name, H5P_DEFAULT), type = H5Aget_type(a), space = H5Aget_space(a);
  std::vector<char> value(H5Tget_size(type) * static_cast<size_t>(H5Sget_simple_extent_npoints(space)));
  H5Aread(a, type, value.data());
  hid_t copy = H5Acreate2(*static_cast<hid_t*>(dst_obj), name, type, space, H5P_DEFAULT, H5P_DEFAULT);
  H5Awrite(copy, type, value.data());
  for (hid_t id : {copy, a}) H5Aclose(id);
  H5Sclose(space);
  H5Tclose(type);
  return 0;
}

void copy_attributes(hid_t src_obj, hid_t dst_obj) {
  hsize_t index = 0;
  H5Aiterate2(src_obj, H5_INDEX_NAME, H5_ITER_INC, &index, copy_attribute, &dst_obj);
}

void copy_group(const h5::File& src, hid_t dst_file, const std::string& group) {
  for (const std::string& name : src.list(group)) {
    const std::string path = (group == "/" ? "" : group) + "/" + name;
    if (src.is_group(path)) {
      hid_t g = H5Gcreate2(dst_file, path.c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
      hid_t sg = H5Gopen2(src.id(), path.c_str(), H5P_DEFAULT);
      copy_attributes(sg, g);
      H5Gclose(sg);
      H5Gclose(g);
      copy_group(src, dst_file, path);
      continue;
    }
    hid_t d = H5Dopen2(src.id(), path.c_str(), H5P_DEFAULT), type = H5Dget_type(d), space = H5Dget_space(d);
    std::vector<char> data(H5Tget_size(type) * static_cast<size_t>(H5Sget_simple_extent_npoints(space)) + 1);
    H5Dread(d, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data.data());
    hid_t copy = H5Dcreate2(dst_file, path.c_str(), type, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    H5Dwrite(copy, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data.data());
    copy_attributes(d, copy);
    for (hid_t id : {copy, d}) H5Dclose(id);
    H5Sclose(space);
    H5Tclose(type);
  }
}

}  // namespace

void write_legacy_copy(const std::string& from, const std::string& to) {
  h5::File src = h5::File::open_read(from);
  hid_t dst = H5Fcreate(to.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  ASSERT_GE(dst, 0) << to;
  hid_t src_root = H5Gopen2(src.id(), "/", H5P_DEFAULT), dst_root = H5Gopen2(dst, "/", H5P_DEFAULT);
  copy_attributes(src_root, dst_root);
  H5Gclose(src_root);
  H5Gclose(dst_root);
  copy_group(src, dst, "/");
  H5Fclose(dst);
}

void write_single_file_checkpoint(const std::string& path, const AdamW& optimizer, const model::ParameterLayout& layout,
                                  const CheckpointState& state) {
  h5::File file = h5::File::create(path);
  const char* groups[3] = {"params", "optimizer/m", "optimizer/v"};
  const AdamW::State states[3] = {AdamW::State::master, AdamW::State::first_moment, AdamW::State::second_moment};
  for (int k = 0; k < 3; ++k) {
    std::vector<float> packed = optimizer.state_to_host(states[k]), arena(static_cast<size_t>(layout.total()), 0.0f);
    for (const AdamW::OwnedRange& r : optimizer.owned())
      std::copy_n(packed.begin() + r.state_offset, r.numel, arena.begin() + r.offset);
    for (const model::ParamTensor& t : layout.tensors())
      file.write(std::string(groups[k]) + "/" + t.name, layout.read_tensor(arena, t).data(), t.shape);
  }
  file.set_attr("/", "format_version", int64_t{1});
  file.set_attr("/", "step", state.step);
  file.set_attr("/", "tokens_seen", state.tokens_seen);
  file.set_attr("/", "optimizer_steps", optimizer.steps_taken());
  file.set_attr("/", "sampler_epoch", state.sampler.epoch);
  file.set_attr("/", "sampler_cursor", state.sampler.cursor);
  file.set_attr("/", "seed", static_cast<int64_t>(state.seed));
  file.set_attr("/", "recipe", state.recipe_yaml);
}

FileSizeLimit::FileSizeLimit(rlim_t bytes) {
  getrlimit(RLIMIT_FSIZE, &saved_);
  previous_handler_ = signal(SIGXFSZ, SIG_IGN);
  rlimit limit = saved_;
  limit.rlim_cur = bytes;
  setrlimit(RLIMIT_FSIZE, &limit);
}

FileSizeLimit::~FileSizeLimit() {
  setrlimit(RLIMIT_FSIZE, &saved_);
  signal(SIGXFSZ, previous_handler_);
}

void flip_byte(const std::string& path, size_t offset) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(static_cast<std::streamoff>(offset));
  char c = 0;
  f.get(c);
  f.seekp(static_cast<std::streamoff>(offset));
  f.put(static_cast<char>(c ^ 0x5A));
}

std::pair<size_t, size_t> first_chunk(const std::string& path, const std::string& dataset) {
  h5::File file = h5::File::open_read(path);
  hid_t d = H5Dopen2(file.id(), dataset.c_str(), H5P_DEFAULT);
  haddr_t address = HADDR_UNDEF;
  hsize_t size = 0;
  unsigned filter_mask = 0;
  hid_t space = H5Dget_space(d);
  herr_t status = H5Dget_chunk_info(d, space, 0, nullptr, &filter_mask, &address, &size);
  H5Sclose(space);
  H5Dclose(d);
  EXPECT_GE(status, 0) << dataset << " in " << path << " is not chunked";
  return {static_cast<size_t>(address), static_cast<size_t>(size)};
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
