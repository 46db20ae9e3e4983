// Attention as the model decides it (the policy; backends only run ops, kernels/attention.h): per layer full causal
// or MoBA with its block size and top_k, whether MoBA routes again or keeps the routing it already has (activation
// recompute, analysis of a fixed routing), deterministic gradients, and the scratch of the backend's attention ops,
// allocated once for the largest call of the run.
// Invariant: forward() followed by backward() on the same call uses one routing: backward never routes.
#pragma once
#include <cstdint>

#include "kernels/backend.h"

namespace moba {

// What one attention layer computes (see ../shared/docs/moba-spec.md for moba).
struct AttentionParams {
  AttentionMode mode = AttentionMode::full;
  int block_size = 512;  // moba only
  int top_k = 3;         // moba only, counts the current block
  float softmax_scale = 0;
  // moba only: keep the block selection already in `selected` instead of routing again. Routing is a
  // constant of the backward pass, so freezing it makes the layer smooth in Q and K (finite-difference
  // tests, analysis of a fixed routing).
  bool reuse_routing = false;
  // Bitwise-reproducible gradients where the backend otherwise sums in a run-dependent order (CUDA: dQ of MoBA and
  // full attention without float atomics, MoBA's dispatch lists in canonical order for dK/dV); slower. The run's
  // other ops take the same choice from BackendSettings::deterministic (train.deterministic sets both).
  bool deterministic = false;
};

namespace model {

class AttentionLayer {
 public:
  // Scratch for every call up to `largest` (rows, heads, smallest block size, largest top_k; settings carry the
  // kernel choices of every call, `deterministic` aside, which comes per call from AttentionParams).
  AttentionLayer(Backend& backend, const AttentionScratchShape& largest);
  ~AttentionLayer();
  AttentionLayer(const AttentionLayer&) = delete;
  AttentionLayer& operator=(const AttentionLayer&) = delete;

  // Bytes of scratch an AttentionLayer for `largest` allocates on `backend` (a line of the memory plan).
  static size_t scratch_bytes(const Backend& backend, const AttentionScratchShape& largest);

  // `tensors` holds the call's tensors (keys, queries with q_rows for a subset, out, lse, selected; for backward
  // also dout, dq, dk, dv); the mode, block size, top_k, scale, settings and scratch come from here.
  // Forward: MoBA routes on q and the whole k first, unless p.reuse_routing; then out, lse.
  void forward(const AttentionParams& p, const AttentionCall& tensors);
  // The two halves of forward(), for callers that overlap other work with them (context parallelism gathers V
  // while routing reads only K): route() writes tensors.selected (MoBA without reuse_routing; else nothing),
  // attend() writes out and lse over that routing.
  void route(const AttentionParams& p, const AttentionCall& tensors);
  void attend(const AttentionParams& p, const AttentionCall& tensors);
  // Backward over the routing in tensors.selected: dq, dk, dv += (dk/dv may be f32).
  void backward(const AttentionParams& p, const AttentionCall& tensors);

 private:
  AttentionCall complete(const AttentionParams& p, const AttentionCall& tensors) const;

  Backend& be_;
  AttentionScratchShape largest_;
  AttentionScratch scratch_;
};

}  // namespace model
}  // namespace moba
