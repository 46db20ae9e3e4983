// A tokenized dataset in HDF5 (readable from h5py):
//   tokens      (T,)   uint16 or uint32   every document's tokens, each document followed by EOS
//   doc_offsets (D+1,) uint64             document d is tokens[doc_offsets[d] : doc_offsets[d+1]]
//   loss_mask   (T,)   uint8, optional    SFT: 0 on prompt tokens, 1 on response tokens (and EOS)
//   attributes on "/": vocab_size, eos_id, tokenizer ("byte"|"sentencepiece"), source, split, format_version
// Every dataset carries a Fletcher32 checksum per chunk (common/hdf5_io.h); files written before that still
// open, with a note that corruption in them cannot be detected.
// Invariant: open() validates everything (checksums, shapes, monotone offsets, token ids < vocab_size) so
// readers can trust the file; a truncated or corrupt file is a moba::Error naming the file and the fix.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/hdf5_io.h"

namespace moba::data {

struct DatasetInfo {
  std::string path;
  int vocab_size = 0;
  uint32_t eos_id = 0;
  std::string tokenizer;  // "byte" | "sentencepiece"
  std::string source;     // what it was prepared from
  std::string split;      // "train" | "val"
  int64_t num_tokens = 0;
  int64_t num_documents = 0;
  bool has_loss_mask = false;
};

class TokenDataset {
 public:
  static TokenDataset open(const std::string& path);  // validates; throws moba::Error
  const DatasetInfo& info() const { return info_; }
  int64_t num_documents() const { return info_.num_documents; }
  int64_t doc_begin(int64_t d) const { return static_cast<int64_t>(doc_offsets_[d]); }
  int64_t doc_end(int64_t d) const { return static_cast<int64_t>(doc_offsets_[d + 1]); }
  int64_t doc_length(int64_t d) const { return doc_end(d) - doc_begin(d); }
  // Reads tokens [offset, offset+count) as int32; loss mask likewise (all ones when the file has none).
  void read_tokens(int64_t offset, int64_t count, int32_t* out) const;
  void read_loss_mask(int64_t offset, int64_t count, uint8_t* out) const;

 private:
  DatasetInfo info_;
  std::vector<uint64_t> doc_offsets_;
  std::vector<uint32_t> tokens_;  // whole token array in memory (datasets here are <= a few hundred M tokens)
  std::vector<uint8_t> loss_mask_;
};

}  // namespace moba::data
