// The decoder's architecture constants and the layout of its parameters in one flat fp32 arena.
// Per-layer tensors are stacked (layer l of "layers.wqkv" is an offset), llm.c style, so the optimizer,
// the gradient norm, checkpoints and (later) ZeRO sharding all see one contiguous buffer.
// Invariant: the layout is a pure function of ModelConfig; checkpoints store tensors by these names.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace moba::model {

struct ModelConfig {
  int vocab_size = 0;  // V
  int d_model = 0;     // C
  int n_layers = 0;    // L
  int n_heads = 0;     // H
  int n_kv_heads = 0;  // Hkv (divides H)
  int head_dim = 0;    // D
  int ffn_hidden = 0;  // F (SwiGLU inner size)
  float rope_theta = 10000.0f;
  float norm_eps = 1e-5f;
  bool tie_embeddings = false;

  int qkv_dim() const { return (n_heads + 2 * n_kv_heads) * head_dim; }  // fused QKV projection width
  int q_dim() const { return n_heads * head_dim; }
  int kv_dim() const { return n_kv_heads * head_dim; }
};

struct ParamTensor {
  std::string name;             // e.g. "layers.wqkv"
  std::vector<int64_t> shape;   // e.g. {L, (H + 2 Hkv) D, C}
  int64_t offset = 0;           // into the arena, in elements
  int64_t numel = 0;
  bool is_matrix = false;       // weight decay applies to matrices (not norms or embeddings) by default
  bool is_embedding = false;
};

class ParameterLayout {
 public:
  explicit ParameterLayout(const ModelConfig& config);
  const std::vector<ParamTensor>& tensors() const { return tensors_; }
  const ParamTensor& get(const std::string& name) const;  // throws for unknown names
  int64_t total() const { return total_; }
  int64_t count_non_embedding() const;  // parameters outside wte / lm_head (for MFU)

 private:
  void add(const std::string& name, std::vector<int64_t> shape, bool matrix, bool embedding);
  std::vector<ParamTensor> tensors_;
  int64_t total_ = 0;
};

// Fills a host copy of the arena: N(0, init_std) for matrices, the residual output projections (wo, w_down)
// scaled by 1/sqrt(2L), norm gains 1. Deterministic in seed on every platform (own normal sampler).
void initialize_parameters(const ParameterLayout& layout, const ModelConfig& config, float init_std, uint64_t seed,
                           std::vector<float>& host_params);

}  // namespace moba::model
