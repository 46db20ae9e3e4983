// libFuzzer target: a tokenized dataset file (data/dataset.h). TokenDataset::open must throw a moba::Error or
// return a dataset whose promises hold: every document's tokens readable and below vocab_size, and the sampler
// able to cut batches from it in every packing mode without reading out of bounds.
#include <cstdint>
#include <string>
#include <string_view>

#include "common/error.h"
#include "data/dataset.h"
#include "data/sampler.h"
#include "fuzz/fuzz_support.h"

extern "C" int LLVMFuzzerInitialize(int* argc, char*** argv) {
  moba::fuzz::parse_fuzz_flags(*argc, *argv);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  if (moba::fuzz::hdf5_without_checksums(input) && !moba::fuzz::fuzz_files_without_checksums()) return 0;
  const std::string path = (moba::fuzz::scratch() / "dataset.h5").string();
  moba::fuzz::write_bytes(path, input);
  try {
    const moba::data::TokenDataset ds = moba::data::TokenDataset::open(path);
    std::vector<int32_t> tokens(static_cast<size_t>(ds.info().num_tokens));
    std::vector<uint8_t> mask(tokens.size());
    ds.read_tokens(0, ds.info().num_tokens, tokens.data());
    ds.read_loss_mask(0, ds.info().num_tokens, mask.data());
    for (int32_t t : tokens)
      if (t < 0 || t >= ds.info().vocab_size) std::abort();
    for (moba::data::PackMode pack :
         {moba::data::PackMode::documents, moba::data::PackMode::concat, moba::data::PackMode::long_documents}) {
      moba::data::SamplerConfig config;
      config.seq_len = 8;
      config.batch_seqs = 2;
      config.pack = pack;
      config.use_loss_mask = ds.info().has_loss_mask;
      try {
        moba::data::Sampler sampler(ds, config);
        for (int b = 0; b < 4; ++b) sampler.next();
      } catch (const moba::Error&) {  // e.g. too small for one batch
      }
    }
  } catch (const moba::Error&) {
  }
  return 0;
}
