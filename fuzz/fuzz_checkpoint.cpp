// libFuzzer target: checkpoints (trainer/checkpoint.h), single files (format 1) and directories (format 2, packed
// as fuzz_support.h says) loaded into the tiny model: the attributes, a resume (shards and moments) and the
// weights eval reads. Each must throw a moba::Error or succeed.
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>

#include "common/error.h"
#include "fuzz/fuzz_support.h"
#include "kernels/backend.h"
#include "trainer/checkpoint.h"
#include "trainer/optimizer.h"

namespace {

struct Loaded {
  std::unique_ptr<moba::Backend> backend = moba::make_cpu_backend();
  moba::model::Transformer model{*backend, moba::fuzz::tiny_model(), 8, 0};
  moba::AdamW optimizer{*backend, model, moba::OptimizerSettings{}};
};

// Writes the input as a checkpoint; returns its path, or "" when the input cannot be unpacked.
std::string unpack(std::string_view input) {
  namespace fs = std::filesystem;
  const fs::path dir = moba::fuzz::scratch() / "checkpoints";
  fs::remove_all(dir);
  fs::create_directories(dir);
  if (input.empty()) return "";
  const auto kind = static_cast<moba::fuzz::CheckpointKind>(input[0]);
  input.remove_prefix(1);
  if (!moba::fuzz::fuzz_files_without_checksums() && moba::fuzz::hdf5_without_checksums(input)) return "";
  if (kind == moba::fuzz::CheckpointKind::single_file) {
    moba::fuzz::write_bytes(dir / "step_00000001.h5", input);
    return (dir / "step_00000001.h5").string();
  }
  uint32_t sizes[2];
  if (kind != moba::fuzz::CheckpointKind::directory || input.size() < sizeof sizes) return "";
  std::memcpy(sizes, input.data(), sizeof sizes);
  input.remove_prefix(sizeof sizes);
  if (sizes[0] > input.size() || sizes[1] > input.size() - sizes[0]) return "";
  if (!moba::fuzz::fuzz_files_without_checksums() &&
      (moba::fuzz::hdf5_without_checksums(input.substr(0, sizes[0])) ||
       moba::fuzz::hdf5_without_checksums(input.substr(sizes[0], sizes[1]))))
    return "";
  const fs::path step = dir / "step_00000001";
  fs::create_directories(step);
  moba::fuzz::write_bytes(step / "model.h5", input.substr(0, sizes[0]));
  moba::fuzz::write_bytes(step / "shard_00000.h5", input.substr(sizes[0], sizes[1]));
  moba::fuzz::write_bytes(step / "manifest.yaml", input.substr(sizes[0] + sizes[1]));
  return step.string();
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int* argc, char*** argv) {
  moba::fuzz::parse_fuzz_flags(*argc, *argv);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static Loaded loaded;
  const std::string path = unpack(std::string_view(reinterpret_cast<const char*>(data), size));
  if (path.empty()) return 0;
  try {
    moba::read_checkpoint_state(path);
  } catch (const moba::Error&) {
  }
  try {
    moba::load_checkpoint(path, loaded.model, loaded.optimizer);
  } catch (const moba::Error&) {
  }
  try {
    moba::read_checkpoint_weights(path, loaded.model.layout());
  } catch (const moba::Error&) {
  }
  return 0;
}
