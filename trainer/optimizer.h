// AdamW over the model's layer-major parameter arena with ZeRO-1 (parallel.zero: 1): every data-parallel rank
// owns one shard of every gradient bucket (model/parameters.h) and keeps the f32 master weights and both moments
// for it alone; the bf16 working weights (f32 on the CPU) are all-gathered after each step. With zero: 0 every
// rank owns everything and gradients are all-reduced instead of reduce-scattered.
// Gradient reduction starts per bucket from the model's backward hook (on the last micro-batch of a step), so a
// layer's gradients travel while backward computes the layers below; clipping uses the global norm (squares of
// the owned shards, all-reduced).
// Invariant: owned() is a pure function of (layout, zero, data rank); master, m and v hold the owned ranges packed
// in that order, so checkpoints address them by (bucket, offset in bucket), independent of the rank count.
#pragma once
#include <cstdint>
#include <vector>

#include "kernels/backend.h"
#include "model/transformer.h"
#include "parallel/communicator.h"
#include "trainer/recipe.h"

namespace moba {

class AdamW {
 public:
  // comm == nullptr: a single rank (no reduction). zero: 0 or 1.
  AdamW(Backend& backend, model::Transformer& model, const OptimizerSettings& settings,
        parallel::Communicator* comm = nullptr, int zero = 1);
  ~AdamW();
  AdamW(const AdamW&) = delete;
  AdamW& operator=(const AdamW&) = delete;

  // The piece of one bucket this rank owns: arena [offset, offset + numel) = bucket [begin, begin + numel).
  struct OwnedRange {
    int bucket = 0;
    int64_t begin = 0;         // in the bucket (unpadded coordinates: what checkpoints record)
    int64_t offset = 0;        // in the arena
    int64_t numel = 0;         // padding past the bucket's content excluded
    int64_t state_offset = 0;  // in master / m / v
  };
  const std::vector<OwnedRange>& owned() const { return owned_; }
  int64_t state_numel() const { return owned_numel_; }  // master / m / v length (owned ranges, 64-aligned)
  // Bytes of master weights and moments this rank holds, for the memory plan.
  static size_t state_bytes(const model::ParameterLayout& layout, int zero, int data_ranks);

  // Starts reducing bucket b's gradients over the data (and context) groups; called from the model's gradient
  // hook on the last micro-batch. finish_gradient_reduction() makes later compute wait for all of them.
  void reduce_bucket(int bucket);
  void finish_gradient_reduction();

  // Global L2 norm of the reduced gradients; when clip > 0 and the norm exceeds it, the next step() uses the
  // gradients scaled to norm `clip` (applied inside the update; grads() itself is left as it is).
  double clip_gradients(double clip);
  // Updates the owned master weights and moments, writes them rounded into the working weights, all-gathers.
  void step(double lr);

  // Master weights from a full f32 arena of the layout (initialisation, single-file checkpoints); then the
  // working weights are refreshed from them (publish_weights()).
  void set_master_from_host(const std::vector<float>& arena);
  void publish_weights();
  // The owned ranges' master weights / moments (state_numel(); range r at r.state_offset), to and from the host.
  enum class State { master, first_moment, second_moment };
  std::vector<float> state_to_host(State which) const;
  void state_from_host(State which, const std::vector<float>& packed);

  int zero() const { return zero_; }
  int64_t steps_taken() const { return step_; }
  void set_steps_taken(int64_t s) { step_ = s; }
  bool decays(const model::ParamTensor& t) const;

 private:
  Tensor& state(State which);
  const Tensor& state(State which) const;
  Backend& be_;
  model::Transformer& model_;
  OptimizerSettings s_;
  parallel::Communicator* comm_;
  int zero_;
  std::vector<OwnedRange> owned_;
  int64_t owned_numel_ = 0;
  Tensor master_, m_, v_;  // (owned_numel) f32
  int64_t step_ = 0;
  float grad_scale_ = 1.0f;  // clipping factor from clip_gradients(), used by the next step()
};

}  // namespace moba
