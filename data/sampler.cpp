// Batches from a TokenDataset: epoch orders, stream windows, document windows and sharding (see sampler.h).
// Invariant: a batch is a pure function of (dataset, config, state), so restore(state) + next() reproduces
// the batch the original sampler produced from that state.
#include "data/sampler.h"

#include <algorithm>
#include <limits>
#include <random>

#include "common/error.h"

namespace moba::data {
namespace {

// Uniform integer in [0, bound) from mt19937_64 by rejection, identical on every standard library
// (std::uniform_int_distribution is implementation-defined).
uint64_t uniform_below(std::mt19937_64& rng, uint64_t bound) {
  const uint64_t reject_below = (0 - bound) % bound;  // 2^64 mod bound: the biased low values
  while (true) {
    uint64_t x = rng();
    if (x >= reject_below) return x % bound;
  }
}

}  // namespace

PackMode parse_pack_mode(const std::string& s) {
  if (s == "documents") return PackMode::documents;
  if (s == "concat") return PackMode::concat;
  if (s == "long_documents") return PackMode::long_documents;
  throw Error(cat("unknown pack mode '", s, "'"), "use documents, concat or long_documents");
}

const char* pack_mode_name(PackMode m) {
  switch (m) {
    case PackMode::documents: return "documents";
    case PackMode::concat: return "concat";
    case PackMode::long_documents: return "long_documents";
  }
  return "unknown";
}

Sampler::Sampler(const TokenDataset& dataset, const SamplerConfig& config) : ds_(dataset), cfg_(config) {
  const std::string& path = ds_.info().path;
  MOBA_CHECK(cfg_.seq_len >= 1, cat("sampler: seq_len must be >= 1, got ", cfg_.seq_len), "fix seq_len");
  MOBA_CHECK(cfg_.batch_seqs >= 1, cat("sampler: batch_seqs must be >= 1, got ", cfg_.batch_seqs), "fix the batch size");
  MOBA_CHECK(cfg_.shard_count >= 1 && cfg_.shard_index >= 0 && cfg_.shard_index < cfg_.shard_count,
             cat("sampler: shard ", cfg_.shard_index, " of ", cfg_.shard_count, " is not a valid shard"),
             "shard_index must be in [0, shard_count)");
  MOBA_CHECK(cfg_.seq_len * cfg_.batch_seqs <= std::numeric_limits<int32_t>::max(),
             cat("sampler: batch_seqs * seq_len = ", cfg_.seq_len * cfg_.batch_seqs, " does not fit int32 cu_seqlens"),
             "use a smaller batch or sequence length");

  int64_t global_sequences = 0;
  if (cfg_.pack == PackMode::long_documents) {
    const int64_t min_tokens = std::max<int64_t>(cfg_.min_doc_tokens, 2);
    for (int64_t d = 0; d < ds_.num_documents(); ++d)
      if (ds_.doc_length(d) >= min_tokens) candidates_.push_back(d);
    global_sequences = static_cast<int64_t>(candidates_.size());
  } else {
    candidates_.resize(static_cast<size_t>(ds_.num_documents()));
    for (int64_t d = 0; d < ds_.num_documents(); ++d) candidates_[static_cast<size_t>(d)] = d;
    const int64_t stream = ds_.info().num_tokens;
    global_sequences = stream >= cfg_.seq_len + 1 ? (stream - 1) / cfg_.seq_len : 0;
  }
  MOBA_CHECK(cfg_.epoch_multiple >= 0 && (cfg_.epoch_multiple == 0 || cfg_.epoch_multiple % cfg_.shard_count == 0),
             cat("sampler: epoch_multiple ", cfg_.epoch_multiple, " is not a multiple of ", cfg_.shard_count, " shards"),
             "this is a bug in the caller");
  if (cfg_.epoch_multiple > 0) global_sequences = global_sequences / cfg_.epoch_multiple * cfg_.epoch_multiple;
  shard_sequences_ = global_sequences / cfg_.shard_count;
  MOBA_CHECK(shard_sequences_ >= cfg_.batch_seqs,
             cat(path, " yields ", global_sequences, " sequences per epoch in ", pack_mode_name(cfg_.pack),
                 " mode (seq_len ", cfg_.seq_len, ", ", ds_.info().num_tokens, " tokens, ", ds_.num_documents(),
                 " documents), ", shard_sequences_, " per shard of ", cfg_.shard_count, ": fewer than one batch of ",
                 cfg_.batch_seqs),
             "use more data, a shorter seq_len, a smaller batch, fewer ranks or (long_documents) a lower "
             "min_doc_tokens");
}

int64_t Sampler::sequences_per_epoch() const { return shard_sequences_; }

void Sampler::restore(const SamplerState& state) {
  MOBA_CHECK(state.epoch >= 0 && state.cursor >= 0 && state.cursor <= shard_sequences_,
             cat("sampler state (epoch ", state.epoch, ", cursor ", state.cursor, ") is outside this dataset's ",
                 shard_sequences_, " sequences per epoch"),
             "resume with the same dataset, seq_len and data-parallel size as the run that saved the state");
  state_ = state;
}

void Sampler::start_epoch() {
  order_ = candidates_;
  if (cfg_.shuffle) {
    std::mt19937_64 rng(cfg_.seed + static_cast<uint64_t>(state_.epoch));
    for (size_t i = order_.size(); i > 1; --i) std::swap(order_[i - 1], order_[uniform_below(rng, i)]);
  }
  if (cfg_.pack != PackMode::long_documents) {
    stream_offsets_.assign(order_.size() + 1, 0);
    for (size_t k = 0; k < order_.size(); ++k) stream_offsets_[k + 1] = stream_offsets_[k] + ds_.doc_length(order_[k]);
    if (cfg_.shuffle) {
      // Mix windows too, so one batch never comes from a single long document (8 bytes per window).
      std::mt19937_64 rng(cfg_.seed + static_cast<uint64_t>(state_.epoch) + 0x9E3779B97F4A7C15ull);
      window_order_.resize(static_cast<size_t>(shard_sequences_ * cfg_.shard_count));
      for (size_t i = 0; i < window_order_.size(); ++i) window_order_[i] = static_cast<int64_t>(i);
      for (size_t i = window_order_.size(); i > 1; --i) std::swap(window_order_[i - 1], window_order_[uniform_below(rng, i)]);
    }
  }
  order_epoch_ = state_.epoch;
}

std::optional<Batch> Sampler::next() {
  if (state_.cursor + cfg_.batch_seqs > shard_sequences_) {
    if (cfg_.single_pass) return std::nullopt;
    state_.epoch += 1;
    state_.cursor = 0;
  }
  if (order_epoch_ != state_.epoch) start_epoch();

  const int64_t T = cfg_.seq_len;
  const size_t rows = static_cast<size_t>(cfg_.batch_seqs * T);
  Batch batch;
  batch.batch_seqs = cfg_.batch_seqs;
  batch.seq_len = T;
  batch.inputs.resize(rows);
  batch.targets.resize(rows);
  batch.loss_mask.resize(rows);
  batch.positions.resize(rows);
  batch.valid_len.assign(static_cast<size_t>(cfg_.batch_seqs), static_cast<int32_t>(T));
  batch.cu_seqlens.assign(1, 0);
  for (size_t r = 0; r < rows; ++r) batch.positions[r] = static_cast<int32_t>(static_cast<int64_t>(r) % T);
  for (int row = 0; row < cfg_.batch_seqs; ++row) {
    int64_t sequence = (state_.cursor + row) * cfg_.shard_count + cfg_.shard_index;
    if (cfg_.pack == PackMode::long_documents) fill_document_row(batch, row, sequence);
    else fill_stream_row(batch, row, window_order_.empty() ? sequence : window_order_[static_cast<size_t>(sequence)]);
  }
  state_.cursor += cfg_.batch_seqs;
  return batch;
}

// Window stream[w*T, w*T + T + 1) of the concatenated documents; in documents mode a new segment starts at
// every row whose input token is the first token of a document.
void Sampler::fill_stream_row(Batch& batch, int row, int64_t window_index) const {
  const int64_t T = cfg_.seq_len;
  const int64_t row_start = row * T;
  std::vector<int32_t> window(static_cast<size_t>(T + 1));  // (T+1,) tokens
  std::vector<uint8_t> mask(static_cast<size_t>(T + 1));    // (T+1,) loss mask of each token
  int64_t position = window_index * T;  // in the stream
  size_t k = static_cast<size_t>(std::upper_bound(stream_offsets_.begin(), stream_offsets_.end(), position) -
                                 stream_offsets_.begin() - 1);
  int64_t filled = 0;
  while (filled < T + 1) {
    MOBA_ASSERT(k < order_.size());
    const int64_t doc = order_[k];
    const int64_t local = position + filled - stream_offsets_[k];
    const int64_t count = std::min(T + 1 - filled, ds_.doc_length(doc) - local);
    if (count > 0) {
      ds_.read_tokens(ds_.doc_begin(doc) + local, count, window.data() + filled);
      if (cfg_.use_loss_mask) ds_.read_loss_mask(ds_.doc_begin(doc) + local, count, mask.data() + filled);
      if (cfg_.pack == PackMode::documents && local == 0 && filled > 0 && filled < T)
        batch.cu_seqlens.push_back(static_cast<int32_t>(row_start + filled));
      filled += count;
    }
    ++k;
  }
  for (int64_t t = 0; t < T; ++t) {
    batch.inputs[static_cast<size_t>(row_start + t)] = window[static_cast<size_t>(t)];
    batch.targets[static_cast<size_t>(row_start + t)] = window[static_cast<size_t>(t + 1)];
    batch.loss_mask[static_cast<size_t>(row_start + t)] = cfg_.use_loss_mask ? mask[static_cast<size_t>(t + 1)] : 1;
  }
  batch.cu_seqlens.push_back(static_cast<int32_t>(row_start + T));
}

// One document's first min(len-1, T) rows; the rest of the row is EOS padding with loss 0 in its own segment.
void Sampler::fill_document_row(Batch& batch, int row, int64_t sequence) const {
  const int64_t T = cfg_.seq_len;
  const int64_t row_start = row * T;
  const int64_t doc = order_[static_cast<size_t>(sequence)];
  const int64_t real = std::min(ds_.doc_length(doc) - 1, T);
  std::vector<int32_t> window(static_cast<size_t>(real + 1));  // (real+1,) tokens
  std::vector<uint8_t> mask(static_cast<size_t>(real + 1), 1);
  ds_.read_tokens(ds_.doc_begin(doc), real + 1, window.data());
  if (cfg_.use_loss_mask) ds_.read_loss_mask(ds_.doc_begin(doc), real + 1, mask.data());
  const int32_t eos = static_cast<int32_t>(ds_.info().eos_id);
  for (int64_t t = 0; t < T; ++t) {
    size_t r = static_cast<size_t>(row_start + t);
    bool is_real = t < real;
    batch.inputs[r] = is_real ? window[static_cast<size_t>(t)] : eos;
    batch.targets[r] = is_real ? window[static_cast<size_t>(t + 1)] : eos;
    batch.loss_mask[r] = is_real ? mask[static_cast<size_t>(t + 1)] : 0;
  }
  if (real < T) batch.cu_seqlens.push_back(static_cast<int32_t>(row_start + real));
  batch.cu_seqlens.push_back(static_cast<int32_t>(row_start + T));
  batch.valid_len[static_cast<size_t>(row)] = static_cast<int32_t>(real);
}

}  // namespace moba::data
