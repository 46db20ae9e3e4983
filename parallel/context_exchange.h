// The model's ContextExchange (model/context_exchange.h) over the communicator's context-parallel group.
#pragma once
#include "model/context_exchange.h"
#include "parallel/communicator.h"

namespace moba::parallel {

class CommunicatorContextExchange final : public model::ContextExchange {
 public:
  explicit CommunicatorContextExchange(Communicator& comm) : comm_(comm) {}
  int size() const override { return comm_.size(Group::context); }
  int rank() const override { return comm_.rank(Group::context); }
  void all_gather(const Tensor& local, Tensor gathered) override {
    comm_.all_gather(local.reshape({local.numel()}), gathered.reshape({gathered.numel()}), Group::context,
                     "context-parallel key/value all-gather");
  }
  void reduce_scatter(const Tensor& gathered, Tensor local) override {
    comm_.reduce_scatter(gathered.reshape({gathered.numel()}), local.reshape({local.numel()}), Group::context,
                         "context-parallel key/value gradient reduce-scatter");
  }
  void wait() override { comm_.wait_all(); }

 private:
  Communicator& comm_;
};

}  // namespace moba::parallel
