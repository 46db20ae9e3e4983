#include "model/transformer.h"

#include <cmath>

#include "common/error.h"

namespace moba::model {

// Every buffer of one micro-batch. Per-layer activations are stacked as (L * N_max, width): layer l, n rows
// is slice_rows(l * N_max, n). Shapes below use N = max_tokens.
struct Transformer::Activations {
  Tensor inputs, targets, positions;  // (N) i32
  Tensor mask;                        // (N) u8
  Tensor cu_seqlens;                  // (N + 1) i32: at most one segment per row
  Tensor resid;                       // (L + 1, N, C) input of layer l; resid[L] feeds the final norm
  Tensor resid_mid;                   // (L, N, C) after the attention residual
  Tensor ln1, ln2;                    // (L, N, C)
  Tensor ln1_rstd, ln2_rstd;          // (L, N)
  Tensor qkv;                         // (L, N, (H + 2 Hkv) D)
  Tensor q, att;                      // (L, N, H, D) roped queries; attention output
  Tensor k, v;                        // (L, N, Hkv, D) roped keys; values
  Tensor lse;                         // (L, N, H) fp32 log-sum-exp
  Tensor selected;                    // (L, N, H, max_top_k) i32 MoBA routing (empty if no MoBA)
  Tensor gate_up;                     // (L, N, 2F)
  Tensor swiglu;                      // (L, N, F)
  Tensor lnf;                         // (N, C)
  Tensor lnf_rstd;                    // (N)
  Tensor logits, dlogits;             // (N, V)
  Tensor losses;                      // (N)
  // backward scratch, reused by every layer
  Tensor dresid, dln;                 // (N, C)
  Tensor dqkv;                        // (N, (H + 2 Hkv) D)
  Tensor dq, datt;                    // (N, H, D)
  Tensor dk, dv;                      // (N, Hkv, D)
  Tensor dgate_up;                    // (N, 2F)
  Tensor dswiglu;                     // (N, F)
  std::vector<Tensor*> all() {
    return {&inputs, &targets, &positions, &mask, &cu_seqlens, &resid, &resid_mid, &ln1, &ln2, &ln1_rstd,
            &ln2_rstd, &qkv, &q, &att, &k, &v, &lse, &selected, &gate_up, &swiglu, &lnf, &lnf_rstd, &logits,
            &dlogits, &losses, &dresid, &dln, &dqkv, &dq, &datt, &dk, &dv, &dgate_up, &dswiglu};
  }
};

Transformer::Transformer(Backend& backend, const ModelConfig& config, int64_t max_tokens, int max_top_k)
    : be_(backend), config_(config), layout_(config), max_tokens_(max_tokens), max_top_k_(max_top_k) {
  const ModelConfig& c = config_;
  MOBA_ASSERT(c.vocab_size > 0 && c.n_heads % c.n_kv_heads == 0 && c.head_dim % 2 == 0 && max_tokens > 0);
  const int64_t N = max_tokens, L = c.n_layers, C = c.d_model, H = c.n_heads, Hkv = c.n_kv_heads, D = c.head_dim;
  const int64_t F = c.ffn_hidden, V = c.vocab_size;
  act_dtype_ = be_.activation_dtype();
  const DType A = act_dtype_;  // activations and their gradients; statistics stay f32
  params_ = be_.allocate(DType::f32, {layout_.total()});
  grads_ = be_.allocate(DType::f32, {layout_.total()});
  working_ = A != DType::f32;
  if (working_) params_working_ = be_.allocate(A, {layout_.total()});
  act_ = std::make_unique<Activations>();
  Activations& a = *act_;
  a.inputs = be_.allocate(DType::i32, {N});
  a.targets = be_.allocate(DType::i32, {N});
  a.positions = be_.allocate(DType::i32, {N});
  a.mask = be_.allocate(DType::u8, {N});
  a.cu_seqlens = be_.allocate(DType::i32, {N + 1});
  a.resid = be_.allocate(A, {(L + 1) * N, C});
  a.resid_mid = be_.allocate(A, {L * N, C});
  a.ln1 = be_.allocate(A, {L * N, C});
  a.ln2 = be_.allocate(A, {L * N, C});
  a.ln1_rstd = be_.allocate(DType::f32, {L * N});
  a.ln2_rstd = be_.allocate(DType::f32, {L * N});
  a.qkv = be_.allocate(A, {L * N, c.qkv_dim()});
  a.q = be_.allocate(A, {L * N, H * D});
  a.att = be_.allocate(A, {L * N, H * D});
  a.k = be_.allocate(A, {L * N, Hkv * D});
  a.v = be_.allocate(A, {L * N, Hkv * D});
  a.lse = be_.allocate(DType::f32, {L * N, H});
  if (max_top_k > 0) a.selected = be_.allocate(DType::i32, {L * N, H * max_top_k});
  a.gate_up = be_.allocate(A, {L * N, 2 * F});
  a.swiglu = be_.allocate(A, {L * N, F});
  a.lnf = be_.allocate(A, {N, C});
  a.lnf_rstd = be_.allocate(DType::f32, {N});
  a.logits = be_.allocate(A, {N, V});
  a.dlogits = be_.allocate(A, {N, V});
  a.losses = be_.allocate(DType::f32, {N});
  a.dresid = be_.allocate(A, {N, C});
  a.dln = be_.allocate(A, {N, C});
  a.dqkv = be_.allocate(A, {N, c.qkv_dim()});
  a.dq = be_.allocate(A, {N, H * D});
  a.datt = be_.allocate(A, {N, H * D});
  a.dk = be_.allocate(A, {N, Hkv * D});
  a.dv = be_.allocate(A, {N, Hkv * D});
  a.dgate_up = be_.allocate(A, {N, 2 * F});
  a.dswiglu = be_.allocate(A, {N, F});
}

Transformer::~Transformer() {
  for (Tensor* t : act_->all())
    if (t->data) be_.release(*t);
  be_.release(params_);
  be_.release(grads_);
  if (working_) be_.release(params_working_);
}

Tensor Transformer::view(const Tensor& arena, const ParamTensor& t, int layer) const {
  Tensor v = arena;
  int64_t offset = t.offset;
  std::vector<int64_t> shape = t.shape;
  if (layer >= 0) {  // stacked per-layer tensor: drop the leading L
    int64_t per_layer = t.numel / shape[0];
    offset += layer * per_layer;
    shape.erase(shape.begin());
  }
  v.data = static_cast<char*>(arena.data) + static_cast<size_t>(offset) * dtype_size(arena.dtype);
  v.ndim = static_cast<int>(shape.size());
  for (int i = 0; i < v.ndim; ++i) v.shape[i] = shape[i];
  v.row_stride = 0;
  return v;
}

Tensor Transformer::param(const std::string& name) const {
  return view(working_ ? params_working_ : params_, layout_.get(name), -1);
}
Tensor Transformer::master_param(const std::string& name) const { return view(params_, layout_.get(name), -1); }
Tensor Transformer::working_param(const std::string& name) const {
  return working_ ? view(params_working_, layout_.get(name), -1) : Tensor();
}
Tensor Transformer::grad(const std::string& name) const { return view(grads_, layout_.get(name), -1); }
Tensor Transformer::layer_param(const std::string& name, int layer) const {
  return view(working_ ? params_working_ : params_, layout_.get(name), layer);
}
Tensor Transformer::layer_grad(const std::string& name, int layer) const {
  return view(grads_, layout_.get(name), layer);
}

void Transformer::set_params_from_host(const std::vector<float>& host) {
  MOBA_ASSERT(static_cast<int64_t>(host.size()) == layout_.total());
  be_.upload(params_, host.data());
  if (working_) be_.convert(params_working_, params_);
}

std::vector<float> Transformer::params_to_host() const {
  std::vector<float> host(static_cast<size_t>(layout_.total()));
  be_.download(host.data(), params_);
  return host;
}

void Transformer::zero_grads() { be_.zero(grads_); }

namespace {
// Layer l's n rows of a stacked (L * N_max, width) activation, optionally viewed as (n, heads, head_dim).
Tensor rows_of(const Tensor& stacked, int64_t n_max, int layer, int64_t n) {
  return stacked.slice_rows(layer * n_max, n);
}
Tensor heads(const Tensor& t, int64_t n, int64_t h, int64_t d) { return t.reshape({n, h, d}); }
}  // namespace

double Transformer::forward(const TokenBatch& batch, const std::vector<AttentionParams>& attention) {
  const ModelConfig& c = config_;
  Activations& a = *act_;
  const int64_t n = batch.num_tokens, N = max_tokens_;
  const int64_t H = c.n_heads, Hkv = c.n_kv_heads, D = c.head_dim;
  MOBA_CHECK(n > 0 && n <= N, cat("micro-batch of ", n, " tokens does not fit the model's buffers (", N, ")"),
             "this is a bug in the caller");
  MOBA_CHECK(batch.num_segments >= 1 && batch.num_segments <= n && batch.cu_seqlens[batch.num_segments] == n,
             cat("cu_seqlens does not cover the micro-batch (", batch.num_segments, " segments, ", n, " tokens)"),
             "this is a bug in the data layer");
  MOBA_ASSERT(static_cast<int>(attention.size()) == c.n_layers);
  for (const AttentionParams& p : attention)
    MOBA_ASSERT(p.mode == AttentionMode::full || (p.top_k >= 1 && p.top_k <= max_top_k_));
  last_attention_ = attention;
  last_tokens_ = n;
  last_segments_ = batch.num_segments;

  Tensor inputs = a.inputs.slice_rows(0, n), targets = a.targets.slice_rows(0, n);
  Tensor positions = a.positions.slice_rows(0, n), mask = a.mask.slice_rows(0, n);
  Tensor cu = a.cu_seqlens.slice_rows(0, batch.num_segments + 1);
  be_.upload(inputs, batch.inputs);
  be_.upload(targets, batch.targets);
  be_.upload(positions, batch.positions);
  be_.upload(mask, batch.loss_mask);
  be_.upload(cu, batch.cu_seqlens);

  be_.embedding_forward(rows_of(a.resid, N, 0, n), inputs, param("wte"));
  for (int l = 0; l < c.n_layers; ++l) {
    Tensor x = rows_of(a.resid, N, l, n);
    Tensor ln1 = rows_of(a.ln1, N, l, n), ln1_rstd = rows_of(a.ln1_rstd, N, l, n);
    be_.rmsnorm_forward(ln1, ln1_rstd, x, layer_param("layers.ln1", l), c.norm_eps);
    Tensor qkv = rows_of(a.qkv, N, l, n);  // (n, (H + 2 Hkv) D)
    be_.matmul_forward(qkv, ln1, layer_param("layers.wqkv", l));
    Tensor q = heads(rows_of(a.q, N, l, n), n, H, D), k = heads(rows_of(a.k, N, l, n), n, Hkv, D);
    Tensor v = heads(rows_of(a.v, N, l, n), n, Hkv, D);
    be_.rope_forward(q, qkv.columns(0, H * D), positions, c.rope_theta);
    be_.rope_forward(k, qkv.columns(H * D, Hkv * D), positions, c.rope_theta);
    be_.copy(v.reshape({n, Hkv * D}), qkv.columns((H + Hkv) * D, Hkv * D));
    Tensor att = heads(rows_of(a.att, N, l, n), n, H, D), lse = rows_of(a.lse, N, l, n);
    Tensor sel = a.selected.data ? rows_of(a.selected, N, l, n) : Tensor();
    if (sel.data && attention[l].mode == AttentionMode::moba) sel = sel.reshape({n * H * max_top_k_})
                                                                        .slice_rows(0, n * H * attention[l].top_k);
    be_.attention_forward(att, lse, sel, q, k, v, cu, attention[l]);
    Tensor mid = rows_of(a.resid_mid, N, l, n);
    be_.matmul_forward(mid, att.reshape({n, H * D}), layer_param("layers.wo", l));
    be_.add_inplace(mid, x);
    Tensor ln2 = rows_of(a.ln2, N, l, n), ln2_rstd = rows_of(a.ln2_rstd, N, l, n);
    be_.rmsnorm_forward(ln2, ln2_rstd, mid, layer_param("layers.ln2", l), c.norm_eps);
    Tensor gu = rows_of(a.gate_up, N, l, n), act = rows_of(a.swiglu, N, l, n);
    be_.matmul_forward(gu, ln2, layer_param("layers.w_gate_up", l));
    be_.swiglu_forward(act, gu);
    Tensor out = rows_of(a.resid, N, l + 1, n);
    be_.matmul_forward(out, act, layer_param("layers.w_down", l));
    be_.add_inplace(out, mid);
  }
  Tensor lnf = a.lnf.slice_rows(0, n), lnf_rstd = a.lnf_rstd.slice_rows(0, n);
  be_.rmsnorm_forward(lnf, lnf_rstd, rows_of(a.resid, N, c.n_layers, n), param("ln_f"), c.norm_eps);
  Tensor logits = a.logits.slice_rows(0, n);
  be_.matmul_forward(logits, lnf, param(c.tie_embeddings ? "wte" : "lm_head"));
  return be_.cross_entropy_forward(a.losses.slice_rows(0, n), logits, targets, mask);
}

void Transformer::backward(float grad_scale) {
  const ModelConfig& c = config_;
  Activations& a = *act_;
  const int64_t n = last_tokens_, N = max_tokens_;
  const int64_t H = c.n_heads, Hkv = c.n_kv_heads, D = c.head_dim;
  MOBA_ASSERT(n > 0);
  Tensor positions = a.positions.slice_rows(0, n);
  Tensor cu = a.cu_seqlens.slice_rows(0, last_segments_ + 1);

  Tensor logits = a.logits.slice_rows(0, n), dlogits = a.dlogits.slice_rows(0, n);
  be_.zero(dlogits);
  be_.cross_entropy_backward(dlogits, logits, a.targets.slice_rows(0, n), a.mask.slice_rows(0, n), grad_scale);
  Tensor dln = a.dln.slice_rows(0, n), dresid = a.dresid.slice_rows(0, n);
  be_.zero(dln);
  const char* head = c.tie_embeddings ? "wte" : "lm_head";
  be_.matmul_backward(dln, grad(head), dlogits, a.lnf.slice_rows(0, n), param(head));
  be_.zero(dresid);
  be_.rmsnorm_backward(dresid, grad("ln_f"), dln, rows_of(a.resid, N, c.n_layers, n), param("ln_f"),
                       a.lnf_rstd.slice_rows(0, n));

  for (int l = c.n_layers - 1; l >= 0; --l) {
    // MLP branch: resid[l+1] = mid + Wdown swiglu(Wgu ln2(mid)); dresid holds d resid[l+1] -> d mid.
    Tensor mid = rows_of(a.resid_mid, N, l, n);
    Tensor dact = a.dswiglu.slice_rows(0, n), dgu = a.dgate_up.slice_rows(0, n);
    be_.zero(dact);
    be_.matmul_backward(dact, layer_grad("layers.w_down", l), dresid, rows_of(a.swiglu, N, l, n),
                        layer_param("layers.w_down", l));
    be_.zero(dgu);
    be_.swiglu_backward(dgu, dact, rows_of(a.gate_up, N, l, n));
    be_.zero(dln);
    be_.matmul_backward(dln, layer_grad("layers.w_gate_up", l), dgu, rows_of(a.ln2, N, l, n),
                        layer_param("layers.w_gate_up", l));
    be_.rmsnorm_backward(dresid, layer_grad("layers.ln2", l), dln, mid, layer_param("layers.ln2", l),
                         rows_of(a.ln2_rstd, N, l, n));
    // Attention branch: mid = x + Wo attn(...); dresid holds d mid -> d x.
    Tensor att = heads(rows_of(a.att, N, l, n), n, H, D);
    Tensor datt = heads(a.datt.slice_rows(0, n), n, H, D);
    be_.zero(datt);
    be_.matmul_backward(datt.reshape({n, H * D}), layer_grad("layers.wo", l), dresid, att.reshape({n, H * D}),
                        layer_param("layers.wo", l));
    Tensor dq = heads(a.dq.slice_rows(0, n), n, H, D), dk = heads(a.dk.slice_rows(0, n), n, Hkv, D);
    Tensor dv = heads(a.dv.slice_rows(0, n), n, Hkv, D);
    be_.zero(dq);
    be_.zero(dk);
    be_.zero(dv);
    const AttentionParams& p = last_attention_[static_cast<size_t>(l)];
    Tensor sel = a.selected.data ? rows_of(a.selected, N, l, n) : Tensor();
    if (sel.data && p.mode == AttentionMode::moba) sel = sel.reshape({n * H * max_top_k_}).slice_rows(0, n * H * p.top_k);
    be_.attention_backward(dq, dk, dv, datt, heads(rows_of(a.q, N, l, n), n, H, D),
                           heads(rows_of(a.k, N, l, n), n, Hkv, D), heads(rows_of(a.v, N, l, n), n, Hkv, D), att,
                           rows_of(a.lse, N, l, n), sel, cu, p);
    Tensor dqkv = a.dqkv.slice_rows(0, n);
    be_.zero(dqkv);
    be_.rope_backward(dqkv.columns(0, H * D), dq, positions, c.rope_theta);
    be_.rope_backward(dqkv.columns(H * D, Hkv * D), dk, positions, c.rope_theta);
    be_.copy(dqkv.columns((H + Hkv) * D, Hkv * D), dv.reshape({n, Hkv * D}));
    be_.zero(dln);
    be_.matmul_backward(dln, layer_grad("layers.wqkv", l), dqkv, rows_of(a.ln1, N, l, n),
                        layer_param("layers.wqkv", l));
    be_.rmsnorm_backward(dresid, layer_grad("layers.ln1", l), dln, rows_of(a.resid, N, l, n),
                         layer_param("layers.ln1", l), rows_of(a.ln1_rstd, N, l, n));
  }
  be_.embedding_backward(grad("wte"), dresid, a.inputs.slice_rows(0, n));
}

std::vector<float> Transformer::token_losses() const {
  std::vector<float> out(static_cast<size_t>(last_tokens_));
  be_.download(out.data(), act_->losses.slice_rows(0, last_tokens_));
  return out;
}

}  // namespace moba::model
