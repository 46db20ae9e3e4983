// Turns a TokenDataset into training/eval batches of fixed shape (batch_seqs, seq_len).
// Deterministic given (seed, state): the same state always yields the same next batch, so a resumed run
// sees exactly the batches the uninterrupted run would have seen. Data-parallel ranks take disjoint shards.
//
// Epochs: epoch e visits the documents in an order shuffled by std::mt19937_64(seed + e) with a hand-written
// Fisher-Yates (the same on every platform), or in file order when !shuffle.
//   documents/concat: the documents of that order, concatenated, form a stream cut into windows
//     stream[w*T, w*T + T + 1) (inputs the first T tokens, targets the last T). Global sequence i is window
//     w = perm_e(i), a permutation drawn from the same generator (identity when !shuffle), so consecutive
//     sequences, and so the rows of a batch, come from all over the corpus rather than from one document.
//   long_documents: global sequence i is the window at the start of the i-th document of the order with at
//     least max(min_doc_tokens, 2) tokens.
// Shards: shard s takes the global sequences i with i % shard_count == s. Every shard gets the same number of
// sequences per epoch (the last < shard_count sequences are dropped) so ranks step in lockstep, and an epoch
// ends at the last complete batch: a trailing partial batch is dropped, for single_pass too.
// SamplerState::cursor counts this shard's sequences already taken in the epoch.
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
  // Sequences per epoch (over all shards) are rounded down to a multiple of this, so that the epoch, and with it
  // the window order, is the same for every shard_count dividing it (training passes the global batch in
  // sequences); 0 = only the shard rounding below.
  int64_t epoch_multiple = 0;
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
  // Fills row `row` of `batch` with global sequence `sequence` of the current epoch.
  void fill_stream_row(Batch& batch, int row, int64_t window_index) const;
  void fill_document_row(Batch& batch, int row, int64_t sequence) const;
  const TokenDataset& ds_;
  SamplerConfig cfg_;
  SamplerState state_;
  std::vector<int64_t> candidates_;      // documents an epoch visits (long_documents: only long-enough ones)
  int64_t shard_sequences_ = 0;          // sequences per epoch for this shard
  std::vector<int64_t> order_;           // document order of the current epoch
  int64_t order_epoch_ = -1;             // the epoch order_ belongs to
  std::vector<int64_t> stream_offsets_;  // (order_.size() + 1,) start of each ordered document in the stream
  std::vector<int64_t> window_order_;    // documents/concat with shuffle: global sequence -> window index
};

}  // namespace moba::data
