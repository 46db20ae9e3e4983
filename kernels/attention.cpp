// Shape and dtype checks of an AttentionCall, shared by every backend (see kernels/attention.h).
#include "kernels/attention.h"

#include "common/error.h"

namespace moba {

const char* attention_mode_name(AttentionMode m) { return m == AttentionMode::moba ? "moba" : "full"; }

void check_attention_call(const char* op, const AttentionCall& c, DType activations, Device device, bool backward) {
  auto fail = [&](const std::string& what) {
    throw Error(cat(op, ": ", what), "pass the tensors described in kernels/attention.h (this is a bug in the caller)");
  };
  auto expect = [&](const Tensor& t, const char* name, DType dtype, int ndim) {
    if (t.data == nullptr) fail(cat(name, " is missing"));
    if (t.dtype != dtype || t.device != device || t.ndim != ndim || !t.contiguous())
      fail(cat(name, " must be a contiguous ", dtype_name(dtype), " tensor of ", ndim, " dims on the ",
               device == Device::cpu ? "cpu" : "cuda", ", got ", t.describe()));
  };
  expect(c.q, "q", activations, 3);
  expect(c.k, "k", activations, 3);
  expect(c.v, "v", activations, 3);
  expect(c.cu_seqlens, "cu_seqlens", DType::i32, 1);
  const int64_t Nq = c.n_queries(), Nk = c.n_keys();
  const int H = c.n_heads(), Hkv = c.n_kv_heads(), D = c.head_dim();
  if (c.v.shape[0] != Nk || c.v.shape[1] != Hkv || c.v.shape[2] != D || c.k.shape[2] != D)
    fail(cat("q ", c.q.describe(), ", k ", c.k.describe(), " and v ", c.v.describe(), " disagree on kv heads or head dim"));
  if (H < 1 || Hkv < 1 || H % Hkv != 0)
    fail(cat(H, " query heads are not a multiple of ", Hkv, " kv heads (GQA needs H = g * Hkv)"));
  if (c.cu_seqlens.numel() < 2) fail("cu_seqlens needs at least 2 offsets (one document)");
  if (c.q_rows.data != nullptr) {
    expect(c.q_rows, "q_rows", DType::i32, 1);
    if (c.q_rows.numel() != Nq) fail(cat("q_rows has ", c.q_rows.numel(), " rows for ", Nq, " query rows"));
  } else if (Nq != Nk) {
    fail(cat(Nq, " query rows against ", Nk, " key rows need q_rows (the key row each query row stands at)"));
  }
  if (!(c.softmax_scale > 0.0f)) fail(cat("softmax_scale must be positive, got ", c.softmax_scale));
  if (c.mode == AttentionMode::moba) {
    if (c.block_size < 1 || c.top_k < 1) fail(cat("MoBA needs block_size >= 1 and top_k >= 1, got ", c.block_size, ", ", c.top_k));
    expect(c.selected, "selected", DType::i32, c.selected.ndim == 3 ? 3 : 1);
    if (c.selected.numel() != Nq * H * c.top_k)
      fail(cat("selected ", c.selected.describe(), " must hold (Nq, H, top_k) = (", Nq, ", ", H, ", ", c.top_k, ")"));
  }
  if (c.out.data != nullptr || backward) {
    expect(c.out, "out", activations, 3);
    expect(c.lse, "lse", DType::f32, c.lse.ndim == 2 ? 2 : 1);
    if (c.out.numel() != c.q.numel() || c.lse.numel() != Nq * H) fail("out and lse must hold (Nq, H, D) and (Nq, H)");
  }
  if (!backward) return;
  expect(c.dout, "dout", activations, 3);
  expect(c.dq, "dq", activations, 3);
  if (c.dout.numel() != c.q.numel() || c.dq.numel() != c.q.numel()) fail("dout and dq must have q's shape");
  const DType grad = c.dk.dtype == DType::f32 ? DType::f32 : activations;
  expect(c.dk, "dk", grad, 3);
  expect(c.dv, "dv", grad, 3);
  if (c.dk.numel() != c.k.numel() || c.dv.numel() != c.k.numel()) fail("dk and dv must have k's shape");
}

}  // namespace moba
