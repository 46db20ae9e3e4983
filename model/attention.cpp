// The model's attention layer: policy (full or MoBA, routing reuse) over the backend's ops, and their scratch.
#include "model/attention.h"

#include "common/error.h"

namespace moba::model {

AttentionLayer::AttentionLayer(Backend& backend, const AttentionScratchShape& largest)
    : be_(backend), largest_(largest), scratch_(allocate_attention_scratch(backend, largest)) {}

AttentionLayer::~AttentionLayer() { release_attention_scratch(be_, scratch_); }

size_t AttentionLayer::scratch_bytes(const Backend& backend, const AttentionScratchShape& largest) {
  const AttentionScratchSizes s = backend.attention_scratch_sizes(largest);
  return s.row_stats + s.partials + s.block_means + s.dispatch + s.chunk_dispatch + s.query_index;
}

AttentionCall AttentionLayer::complete(const AttentionParams& p, const AttentionCall& tensors) const {
  AttentionCall c = tensors;
  c.mode = p.mode;
  c.softmax_scale = p.softmax_scale;
  if (p.mode == AttentionMode::moba) {
    MOBA_CHECK(p.block_size >= largest_.min_block_size && p.top_k <= largest_.max_top_k,
               cat("MoBA with block size ", p.block_size, " and top_k ", p.top_k, " exceeds the attention scratch, ",
                   "planned for block sizes >= ", largest_.min_block_size, " and top_k <= ", largest_.max_top_k),
               "this is a bug in the caller: plan the model for every block size and top_k its layers use");
    c.block_size = p.block_size;
    c.top_k = p.top_k;
  } else {
    c.block_size = c.top_k = 0;
    c.selected = Tensor();
  }
  c.settings = largest_.settings;
  c.settings.deterministic = p.deterministic;
  c.scratch = scratch_;
  return c;
}

void AttentionLayer::forward(const AttentionParams& p, const AttentionCall& tensors) {
  route(p, tensors);
  attend(p, tensors);
}

void AttentionLayer::route(const AttentionParams& p, const AttentionCall& tensors) {
  if (p.mode == AttentionMode::moba && !p.reuse_routing) be_.moba_select_blocks(complete(p, tensors));
}

void AttentionLayer::attend(const AttentionParams& p, const AttentionCall& tensors) {
  be_.attention_forward(complete(p, tensors));
}

void AttentionLayer::backward(const AttentionParams& p, const AttentionCall& tensors) {
  be_.attention_backward(complete(p, tensors));
}

}  // namespace moba::model
