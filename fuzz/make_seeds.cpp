// Writes the fuzz targets' seed corpora from the tests' inputs: usage `fuzz_make_seeds SOURCE_DIR OUT_DIR`.
//   OUT/recipe/      every recipe of recipes/ alone and with the tests' --set overrides (NUL-separated)
//   OUT/jsonl/       fuzz/seeds/jsonl/* as JSON Lines, plain text, SFT, limited, gzip and xz
//   OUT/dataset/     small datasets as moba writes them (uint16/uint32 tokens, with a loss mask) and as moba
//                    wrote them before checksums
//   OUT/checkpoint/  a tiny model's checkpoint directory, and single-file checkpoints with and without checksums
#include <lzma.h>
#include <zlib.h>

#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "common/hdf5_io.h"
#include "fuzz/fuzz_support.h"
#include "kernels/backend.h"
#include "tests/support/test_util.h"
#include "trainer/checkpoint.h"
#include "trainer/optimizer.h"

namespace fs = std::filesystem;

namespace moba::fuzz {
namespace {

std::string read_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string gzip(const std::string& data) {
  z_stream z{};
  deflateInit2(&z, 6, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY);  // 15 + 16: a gzip header
  std::string out(deflateBound(&z, data.size()) + 32, '\0');
  z.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(data.data()));
  z.avail_in = static_cast<uInt>(data.size());
  z.next_out = reinterpret_cast<Bytef*>(out.data());
  z.avail_out = static_cast<uInt>(out.size());
  deflate(&z, Z_FINISH);
  out.resize(z.total_out);
  deflateEnd(&z);
  return out;
}

std::string xz(const std::string& data) {
  std::string out(lzma_stream_buffer_bound(data.size()), '\0');
  size_t written = 0;
  lzma_easy_buffer_encode(6, LZMA_CHECK_CRC64, nullptr, reinterpret_cast<const uint8_t*>(data.data()), data.size(),
                          reinterpret_cast<uint8_t*>(out.data()), &written, out.size());
  out.resize(written);
  return out;
}

void recipes(const fs::path& source, const fs::path& out) {
  const std::vector<std::string> overrides = {
      "train.optimizer.lr=3e-4", "attention.full_layers=[0, 1]", "model.n_layers=3", "data.val=",
      "phases=[{until: 0.5, attention: {mode: moba, full_layers: none}}, {until: 1.0, attention: {mode: full}}]",
      "train.tokens=.inf", "model.d_model=", "parallel.data=auto", "attention.moba.top_k=2"};
  int n = 0;
  for (const auto& e : fs::recursive_directory_iterator(source / "recipes")) {
    if (e.path().extension() != ".yaml") continue;
    const std::string yaml = read_bytes(e.path());
    write_bytes(out / cat("recipe_", n, ".yaml"), yaml);
    for (size_t i = 0; i < overrides.size(); ++i)
      write_bytes(out / cat("recipe_", n, "_set_", i), yaml + std::string(1, '\0') + overrides[i]);
    ++n;
  }
}

void text_inputs(const fs::path& source, const fs::path& out) {
  for (const auto& e : fs::directory_iterator(source / "fuzz" / "seeds" / "jsonl")) {
    const std::string name = e.path().stem().string(), text = read_bytes(e.path());
    const char plain = e.path().extension() == ".txt" ? 2 : 0, sft = name == "sft" ? 1 : 0;
    write_bytes(out / (name + "_read"), std::string(1, plain | sft) + text);
    write_bytes(out / (name + "_limited"), std::string(1, static_cast<char>(plain | sft | 4 | 8 | 0x30)) + text);
    write_bytes(out / (name + "_gz"), std::string(1, plain | sft) + gzip(text));
    write_bytes(out / (name + "_xz"), std::string(1, plain | sft) + xz(text));
  }
}

void write_dataset(const fs::path& path, bool wide, bool mask) {
  h5::File f = h5::File::create(path.string());
  std::vector<uint32_t> tokens;
  std::vector<uint64_t> offsets{0};
  for (int doc = 0; doc < 5; ++doc) {
    for (int t = 0; t < 7 + 5 * doc; ++t) tokens.push_back(static_cast<uint32_t>((doc * 31 + t) % 256));
    tokens.push_back(256);  // EOS
    offsets.push_back(tokens.size());
  }
  if (wide) {
    f.write("tokens", tokens);
  } else {
    f.write("tokens", std::vector<uint16_t>(tokens.begin(), tokens.end()));
  }
  f.write("doc_offsets", offsets);
  if (mask) {
    std::vector<uint8_t> m(tokens.size());
    for (size_t i = 0; i < m.size(); ++i) m[i] = i % 3 != 0;
    f.write("loss_mask", m);
  }
  f.set_attr("/", "format_version", int64_t{1});
  f.set_attr("/", "vocab_size", int64_t{258});
  f.set_attr("/", "eos_id", int64_t{256});
  f.set_attr("/", "tokenizer", std::string("byte"));
  f.set_attr("/", "source", std::string("fuzz seed"));
  f.set_attr("/", "split", std::string("train"));
}

void datasets(const fs::path& out, const fs::path& work) {
  for (bool wide : {false, true})
    for (bool mask : {false, true}) {
      const std::string name = cat("dataset_", wide ? "u32" : "u16", mask ? "_mask" : "");
      write_dataset(out / (name + ".h5"), wide, mask);
      test::write_legacy_copy((out / (name + ".h5")).string(), (work / "legacy.h5").string());
      fs::copy_file(work / "legacy.h5", out / (name + "_legacy.h5"), fs::copy_options::overwrite_existing);
    }
}

void checkpoints(const fs::path& out, const fs::path& work) {
  std::unique_ptr<Backend> backend = make_cpu_backend();
  model::Transformer model(*backend, tiny_model(), 8, 0);
  AdamW optimizer(*backend, model, OptimizerSettings{});
  optimizer.set_master_from_host(test::random_vector(static_cast<size_t>(model.layout().total()), 1));
  const size_t state_numel = static_cast<size_t>(optimizer.state_numel());
  optimizer.state_from_host(AdamW::State::first_moment, test::random_vector(state_numel, 2));
  optimizer.state_from_host(AdamW::State::second_moment, test::random_vector(state_numel, 3, 0.0f, 1.0f));
  CheckpointState state;
  state.step = 1;
  state.recipe_yaml = "name: fuzz\n";
  const std::string dir = save_checkpoint((work / "ckpt").string(), state, model, optimizer, nullptr, 1);
  const std::string model_h5 = read_bytes(fs::path(dir) / "model.h5"), shard = read_bytes(fs::path(dir) / "shard_00000.h5");
  const uint32_t sizes[2] = {static_cast<uint32_t>(model_h5.size()), static_cast<uint32_t>(shard.size())};
  write_bytes(out / "directory", std::string(1, static_cast<char>(CheckpointKind::directory)) +
                                     std::string(reinterpret_cast<const char*>(sizes), sizeof sizes) + model_h5 + shard +
                                     read_bytes(fs::path(dir) / "manifest.yaml"));
  state.tokens_seen = 1024;
  state.sampler.cursor = 2;
  test::write_single_file_checkpoint((work / "single.h5").string(), optimizer, model.layout(), state);
  const std::string single_file(1, static_cast<char>(CheckpointKind::single_file));
  write_bytes(out / "single_file", single_file + read_bytes(work / "single.h5"));
  test::write_legacy_copy((work / "single.h5").string(), (work / "legacy.h5").string());
  write_bytes(out / "single_file_legacy", single_file + read_bytes(work / "legacy.h5"));
}

}  // namespace
}  // namespace moba::fuzz

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: fuzz_make_seeds SOURCE_DIR OUT_DIR\n";
    return 2;
  }
  const fs::path source = argv[1], out = argv[2], work = out / ".work";
  for (const char* target : {"recipe", "jsonl", "dataset", "checkpoint"}) fs::create_directories(out / target);
  fs::create_directories(work);
  try {
    moba::fuzz::recipes(source, out / "recipe");
    moba::fuzz::text_inputs(source, out / "jsonl");
    moba::fuzz::datasets(out / "dataset", work);
    moba::fuzz::checkpoints(out / "checkpoint", work);
  } catch (const moba::Error& e) {
    std::cerr << "fuzz_make_seeds: " << e.what() << "\n";
    return 1;
  }
  fs::remove_all(work);
  return 0;
}
