#include "trainer/optimizer.h"

#include <algorithm>
#include <cmath>

#include "common/error.h"

namespace moba {
namespace {

int data_ranks(const parallel::Communicator* comm) { return comm ? comm->size(parallel::Group::data) : 1; }
int data_rank(const parallel::Communicator* comm) { return comm ? comm->rank(parallel::Group::data) : 0; }

std::vector<AdamW::OwnedRange> owned_ranges(const model::ParameterLayout& layout, int zero, int ranks, int rank) {
  std::vector<AdamW::OwnedRange> out;
  int64_t packed = 0;
  for (size_t b = 0; b < layout.buckets().size(); ++b) {
    const model::Bucket& bucket = layout.buckets()[b];
    const int64_t shard = zero == 1 ? bucket.padded / ranks : bucket.padded;
    const int64_t begin = zero == 1 ? shard * rank : 0;
    const int64_t numel = std::max<int64_t>(0, std::min(begin + shard, bucket.size) - begin);  // no padding
    if (numel == 0) continue;
    out.push_back({static_cast<int>(b), begin, bucket.offset + begin, numel, packed});
    packed += (numel + 63) / 64 * 64;  // state offsets keep the arena's 256-byte alignment (vector loads)
  }
  return out;
}

}  // namespace

AdamW::AdamW(Backend& backend, model::Transformer& model, const OptimizerSettings& settings,
             parallel::Communicator* comm, int zero)
    : be_(backend), model_(model), s_(settings), comm_(comm), zero_(zero) {
  MOBA_ASSERT(zero == 0 || zero == 1);
  MOBA_ASSERT(model.layout().shard_count() == data_ranks(comm));
  owned_ = owned_ranges(model.layout(), zero, data_ranks(comm), data_rank(comm));
  if (!owned_.empty()) owned_numel_ = owned_.back().state_offset + (owned_.back().numel + 63) / 64 * 64;
  const int64_t n = std::max<int64_t>(owned_numel_, 1);
  master_ = be_.allocate(DType::f32, {n});
  m_ = be_.allocate(DType::f32, {n});
  v_ = be_.allocate(DType::f32, {n});
}

AdamW::~AdamW() {
  be_.release(master_);
  be_.release(m_);
  be_.release(v_);
}

size_t AdamW::state_bytes(const model::ParameterLayout& layout, int zero, int ranks) {
  std::vector<OwnedRange> owned = owned_ranges(layout, zero, ranks, 0);  // shard 0 is never smaller
  const int64_t n = owned.empty() ? 1 : owned.back().state_offset + (owned.back().numel + 63) / 64 * 64;
  return 3 * ((static_cast<size_t>(n) * 4 + 255) / 256 * 256);
}

Tensor& AdamW::state(State which) { return which == State::master ? master_ : which == State::first_moment ? m_ : v_; }
const Tensor& AdamW::state(State which) const {
  return which == State::master ? master_ : which == State::first_moment ? m_ : v_;
}

bool AdamW::decays(const model::ParamTensor& t) const { return t.is_matrix || s_.decay_norms_and_embeddings; }

void AdamW::reduce_bucket(int b) {
  if (!comm_) return;
  const model::Bucket& bucket = model_.layout().buckets()[static_cast<size_t>(b)];
  Tensor grads = model_.grads().slice_rows(bucket.offset, bucket.padded);
  using parallel::Group;
  const int ranks = comm_->size(Group::data);
  if (ranks > 1) {
    if (zero_ == 1) {  // in place: this rank's shard of the bucket receives the sum
      Tensor shard = grads.slice_rows(bucket.shard() * comm_->rank(Group::data), bucket.shard());
      comm_->reduce_scatter(grads, shard, Group::data, "gradient reduce-scatter");
    } else {
      comm_->all_reduce(grads, Group::data, "gradient all-reduce");
    }
  }
  if (comm_->size(Group::context) > 1) {  // context-parallel ranks hold partial gradients of the same shard
    Tensor mine = zero_ == 1 && ranks > 1 ? grads.slice_rows(bucket.shard() * comm_->rank(Group::data), bucket.shard())
                                          : grads;
    comm_->all_reduce(mine, Group::context, "gradient all-reduce (context)");
  }
}

void AdamW::finish_gradient_reduction() {
  if (comm_) comm_->wait_all();
}

double AdamW::clip_gradients(double clip) {
  double squares = 0;
  for (const OwnedRange& r : owned_) squares += be_.sum_of_squares(model_.grads().slice_rows(r.offset, r.numel));
  // Under zero 1 the data-parallel ranks own disjoint shards; under zero 0 every rank already has the whole sum.
  if (comm_ && zero_ == 1) comm_->host(parallel::Group::data).all_reduce(&squares, 1, parallel::ReduceOp::sum,
                                                                         "gradient norm");
  const double norm = std::sqrt(squares);
  // Applied inside the next step()'s update rather than by a pass over the gradients here.
  grad_scale_ = clip > 0 && norm > clip ? static_cast<float>(clip / (norm + 1e-6)) : 1.0f;
  return norm;
}

void AdamW::step(double lr) {
  ++step_;
  const model::ParameterLayout& layout = model_.layout();
  Tensor weights = model_.weights(), grads = model_.grads();
  for (const OwnedRange& r : owned_) {
    // The tensor slices inside this range, merged into runs of equal weight decay (one update call each).
    int64_t run_begin = -1, run_end = -1;
    float run_decay = 0;
    auto flush = [&]() {
      if (run_begin < 0) return;
      const int64_t n = run_end - run_begin, state_at = r.state_offset + (run_begin - r.offset);
      be_.adamw_update(master_.slice_rows(state_at, n), weights.slice_rows(run_begin, n), grads.slice_rows(run_begin, n),
                       m_.slice_rows(state_at, n), v_.slice_rows(state_at, n), static_cast<float>(lr),
                       static_cast<float>(s_.beta1), static_cast<float>(s_.beta2), static_cast<float>(s_.eps), run_decay,
                       step_, grad_scale_);
      run_begin = -1;
    };
    for (const model::ParamSlice& slice : layout.slices()) {
      const int64_t lo = std::max(slice.offset, r.offset), hi = std::min(slice.offset + slice.numel, r.offset + r.numel);
      if (lo >= hi) continue;
      const float decay = decays(*slice.tensor) ? static_cast<float>(s_.weight_decay) : 0.0f;
      if (run_begin >= 0 && (lo != run_end || decay != run_decay)) flush();
      if (run_begin < 0) {
        run_begin = lo;
        run_decay = decay;
      }
      run_end = hi;
    }
    flush();
  }
  grad_scale_ = 1.0f;
  if (zero_ == 1 && comm_ && comm_->size(parallel::Group::data) > 1) {
    for (const model::Bucket& bucket : layout.buckets()) {  // every rank's updated shard, to every rank
      Tensor all = weights.slice_rows(bucket.offset, bucket.padded);
      comm_->all_gather(all.slice_rows(bucket.shard() * comm_->rank(parallel::Group::data), bucket.shard()), all,
                        parallel::Group::data, "weight all-gather");
    }
    comm_->wait_all();
  }
}

void AdamW::set_master_from_host(const std::vector<float>& arena) {
  MOBA_ASSERT(static_cast<int64_t>(arena.size()) == model_.layout().total());
  std::vector<float> packed(static_cast<size_t>(owned_numel_));
  for (const OwnedRange& r : owned_)
    std::copy_n(arena.begin() + r.offset, r.numel, packed.begin() + r.state_offset);
  state_from_host(State::master, packed);
  publish_weights();
}

void AdamW::publish_weights() {
  Tensor weights = model_.weights();
  for (const OwnedRange& r : owned_)
    be_.convert(weights.slice_rows(r.offset, r.numel), master_.slice_rows(r.state_offset, r.numel));
  if (zero_ == 1 && comm_ && comm_->size(parallel::Group::data) > 1) {
    for (const model::Bucket& bucket : model_.layout().buckets()) {
      Tensor all = weights.slice_rows(bucket.offset, bucket.padded);
      comm_->all_gather(all.slice_rows(bucket.shard() * comm_->rank(parallel::Group::data), bucket.shard()), all,
                        parallel::Group::data, "weight all-gather");
    }
    comm_->wait_all();
  }
  be_.synchronize();
}

std::vector<float> AdamW::state_to_host(State which) const {
  std::vector<float> host(static_cast<size_t>(owned_numel_));
  if (owned_numel_ > 0) be_.download(host.data(), state(which).slice_rows(0, owned_numel_));
  return host;
}

void AdamW::state_from_host(State which, const std::vector<float>& packed) {
  MOBA_ASSERT(static_cast<int64_t>(packed.size()) == owned_numel_);
  if (owned_numel_ > 0) be_.upload(state(which).slice_rows(0, owned_numel_), packed.data());
}

}  // namespace moba
