#include "trainer/cost.h"

#include <algorithm>
#include <cmath>
#include <map>

#include "trainer/setup.h"

namespace moba {

double mean_attended_keys(int64_t seq_len, const AttentionParams& p) {
  const double S = static_cast<double>(seq_len);
  if (p.mode == AttentionMode::full) return (S + 1) / 2;
  const int64_t B = p.block_size, past_blocks = p.top_k - 1;
  double keys = 0;
  for (int64_t t = 0; t < seq_len; ++t) {
    const int64_t block = t / B;  // complete blocks strictly before t's own block: 0 .. block-1
    keys += static_cast<double>(t - block * B + 1) + static_cast<double>(B * std::min(past_blocks, block));
  }
  return keys / S;
}

TrainingCost training_cost(const Recipe& r, const model::ModelConfig& c) {
  TrainingCost cost;
  model::ModelConfig shape = c;
  if (shape.vocab_size == 0) shape.vocab_size = 1;  // the non-embedding count does not depend on it
  model::ParameterLayout layout(shape);
  cost.non_embedding_parameters = layout.count_non_embedding();
  cost.parameters = c.vocab_size > 0 ? layout.total() : 0;
  const double batch = static_cast<double>(r.train.global_batch_tokens);
  cost.steps = static_cast<int64_t>(std::ceil(r.train.tokens / batch));
  cost.tokens = static_cast<double>(cost.steps) * batch;
  cost.dense_flops = 6.0 * static_cast<double>(cost.non_embedding_parameters) * cost.tokens;

  // Attention in force at each step (phases switch at step boundaries), costed once per distinct layout.
  const double per_pair = 12.0 * c.n_heads * c.head_dim;  // FLOPs per attended pair per token, forward + backward
  std::map<std::string, double> keys_of_layout;            // describe_attention -> summed mean keys over layers
  double full_keys = 0;
  for (int l = 0; l < c.n_layers; ++l) full_keys += mean_attended_keys(r.data.seq_len, AttentionParams{});
  for (int64_t step = 0; step < cost.steps; ++step) {
    const std::vector<AttentionParams> layers = layer_attention(r.attention_at(static_cast<double>(step) * batch), c);
    const std::string key = describe_attention(layers);
    auto it = keys_of_layout.find(key);
    if (it == keys_of_layout.end()) {
      double keys = 0;
      for (const AttentionParams& p : layers) keys += mean_attended_keys(r.data.seq_len, p);
      it = keys_of_layout.emplace(key, keys).first;
    }
    cost.attention_flops += per_pair * it->second * batch;
  }
  cost.attention_flops_full = per_pair * full_keys * cost.tokens;
  return cost;
}

}  // namespace moba
