// AdamW over the model's flat parameter arena: first/second moments in arenas of the same layout, decoupled
// weight decay per named tensor (matrices decay; norms and embeddings only when asked), and clipping of
// the global gradient norm. The step counter is part of the state saved in checkpoints.
#pragma once
#include <cstdint>
#include <vector>

#include "kernels/backend.h"
#include "model/transformer.h"
#include "trainer/recipe.h"

namespace moba {

class AdamW {
 public:
  AdamW(Backend& backend, model::Transformer& model, const OptimizerSettings& settings);
  ~AdamW();
  AdamW(const AdamW&) = delete;
  AdamW& operator=(const AdamW&) = delete;

  // Global L2 norm of the gradients; when clip > 0 and the norm exceeds it, the next step() uses the gradients
  // scaled to norm `clip` (the scale is applied inside the update; grads() itself is left as it is).
  double clip_gradients(double clip);
  void step(double lr);

  int64_t steps_taken() const { return step_; }
  void set_steps_taken(int64_t s) { step_ = s; }
  // The moments (P, same layout as the parameters) copied to/from the host, for checkpoints.
  enum class Moment { first, second };
  std::vector<float> moment_to_host(Moment which) const;
  void moment_from_host(Moment which, const std::vector<float>& host);
  bool decays(const model::ParamTensor& t) const;

 private:
  Backend& be_;
  model::Transformer& model_;
  OptimizerSettings s_;
  Tensor m_, v_;
  int64_t step_ = 0;
  float grad_scale_ = 1.0f;  // clipping factor from clip_gradients(), used by the next step()
};

}  // namespace moba
