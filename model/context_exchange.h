// What the model needs from the context-parallel group, and nothing more: gather every rank's rows of a tensor,
// and sum partial gradients back onto the ranks that own the rows. parallel/ implements it over the communicator's
// context group (NCCL, or MPI); the model never sees a transport.
// Invariant: every rank of the group makes the same calls in the same order; results are visible to later ops only
// after wait() (calls may overlap with compute queued in between).
#pragma once
#include "kernels/tensor.h"

namespace moba::model {

class ContextExchange {
 public:
  virtual ~ContextExchange() = default;
  virtual int size() const = 0;  // ranks in the context-parallel group
  virtual int rank() const = 0;
  // local (n, W) -> gathered (size() * n, W): every rank's rows, rank 0's first (any dtype).
  virtual void all_gather(const Tensor& local, Tensor gathered) = 0;
  // gathered (size() * n, W) f32 partial sums, rank blocks in rank order -> local (n, W) f32: this rank's block
  // summed over the group.
  virtual void reduce_scatter(const Tensor& gathered, Tensor local) = 0;
  virtual void wait() = 0;
};

}  // namespace moba::model
