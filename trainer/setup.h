// Glue between a Recipe and the model/data layers, shared by `moba train` and `moba eval`: the model's
// shape, per-layer attention, and host batches viewed as model inputs.
#pragma once
#include <string>
#include <vector>

#include "data/context_shard.h"
#include "data/sampler.h"
#include "model/transformer.h"
#include "trainer/recipe.h"

namespace moba {

// The model shape; vocab_size comes from the recipe or, when it says 0, from the dataset.
model::ModelConfig model_config_from(const Recipe& recipe, int dataset_vocab_size);
// How each layer attends under `attention` (full or moba with block size and top_k).
std::vector<AttentionParams> layer_attention(const AttentionSettings& attention, const model::ModelConfig& config,
                                             bool deterministic = false);
// The largest top_k any phase can use (sizes the routing buffer).
int max_top_k(const Recipe& recipe);
// How the model keeps its activations (routing buffer size, train.recompute).
model::TransformerOptions transformer_options(const Recipe& recipe);
// The buffers one rank allocates for the model and AdamW for a micro-batch of micro_tokens rows on this rank (the
// optimizer state is one ZeRO-1 shard when options.parameter_shards > 1 and parallel.zero is 1).
// `backend` sizes the attention kernels' scratch; without one (planning a GPU run without a GPU) the plan uses
// `activations` and leaves that scratch out.
std::vector<model::MemoryItem> rank_memory_plan(const Recipe& recipe, const model::ModelConfig& config,
                                                int64_t micro_tokens, const model::TransformerOptions& options,
                                                const Backend* backend, DType activations);
// Memory one command will allocate, by buffer: through the backend, and in plain host memory.
struct MemoryPlan {
  std::vector<model::MemoryItem> backend;  // weights, gradients, optimizer state, activations
  std::vector<model::MemoryItem> host;     // host-side buffers (on the CPU backend the same memory as the above)
};
// Prints the plan and fails before anything is allocated when it does not fit: the backend's items against what
// the backend has free (a GPU's free memory; on the CPU the host memory available, cgroup limits included), host
// items against host memory. `what` names the job ("training (micro-batch of 4096 tokens)"); `settings` says
// what shrinks the plan; `ranks_per_host` ranks of the job run this plan on the same machine (CPU ranks share its
// memory).
void check_memory_fits(const std::string& what, const MemoryPlan& plan, const Backend& backend,
                       const std::string& settings, int ranks_per_host = 1);
// The plan of one training rank for a micro-batch of micro_tokens (the optimizer state is one ZeRO-1 shard when
// options.parameter_shards > 1 and parallel.zero is 1), checked as above with the recipe's settings to change.
// Returns the planned bytes on the backend.
size_t check_memory_plan(const Recipe& recipe, const model::ModelConfig& config, int64_t micro_tokens,
                         const model::TransformerOptions& options, const Backend& backend, int ranks_per_host = 1);
// Context parallelism's constraints on the recipe (no-op for context 1): data.seq_len a multiple of 2 x context,
// and of 2 x context x block_size wherever a phase runs MoBA layers (a block never straddles two ranks' chunks).
void check_context_parallel(const Recipe& recipe, int context);
model::TokenBatch token_batch(const data::Batch& batch);
// The rows of `batch` this context-parallel rank computes: the whole batch when context == 1, else its zigzag
// chunks (cut into `storage`, which must outlive the returned view).
model::TokenBatch local_batch(const data::Batch& batch, int context, int context_rank, data::ContextShard& storage);
data::PackMode pack_mode_of(const DataSettings& data);
// A one-line description of per-layer attention, e.g. "moba(B=512,k=3) x10 + full x2 (layers 10-11)".
std::string describe_attention(const std::vector<AttentionParams>& layers);

}  // namespace moba
