// Turns a TokenDataset into training/eval batches of fixed shape (batch_seqs, seq_len).
// Deterministic given (seed, state): the same state always yields the same next batch, so a resumed run
// sees exactly the batches the uninterrupted run would have seen. Data-parallel ranks take disjoint shards.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "data/dataset.h"

namespace moba::data {

enum class PackMode {
  documents,       // documents concatenated into windows; cu_seqlens splits at every document boundary
  concat,          // same windows, one segment per sequence (attention crosses documents)
  long_documents,  // one window per document starting at its first token; short documents padded + masked
};
PackMode parse_pack_mode(const std::string& s);  // throws moba::Error listing the allowed values
const char* pack_mode_name(PackMode m);

struct SamplerConfig {
  int64_t seq_len = 1024;
  int batch_seqs = 1;           // sequences per batch (micro-batch)
  PackMode pack = PackMode::documents;
  uint64_t seed = 1234;
  bool shuffle = true;          // shuffle document order each epoch (false: file order, e.g. for eval)
  bool single_pass = false;     // next() returns nullopt after one epoch instead of starting the next
  bool use_loss_mask = false;   // SFT: apply the dataset's loss_mask
  int64_t min_doc_tokens = 2;   // long_documents: skip documents with fewer tokens
  int shard_index = 0;          // data-parallel rank
  int shard_count = 1;          // data-parallel world size
};

struct Batch {
  int batch_seqs = 0;
  int64_t seq_len = 0;
  std::vector<int32_t> inputs;      // (batch_seqs, seq_len)
  std::vector<int32_t> targets;     // (batch_seqs, seq_len) next token
  std::vector<uint8_t> loss_mask;   // (batch_seqs, seq_len) 1 = the target counts in the loss
  std::vector<int32_t> positions;   // (batch_seqs, seq_len) RoPE position = index inside the window
  std::vector<int32_t> cu_seqlens;  // (segments + 1) over the flattened batch_seqs*seq_len rows
  std::vector<int32_t> valid_len;   // (batch_seqs) rows before padding (seq_len unless long_documents)
};

struct SamplerState {
  int64_t epoch = 0;
  int64_t cursor = 0;  // position inside the epoch (meaning depends on the pack mode)
};

class Sampler {
 public:
  Sampler(const TokenDataset& dataset, const SamplerConfig& config);
  std::optional<Batch> next();
  SamplerState state() const { return state_; }
  void restore(const SamplerState& state);
  int64_t sequences_per_epoch() const;  // for this shard

 private:
  void start_epoch();
  const TokenDataset& ds_;
  SamplerConfig cfg_;
  SamplerState state_;
  std::vector<int64_t> order_;  // document order of the current epoch
};

}  // namespace moba::data
