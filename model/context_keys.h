// Context parallelism in the attention sublayer. Each rank of a context-parallel (CP) group holds n of the micro-
// batch's N = C n rows (zigzag chunks, data/context_shard.h); attention needs every key and value. Per layer this
// gathers K and V from the group (rank-major), puts them in whole-micro-batch order, and after the attention
// backward sums the partial dK and dV (f32, every key row) back onto the ranks that own the rows (reduce-scatter).
// K and V are not kept between forward and backward: the backward gathers them again (unless they are still here).
// Invariant: keys()/values() hold the rows of layer gathered_layer() in whole-batch order; the reordering is exact.
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "kernels/backend.h"
#include "model/context_exchange.h"

namespace moba::model {

struct MemoryItem;
struct TokenBatch;

class ContextKeys {
 public:
  // max_local_rows: n; kv_width: Hkv D.
  ContextKeys(Backend& backend, ContextExchange& exchange, int64_t max_local_rows, int64_t kv_width);
  ~ContextKeys();
  ContextKeys(const ContextKeys&) = delete;
  ContextKeys& operator=(const ContextKeys&) = delete;
  // Bytes of every buffer (the memory plan's lines for context parallelism).
  static std::vector<MemoryItem> memory_plan(int64_t max_local_rows, int context, int64_t kv_width, DType activations);

  // The micro-batch's rows: where the local rows stand, and the rank-major <-> whole-batch maps.
  void set_rows(const TokenBatch& batch);
  Tensor query_rows() const { return q_rows_.slice_rows(0, n_); }  // (n) i32, ascending

  // k, v (n, Hkv, D) local -> keys(), values() (N, Hkv, D). `between` runs once the keys are in order while the
  // values still travel (MoBA's block means and routing need only the keys).
  void gather(int layer, const Tensor& k, const Tensor& v, const std::function<void()>& between);
  int gathered_layer() const { return gathered_layer_; }
  void forget() { gathered_layer_ = -1; }  // the next gather() must not be skipped
  Tensor keys() const;
  Tensor values() const;
  // f32 (N, Hkv, D) gradients for the attention backward to add into; zeroed.
  Tensor zeroed_key_grads();
  Tensor zeroed_value_grads();
  // The group's sums of those partial gradients on this rank's rows, written (overwriting) into dk, dv (n, Hkv, D).
  void scatter_grads(Tensor dk, Tensor dv);

 private:
  void reorder_gathered(Tensor whole);  // gathered_ (rank-major) -> whole-batch order
  void scatter_one(const Tensor& whole_grads, Tensor local);
  Backend& be_;
  ContextExchange& exchange_;
  int64_t max_n_, width_;
  int64_t n_ = 0;  // local rows of the current micro-batch; N = size * n
  int gathered_layer_ = -1;
  Tensor q_rows_;          // (n) i32: whole-batch row of each local row
  Tensor gathered_rows_;   // (N) i32: whole-batch row of each rank-major row
  Tensor gathered_index_;  // (N) i32: rank-major position of each whole-batch row
  Tensor gathered_;        // (N, W) activation dtype: one of K or V as it arrives (rank-major)
  Tensor keys_, values_;   // (N, W) activation dtype, whole-batch order
  Tensor dkeys_, dvalues_; // (N, W) f32, whole-batch order
  Tensor grad_blocks_;     // (N, W) f32, rank-major (the reduce-scatter's input)
  Tensor grad_local_;      // (n, W) f32 (its output)
};

}  // namespace moba::model
