#include "model/transformer.h"

#include <algorithm>
#include <cmath>

#include "common/error.h"

namespace moba::model {

Recompute parse_recompute(const std::string& name) {
  if (name == "none") return Recompute::none;
  if (name == "attention") return Recompute::attention;
  if (name == "full") return Recompute::full;
  throw Error(cat("unknown recompute setting '", name, "'"), "use none, attention or full");
}
const char* recompute_name(Recompute r) {
  switch (r) {
    case Recompute::none: return "none";
    case Recompute::attention: return "attention";
    case Recompute::full: return "full";
  }
  return "?";
}

// Every buffer of one micro-batch. Per-layer activations are stacked as (slots * N_max, width): slot s, n rows is
// slice_rows(s * N_max, n). A sublayer whose activations are recomputed has one slot, reused by every layer;
// otherwise one slot per layer. Shapes below use N = max_tokens, La / Lm = slots of the attention / MLP sublayer.
struct Transformer::Activations {
  Tensor inputs, targets, positions;  // (N) i32
  Tensor mask;                        // (N) u8
  Tensor cu_seqlens;                  // (N + 1) i32: at most one segment per row
  Tensor resid;                       // (L + 1, N, C) input of layer l, always kept; resid[L] feeds the final norm
  Tensor selected;                    // (L, N, H * max_top_k) i32 MoBA routing, always kept (empty if no MoBA)
  // attention sublayer, La slots
  Tensor ln1;                         // (La, N, C)
  Tensor ln1_rstd;                    // (La, N)
  Tensor q, att;                      // (La, N, H, D) roped queries; attention output
  Tensor k, v;                        // (La, N, Hkv, D) roped keys; values
  Tensor lse;                         // (La, N, H) fp32 log-sum-exp
  // MLP sublayer, Lm slots
  Tensor resid_mid;                   // (Lm, N, C) after the attention residual
  Tensor ln2;                         // (Lm, N, C)
  Tensor ln2_rstd;                    // (Lm, N)
  Tensor gate_up;                     // (Lm, N, 2F)
  Tensor swiglu;                      // (Lm, N, F)
  // per micro-batch
  Tensor qkv;                         // (N, (H + 2 Hkv) D) the fused projection, consumed by rope right away
  Tensor lnf;                         // (N, C)
  Tensor lnf_rstd;                    // (N)
  Tensor logits;                      // (head_rows, V) one chunk of the LM head; its gradient overwrites it
  Tensor losses;                      // (N)
  // backward scratch, reused by every layer (dln also carries the head's gradient from forward to backward)
  Tensor dresid, dln;                 // (N, C)
  Tensor dqkv;                        // (N, (H + 2 Hkv) D)
  Tensor dq, datt;                    // (N, H, D)
  Tensor dk, dv;                      // (N, Hkv, D)
  Tensor dgate_up;                    // (N, 2F)
  Tensor dswiglu;                     // (N, F)

  // One entry per buffer: where it goes, its name, its line of the memory plan, dtype and 2-D shape.
  enum class Group { kept, head, gradient, scratch };
  struct Spec {
    Tensor* tensor;
    const char* name;
    DType dtype;
    int64_t rows, cols;
    Group group;
  };
  std::vector<Spec> specs(const ModelConfig& c, int64_t N, int max_top_k, Recompute recompute, int64_t head_rows,
                          DType A, int context) {
    const int64_t L = c.n_layers, C = c.d_model, H = c.n_heads, Hkv = c.n_kv_heads, D = c.head_dim;
    const int64_t F = c.ffn_hidden, V = c.vocab_size;
    const int64_t La = recompute == Recompute::none ? L : 1, Lm = recompute == Recompute::full ? 1 : L;
    using G = Group;
    std::vector<Spec> out = {
        {&inputs, "inputs", DType::i32, N, 1, G::scratch},
        {&targets, "targets", DType::i32, N, 1, G::scratch},
        {&positions, "positions", DType::i32, N, 1, G::scratch},
        {&mask, "loss mask", DType::u8, N, 1, G::scratch},
        {&cu_seqlens, "cu_seqlens", DType::i32, N * context + 1, 1, G::scratch},  // the whole micro-batch's
        {&resid, "residual stream", A, (L + 1) * N, C, G::kept},
        {&ln1, "attention: norm", A, La * N, C, G::kept},
        {&ln1_rstd, "attention: norm rstd", DType::f32, La * N, 1, G::kept},
        {&q, "attention: q", A, La * N, H * D, G::kept},
        {&k, "attention: k", A, La * N, Hkv * D, G::kept},
        {&v, "attention: v", A, La * N, Hkv * D, G::kept},
        {&att, "attention: output", A, La * N, H * D, G::kept},
        {&lse, "attention: lse", DType::f32, La * N, H, G::kept},
        {&resid_mid, "mlp: input", A, Lm * N, C, G::kept},
        {&ln2, "mlp: norm", A, Lm * N, C, G::kept},
        {&ln2_rstd, "mlp: norm rstd", DType::f32, Lm * N, 1, G::kept},
        {&gate_up, "mlp: gate/up", A, Lm * N, 2 * F, G::kept},
        {&swiglu, "mlp: swiglu", A, Lm * N, F, G::kept},
        {&qkv, "qkv projection", A, N, c.qkv_dim(), G::scratch},
        {&lnf, "final norm", A, N, C, G::head},
        {&lnf_rstd, "final norm rstd", DType::f32, N, 1, G::head},
        {&logits, "logits chunk", A, head_rows, V, G::head},
        {&losses, "losses", DType::f32, N, 1, G::head},
        {&dresid, "grad: residual", A, N, C, G::gradient},
        {&dln, "grad: norm", A, N, C, G::gradient},
        {&dqkv, "grad: qkv", A, N, c.qkv_dim(), G::gradient},
        {&dq, "grad: q", A, N, H * D, G::gradient},
        {&datt, "grad: attention", A, N, H * D, G::gradient},
        {&dk, "grad: k", A, N, Hkv * D, G::gradient},
        {&dv, "grad: v", A, N, Hkv * D, G::gradient},
        {&dgate_up, "grad: gate/up", A, N, 2 * F, G::gradient},
        {&dswiglu, "grad: swiglu", A, N, F, G::gradient}};
    if (max_top_k > 0) out.push_back({&selected, "moba routing", DType::i32, L * N, H * max_top_k, G::kept});
    return out;
  }
  std::vector<Tensor*> all() {
    return {&inputs, &targets, &positions, &mask, &cu_seqlens, &resid, &selected, &ln1, &ln1_rstd, &q, &att, &k, &v,
            &lse, &resid_mid, &ln2, &ln2_rstd, &gate_up, &swiglu, &qkv, &lnf, &lnf_rstd, &logits, &losses, &dresid,
            &dln, &dqkv, &dq, &datt, &dk, &dv, &dgate_up, &dswiglu};
  }
};

namespace {
int64_t head_rows_for(const ModelConfig& c, int64_t max_tokens, int64_t requested) {
  if (requested > 0) return std::min(requested, max_tokens);
  // About 2^27 logits (256 MiB in bf16) per chunk, in multiples of 128 rows for the GEMMs.
  int64_t rows = std::max<int64_t>(128, (int64_t{1} << 27) / std::max(c.vocab_size, 1) / 128 * 128);
  return std::min(rows, max_tokens);
}
size_t padded_bytes(DType dtype, int64_t rows, int64_t cols) {
  return (static_cast<size_t>(rows * cols) * dtype_size(dtype) + 255) / 256 * 256;
}
// The largest attention call of a micro-batch: every query row against every key row, any layer's block size/top_k.
AttentionScratchShape attention_plan(const ModelConfig& c, int64_t max_tokens, const TransformerOptions& options) {
  AttentionScratchShape s;
  s.max_queries = max_tokens;
  s.max_keys = max_tokens * options.context_size;
  s.query_rows = options.context_size > 1;
  s.n_heads = c.n_heads;
  s.n_kv_heads = c.n_kv_heads;
  s.head_dim = c.head_dim;
  s.min_block_size = options.min_block_size;
  s.max_top_k = options.max_top_k;
  return s;
}
}  // namespace

std::vector<MemoryItem> Transformer::memory_plan(const ModelConfig& c, int64_t max_tokens,
                                                 const TransformerOptions& options, const Backend& backend) {
  std::vector<MemoryItem> plan = memory_plan(c, max_tokens, options, backend.activation_dtype(),
                                             AttentionLayer::scratch_bytes(backend, attention_plan(c, max_tokens, options)));
  if (const size_t ops = backend.op_scratch_bytes(max_tokens, c.d_model, c.vocab_size); ops > 0)
    plan.push_back({"deterministic backward scratch (embedding, RMSNorm)", ops});
  return plan;
}

std::vector<MemoryItem> Transformer::memory_plan(const ModelConfig& c, int64_t max_tokens,
                                                 const TransformerOptions& options, DType A,
                                                 size_t attention_scratch_bytes) {
  ParameterLayout layout(c, options.parameter_shards);
  const size_t P = static_cast<size_t>(layout.total());
  std::vector<MemoryItem> plan = {{cat("weights (", dtype_name(A), ", every rank)"), padded_bytes(A, 1, P)},
                                  {"gradients (f32, every rank)", padded_bytes(DType::f32, 1, P)}};
  Activations a;
  size_t stored = 0, layer_scratch = 0, head = 0, grads = 0;
  const int64_t head_rows = head_rows_for(c, max_tokens, options.head_chunk_rows);
  for (const Activations::Spec& sp :
       a.specs(c, max_tokens, options.max_top_k, options.recompute, head_rows, A, options.context_size)) {
    const size_t bytes = padded_bytes(sp.dtype, sp.rows, sp.cols);
    switch (sp.group) {
      case Activations::Group::kept: stored += bytes; break;
      case Activations::Group::head: head += bytes; break;
      case Activations::Group::gradient: grads += bytes; break;
      case Activations::Group::scratch: layer_scratch += bytes; break;
    }
  }
  plan.push_back({cat("activations kept for backward (recompute: ", recompute_name(options.recompute), ")"), stored});
  plan.push_back({"LM head (final norm, one logits chunk, losses)", head});
  plan.push_back({"activation gradients (one layer at a time)", grads});
  plan.push_back({"inputs and projection scratch", layer_scratch});
  if (attention_scratch_bytes > 0) plan.push_back({"attention kernels' scratch", attention_scratch_bytes});
  if (options.context_size > 1)
    for (const MemoryItem& m : ContextKeys::memory_plan(max_tokens, options.context_size,
                                                        static_cast<int64_t>(c.n_kv_heads) * c.head_dim, A))
      plan.push_back(m);
  return plan;
}

Transformer::Transformer(Backend& backend, const ModelConfig& config, int64_t max_tokens,
                         const TransformerOptions& options)
    : be_(backend), config_(config), layout_(config, options.parameter_shards), max_tokens_(max_tokens),
      max_top_k_(options.max_top_k),
      recompute_(options.recompute) {
  const ModelConfig& c = config_;
  MOBA_ASSERT(c.vocab_size > 0 && c.n_heads % c.n_kv_heads == 0 && c.head_dim % 2 == 0 && max_tokens > 0);
  act_dtype_ = be_.activation_dtype();
  head_rows_ = head_rows_for(c, max_tokens, options.head_chunk_rows);
  weights_ = be_.allocate(act_dtype_, {layout_.total()});
  grads_ = be_.allocate(DType::f32, {layout_.total()});
  act_ = std::make_unique<Activations>();
  for (const Activations::Spec& sp :
       act_->specs(c, max_tokens, max_top_k_, recompute_, head_rows_, act_dtype_, options.context_size))
    *sp.tensor = sp.cols == 1 ? be_.allocate(sp.dtype, {sp.rows}) : be_.allocate(sp.dtype, {sp.rows, sp.cols});
  attention_ = std::make_unique<AttentionLayer>(be_, attention_plan(c, max_tokens, options));
  if (options.context_size > 1) {
    MOBA_CHECK(options.context && options.context->size() == options.context_size,
               cat("context parallelism over ", options.context_size, " ranks needs the group's exchange"),
               "this is a bug in the caller");
    context_ = std::make_unique<ContextKeys>(be_, *options.context, max_tokens,
                                             static_cast<int64_t>(c.n_kv_heads) * c.head_dim);
  }
}

Transformer::~Transformer() {
  context_.reset();
  attention_.reset();
  for (Tensor* t : act_->all())
    if (t->data) be_.release(*t);
  be_.release(weights_);
  be_.release(grads_);
}

Tensor Transformer::view(const Tensor& arena, const ParamTensor& t, int layer) const {
  Tensor v = arena;
  int64_t offset = t.offset;
  std::vector<int64_t> shape = t.shape;
  if (layer >= 0) {  // one layer's slice of a stacked tensor: drop the leading L
    MOBA_ASSERT(t.per_layer());
    offset = t.offset_of(layer);
    shape.erase(shape.begin());
  } else {
    MOBA_ASSERT(!t.per_layer());  // a stacked tensor is not contiguous in the layer-major arena
  }
  v.data = static_cast<char*>(arena.data) + static_cast<size_t>(offset) * dtype_size(arena.dtype);
  v.ndim = static_cast<int>(shape.size());
  for (int i = 0; i < v.ndim; ++i) v.shape[i] = shape[i];
  v.row_stride = 0;
  return v;
}

Tensor Transformer::param(const std::string& name) const { return view(weights_, layout_.get(name), -1); }
Tensor Transformer::grad(const std::string& name) const { return view(grads_, layout_.get(name), -1); }
Tensor Transformer::layer_param(const std::string& name, int layer) const {
  return view(weights_, layout_.get(name), layer);
}
Tensor Transformer::layer_grad(const std::string& name, int layer) const {
  return view(grads_, layout_.get(name), layer);
}

void Transformer::set_weights_from_host(const std::vector<float>& host) {
  MOBA_ASSERT(static_cast<int64_t>(host.size()) == layout_.total());
  if (act_dtype_ == DType::f32) {
    be_.upload(weights_, host.data());
    return;
  }
  Tensor staging = be_.allocate(DType::f32, {layout_.total()});
  be_.upload(staging, host.data());
  be_.convert(weights_, staging);
  be_.synchronize();
  be_.release(staging);
}

std::vector<float> Transformer::weights_to_host() const {
  std::vector<float> host(static_cast<size_t>(layout_.total()));
  if (act_dtype_ == DType::f32) {
    be_.download(host.data(), weights_);
    return host;
  }
  Tensor staging = be_.allocate(DType::f32, {layout_.total()});
  be_.convert(staging, weights_);
  be_.download(host.data(), staging);
  be_.release(staging);
  return host;
}

void Transformer::zero_grads() { be_.zero(grads_); }

namespace {
Tensor heads(const Tensor& t, int64_t n, int64_t h, int64_t d) { return t.reshape({n, h, d}); }
// The n rows of slot `slot` of a stacked (slots * N_max, width) activation.
Tensor slot_rows(const Tensor& stacked, int64_t n_max, int64_t slot, int64_t n) {
  return stacked.slice_rows(slot * n_max, n);
}
}  // namespace

// Layer l's views of the activations for the current micro-batch (n rows), whichever slot holds them.
struct Transformer::LayerViews {
  Tensor x, out;              // resid[l], resid[l + 1]: (n, C)
  Tensor ln1, ln1_rstd;       // (n, C), (n)
  Tensor q, k, v, att, lse;   // (n, H, D), (n, Hkv, D) x 2, (n, H, D), (n, H)
  Tensor sel;                 // (n * H * top_k) for a moba layer, else empty
  Tensor mid, ln2, ln2_rstd;  // (n, C), (n, C), (n)
  Tensor gate_up, swiglu;     // (n, 2F), (n, F)
};

Transformer::LayerViews Transformer::layer_views(int l) const {
  const ModelConfig& c = config_;
  const Activations& a = *act_;
  const int64_t n = last_tokens_, N = max_tokens_, H = c.n_heads, Hkv = c.n_kv_heads, D = c.head_dim;
  const int64_t sa = recompute_ == Recompute::none ? l : 0, sm = recompute_ == Recompute::full ? 0 : l;
  LayerViews v;
  v.x = slot_rows(a.resid, N, l, n);
  v.out = slot_rows(a.resid, N, l + 1, n);
  v.ln1 = slot_rows(a.ln1, N, sa, n);
  v.ln1_rstd = slot_rows(a.ln1_rstd, N, sa, n);
  v.q = heads(slot_rows(a.q, N, sa, n), n, H, D);
  v.k = heads(slot_rows(a.k, N, sa, n), n, Hkv, D);
  v.v = heads(slot_rows(a.v, N, sa, n), n, Hkv, D);
  v.att = heads(slot_rows(a.att, N, sa, n), n, H, D);
  v.lse = slot_rows(a.lse, N, sa, n);
  const AttentionParams& p = last_attention_[static_cast<size_t>(l)];
  if (a.selected.data && p.mode == AttentionMode::moba)
    v.sel = slot_rows(a.selected, N, l, n).reshape({n * H * max_top_k_}).slice_rows(0, n * H * p.top_k);
  v.mid = slot_rows(a.resid_mid, N, sm, n);
  v.ln2 = slot_rows(a.ln2, N, sm, n);
  v.ln2_rstd = slot_rows(a.ln2_rstd, N, sm, n);
  v.gate_up = slot_rows(a.gate_up, N, sm, n);
  v.swiglu = slot_rows(a.swiglu, N, sm, n);
  return v;
}

// ln1 (already normalised) -> qkv -> rope(q), rope(k), v -> attention -> att, lse.
void Transformer::attention_sublayer_forward(int l, const AttentionParams& p) {
  const ModelConfig& c = config_;
  const int64_t n = last_tokens_;
  const LayerViews lv = layer_views(l);
  Tensor positions = act_->positions.slice_rows(0, n);
  Tensor qkv = act_->qkv.slice_rows(0, n);  // (n, (H + 2 Hkv) D)
  be_.matmul_forward(qkv, lv.ln1, layer_param("layers.wqkv", l));
  be_.qkv_rope_forward(lv.q, lv.k, lv.v, qkv, positions, c.rope_theta);
  AttentionCall call = attention_tensors(lv);
  if (!context_) {
    attention_->forward(p, call);
    return;
  }
  // Context parallelism: the local queries against the whole micro-batch's keys, gathered from the group; the
  // values travel while routing reads the keys.
  call.k = context_->keys().reshape({context_->keys().rows(), c.n_kv_heads, c.head_dim});
  call.v = context_->values().reshape({context_->values().rows(), c.n_kv_heads, c.head_dim});
  call.q_rows = context_->query_rows();
  context_->gather(l, lv.k, lv.v, [&] { attention_->route(p, call); });
  attention_->attend(p, call);
}

AttentionCall Transformer::attention_tensors(const LayerViews& lv) const {
  AttentionCall c;
  c.q = lv.q;
  c.k = lv.k;
  c.v = lv.v;
  c.cu_seqlens = act_->cu_seqlens.slice_rows(0, last_segments_ + 1);
  c.out = lv.att;
  c.lse = lv.lse;
  c.selected = lv.sel;
  return c;
}

// mid (holding Wo att on entry) += x, ln2 = rmsnorm(mid) -> gate_up -> swiglu.
void Transformer::mlp_sublayer_forward(int l) {
  const LayerViews lv = layer_views(l);
  be_.matmul_forward(lv.mid, lv.att.reshape({last_tokens_, config_.n_heads * config_.head_dim}),
                     layer_param("layers.wo", l));
  be_.residual_rmsnorm_forward(lv.mid, lv.ln2, lv.ln2_rstd, lv.x, layer_param("layers.ln2", l), config_.norm_eps);
  be_.matmul_forward(lv.gate_up, lv.ln2, layer_param("layers.w_gate_up", l));
  be_.swiglu_forward(lv.swiglu, lv.gate_up);
}

void Transformer::head(float grad_scale) {
  const ModelConfig& c = config_;
  Activations& a = *act_;
  const int64_t n = last_tokens_;
  const char* name = c.tie_embeddings ? "wte" : "lm_head";
  Tensor dln = a.dln.slice_rows(0, n), lnf = a.lnf.slice_rows(0, n);
  for (int64_t r0 = 0; r0 < n; r0 += head_rows_) {
    const int64_t rows = std::min(head_rows_, n - r0);
    Tensor logits = a.logits.slice_rows(0, rows), x = lnf.slice_rows(r0, rows);
    be_.matmul_forward(logits, x, param(name));
    be_.cross_entropy_fused(a.losses.slice_rows(r0, rows), logits, a.targets.slice_rows(r0, rows),
                            a.mask.slice_rows(r0, rows), grad_scale);  // logits now hold dlogits
    if (grad_scale != 0.0f) be_.matmul_backward(dln.slice_rows(r0, rows), grad(name), logits, x, param(name), false);
  }
}

double Transformer::forward(const TokenBatch& batch, const std::vector<AttentionParams>& attention, float grad_scale) {
  const ModelConfig& c = config_;
  Activations& a = *act_;
  const int64_t n = batch.num_tokens, N = max_tokens_;
  MOBA_CHECK(n > 0 && n <= N, cat("micro-batch of ", n, " tokens does not fit the model's buffers (", N, ")"),
             "this is a bug in the caller");
  const int64_t n_keys = context_ ? batch.num_global_tokens : n;  // rows of the key sequence
  MOBA_CHECK(batch.num_segments >= 1 && batch.num_segments <= n_keys && batch.cu_seqlens[batch.num_segments] == n_keys,
             cat("cu_seqlens does not cover the micro-batch (", batch.num_segments, " segments, ", n_keys, " tokens)"),
             "this is a bug in the data layer");
  MOBA_ASSERT(static_cast<int>(attention.size()) == c.n_layers);
  for (const AttentionParams& p : attention)
    MOBA_ASSERT(p.mode == AttentionMode::full || (p.top_k >= 1 && p.top_k <= max_top_k_));
  last_attention_ = attention;
  last_tokens_ = n;
  last_segments_ = batch.num_segments;

  be_.upload(a.inputs.slice_rows(0, n), batch.inputs);
  be_.upload(a.targets.slice_rows(0, n), batch.targets);
  be_.upload(a.positions.slice_rows(0, n), batch.positions);
  be_.upload(a.mask.slice_rows(0, n), batch.loss_mask);
  be_.upload(a.cu_seqlens.slice_rows(0, batch.num_segments + 1), batch.cu_seqlens);
  if (context_) context_->set_rows(batch);

  Tensor x0 = slot_rows(a.resid, N, 0, n);
  be_.gather_rows(x0, param("wte"), a.inputs.slice_rows(0, n));  // the embedding lookup
  {
    const LayerViews first = layer_views(0);
    be_.rmsnorm_forward(first.ln1, first.ln1_rstd, x0, layer_param("layers.ln1", 0), c.norm_eps);
  }
  for (int l = 0; l < c.n_layers; ++l) {
    attention_sublayer_forward(l, attention[static_cast<size_t>(l)]);
    mlp_sublayer_forward(l);
    // resid[l + 1] = mid + Wdown swiglu, fused with the norm that reads it: the next layer's ln1, or ln_f.
    const LayerViews lv = layer_views(l);
    be_.matmul_forward(lv.out, lv.swiglu, layer_param("layers.w_down", l));
    if (l + 1 < c.n_layers) {
      const LayerViews next = layer_views(l + 1);
      be_.residual_rmsnorm_forward(lv.out, next.ln1, next.ln1_rstd, lv.mid, layer_param("layers.ln1", l + 1),
                                   c.norm_eps);
    } else {
      be_.residual_rmsnorm_forward(lv.out, a.lnf.slice_rows(0, n), a.lnf_rstd.slice_rows(0, n), lv.mid,
                                   param("ln_f"), c.norm_eps);
    }
  }
  head(grad_scale);
  head_grad_scale_ = grad_scale;
  return be_.sum(a.losses.slice_rows(0, n));
}

void Transformer::backward(float grad_scale) {
  const ModelConfig& c = config_;
  Activations& a = *act_;
  const int64_t n = last_tokens_, N = max_tokens_;
  const int64_t H = c.n_heads, Hkv = c.n_kv_heads, D = c.head_dim;
  MOBA_ASSERT(n > 0);
  MOBA_CHECK(head_grad_scale_ == 0.0f || head_grad_scale_ == grad_scale,
             cat("backward(", grad_scale, ") after a forward whose LM head used grad_scale ", head_grad_scale_),
             "pass the same grad_scale to forward() and backward()");
  Tensor positions = a.positions.slice_rows(0, n);

  if (head_grad_scale_ == 0.0f) {  // the head's backward did not run in forward
    if (grad_scale != 0.0f) head(grad_scale);
    else be_.zero(a.dln.slice_rows(0, n));
  }
  head_grad_scale_ = 0.0f;
  Tensor dln = a.dln.slice_rows(0, n), dresid = a.dresid.slice_rows(0, n);
  be_.zero(dresid);
  be_.rmsnorm_backward(dresid, grad("ln_f"), dln, slot_rows(a.resid, N, c.n_layers, n), param("ln_f"),
                       a.lnf_rstd.slice_rows(0, n));
  const int head_bucket = static_cast<int>(layout_.buckets().size()) - 1;
  if (gradient_hook_) gradient_hook_(head_bucket);

  for (int l = c.n_layers - 1; l >= 0; --l) {
    const AttentionParams& p = last_attention_[static_cast<size_t>(l)];
    const LayerViews lv = layer_views(l);
    if (recompute_ != Recompute::none) {  // rebuild this layer's activations from resid[l], routing frozen
      AttentionParams again = p;
      again.reuse_routing = true;
      be_.rmsnorm_forward(lv.ln1, lv.ln1_rstd, lv.x, layer_param("layers.ln1", l), c.norm_eps);
      attention_sublayer_forward(l, again);
      if (recompute_ == Recompute::full) mlp_sublayer_forward(l);
    }
    // MLP branch: resid[l+1] = mid + Wdown swiglu(Wgu ln2(mid)); dresid holds d resid[l+1] -> d mid.
    // The activation gradients below are overwritten (accumulate = false), not zeroed first.
    Tensor dact = a.dswiglu.slice_rows(0, n), dgu = a.dgate_up.slice_rows(0, n);
    be_.matmul_backward(dact, layer_grad("layers.w_down", l), dresid, lv.swiglu, layer_param("layers.w_down", l),
                        false);
    be_.swiglu_backward(dgu, dact, lv.gate_up, false);
    be_.matmul_backward(dln, layer_grad("layers.w_gate_up", l), dgu, lv.ln2, layer_param("layers.w_gate_up", l),
                        false);
    be_.rmsnorm_backward(dresid, layer_grad("layers.ln2", l), dln, lv.mid, layer_param("layers.ln2", l), lv.ln2_rstd);
    // Attention branch: mid = x + Wo attn(...); dresid holds d mid -> d x.
    Tensor datt = heads(a.datt.slice_rows(0, n), n, H, D);
    be_.matmul_backward(datt.reshape({n, H * D}), layer_grad("layers.wo", l), dresid, lv.att.reshape({n, H * D}),
                        layer_param("layers.wo", l), false);
    Tensor dq = heads(a.dq.slice_rows(0, n), n, H, D), dk = heads(a.dk.slice_rows(0, n), n, Hkv, D);
    Tensor dv = heads(a.dv.slice_rows(0, n), n, Hkv, D);
    be_.zero(dq);
    be_.zero(dk);
    be_.zero(dv);
    AttentionCall call = attention_tensors(lv);
    call.dout = datt;
    call.dq = dq;
    if (!context_) {
      call.dk = dk;
      call.dv = dv;
      attention_->backward(p, call);
    } else {  // partial f32 dK/dV for every key row of the micro-batch, summed onto the owning ranks
      if (context_->gathered_layer() != l) context_->gather(l, lv.k, lv.v, nullptr);
      const int64_t n_keys = context_->keys().rows();
      call.k = context_->keys().reshape({n_keys, Hkv, D});
      call.v = context_->values().reshape({n_keys, Hkv, D});
      call.q_rows = context_->query_rows();
      call.dk = context_->zeroed_key_grads().reshape({n_keys, Hkv, D});
      call.dv = context_->zeroed_value_grads().reshape({n_keys, Hkv, D});
      attention_->backward(p, call);
      context_->scatter_grads(dk, dv);  // overwrites dk, dv
    }
    Tensor dqkv = a.dqkv.slice_rows(0, n);
    be_.qkv_rope_backward(dqkv, dq, dk, dv, positions, c.rope_theta);  // overwrites every column
    be_.matmul_backward(dln, layer_grad("layers.wqkv", l), dqkv, lv.ln1, layer_param("layers.wqkv", l), false);
    be_.rmsnorm_backward(dresid, layer_grad("layers.ln1", l), dln, lv.x, layer_param("layers.ln1", l), lv.ln1_rstd);
    if (gradient_hook_) gradient_hook_(layout_.layer_bucket(l));
  }
  be_.embedding_backward(grad("wte"), dresid, a.inputs.slice_rows(0, n));
  if (gradient_hook_) gradient_hook_(0);
}

std::vector<float> Transformer::token_losses() const {
  std::vector<float> out(static_cast<size_t>(last_tokens_));
  be_.download(out.data(), act_->losses.slice_rows(0, last_tokens_));
  return out;
}

}  // namespace moba::model
