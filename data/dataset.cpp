// Opens and validates a tokenized dataset file (format in dataset.h) and serves token ranges from memory.
// Invariant: once open() returns, doc_offsets_ is a monotone partition of tokens_, every token is < vocab_size
// and loss_mask_ is empty or as long as tokens_, so the sampler can index without further checks.
#include "data/dataset.h"

#include <algorithm>
#include <limits>

#include "common/error.h"
#include "common/host_memory.h"
#include "common/log.h"

namespace moba::data {
namespace {

constexpr const char* kRecreate = "recreate it with moba prep";

void require_1d(const h5::File& file, const std::string& name) {
  std::vector<int64_t> shape = file.shape(name);
  MOBA_CHECK(shape.size() == 1, cat(file.path(), ": dataset '", name, "' must be 1-D, found ", shape.size(), "-D"),
             kRecreate);
}

// Opens the file read-only; a missing, truncated or non-HDF5 file gets a hint that fits datasets.
h5::File open_dataset_file(const std::string& path) {
  try {
    return h5::File::open_read(path);
  } catch (const Error& e) {
    throw Error(e.what(), cat("check the path, or re-run moba prep to rewrite the dataset (", e.hint(), ")"));
  }
}

}  // namespace

TokenDataset TokenDataset::open(const std::string& path) {
  h5::File file = open_dataset_file(path);
  TokenDataset ds;
  DatasetInfo& info = ds.info_;
  info.path = path;

  for (const char* name : {"tokens", "doc_offsets"})
    MOBA_CHECK(file.exists(name), cat(path, " has no '", name, "' dataset, so it is not a moba token dataset"),
               cat("point at a train.h5/val.h5 written by moba prep, or ", kRecreate));
  for (const char* key : {"format_version", "vocab_size", "eos_id", "tokenizer", "source", "split"})
    MOBA_CHECK(file.has_attr("/", key), cat(path, " lacks the attribute '", key, "'"),
               cat("the file is incomplete or from another tool; ", kRecreate));

  int64_t version = file.attr_int("/", "format_version");
  MOBA_CHECK(version == 1, cat(path, ": format_version ", version, " is not supported (this moba reads 1)"),
             cat("use the moba version that wrote it, or ", kRecreate));
  int64_t vocab_size = file.attr_int("/", "vocab_size");
  MOBA_CHECK(vocab_size > 0 && vocab_size <= std::numeric_limits<int32_t>::max(),
             cat(path, ": vocab_size ", vocab_size, " is out of range"), kRecreate);
  int64_t eos_id = file.attr_int("/", "eos_id");
  MOBA_CHECK(eos_id >= 0 && eos_id < vocab_size,
             cat(path, ": eos_id ", eos_id, " is not below vocab_size ", vocab_size), kRecreate);
  info.vocab_size = static_cast<int>(vocab_size);
  info.eos_id = static_cast<uint32_t>(eos_id);
  info.tokenizer = file.attr_string("/", "tokenizer");
  info.source = file.attr_string("/", "source");
  info.split = file.attr_string("/", "split");

  // tokens (T,) uint16|uint32
  require_1d(file, "tokens");
  h5::StoredType token_type = file.stored_type("tokens");
  MOBA_CHECK(token_type == h5::StoredType::u16 || token_type == h5::StoredType::u32,
             cat(path, ": 'tokens' is ", h5::stored_type_name(token_type), ", expected uint16 or uint32"), kRecreate);
  const int64_t num_tokens = file.numel("tokens");

  // doc_offsets (D+1,) uint64: 0 = offsets[0] <= offsets[1] <= ... <= offsets[D] = T
  require_1d(file, "doc_offsets");
  h5::StoredType offset_type = file.stored_type("doc_offsets");
  MOBA_CHECK(offset_type == h5::StoredType::u64,
             cat(path, ": 'doc_offsets' is ", h5::stored_type_name(offset_type), ", expected uint64"), kRecreate);
  ds.doc_offsets_ = file.read<uint64_t>("doc_offsets");
  const std::vector<uint64_t>& offsets = ds.doc_offsets_;
  MOBA_CHECK(!offsets.empty(), cat(path, ": 'doc_offsets' is empty (it needs D+1 entries starting at 0)"), kRecreate);
  MOBA_CHECK(offsets.front() == 0, cat(path, ": doc_offsets[0] = ", offsets.front(), ", expected 0"), kRecreate);
  for (size_t d = 1; d < offsets.size(); ++d)
    MOBA_CHECK(offsets[d] >= offsets[d - 1],
               cat(path, ": doc_offsets decreases at index ", d, " (", offsets[d - 1], " then ", offsets[d], ")"),
               kRecreate);
  MOBA_CHECK(offsets.back() == static_cast<uint64_t>(num_tokens),
             cat(path, ": doc_offsets ends at ", offsets.back(), " but 'tokens' has ", num_tokens, " entries"),
             cat("the file is inconsistent (truncated write?); ", kRecreate));
  info.num_documents = static_cast<int64_t>(offsets.size()) - 1;
  info.num_tokens = num_tokens;

  // The tokens (and mask) are held in memory as uint32 (and uint8): refuse before allocating what cannot fit.
  const size_t needed = static_cast<size_t>(num_tokens) * (sizeof(uint32_t) + (file.exists("loss_mask") ? 1 : 0));
  const size_t available = host_available_bytes();
  MOBA_CHECK(available == 0 || needed <= available,
             cat(path, ": its ", num_tokens, " tokens need ", needed >> 20, " MiB of memory but this machine has ",
                 available >> 20, " MiB available"),
             "prepare a smaller dataset (moba prep --max-bytes) or use a machine with more memory");
  if (!file.has_checksum("tokens"))
    moba::info("note: ", path, " carries no checksums (written before moba added them), so corruption in it cannot be "
         "detected; re-run moba prep to add them");
  ds.tokens_ = file.read<uint32_t>("tokens");
  for (size_t i = 0; i < ds.tokens_.size(); ++i)
    MOBA_CHECK(ds.tokens_[i] < static_cast<uint32_t>(vocab_size),
               cat(path, ": tokens[", i, "] = ", ds.tokens_[i], " is not below vocab_size ", vocab_size),
               "the tokens were written with a different tokenizer than the file declares; re-run moba prep "
               "with the right --tokenizer (and --sp-model)");

  // loss_mask (T,) uint8 of 0/1, optional
  if (file.exists("loss_mask")) {
    require_1d(file, "loss_mask");
    h5::StoredType mask_type = file.stored_type("loss_mask");
    MOBA_CHECK(mask_type == h5::StoredType::u8,
               cat(path, ": 'loss_mask' is ", h5::stored_type_name(mask_type), ", expected uint8"), kRecreate);
    MOBA_CHECK(file.numel("loss_mask") == num_tokens,
               cat(path, ": 'loss_mask' has ", file.numel("loss_mask"), " entries but 'tokens' has ", num_tokens),
               kRecreate);
    ds.loss_mask_ = file.read<uint8_t>("loss_mask");
    auto bad = std::find_if(ds.loss_mask_.begin(), ds.loss_mask_.end(), [](uint8_t m) { return m > 1; });
    MOBA_CHECK(bad == ds.loss_mask_.end(),
               cat(path, ": loss_mask[", bad - ds.loss_mask_.begin(), "] = ", static_cast<int>(*bad),
                   ", expected 0 or 1"),
               kRecreate);
    info.has_loss_mask = true;
  }
  return ds;
}

void TokenDataset::read_tokens(int64_t offset, int64_t count, int32_t* out) const {
  MOBA_ASSERT(offset >= 0 && count >= 0 && offset + count <= info_.num_tokens);
  for (int64_t i = 0; i < count; ++i) out[i] = static_cast<int32_t>(tokens_[static_cast<size_t>(offset + i)]);
}

void TokenDataset::read_loss_mask(int64_t offset, int64_t count, uint8_t* out) const {
  MOBA_ASSERT(offset >= 0 && count >= 0 && offset + count <= info_.num_tokens);
  if (loss_mask_.empty()) {
    std::fill(out, out + count, uint8_t{1});
    return;
  }
  std::copy_n(loss_mask_.begin() + offset, count, out);
}

}  // namespace moba::data
