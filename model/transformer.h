// The Llama-style decoder, forward and backward written out by hand over the Backend's ops:
//   x = wte[tokens]; per layer: x += Wo attn(rope(q), rope(k), v; rmsnorm(x)); x += Wdown swiglu(Wgu rmsnorm(x))
//   logits = head(rmsnorm(x)); loss = masked cross-entropy.
// All buffers are allocated once for a micro-batch of up to max_tokens rows; nothing is allocated per step.
// Each residual add is fused with the norm that follows it. The LM head runs in chunks of rows with the loss and
// its gradient in one op, so logits exist for one chunk at a time. Activation recompute (train.recompute) keeps
// one layer's worth of the attention sublayer's activations (attention) or of the whole layer's (full) and
// rebuilds them from the stored layer inputs in backward, with the routing of the forward.
// Invariant: backward() uses exactly the activations and routing saved by the last forward(); recomputation
// gives bitwise the activations the forward had, so gradients do not depend on the recompute setting.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "model/attention.h"
#include "model/context_exchange.h"
#include "model/context_keys.h"
#include "model/parameters.h"

namespace moba::model {

// A micro-batch on the host: N rows (batch * seq flattened), packed segments in cu_seqlens. Under context
// parallelism this rank holds N of the micro-batch's N_g = C N rows (data/context_shard.h): cu_seqlens then
// describes the whole micro-batch (the keys) and the row maps say where the local rows stand.
struct TokenBatch {
  const int32_t* inputs = nullptr;     // (N)
  const int32_t* targets = nullptr;    // (N)
  const uint8_t* loss_mask = nullptr;  // (N), 1 = counts
  const int32_t* positions = nullptr;  // (N) true positions (RoPE)
  const int32_t* cu_seqlens = nullptr; // (segments + 1), cu_seqlens[segments] == N_g
  int64_t num_tokens = 0;              // N
  int num_segments = 0;
  // context parallelism only (null without):
  const int32_t* global_rows = nullptr;     // (N) whole-batch row of each local row, ascending
  const int32_t* gathered_rows = nullptr;   // (N_g) whole-batch row of each row gathered rank-major
  const int32_t* gathered_index = nullptr;  // (N_g) its inverse
  int64_t num_global_tokens = 0;            // N_g (= N without context parallelism)
};

enum class Recompute { none, attention, full };
Recompute parse_recompute(const std::string& name);  // "none" | "attention" | "full"
const char* recompute_name(Recompute r);

struct TransformerOptions {
  int max_top_k = 0;  // the largest MoBA top_k any layer may use (sizes the routing buffer); 0 if no MoBA ever
  Recompute recompute = Recompute::none;
  int64_t head_chunk_rows = 0;  // rows of logits held at once; 0 = about 2^27 logits per chunk
  int parameter_shards = 1;     // data-parallel ranks: the parameter buckets are padded to split evenly
  int min_block_size = 1;       // the smallest MoBA block size any layer may use (sizes the attention scratch)
  int context_size = 1;         // context-parallel group size: max_tokens are local rows, keys are C x as many
  ContextExchange* context = nullptr;  // the CP group's collectives (needed when context_size > 1)
};

// One named device buffer of the memory plan.
struct MemoryItem {
  std::string name;
  size_t bytes = 0;
};

class Transformer {
 public:
  Transformer(Backend& backend, const ModelConfig& config, int64_t max_tokens, const TransformerOptions& options);
  Transformer(Backend& backend, const ModelConfig& config, int64_t max_tokens, int max_top_k)
      : Transformer(backend, config, max_tokens, TransformerOptions{max_top_k, Recompute::none, 0, 1}) {}
  ~Transformer();
  Transformer(const Transformer&) = delete;
  Transformer& operator=(const Transformer&) = delete;

  const ModelConfig& config() const { return config_; }
  const ParameterLayout& layout() const { return layout_; }
  // (P) the weights forward and backward read, in the backend's activation dtype (f32 on the CPU), the same on
  // every rank. The f32 master weights live with the optimizer (trainer/optimizer.h), sharded under ZeRO-1.
  Tensor weights() const { return weights_; }
  Tensor grads() const { return grads_; }  // (P) f32, same layout
  // Views of one non-layer tensor ("wte", "ln_f", "lm_head") in the weights / gradients.
  Tensor param(const std::string& name) const;
  Tensor grad(const std::string& name) const;

  // host: an f32 arena of layout(); the weights get it rounded to the activation dtype.
  void set_weights_from_host(const std::vector<float>& host);
  std::vector<float> weights_to_host() const;  // as f32
  void zero_grads();

  // What the constructor allocates on `backend` for these settings, by buffer (parameters, optimizer-free): the
  // plan printed before training, the attention kernels' scratch and the backend's op scratch included.
  static std::vector<MemoryItem> memory_plan(const ModelConfig& config, int64_t max_tokens,
                                             const TransformerOptions& options, const Backend& backend);
  // The same for a backend that is not at hand (planning a GPU run on a machine without one): its activation dtype
  // and the bytes of its attention scratch for these settings.
  static std::vector<MemoryItem> memory_plan(const ModelConfig& config, int64_t max_tokens,
                                             const TransformerOptions& options, DType activations,
                                             size_t attention_scratch_bytes);

  // Runs the forward pass; returns the sum of the per-token losses over unmasked targets.
  // attention[l] says how layer l attends (full or moba with its block size / top_k).
  // grad_scale != 0 (training): the LM head's backward runs here, chunk by chunk, while its logits are at hand;
  // backward() must then get the same grad_scale. grad_scale == 0: loss only (backward() recomputes the head).
  double forward(const TokenBatch& batch, const std::vector<AttentionParams>& attention, float grad_scale = 0.0f);
  // Accumulates d(grad_scale * loss_sum)/d(params) into grads(). Call after forward() on the same batch.
  // After each bucket's gradients are complete for this micro-batch, the gradient hook (if set) is called with
  // the bucket's index: the head first, then layers L-1 .. 0, then the embedding (data parallelism starts
  // reducing a bucket there while backward goes on).
  void backward(float grad_scale);
  void set_gradient_hook(std::function<void(int bucket)> hook) { gradient_hook_ = std::move(hook); }
  // Per-token losses of the last forward (N), 0 where masked.
  std::vector<float> token_losses() const;

 private:
  struct Activations;
  struct LayerViews;
  LayerViews layer_views(int layer) const;
  void attention_sublayer_forward(int layer, const AttentionParams& p);  // ln1 (given) -> q, k, v, att, lse
  AttentionCall attention_tensors(const LayerViews& lv) const;           // layer l's q, k, v, att, lse, routing
  void mlp_sublayer_forward(int layer);                                  // mid -> ln2, gate_up, swiglu
  void head(float grad_scale);  // the chunked LM head: losses, and with grad_scale != 0 dln and the head's grads
  Tensor layer_param(const std::string& name, int layer) const;
  Tensor layer_grad(const std::string& name, int layer) const;
  Tensor view(const Tensor& arena, const ParamTensor& t, int layer) const;

  Backend& be_;
  ModelConfig config_;
  ParameterLayout layout_;
  int64_t max_tokens_;
  int max_top_k_;
  Recompute recompute_;
  int64_t head_rows_ = 0;      // rows per LM-head chunk
  float head_grad_scale_ = 0;  // grad_scale the last forward's head backward used (0: not run)
  Tensor weights_;  // (P) activation dtype, replicated on every rank
  Tensor grads_;    // (P) f32
  DType act_dtype_ = DType::f32;
  std::function<void(int)> gradient_hook_;
  std::unique_ptr<Activations> act_;
  std::unique_ptr<AttentionLayer> attention_;  // policy and scratch of every layer's attention
  std::unique_ptr<ContextKeys> context_;       // context parallelism's gathered keys (null without)
  std::vector<AttentionParams> last_attention_;
  int64_t last_tokens_ = 0;
  int last_segments_ = 0;
};

}  // namespace moba::model
