// Shared by the fuzz targets and their seed generator: a scratch directory per process (readers that take files
// get the input written there), and the tiny model whose checkpoints the checkpoint target loads.
// Invariant: a target's only accepted failure is a moba::Error; anything else (a crash, a sanitizer report,
// another exception) is a finding, and the input that caused it is kept in fuzz/regressions/<target>/.
#pragma once
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>

#include "model/transformer.h"
#include "tests/support/tiny_model.h"

namespace moba::fuzz {

// <tmp>/moba-fuzz-<pid>/, created once per process.
inline const std::filesystem::path& scratch() {
  static const std::filesystem::path dir = [] {
    std::filesystem::path p = std::filesystem::temp_directory_path() / ("moba-fuzz-" + std::to_string(getpid()));
    std::filesystem::create_directories(p);
    return p;
  }();
  return dir;
}

inline void write_bytes(const std::filesystem::path& path, std::string_view bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// Whether `bytes` is an HDF5 file without checksums: a superblock of version 0 or 1 (what moba wrote before
// checksums), found where HDF5 looks for it (offset 0, 512, 1024, ...). libhdf5 1.10.8 itself crashes on some
// damaged ones (docs/fuzzing.md), so the HDF5 targets skip them unless run with -moba_files_without_checksums=1
// (the exploratory runs, in -fork mode; the regressions).
inline bool hdf5_without_checksums(std::string_view bytes) {
  static constexpr std::string_view kSignature("\x89HDF\r\n\x1a\n", 8);
  for (size_t at = 0; at + 9 <= bytes.size(); at = at == 0 ? 512 : at * 2)
    if (bytes.substr(at, 8) == kSignature) return static_cast<uint8_t>(bytes[at + 8]) < 2;
  return false;
}

// True when the target was started with -moba_files_without_checksums=1 (set by LLVMFuzzerInitialize).
inline bool& fuzz_files_without_checksums() {
  static bool enabled = false;
  return enabled;
}

inline void parse_fuzz_flags(int argc, char** argv) {
  for (int i = 1; i < argc; ++i)
    if (std::string_view(argv[i]) == "-moba_files_without_checksums=1") fuzz_files_without_checksums() = true;
}

// The model of the checkpoint seeds: the checkpoint tests' tiny model.
inline model::ModelConfig tiny_model() { return test::tiny_model_config(); }

// A directory checkpoint packed into one input: u32 size of model.h5, u32 size of the shard, then model.h5, the
// shard and manifest.yaml back to back; a single-file checkpoint is the file itself. The first byte says which.
enum class CheckpointKind : uint8_t { single_file = 0, directory = 1 };

}  // namespace moba::fuzz
