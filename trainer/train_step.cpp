#include "trainer/train_step.h"

#include <cmath>

#include "common/log.h"

namespace moba {

StepResult train_step(model::Transformer& model, AdamW& optimizer, parallel::Communicator* comm,
                      const std::vector<model::TokenBatch>& micro_batches,
                      const std::vector<AttentionParams>& attention, double lr, double grad_clip, int64_t step) {
  using parallel::Group;
  StepResult result;
  for (const model::TokenBatch& b : micro_batches)
    for (int64_t i = 0; i < b.num_tokens; ++i) result.loss_tokens += b.loss_mask[i];
  if (comm) comm->host(Group::world).all_reduce(&result.loss_tokens, 1, parallel::ReduceOp::sum, "loss token count");
  const float scale = result.loss_tokens > 0 ? static_cast<float>(1.0 / result.loss_tokens) : 0.0f;

  model.zero_grads();
  bool last = false;  // gradients are reduced once, in the last micro-batch's backward, bucket by bucket
  model.set_gradient_hook([&](int bucket) {
    if (last) optimizer.reduce_bucket(bucket);
  });
  double loss_sum = 0;
  for (size_t i = 0; i < micro_batches.size(); ++i) {
    last = i + 1 == micro_batches.size();
    loss_sum += model.forward(micro_batches[i], attention, scale);
    model.backward(scale);
  }
  model.set_gradient_hook(nullptr);
  optimizer.finish_gradient_reduction();
  MOBA_CHECK(std::isfinite(loss_sum),
             cat("the loss is ", loss_sum, " at step ", step + 1, ": training diverged"),
             "lower train.optimizer.lr, raise train.schedule.warmup_tokens, or resume from an earlier checkpoint");
  if (comm) comm->host(Group::world).all_reduce(&loss_sum, 1, parallel::ReduceOp::sum, "loss");
  result.loss = loss_sum * scale;
  result.grad_norm = optimizer.clip_gradients(grad_clip);
  MOBA_CHECK(std::isfinite(result.grad_norm),
             cat("the gradient norm is ", result.grad_norm, " at step ", step + 1,
                 " (loss ", result.loss, "): training diverged"),
             "lower train.optimizer.lr, raise train.schedule.warmup_tokens, or resume from an earlier checkpoint");
  optimizer.step(lr);
  return result;
}

}  // namespace moba
