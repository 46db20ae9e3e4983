// The CUDA backend: device memory and the Backend interface on one stream, activations in bf16, master
// weights, gradients and statistics in f32 (see kernels/backend.h for the precision contract).
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <vector>

#include "kernels/cuda/attention.h"
#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/ops.h"
#include "kernels/cuda/timing.h"

namespace moba {
namespace cuda {

bool device_has_wgmma(const CudaContext& ctx) {
  int major = 0, minor = 0;
  MOBA_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, ctx.device));
  MOBA_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, ctx.device));
  return major == 9 && minor == 0;
}

namespace {

template <typename T>
T* typed(const Tensor& t, DType want, const char* what) {
  MOBA_CHECK(t.device == Device::cuda && t.dtype == want,
             cat("cuda backend: ", what, " must be ", dtype_name(want), " on the GPU, got ", t.describe()),
             "this is a bug in the caller");
  return static_cast<T*>(t.data);
}
bf16* b16(const Tensor& t, const char* what) { return typed<bf16>(t, DType::bf16, what); }
float* f32(const Tensor& t, const char* what) { return typed<float>(t, DType::f32, what); }
const int32_t* i32(const Tensor& t, const char* what) { return typed<int32_t>(t, DType::i32, what); }
const uint8_t* u8(const Tensor& t, const char* what) { return typed<uint8_t>(t, DType::u8, what); }

// CUDA events around every op, summed per op name and printed (stderr) when the backend is destroyed
// (OpProfile in kernels/backend.h; off by default).
class OpProfiler {
 public:
  OpProfiler(cudaStream_t stream, OpProfile profile)
      : stream_(stream), enabled_(profile != OpProfile::off), every_call_(profile == OpProfile::every_call) {}
  bool enabled() const { return enabled_; }
  void record(std::string name, cudaEvent_t start, cudaEvent_t stop) {
    pending_.push_back({std::move(name), start, stop});
  }
  cudaEvent_t event() {
    cudaEvent_t e;
    MOBA_CUDA_CHECK(cudaEventCreate(&e));
    return e;
  }
  cudaStream_t stream() const { return stream_; }
  void report() {
    if (!enabled_ || pending_.empty()) return;
    cudaStreamSynchronize(stream_);
    std::map<std::string, std::pair<double, int64_t>> totals;
    double all = 0;
    for (const Pending& p : pending_) {
      float ms = 0;
      cudaEventElapsedTime(&ms, p.start, p.stop);
      if (every_call_) std::fprintf(stderr, "op %-36s %9.3f ms\n", p.name.c_str(), ms);
      totals[p.name].first += ms;
      totals[p.name].second += 1;
      all += ms;
      cudaEventDestroy(p.start);
      cudaEventDestroy(p.stop);
    }
    pending_.clear();
    std::vector<std::pair<double, std::string>> rows;
    for (const auto& [name, t] : totals) rows.push_back({t.first, name});
    std::sort(rows.rbegin(), rows.rend());
    std::fprintf(stderr, "profile (--profile-ops): %.1f ms in ops\n", all);
    for (const auto& [ms, name] : rows)
      std::fprintf(stderr, "  %-36s %10.2f ms %6.1f%%  %8lld calls\n", name.c_str(), ms, 100.0 * ms / all,
                   static_cast<long long>(totals[name].second));
  }

 private:
  struct Pending {
    std::string name;
    cudaEvent_t start, stop;
  };
  cudaStream_t stream_;
  bool enabled_ = false;
  bool every_call_ = false;  // also every call in order
  std::vector<Pending> pending_;
};

class OpTimer {
 public:
  OpTimer(OpProfiler& profiler, std::string name) : profiler_(profiler), name_(std::move(name)) {
    if (!profiler_.enabled()) return;
    start_ = profiler_.event();
    stop_ = profiler_.event();
    MOBA_CUDA_CHECK(cudaEventRecord(start_, profiler_.stream()));
  }
  ~OpTimer() {
    if (!profiler_.enabled()) return;
    cudaEventRecord(stop_, profiler_.stream());
    profiler_.record(std::move(name_), start_, stop_);
  }

 private:
  OpProfiler& profiler_;
  std::string name_;
  cudaEvent_t start_ = nullptr, stop_ = nullptr;
};

// The raw device view of a checked call (tensors the call leaves empty stay nullptr).
cuda::AttentionArgs args_of(const AttentionCall& c, const char* op, bool backward) {
  check_attention_call(cat("cuda ", op).c_str(), c, DType::bf16, Device::cuda, backward);
  cuda::AttentionArgs a;
  static_cast<AttentionViews<bf16, void>&>(a) = attention_views<bf16, void>(c);
  a.dkv_f32 = c.dk.dtype == DType::f32;
  a.settings = c.settings;
  auto buffer = [](const Tensor& t) { return cuda::ScratchBuffer{t.data, t.data ? t.bytes() : 0}; };
  a.scratch = {buffer(c.scratch.row_stats), buffer(c.scratch.partials), buffer(c.scratch.block_means),
               buffer(c.scratch.dispatch), buffer(c.scratch.chunk_dispatch), buffer(c.scratch.query_index)};
  return a;
}

class CudaBackend final : public Backend {
 public:
  CudaBackend(int device, BackendSettings settings) : deterministic_(settings.deterministic) {
    ctx_.device = device;
    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    MOBA_CHECK(err == cudaSuccess && count > 0,
               cat("backend 'cuda': no usable GPU (", err == cudaSuccess ? "no device" : cudaGetErrorString(err), ")"),
               "run on a machine with an NVIDIA GPU and driver, or use backend: cpu");
    MOBA_CHECK(device >= 0 && device < count, cat("backend 'cuda': GPU ", device, " requested but ", count, " visible"),
               "launch at most one rank per visible GPU (CUDA_VISIBLE_DEVICES), or use parallel.transport: mpi");
    MOBA_CUDA_CHECK(cudaSetDevice(ctx_.device));
    cudaDeviceProp prop{};
    MOBA_CUDA_CHECK(cudaGetDeviceProperties(&prop, ctx_.device));
    ctx_.sm_count = prop.multiProcessorCount;
    MOBA_CUDA_CHECK(cudaStreamCreateWithFlags(&ctx_.stream, cudaStreamNonBlocking));
    MOBA_CUBLAS_CHECK(cublasLtCreate(&ctx_.lt));
    ctx_.workspace_bytes = 32u << 20;
    MOBA_CUDA_CHECK(cudaMalloc(&ctx_.workspace, ctx_.workspace_bytes));
    name_ = cat("cuda (", prop.name, ")");
    profiler_ = std::make_unique<OpProfiler>(ctx_.stream, settings.profile);
  }
  ~CudaBackend() override {
    cudaStreamSynchronize(ctx_.stream);
    if (profiler_) profiler_->report();
    for (void* p : ctx_.scratch_ptr) cudaFree(p);
    cudaFree(ctx_.workspace);
    cublasLtDestroy(ctx_.lt);
    cudaStreamDestroy(ctx_.stream);
  }

  std::string name() const override { return name_; }
  Device device() const override { return Device::cuda; }
  DType activation_dtype() const override { return DType::bf16; }

  Tensor allocate(DType dtype, std::initializer_list<int64_t> shape) override {
    Tensor t(nullptr, dtype, Device::cuda, shape);
    size_t bytes = (t.bytes() + 255) / 256 * 256;
    bytes = bytes ? bytes : 256;
    cudaError_t err = cudaMalloc(&t.data, bytes);
    if (err == cudaErrorMemoryAllocation) {
      size_t free_bytes = 0, total_bytes = 0;
      cudaGetLastError();
      cudaMemGetInfo(&free_bytes, &total_bytes);
      throw Error(cat("out of GPU memory allocating ", t.describe(), " (", bytes >> 20, " MiB; ", ctx_.allocated >> 20,
                      " MiB already held by moba, ", free_bytes >> 20, " MiB free of ", total_bytes >> 20, ")"),
                  "lower train.micro_batch_seqs or data.seq_len, or set train.recompute: attention (or full)");
    }
    MOBA_CUDA_CHECK(err);
    MOBA_CUDA_CHECK(cudaMemsetAsync(t.data, 0, bytes, ctx_.stream));
    ctx_.track(static_cast<int64_t>(bytes));
    return t;
  }
  void release(Tensor& t) override {
    ctx_.track(-static_cast<int64_t>((t.bytes() ? (t.bytes() + 255) / 256 * 256 : 256)));
    cudaFree(t.data);
    t.data = nullptr;
  }
  size_t allocated_bytes() const override { return ctx_.allocated; }
  size_t peak_bytes() const override { return ctx_.peak; }
  size_t available_bytes() const override {
    size_t free_bytes = 0, total_bytes = 0;
    MOBA_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
    return free_bytes;
  }
  std::vector<double> time_ms(const std::function<void()>& fn, int warmup, int reps) override {
    return cuda::time_on_stream(ctx_.stream, fn, warmup, reps);
  }
  int device_index() const override { return ctx_.device; }
  void* stream_handle() const override { return ctx_.stream; }
  void zero(Tensor t) override {
    OpTimer timer(*profiler_, "zero");
    if (t.contiguous()) {
      MOBA_CUDA_CHECK(cudaMemsetAsync(t.data, 0, t.bytes(), ctx_.stream));
    } else {
      size_t row_bytes = static_cast<size_t>(t.row_size()) * dtype_size(t.dtype);
      MOBA_CUDA_CHECK(cudaMemset2DAsync(t.data, static_cast<size_t>(t.stride0()) * dtype_size(t.dtype), 0, row_bytes,
                                        static_cast<size_t>(t.rows()), ctx_.stream));
    }
  }
  void upload(Tensor dst, const void* host) override {
    MOBA_CUDA_CHECK(cudaMemcpyAsync(dst.data, host, dst.bytes(), cudaMemcpyHostToDevice, ctx_.stream));
    MOBA_CUDA_CHECK(cudaStreamSynchronize(ctx_.stream));
  }
  void download(void* host, const Tensor& src) override {
    MOBA_CUDA_CHECK(cudaMemcpyAsync(host, src.data, src.bytes(), cudaMemcpyDeviceToHost, ctx_.stream));
    MOBA_CUDA_CHECK(cudaStreamSynchronize(ctx_.stream));
  }
  void synchronize() override { MOBA_CUDA_CHECK(cudaStreamSynchronize(ctx_.stream)); }

  // ---- ops: check dtypes/shapes here, launch in kernels/cuda/*.cu ----
  void gather_rows(Tensor out, const Tensor& src, const Tensor& rows) override {
    OpTimer timer(*profiler_, "gather_rows");
    MOBA_ASSERT(out.dtype == src.dtype && out.row_size() == src.row_size() && out.contiguous() && src.contiguous() &&
                rows.numel() == out.rows() && src.device == Device::cuda);
    cuda::gather_rows(ctx_, out.data, i32(rows, "rows"), src.data, out.rows(),
                      static_cast<int64_t>(out.row_size() * dtype_size(out.dtype)));
  }
  void embedding_backward(Tensor dwte, const Tensor& dout, const Tensor& tokens) override {
    OpTimer timer(*profiler_, "embedding_backward");
    cuda::embedding_backward(ctx_, f32(dwte, "dwte"), b16(dout, "dout"), i32(tokens, "tokens"), dout.rows(),
                             static_cast<int>(dout.row_size()), static_cast<int>(dwte.rows()), deterministic_);
  }
  void rmsnorm_forward(Tensor out, Tensor rstd, const Tensor& inp, const Tensor& weight, float eps) override {
    OpTimer timer(*profiler_, "rmsnorm_forward");
    cuda::rmsnorm_forward(ctx_, b16(out, "out"), f32(rstd, "rstd"), b16(inp, "inp"), b16(weight, "weight"),
                          inp.rows(), static_cast<int>(inp.row_size()), eps);
  }
  void residual_rmsnorm_forward(Tensor resid, Tensor out, Tensor rstd, const Tensor& residual, const Tensor& weight,
                                float eps) override {
    OpTimer timer(*profiler_, "residual_rmsnorm_forward");
    MOBA_ASSERT(resid.contiguous() && residual.contiguous() && out.contiguous() && resid.numel() == residual.numel() &&
                out.numel() == resid.numel());
    cuda::residual_rmsnorm_forward(ctx_, b16(resid, "resid"), b16(out, "out"), f32(rstd, "rstd"),
                                   b16(residual, "residual"), b16(weight, "weight"), resid.rows(),
                                   static_cast<int>(resid.row_size()), eps);
  }
  void rmsnorm_backward(Tensor dinp, Tensor dweight, const Tensor& dout, const Tensor& inp, const Tensor& weight,
                        const Tensor& rstd) override {
    OpTimer timer(*profiler_, "rmsnorm_backward");
    cuda::rmsnorm_backward(ctx_, b16(dinp, "dinp"), f32(dweight, "dweight"), b16(dout, "dout"), b16(inp, "inp"),
                           b16(weight, "weight"), f32(rstd, "rstd"), inp.rows(), static_cast<int>(inp.row_size()),
                           deterministic_);
  }
  void matmul_forward(Tensor out, const Tensor& inp, const Tensor& weight) override {
    OpTimer timer(*profiler_, profiler_->enabled() ? cat("matmul_forward ", inp.rows(), "x", inp.row_size(), "->",
                                                         weight.rows()) : std::string());
    MOBA_ASSERT(out.contiguous() && inp.contiguous() && inp.row_size() == weight.row_size() &&
                out.row_size() == weight.rows());
    cuda::matmul_forward(ctx_, b16(out, "out"), b16(inp, "inp"), b16(weight, "weight"), inp.rows(),
                         static_cast<int>(inp.row_size()), static_cast<int>(weight.rows()));
  }
  void matmul_backward(Tensor dinp, Tensor dweight, const Tensor& dout, const Tensor& inp, const Tensor& weight,
                       bool accumulate) override {
    OpTimer timer(*profiler_, profiler_->enabled() ? cat("matmul_backward ", inp.rows(), "x", inp.row_size(), "->",
                                                         weight.rows()) : std::string());
    cuda::matmul_backward(ctx_, dinp.data ? b16(dinp, "dinp") : nullptr, dweight.data ? f32(dweight, "dweight") : nullptr,
                          b16(dout, "dout"), b16(inp, "inp"), b16(weight, "weight"), inp.rows(),
                          static_cast<int>(inp.row_size()), static_cast<int>(weight.rows()), accumulate);
  }
  void rope_forward(Tensor out, const Tensor& inp, const Tensor& pos, float theta) override {
    OpTimer timer(*profiler_, "rope_forward");
    MOBA_ASSERT(out.ndim == 3 && out.contiguous());
    cuda::rope_forward(ctx_, b16(out, "out"), b16(inp, "inp"), inp.stride0(), i32(pos, "pos"), out.shape[0],
                       static_cast<int>(out.shape[1]), static_cast<int>(out.shape[2]), theta);
  }
  void rope_backward(Tensor dinp, const Tensor& dout, const Tensor& pos, float theta) override {
    OpTimer timer(*profiler_, "rope_backward");
    MOBA_ASSERT(dout.ndim == 3 && dout.contiguous());
    cuda::rope_backward(ctx_, b16(dinp, "dinp"), dinp.stride0(), b16(dout, "dout"), i32(pos, "pos"), dout.shape[0],
                        static_cast<int>(dout.shape[1]), static_cast<int>(dout.shape[2]), theta);
  }
  void qkv_rope_forward(Tensor q, Tensor k, Tensor v, const Tensor& qkv, const Tensor& pos, float theta) override {
    OpTimer timer(*profiler_, "qkv_rope_forward");
    MOBA_ASSERT(q.ndim == 3 && k.ndim == 3 && v.ndim == 3 && q.contiguous() && k.contiguous() && v.contiguous() &&
                qkv.row_size() == q.row_size() + 2 * k.row_size() && k.shape[1] == v.shape[1]);
    cuda::qkv_rope(ctx_, b16(q, "q"), b16(k, "k"), b16(v, "v"), const_cast<bf16*>(b16(qkv, "qkv")), qkv.stride0(),
                   i32(pos, "pos"), q.shape[0], static_cast<int>(q.shape[1]), static_cast<int>(k.shape[1]),
                   static_cast<int>(q.shape[2]), theta, /*backward=*/false);
  }
  void qkv_rope_backward(Tensor dqkv, const Tensor& dq, const Tensor& dk, const Tensor& dv, const Tensor& pos,
                         float theta) override {
    OpTimer timer(*profiler_, "qkv_rope_backward");
    MOBA_ASSERT(dq.ndim == 3 && dk.ndim == 3 && dv.ndim == 3 && dq.contiguous() && dk.contiguous() &&
                dv.contiguous() && dqkv.row_size() == dq.row_size() + 2 * dk.row_size() && dk.shape[1] == dv.shape[1]);
    cuda::qkv_rope(ctx_, const_cast<bf16*>(b16(dq, "dq")), const_cast<bf16*>(b16(dk, "dk")),
                   const_cast<bf16*>(b16(dv, "dv")), b16(dqkv, "dqkv"), dqkv.stride0(), i32(pos, "pos"), dq.shape[0],
                   static_cast<int>(dq.shape[1]), static_cast<int>(dk.shape[1]), static_cast<int>(dq.shape[2]), theta,
                   /*backward=*/true);
  }
  void swiglu_forward(Tensor out, const Tensor& inp) override {
    OpTimer timer(*profiler_, "swiglu_forward");
    cuda::swiglu_forward(ctx_, b16(out, "out"), b16(inp, "inp"), out.rows(), static_cast<int>(out.row_size()));
  }
  void swiglu_backward(Tensor dinp, const Tensor& dout, const Tensor& inp, bool accumulate) override {
    OpTimer timer(*profiler_, "swiglu_backward");
    cuda::swiglu_backward(ctx_, b16(dinp, "dinp"), b16(dout, "dout"), b16(inp, "inp"), dout.rows(),
                          static_cast<int>(dout.row_size()), accumulate);
  }
  void add_inplace(Tensor dst, const Tensor& src) override {
    OpTimer timer(*profiler_, "add_inplace");
    MOBA_ASSERT(dst.numel() == src.numel() && dst.contiguous() && src.contiguous());
    cuda::add_inplace(ctx_, b16(dst, "dst"), b16(src, "src"), dst.numel());
  }
  void copy(Tensor dst, const Tensor& src) override {
    OpTimer timer(*profiler_, "copy");
    MOBA_ASSERT(dst.rows() == src.rows() && dst.row_size() == src.row_size() && dst.dtype == src.dtype &&
                dst.device == Device::cuda && src.device == Device::cuda);
    cuda::copy_rows(ctx_, dst.data, dst.stride0(), src.data, src.stride0(), src.rows(), src.row_size(),
                    static_cast<int>(dtype_size(src.dtype)));
  }
  void convert(Tensor dst, const Tensor& src) override {
    OpTimer timer(*profiler_, "convert");
    MOBA_ASSERT(dst.numel() == src.numel() && dst.contiguous() && src.contiguous() && dst.device == Device::cuda &&
                src.device == Device::cuda);
    cuda::convert(ctx_, dst.data, dst.dtype, src.data, src.dtype, dst.numel());
  }

  AttentionScratchSizes attention_scratch_sizes(const AttentionScratchShape& shape) const override {
    return cuda::attention_scratch_sizes(shape);
  }
  size_t op_scratch_bytes(int64_t max_tokens, int d_model, int vocab) const override {
    if (!deterministic_) return 0;
    return cuda::rmsnorm_backward_scratch_bytes(ctx_, max_tokens, d_model) +
           cuda::embedding_backward_scratch_bytes(max_tokens, d_model, vocab);
  }
  void moba_select_blocks(const AttentionCall& c) override {
    OpTimer timer(*profiler_, "moba_select_blocks");
    cuda::moba_select_blocks(ctx_, args_of(c, "moba_select_blocks", false));
  }
  void attention_forward(const AttentionCall& c) override {
    OpTimer timer(*profiler_, "attention_forward");
    const cuda::AttentionArgs a = args_of(c, "attention_forward", false);
    if (c.mode == AttentionMode::full) cuda::flash_attention_forward(ctx_, a);
    else cuda::moba_attention_forward(ctx_, a);
  }
  void attention_backward(const AttentionCall& c) override {
    OpTimer timer(*profiler_, "attention_backward");
    const cuda::AttentionArgs a = args_of(c, "attention_backward", true);
    if (c.mode == AttentionMode::full) cuda::flash_attention_backward(ctx_, a);
    else cuda::moba_attention_backward(ctx_, a);
  }

  double cross_entropy_forward(Tensor losses, const Tensor& logits, const Tensor& targets,
                               const Tensor& mask) override {
    OpTimer timer(*profiler_, "cross_entropy_forward");
    return cuda::cross_entropy_forward(ctx_, f32(losses, "losses"), b16(logits, "logits"), i32(targets, "targets"),
                                       mask.data ? u8(mask, "mask") : nullptr, logits.rows(),
                                       static_cast<int>(logits.row_size()));
  }
  void cross_entropy_backward(Tensor dlogits, const Tensor& logits, const Tensor& targets, const Tensor& mask,
                              float grad_scale) override {
    OpTimer timer(*profiler_, "cross_entropy_backward");
    cuda::cross_entropy_backward(ctx_, b16(dlogits, "dlogits"), b16(logits, "logits"), i32(targets, "targets"),
                                 mask.data ? u8(mask, "mask") : nullptr, grad_scale, logits.rows(),
                                 static_cast<int>(logits.row_size()));
  }
  void cross_entropy_fused(Tensor losses, Tensor logits, const Tensor& targets, const Tensor& mask,
                           float grad_scale) override {
    OpTimer timer(*profiler_, "cross_entropy_fused");
    MOBA_ASSERT(logits.contiguous() && losses.numel() == logits.rows());
    cuda::cross_entropy_fused(ctx_, f32(losses, "losses"), b16(logits, "logits"), i32(targets, "targets"),
                              mask.data ? u8(mask, "mask") : nullptr, grad_scale, logits.rows(),
                              static_cast<int>(logits.row_size()));
  }
  double sum(const Tensor& x) override {
    OpTimer timer(*profiler_, "sum");
    return cuda::sum(ctx_, f32(x, "x"), x.numel());
  }
  void adamw_update(Tensor param, Tensor param_working, const Tensor& grad, Tensor m, Tensor v, float lr, float beta1,
                    float beta2, float eps, float weight_decay, int64_t step, float grad_scale) override {
    OpTimer timer(*profiler_, "adamw_update");
    MOBA_ASSERT(param.numel() == grad.numel() && param.numel() == m.numel() && param.numel() == v.numel());
    cuda::adamw_update(ctx_, f32(param, "param"), param_working.data ? b16(param_working, "param_working") : nullptr,
                       f32(grad, "grad"), f32(m, "m"), f32(v, "v"), param.numel(), lr, beta1, beta2, eps, weight_decay,
                       step, grad_scale);
  }
  double sum_of_squares(const Tensor& x) override {
    OpTimer timer(*profiler_, "sum_of_squares");
    return cuda::sum_of_squares(ctx_, f32(x, "x"), x.numel());
  }
  void scale(Tensor x, float s) override {
    OpTimer timer(*profiler_, "scale");
    cuda::scale(ctx_, f32(x, "x"), x.numel(), s);
  }

 private:
  CudaContext ctx_;
  const bool deterministic_;  // BackendSettings::deterministic: the ordered (atomic-free) embedding / RMSNorm backward
  std::unique_ptr<OpProfiler> profiler_;  // per-op timings unless OpProfile::off
  std::string name_;
};

}  // namespace
}  // namespace cuda

std::unique_ptr<Backend> make_cuda_backend(int device, BackendSettings settings) {
  return std::make_unique<cuda::CudaBackend>(device, settings);
}

int gpu_count() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess ? count : 0;
}

}  // namespace moba
