// One optimizer step, the same for `moba train` and `moba bench train`: the loss is normalised by the global
// count of target tokens (over every rank), each micro-batch runs forward and backward, the last micro-batch's
// backward hands every finished gradient bucket to the communicator (reduce-scatter under ZeRO-1, all-reduce
// under zero 0), then clipping by the global norm and the AdamW step (which all-gathers the working weights).
// Invariant: N data-parallel ranks given the rows of one rank's global batch produce its gradients up to the
// order of the floating-point sums.
#pragma once
#include <cstdint>
#include <vector>

#include "model/transformer.h"
#include "parallel/communicator.h"
#include "trainer/optimizer.h"

namespace moba {

struct StepResult {
  double loss = 0;         // mean loss per target token over the global batch
  double grad_norm = 0;    // global gradient norm before clipping
  double loss_tokens = 0;  // target tokens in the global batch
};

// comm may be null (one rank). `step` only names the step in error messages. Throws a moba::Error naming the step
// when this rank's loss or the gradient norm is not finite (the log prefix names the rank).
StepResult train_step(model::Transformer& model, AdamW& optimizer, parallel::Communicator* comm,
                      const std::vector<model::TokenBatch>& micro_batches,
                      const std::vector<AttentionParams>& attention, double lr, double grad_clip, int64_t step);

}  // namespace moba
