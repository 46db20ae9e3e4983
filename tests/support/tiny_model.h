// The tiny model of the checkpoint tests and of the checkpoint fuzz target's seeds (two layers, GQA, vocabulary
// 23): small enough to write and read in milliseconds, with every kind of tensor a checkpoint holds. Header-only
// (no GoogleTest), so the fuzz build includes it too.
#pragma once
#include "model/transformer.h"

namespace moba::test {

inline model::ModelConfig tiny_model_config() {
  model::ModelConfig c;
  c.vocab_size = 23;
  c.d_model = 16;
  c.n_layers = 2;
  c.n_heads = 2;
  c.n_kv_heads = 1;
  c.head_dim = 8;
  c.ffn_hidden = 24;
  return c;
}

}  // namespace moba::test
