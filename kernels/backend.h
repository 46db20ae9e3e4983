// The op layer: every computation of the model and optimizer goes through a Backend, so the CPU reference
// and the CUDA backend are interchangeable behind one interface. Tensors passed in live on the backend's
// device; shapes are read from the tensors and checked. Backward ops ACCUMULATE into their gradients.
// Precision contract (mixed precision on CUDA, plain fp32 on the CPU):
//   activations and the working copy of the weights: activation_dtype() (CPU f32, CUDA bf16);
//   master weights, weight gradients, optimizer moments, rstd, lse, losses: f32;
//   gradients of activations (dinp, dq, dlogits, ...): activation_dtype().
// Where a backward op takes `accumulate`, false overwrites that gradient instead (no zeroing pass needed first;
// the result equals accumulating into zeros).
// Invariant: for the same inputs, the CPU backend's results are bitwise reproducible run to run.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "kernels/attention.h"
#include "kernels/tensor.h"

namespace moba {

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  virtual Device device() const = 0;
  virtual DType activation_dtype() const = 0;

  // ---- memory (arenas are allocated once up front; no allocation inside a step) ----
  virtual Tensor allocate(DType dtype, std::initializer_list<int64_t> shape) = 0;
  virtual void release(Tensor& t) = 0;
  virtual void zero(Tensor t) = 0;
  virtual void upload(Tensor dst, const void* host) = 0;    // host -> dst (dst contiguous)
  virtual void download(void* host, const Tensor& src) = 0;  // src (contiguous) -> host
  virtual void synchronize() = 0;
  // Bytes held by allocate() and backend scratch now, and the most held at once since creation.
  virtual size_t allocated_bytes() const = 0;
  virtual size_t peak_bytes() const = 0;
  // Memory still free for allocate(): the GPU's free memory, or on the CPU the host memory this process may
  // still use (common/host_memory.h); 0 when unknown.
  virtual size_t available_bytes() const = 0;
  // Runs fn `warmup` times, then `reps` times, returning each timed run's milliseconds (CUDA events on the
  // GPU, a steady clock on the CPU).
  virtual std::vector<double> time_ms(const std::function<void()>& fn, int warmup, int reps) = 0;
  // The GPU this backend runs on and the cudaStream_t every op is queued on (the communicator orders its own
  // stream after it); -1 and nullptr on the CPU.
  virtual int device_index() const { return -1; }
  virtual void* stream_handle() const { return nullptr; }

  // ---- decoder ops: x (N, C) rows are tokens; weights (OC, IC) ----
  // out[i] = src[rows[i]] for every row i of out (rows (N) int32; any dtype, same row width): the embedding lookup
  // (gather_rows(x, wte, tokens)) and context parallelism's reordering of gathered keys.
  virtual void gather_rows(Tensor out, const Tensor& src, const Tensor& rows) = 0;
  virtual void embedding_backward(Tensor dwte, const Tensor& dout, const Tensor& tokens) = 0;
  virtual void rmsnorm_forward(Tensor out, Tensor rstd, const Tensor& inp, const Tensor& weight, float eps) = 0;
  // The residual stream's add fused with the next norm: resid += residual, then out = rmsnorm(resid) (bitwise
  // add_inplace followed by rmsnorm_forward, one pass less over memory).
  virtual void residual_rmsnorm_forward(Tensor resid, Tensor out, Tensor rstd, const Tensor& residual,
                                        const Tensor& weight, float eps) = 0;
  virtual void rmsnorm_backward(Tensor dinp, Tensor dweight, const Tensor& dout, const Tensor& inp,
                                const Tensor& weight, const Tensor& rstd) = 0;
  virtual void matmul_forward(Tensor out, const Tensor& inp, const Tensor& weight) = 0;
  // dinp or dweight may be empty (data == nullptr) to skip it; accumulate applies to dinp (dweight always adds).
  virtual void matmul_backward(Tensor dinp, Tensor dweight, const Tensor& dout, const Tensor& inp,
                               const Tensor& weight, bool accumulate = true) = 0;
  // out (N, heads, D) contiguous; inp rows (N, heads*D) may be strided; pos (N) int32.
  virtual void rope_forward(Tensor out, const Tensor& inp, const Tensor& pos, float theta) = 0;
  virtual void rope_backward(Tensor dinp, const Tensor& dout, const Tensor& pos, float theta) = 0;
  // The fused projection's split: q (N, H, D) and k (N, Hkv, D) = rope of qkv's q and k columns, v (N, Hkv, D) =
  // its v columns, qkv rows (N, (H + 2 Hkv) D). Backward writes (overwrites) all of dqkv: [rope^-1(dq) | rope^-1(dk)
  // | dv]. The same as rope_forward x 2 + copy, and zero + rope_backward x 2 + copy, in one pass.
  virtual void qkv_rope_forward(Tensor q, Tensor k, Tensor v, const Tensor& qkv, const Tensor& pos, float theta) = 0;
  virtual void qkv_rope_backward(Tensor dqkv, const Tensor& dq, const Tensor& dk, const Tensor& dv, const Tensor& pos,
                                 float theta) = 0;
  virtual void swiglu_forward(Tensor out, const Tensor& inp) = 0;   // inp (N, 2F) = [gate | up]
  virtual void swiglu_backward(Tensor dinp, const Tensor& dout, const Tensor& inp, bool accumulate = true) = 0;
  virtual void add_inplace(Tensor dst, const Tensor& src) = 0;
  virtual void copy(Tensor dst, const Tensor& src) = 0;  // same shape and dtype, either may be row-strided
  virtual void convert(Tensor dst, const Tensor& src) = 0;  // contiguous, same numel, any float dtypes

  // ---- attention (kernels/attention.h): ops only; which layers route, reuse routing or recompute is the model's ----
  // Bytes of each scratch buffer that calls up to `shape` need (zeros where the backend needs none).
  virtual AttentionScratchSizes attention_scratch_sizes(const AttentionScratchShape& shape) const = 0;
  // Bytes of scratch the other ops take (grown once, in the first step) for calls of up to max_tokens rows of d_model
  // channels and vocab token ids: the CUDA backend's deterministic embedding and RMSNorm backward; 0 elsewhere.
  virtual size_t op_scratch_bytes(int64_t max_tokens, int d_model, int vocab) const {
    (void)max_tokens, (void)d_model, (void)vocab;
    return 0;
  }
  // MoBA routing: writes c.selected from c.q and the block means of the whole c.k.
  virtual void moba_select_blocks(const AttentionCall& c) = 0;
  // Writes c.out and c.lse (full causal, or MoBA over c.selected).
  virtual void attention_forward(const AttentionCall& c) = 0;
  // Adds the gradients into c.dq, c.dk and c.dv (recomputing P from c.lse; MoBA over the same c.selected).
  virtual void attention_backward(const AttentionCall& c) = 0;

  // ---- loss: logits (N, V), targets (N) int32, mask (N) uint8 ----
  // Writes per-token losses (N) and returns their sum (the masked tokens add 0).
  virtual double cross_entropy_forward(Tensor losses, const Tensor& logits, const Tensor& targets,
                                       const Tensor& mask) = 0;
  virtual void cross_entropy_backward(Tensor dlogits, const Tensor& logits, const Tensor& targets,
                                      const Tensor& mask, float grad_scale) = 0;
  // The fused loss head, one pass over a chunk of logit rows and no host synchronisation: writes the per-token
  // losses and, when grad_scale != 0, overwrites logits with d(grad_scale * sum of losses)/d(logits) (0 on masked
  // rows), so a model never holds logits and their gradient for the whole batch at once.
  virtual void cross_entropy_fused(Tensor losses, Tensor logits, const Tensor& targets, const Tensor& mask,
                                   float grad_scale) = 0;
  virtual double sum(const Tensor& x) = 0;  // f32 x summed in double in a fixed order (synchronises)

  // ---- optimizer over flat arenas ----
  // Updates the f32 master `param`; when param_working is non-empty (mixed precision), also writes the
  // updated values rounded to its dtype there (the weights the next forward uses).
  // grad_scale multiplies the gradient first (clipping folded into the update: no separate pass over grad).
  virtual void adamw_update(Tensor param, Tensor param_working, const Tensor& grad, Tensor m, Tensor v, float lr,
                            float beta1, float beta2, float eps, float weight_decay, int64_t step,
                            float grad_scale = 1.0f) = 0;
  virtual double sum_of_squares(const Tensor& x) = 0;
  virtual void scale(Tensor x, float s) = 0;
};

// Allocates every buffer of be.attention_scratch_sizes(shape) (empty tensors where 0 bytes are needed);
// release_attention_scratch frees them.
AttentionScratch allocate_attention_scratch(Backend& be, const AttentionScratchShape& shape);
void release_attention_scratch(Backend& be, AttentionScratch& scratch);

// Per-op timing of the CUDA backend (`moba bench train --profile-ops`): CUDA events around every op, summed per op
// name and printed to stderr when the backend is destroyed; every_call also prints each call in order (to find where
// one op's time varies within a step). The events serialise nothing but add a little launch overhead.
enum class OpProfile { off, totals, every_call };

// Run-wide choices of a backend, fixed at creation (typed: from the recipe or bench flags, never the environment).
struct BackendSettings {
  OpProfile profile = OpProfile::off;
  // Bitwise-reproducible results run to run (same GPU, same inputs) of the non-attention ops that otherwise add with
  // float atomics: CUDA embedding_backward and rmsnorm_backward's dweight. Attention takes the same choice per call
  // (AttentionKernelSettings::deterministic). The CPU backend always is.
  bool deterministic = false;
};

std::unique_ptr<Backend> make_cpu_backend();
#if MOBA_HAVE_CUDA
// kernels/cuda/; runs on GPU `device`; throws a clear moba::Error when no GPU is usable
std::unique_ptr<Backend> make_cuda_backend(int device = 0, BackendSettings settings = {});
#endif
// "cpu" or "cuda" (on GPU `device`); "cuda" fails with a clear message when this build has no CUDA backend or no GPU.
// A profile other than off needs "cuda".
std::unique_ptr<Backend> make_backend(const std::string& name, int device = 0, BackendSettings settings = {});
// GPUs this process can see (0 without the CUDA backend or a driver).
int gpu_count();

}  // namespace moba
