// What a recipe's parallel layout costs each rank, before launching: the memory of every buffer (the trainer's own
// plan for the rank's rows, trainer/setup.h) and the bytes each rank moves per layer and per step, with times at a
// given collective bandwidth. `moba plan RECIPE --ranks N` prints it, so a user knows whether 1M tokens fit on
// 8 GPUs, or 10M on 64, and what the gathers will cost.
// Invariant: the memory lines are exactly what the trainer allocates for the same settings (tested); bytes count
// what each rank receives in ring/NVSwitch collectives ((size - 1) / size of the gathered or reduced data).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "model/transformer.h"
#include "parallel/layout.h"
#include "trainer/recipe.h"

namespace moba {

struct ParallelPlan {
  parallel::ParallelLayout layout;
  int64_t rank_tokens = 0;      // rows per micro-batch on each rank (seq_len x micro_batch_seqs / context)
  int64_t accumulation = 0;     // micro-batches per step on each rank
  std::vector<model::MemoryItem> memory;
  size_t memory_bytes = 0;      // their sum: what one rank allocates
  // Bytes one rank receives:
  double kv_gather_per_layer = 0;    // K and V of one layer, all-gathered (forward; the backward gathers again)
  double kv_grad_per_layer = 0;      // f32 dK and dV of one layer, reduce-scattered (backward)
  double context_per_step = 0;       // all of the above over every layer and micro-batch of a step
  double gradients_per_step = 0;     // f32 gradients: reduce-scatter (zero 1) or all-reduce (zero 0), and the
                                     // all-reduce of the shards over the context group
  double weights_per_step = 0;       // bf16 working weights all-gathered after the step (zero 1)
};

// `ranks` processes with the recipe's parallel settings. `backend` (may be null: no GPU here) sizes the attention
// kernels' scratch; `activations` is the recipe backend's activation dtype (bf16 for cuda).
ParallelPlan plan_parallel(const Recipe& recipe, const model::ModelConfig& config, int ranks, const Backend* backend,
                           DType activations);
// A human-readable table of the plan; bandwidth_gbs (GB/s of a collective's bus bandwidth) turns bytes into times.
std::string describe_parallel_plan(const ParallelPlan& plan, const model::ModelConfig& config, double bandwidth_gbs);

}  // namespace moba
