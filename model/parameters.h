// The decoder's architecture constants and the layout of its parameters in one flat fp32 arena, laid out
// layer-major (llm.c style offsets, Megatron-style buckets): [wte] [layer 0: ln1 wqkv wo ln2 w_gate_up w_down]
// ... [layer L-1] [ln_f lm_head]. Each bracket is one gradient bucket, so data parallelism can reduce a layer's
// gradients as soon as backward finishes it. Each bucket is padded to a multiple of 64 * shard_count elements so
// that it splits into shard_count equal, 256-byte aligned shards (ZeRO-1 owns one shard of every bucket).
// Per-layer tensors keep their stacked names and shapes ("layers.wqkv", {L, (H + 2 Hkv) D, C}): layer l's slice
// sits at offset_of(l). Checkpoints, initialisation and tests see tensors by these names in logical order.
// Invariant: the unpadded content of every bucket is a pure function of ModelConfig; only the padding depends
// on shard_count, so checkpoints address parameters by (bucket, offset) or by name, never by arena offset.
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
  std::string name;            // e.g. "layers.wqkv"
  std::vector<int64_t> shape;  // logical shape, stacked over layers for per-layer tensors: {L, (H + 2 Hkv) D, C}
  int64_t numel = 0;           // all layers
  int64_t offset = 0;          // arena offset of layer 0's slice (of the whole tensor when not per-layer)
  int64_t layer_stride = 0;    // arena elements from layer l's slice to layer l + 1's; 0 = not per-layer
  bool is_matrix = false;      // weight decay applies to matrices (not norms or embeddings) by default
  bool is_embedding = false;

  bool per_layer() const { return layer_stride != 0; }
  int slices() const { return per_layer() ? static_cast<int>(shape[0]) : 1; }
  int64_t slice_numel() const { return numel / slices(); }  // one layer's elements (all of it if not per-layer)
  int64_t offset_of(int layer) const { return offset + layer * layer_stride; }
};

// A contiguous stretch of the arena reduced as one unit: the embedding, one layer, or the head.
struct Bucket {
  std::string name;     // "embedding", "layer 3", "head"
  int64_t offset = 0;   // arena offset
  int64_t size = 0;     // elements with content (a function of ModelConfig)
  int64_t padded = 0;   // size rounded up to a multiple of 64 * shard_count (zeros past size)
  int64_t shard() const;  // padded / shard_count: the elements each rank owns under ZeRO-1
  int shard_count = 1;
};

// One tensor slice (one layer's, or a whole non-layer tensor) as it lies in the arena.
struct ParamSlice {
  const ParamTensor* tensor = nullptr;
  int layer = 0;        // 0 for non-layer tensors
  int64_t offset = 0;   // arena offset
  int64_t numel = 0;
};

class ParameterLayout {
 public:
  explicit ParameterLayout(const ModelConfig& config, int shard_count = 1);
  const std::vector<ParamTensor>& tensors() const { return tensors_; }
  const ParamTensor& get(const std::string& name) const;  // throws for unknown names
  const std::vector<Bucket>& buckets() const { return buckets_; }
  int layer_bucket(int layer) const { return 1 + layer; }  // bucket index of a layer ("embedding" is 0)
  const std::vector<ParamSlice>& slices() const { return slices_; }  // in arena order
  int64_t total() const { return total_; }               // arena elements, padding included
  int64_t count() const;                                 // parameters (no padding)
  int64_t count_non_embedding() const;                   // parameters outside wte / lm_head (for MFU)
  int shard_count() const { return shard_count_; }

  // Host copies in logical (checkpoint) order <-> the arena: a tensor's values as its stacked shape lists them.
  std::vector<float> read_tensor(const std::vector<float>& arena, const ParamTensor& t) const;
  void write_tensor(std::vector<float>& arena, const ParamTensor& t, const std::vector<float>& values) const;

 private:
  std::vector<ParamTensor> tensors_;
  std::vector<Bucket> buckets_;
  std::vector<ParamSlice> slices_;
  int64_t total_ = 0;
  int shard_count_ = 1;
};

// Fills a host copy of the arena: N(0, init_std) for matrices, the residual output projections (wo, w_down)
// scaled by 1/sqrt(2L), norm gains 1, padding 0. Deterministic in seed on every platform (own normal sampler),
// and the same values for every shard_count.
void initialize_parameters(const ParameterLayout& layout, const ModelConfig& config, float init_std, uint64_t seed,
                           std::vector<float>& host_params);

}  // namespace moba::model
