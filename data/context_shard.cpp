#include "data/context_shard.h"

#include "common/error.h"

namespace moba::data {
namespace {

// Whole-batch rows of rank r: for each sequence, chunk r then chunk 2C-1-r.
std::vector<int32_t> rows_of(int rank, int context, int batch_seqs, int64_t seq_len) {
  const int64_t chunk = seq_len / (2 * context);
  std::vector<int32_t> rows;
  rows.reserve(static_cast<size_t>(batch_seqs * 2 * chunk));
  for (int s = 0; s < batch_seqs; ++s)
    for (int64_t c : {static_cast<int64_t>(rank), static_cast<int64_t>(2 * context - 1 - rank)})
      for (int64_t t = 0; t < chunk; ++t) rows.push_back(static_cast<int32_t>(s * seq_len + c * chunk + t));
  return rows;
}

}  // namespace

ContextShard shard_for_context(const Batch& batch, int context, int rank) {
  MOBA_CHECK(context >= 1 && rank >= 0 && rank < context, cat("context shard ", rank, " of ", context),
             "this is a bug in the caller");
  MOBA_CHECK(batch.seq_len % (2 * context) == 0,
             cat("data.seq_len ", batch.seq_len, " is not a multiple of 2 x parallel.context = ", 2 * context),
             "use a seq_len divisible by 2 x parallel.context (x the MoBA block size with MoBA layers)");
  ContextShard shard;
  shard.global_rows = rows_of(rank, context, batch.batch_seqs, batch.seq_len);
  shard.cu_seqlens = batch.cu_seqlens;
  for (int r = 0; r < context; ++r) {
    std::vector<int32_t> rows = rows_of(r, context, batch.batch_seqs, batch.seq_len);
    shard.gathered_rows.insert(shard.gathered_rows.end(), rows.begin(), rows.end());
  }
  shard.gathered_index.assign(shard.gathered_rows.size(), 0);
  for (size_t i = 0; i < shard.gathered_rows.size(); ++i)
    shard.gathered_index[static_cast<size_t>(shard.gathered_rows[i])] = static_cast<int32_t>(i);

  Batch& local = shard.local;
  local.batch_seqs = batch.batch_seqs;
  local.seq_len = batch.seq_len / context;
  local.valid_len = batch.valid_len;
  for (int32_t row : shard.global_rows) {
    const size_t g = static_cast<size_t>(row);
    local.inputs.push_back(batch.inputs[g]);
    local.targets.push_back(batch.targets[g]);
    local.loss_mask.push_back(batch.loss_mask[g]);
    local.positions.push_back(batch.positions[g]);
  }
  return shard;
}

}  // namespace moba::data
