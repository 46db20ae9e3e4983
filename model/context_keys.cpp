#include "model/context_keys.h"

#include "common/error.h"
#include "model/transformer.h"

namespace moba::model {

ContextKeys::ContextKeys(Backend& backend, ContextExchange& exchange, int64_t max_local_rows, int64_t kv_width)
    : be_(backend), exchange_(exchange), max_n_(max_local_rows), width_(kv_width) {
  const int64_t N = max_n_ * exchange_.size();
  const DType A = be_.activation_dtype();
  q_rows_ = be_.allocate(DType::i32, {max_n_});
  gathered_rows_ = be_.allocate(DType::i32, {N});
  gathered_index_ = be_.allocate(DType::i32, {N});
  gathered_ = be_.allocate(A, {N, width_});
  keys_ = be_.allocate(A, {N, width_});
  values_ = be_.allocate(A, {N, width_});
  dkeys_ = be_.allocate(DType::f32, {N, width_});
  dvalues_ = be_.allocate(DType::f32, {N, width_});
  grad_blocks_ = be_.allocate(DType::f32, {N, width_});
  grad_local_ = be_.allocate(DType::f32, {max_n_, width_});
}

ContextKeys::~ContextKeys() {
  for (Tensor* t : {&q_rows_, &gathered_rows_, &gathered_index_, &gathered_, &keys_, &values_, &dkeys_, &dvalues_,
                    &grad_blocks_, &grad_local_})
    be_.release(*t);
}

std::vector<MemoryItem> ContextKeys::memory_plan(int64_t max_local_rows, int context, int64_t kv_width,
                                                 DType activations) {
  auto bytes = [](DType t, int64_t rows, int64_t cols) {
    return (static_cast<size_t>(rows * cols) * dtype_size(t) + 255) / 256 * 256;
  };
  const int64_t N = max_local_rows * context;
  return {{cat("context parallel: K, V of one layer gathered from ", context, " ranks"),
           bytes(activations, N, kv_width) * 3 + bytes(DType::i32, N, 2) + bytes(DType::i32, max_local_rows, 1)},
          {"context parallel: f32 dK, dV of one layer (+ reduce-scatter)",
           bytes(DType::f32, N, kv_width) * 3 + bytes(DType::f32, max_local_rows, kv_width)}};
}

void ContextKeys::set_rows(const TokenBatch& b) {
  MOBA_CHECK(b.global_rows && b.gathered_rows && b.gathered_index &&
                 b.num_global_tokens == b.num_tokens * exchange_.size() && b.num_tokens <= max_n_,
             cat("a context-parallel micro-batch needs its row maps (", b.num_tokens, " local rows of ",
                 b.num_global_tokens, ", ", exchange_.size(), " ranks)"),
             "this is a bug in the data layer (data/context_shard.h)");
  n_ = b.num_tokens;
  be_.upload(q_rows_.slice_rows(0, n_), b.global_rows);
  be_.upload(gathered_rows_.slice_rows(0, n_ * exchange_.size()), b.gathered_rows);
  be_.upload(gathered_index_.slice_rows(0, n_ * exchange_.size()), b.gathered_index);
  gathered_layer_ = -1;
}

Tensor ContextKeys::keys() const { return keys_.slice_rows(0, n_ * exchange_.size()); }
Tensor ContextKeys::values() const { return values_.slice_rows(0, n_ * exchange_.size()); }

void ContextKeys::reorder_gathered(Tensor whole) {
  const int64_t N = n_ * exchange_.size();
  be_.gather_rows(whole, gathered_.slice_rows(0, N), gathered_index_.slice_rows(0, N));
}

void ContextKeys::gather(int layer, const Tensor& k, const Tensor& v, const std::function<void()>& between) {
  const int64_t N = n_ * exchange_.size();
  MOBA_ASSERT(k.rows() == n_ && v.rows() == n_ && k.row_size() == width_ && v.row_size() == width_);
  exchange_.all_gather(k.reshape({n_, width_}), gathered_.slice_rows(0, N));
  exchange_.wait();
  reorder_gathered(keys_.slice_rows(0, N));
  // The values travel while `between` computes: the all-gather is ordered after the reorder that reads gathered_.
  exchange_.all_gather(v.reshape({n_, width_}), gathered_.slice_rows(0, N));
  if (between) between();
  exchange_.wait();
  reorder_gathered(values_.slice_rows(0, N));
  gathered_layer_ = layer;
}

Tensor ContextKeys::zeroed_key_grads() {
  Tensor t = dkeys_.slice_rows(0, n_ * exchange_.size());
  be_.zero(t);
  return t;
}
Tensor ContextKeys::zeroed_value_grads() {
  Tensor t = dvalues_.slice_rows(0, n_ * exchange_.size());
  be_.zero(t);
  return t;
}

void ContextKeys::scatter_one(const Tensor& whole_grads, Tensor local) {
  const int64_t N = n_ * exchange_.size();
  Tensor blocks = grad_blocks_.slice_rows(0, N), mine = grad_local_.slice_rows(0, n_);
  be_.gather_rows(blocks, whole_grads.reshape({N, width_}), gathered_rows_.slice_rows(0, N));  // -> rank-major
  exchange_.reduce_scatter(blocks, mine);
  exchange_.wait();
  be_.convert(local.reshape({n_ * width_}), mine.reshape({n_ * width_}));
}

void ContextKeys::scatter_grads(Tensor dk, Tensor dv) {
  scatter_one(dkeys_.slice_rows(0, n_ * exchange_.size()), dk);
  scatter_one(dvalues_.slice_rows(0, n_ * exchange_.size()), dv);
}

}  // namespace moba::model
