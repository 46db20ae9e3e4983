// The CPU reference backend: adapts the Backend interface to the fp32 functions of ops.h and attention.h,
// checking that every tensor is f32 (or i32/u8 for indices and masks) on the CPU with consistent shapes.
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>

#include "common/error.h"
#include "common/host_memory.h"
#include "kernels/backend.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/ops.h"

namespace moba {
namespace {

float* f32(const Tensor& t, const char* what) {
  MOBA_CHECK(t.device == Device::cpu && t.dtype == DType::f32,
             cat("cpu backend: ", what, " must be f32 on the cpu, got ", t.describe()), "this is a bug in the caller");
  return t.as<float>();
}
const int32_t* i32(const Tensor& t, const char* what) {
  MOBA_CHECK(t.device == Device::cpu && t.dtype == DType::i32,
             cat("cpu backend: ", what, " must be i32 on the cpu, got ", t.describe()), "this is a bug in the caller");
  return t.as<int32_t>();
}
void same_rows(const Tensor& a, const Tensor& b, const char* op) {
  MOBA_CHECK(a.rows() == b.rows(), cat("cpu backend: ", op, ": row counts differ: ", a.describe(), " vs ", b.describe()),
             "this is a bug in the caller");
}

class CpuBackend final : public Backend {
 public:
  std::string name() const override { return "cpu"; }
  Device device() const override { return Device::cpu; }
  DType activation_dtype() const override { return DType::f32; }

  Tensor allocate(DType dtype, std::initializer_list<int64_t> shape) override {
    Tensor t(nullptr, dtype, Device::cpu, shape);
    size_t bytes = (t.bytes() + 63) / 64 * 64;
    t.data = std::aligned_alloc(64, bytes ? bytes : 64);
    MOBA_CHECK(t.data != nullptr, cat("cannot allocate ", t.describe(), " (", bytes >> 20, " MiB)"),
               "reduce train.micro_batch_seqs or data.seq_len");
    std::memset(t.data, 0, bytes);
    allocated_ += bytes;
    peak_ = std::max(peak_, allocated_);
    return t;
  }
  void release(Tensor& t) override {
    allocated_ -= (t.bytes() + 63) / 64 * 64;
    std::free(t.data);
    t.data = nullptr;
  }
  size_t allocated_bytes() const override { return allocated_; }
  size_t peak_bytes() const override { return peak_; }
  size_t available_bytes() const override { return host_available_bytes(); }
  std::vector<double> time_ms(const std::function<void()>& fn, int warmup, int reps) override {
    for (int i = 0; i < warmup; ++i) fn();
    std::vector<double> ms;
    for (int i = 0; i < reps; ++i) {
      auto t0 = std::chrono::steady_clock::now();
      fn();
      ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
    return ms;
  }
  void zero(Tensor t) override {
    if (t.contiguous()) {
      std::memset(t.data, 0, t.bytes());
      return;
    }
    for (int64_t r = 0; r < t.rows(); ++r) std::memset(t.slice_rows(r, 1).data, 0, t.row_size() * dtype_size(t.dtype));
  }
  void upload(Tensor dst, const void* host) override { std::memcpy(dst.data, host, dst.bytes()); }
  void download(void* host, const Tensor& src) override { std::memcpy(host, src.data, src.bytes()); }
  void synchronize() override {}

  void gather_rows(Tensor out, const Tensor& src, const Tensor& rows) override {
    same_rows(out, rows, "gather_rows");
    MOBA_ASSERT(out.dtype == src.dtype && out.row_size() == src.row_size() && out.contiguous() && src.contiguous());
    cpu::gather_rows(out.data, i32(rows, "rows"), src.data, out.rows(),
                     static_cast<int64_t>(out.row_size() * dtype_size(out.dtype)));
  }
  void embedding_backward(Tensor dwte, const Tensor& dout, const Tensor& tokens) override {
    cpu::embedding_backward(f32(dwte, "dwte"), f32(dout, "dout"), i32(tokens, "tokens"), dout.rows(),
                            static_cast<int>(dout.row_size()), static_cast<int>(dwte.rows()));
  }
  void rmsnorm_forward(Tensor out, Tensor rstd, const Tensor& inp, const Tensor& weight, float eps) override {
    same_rows(out, inp, "rmsnorm_forward");
    cpu::rmsnorm_forward(f32(out, "out"), f32(rstd, "rstd"), f32(inp, "inp"), f32(weight, "weight"), inp.rows(),
                         static_cast<int>(inp.row_size()), eps);
  }
  void residual_rmsnorm_forward(Tensor resid, Tensor out, Tensor rstd, const Tensor& residual, const Tensor& weight,
                                float eps) override {
    add_inplace(resid, residual);
    rmsnorm_forward(out, rstd, resid, weight, eps);
  }
  void rmsnorm_backward(Tensor dinp, Tensor dweight, const Tensor& dout, const Tensor& inp, const Tensor& weight,
                        const Tensor& rstd) override {
    cpu::rmsnorm_backward(f32(dinp, "dinp"), f32(dweight, "dweight"), f32(dout, "dout"), f32(inp, "inp"),
                          f32(weight, "weight"), f32(rstd, "rstd"), inp.rows(), static_cast<int>(inp.row_size()));
  }
  void matmul_forward(Tensor out, const Tensor& inp, const Tensor& weight) override {
    same_rows(out, inp, "matmul_forward");
    MOBA_ASSERT(inp.row_size() == weight.row_size() && out.row_size() == weight.rows() && out.contiguous() &&
                inp.contiguous());
    cpu::matmul_forward(f32(out, "out"), f32(inp, "inp"), f32(weight, "weight"), inp.rows(),
                        static_cast<int>(inp.row_size()), static_cast<int>(weight.rows()));
  }
  void matmul_backward(Tensor dinp, Tensor dweight, const Tensor& dout, const Tensor& inp, const Tensor& weight,
                       bool accumulate) override {
    if (!accumulate && dinp.data) zero(dinp);
    cpu::matmul_backward(dinp.data ? f32(dinp, "dinp") : nullptr, dweight.data ? f32(dweight, "dweight") : nullptr,
                         f32(dout, "dout"), f32(inp, "inp"), f32(weight, "weight"), inp.rows(),
                         static_cast<int>(inp.row_size()), static_cast<int>(weight.rows()));
  }
  void rope_forward(Tensor out, const Tensor& inp, const Tensor& pos, float theta) override {
    MOBA_ASSERT(out.ndim == 3 && out.contiguous());
    cpu::rope_forward(f32(out, "out"), f32(inp, "inp"), inp.stride0(), i32(pos, "pos"), out.shape[0],
                      static_cast<int>(out.shape[1]), static_cast<int>(out.shape[2]), theta);
  }
  void rope_backward(Tensor dinp, const Tensor& dout, const Tensor& pos, float theta) override {
    MOBA_ASSERT(dout.ndim == 3 && dout.contiguous());
    cpu::rope_backward(f32(dinp, "dinp"), dinp.stride0(), f32(dout, "dout"), i32(pos, "pos"), dout.shape[0],
                       static_cast<int>(dout.shape[1]), static_cast<int>(dout.shape[2]), theta);
  }
  void qkv_rope_forward(Tensor q, Tensor k, Tensor v, const Tensor& qkv, const Tensor& pos, float theta) override {
    const int64_t qd = q.row_size(), kd = k.row_size();
    MOBA_ASSERT(qkv.row_size() == qd + 2 * kd && v.row_size() == kd);
    rope_forward(q, qkv.columns(0, qd), pos, theta);
    rope_forward(k, qkv.columns(qd, kd), pos, theta);
    copy(v.reshape({v.shape[0], kd}), qkv.columns(qd + kd, kd));
  }
  void qkv_rope_backward(Tensor dqkv, const Tensor& dq, const Tensor& dk, const Tensor& dv, const Tensor& pos,
                         float theta) override {
    const int64_t qd = dq.row_size(), kd = dk.row_size();
    MOBA_ASSERT(dqkv.row_size() == qd + 2 * kd && dv.row_size() == kd);
    zero(dqkv);
    rope_backward(dqkv.columns(0, qd), dq, pos, theta);
    rope_backward(dqkv.columns(qd, kd), dk, pos, theta);
    copy(dqkv.columns(qd + kd, kd), dv.reshape({dv.shape[0], kd}));
  }
  void swiglu_forward(Tensor out, const Tensor& inp) override {
    cpu::swiglu_forward(f32(out, "out"), f32(inp, "inp"), out.rows(), static_cast<int>(out.row_size()));
  }
  void swiglu_backward(Tensor dinp, const Tensor& dout, const Tensor& inp, bool accumulate) override {
    if (!accumulate) zero(dinp);
    cpu::swiglu_backward(f32(dinp, "dinp"), f32(dout, "dout"), f32(inp, "inp"), dout.rows(),
                         static_cast<int>(dout.row_size()));
  }
  void add_inplace(Tensor dst, const Tensor& src) override {
    MOBA_ASSERT(dst.numel() == src.numel() && dst.contiguous() && src.contiguous());
    cpu::add_inplace(f32(dst, "dst"), f32(src, "src"), dst.numel());
  }
  void copy(Tensor dst, const Tensor& src) override {
    MOBA_ASSERT(dst.rows() == src.rows() && dst.row_size() == src.row_size());
    cpu::copy_rows(f32(dst, "dst"), dst.stride0(), f32(src, "src"), src.stride0(), src.rows(), src.row_size());
  }

  void convert(Tensor dst, const Tensor& src) override {
    MOBA_ASSERT(dst.numel() == src.numel() && dst.contiguous() && src.contiguous());
    std::memcpy(f32(dst, "dst"), f32(src, "src"), dst.bytes());  // the CPU backend holds f32 only
  }

  AttentionScratchSizes attention_scratch_sizes(const AttentionScratchShape&) const override {
    return {};  // the CPU kernels keep their scratch per thread on the host
  }
  void moba_select_blocks(const AttentionCall& c) override {
    check_attention_call("cpu moba_select_blocks", c, DType::f32, Device::cpu, false);
    cpu::moba_select_blocks(attention_views<float, float>(c));
  }
  void attention_forward(const AttentionCall& c) override {
    check_attention_call("cpu attention_forward", c, DType::f32, Device::cpu, false);
    const cpu::AttentionArgs a = attention_views<float, float>(c);
    if (c.mode == AttentionMode::full) cpu::attention_full_forward(a);
    else cpu::moba_attention_forward(a);
  }
  void attention_backward(const AttentionCall& c) override {
    check_attention_call("cpu attention_backward", c, DType::f32, Device::cpu, true);
    const cpu::AttentionArgs a = attention_views<float, float>(c);
    if (c.mode == AttentionMode::full) cpu::attention_full_backward(a);
    else cpu::moba_attention_backward(a);
  }

  double cross_entropy_forward(Tensor losses, const Tensor& logits, const Tensor& targets,
                               const Tensor& mask) override {
    return cpu::cross_entropy_forward(f32(losses, "losses"), f32(logits, "logits"), i32(targets, "targets"),
                                      mask.data ? mask.as<uint8_t>() : nullptr, logits.rows(),
                                      static_cast<int>(logits.row_size()));
  }
  void cross_entropy_backward(Tensor dlogits, const Tensor& logits, const Tensor& targets, const Tensor& mask,
                              float grad_scale) override {
    cpu::cross_entropy_backward(f32(dlogits, "dlogits"), f32(logits, "logits"), i32(targets, "targets"),
                                mask.data ? mask.as<uint8_t>() : nullptr, grad_scale, logits.rows(),
                                static_cast<int>(logits.row_size()));
  }
  void cross_entropy_fused(Tensor losses, Tensor logits, const Tensor& targets, const Tensor& mask,
                           float grad_scale) override {
    same_rows(losses, logits, "cross_entropy_fused");
    cpu::cross_entropy_fused(f32(losses, "losses"), f32(logits, "logits"), i32(targets, "targets"),
                             mask.data ? mask.as<uint8_t>() : nullptr, grad_scale, logits.rows(),
                             static_cast<int>(logits.row_size()));
  }
  double sum(const Tensor& x) override {
    const float* p = f32(x, "x");
    double total = 0.0;
    for (int64_t i = 0; i < x.numel(); ++i) total += p[i];
    return total;
  }

  void adamw_update(Tensor param, Tensor param_working, const Tensor& grad, Tensor m, Tensor v, float lr,
                    float beta1, float beta2, float eps, float weight_decay, int64_t step, float grad_scale) override {
    MOBA_ASSERT(param.numel() == grad.numel() && param.numel() == m.numel() && param.numel() == v.numel());
    cpu::adamw_update(f32(param, "param"), f32(grad, "grad"), f32(m, "m"), f32(v, "v"), param.numel(), lr, beta1,
                      beta2, eps, weight_decay, step, grad_scale);
    // fp32 throughout: the working copy (when given) is the master's values exactly.
    if (param_working.data) std::memcpy(f32(param_working, "param_working"), param.data, param.bytes());
  }
  double sum_of_squares(const Tensor& x) override { return cpu::sum_of_squares(f32(x, "x"), x.numel()); }
  void scale(Tensor x, float s) override { cpu::scale_inplace(f32(x, "x"), x.numel(), s); }

 private:
  size_t allocated_ = 0, peak_ = 0;
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend() { return std::make_unique<CpuBackend>(); }

}  // namespace moba
