// What a recipe costs to train, counted as scaling-law papers count it: N non-embedding parameters, D tokens
// (whole steps), the dense part C = 6ND, and attention FLOPs from the (query, key) pairs each layer attends
// under its attention mode in each phase (12 * heads * head_dim per pair per token: forward 4, backward 8).
// Invariant: windows are assumed to hold one document each (packing shorter documents only lowers the pairs).
#pragma once
#include <cstdint>

#include "model/attention.h"
#include "model/parameters.h"
#include "trainer/recipe.h"

namespace moba {

struct TrainingCost {
  int64_t non_embedding_parameters = 0;
  int64_t parameters = 0;             // all of them; 0 when the vocabulary is not known yet
  int64_t steps = 0;                  // ceil(train.tokens / global_batch_tokens)
  double tokens = 0;                  // steps * global_batch_tokens: what the run really consumes
  double dense_flops = 0;             // 6 N D
  double attention_flops = 0;         // full layers: causal pairs; MoBA layers: the pairs MoBA attends
  double attention_flops_full = 0;    // the same run with every layer full causal attention
};

// Mean number of keys one query attends in a window of seq_len tokens of one document: (S + 1) / 2 for causal
// full attention; for MoBA its own block up to itself plus min(k - 1, complete past blocks) whole blocks.
double mean_attended_keys(int64_t seq_len, const AttentionParams& attention);

// The cost of the recipe's run with the model shape `config` (vocab_size 0: parameters left at 0).
TrainingCost training_cost(const Recipe& recipe, const model::ModelConfig& config);

}  // namespace moba
