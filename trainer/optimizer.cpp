#include "trainer/optimizer.h"

#include <cmath>

#include "common/error.h"

namespace moba {

AdamW::AdamW(Backend& backend, model::Transformer& model, const OptimizerSettings& settings)
    : be_(backend), model_(model), s_(settings) {
  m_ = be_.allocate(DType::f32, {model.layout().total()});
  v_ = be_.allocate(DType::f32, {model.layout().total()});
}

AdamW::~AdamW() {
  be_.release(m_);
  be_.release(v_);
}

std::vector<float> AdamW::moment_to_host(Moment which) const {
  std::vector<float> host(static_cast<size_t>(model_.layout().total()));
  be_.download(host.data(), which == Moment::first ? m_ : v_);
  return host;
}

void AdamW::moment_from_host(Moment which, const std::vector<float>& host) {
  MOBA_ASSERT(static_cast<int64_t>(host.size()) == model_.layout().total());
  be_.upload(which == Moment::first ? m_ : v_, host.data());
}

bool AdamW::decays(const model::ParamTensor& t) const {
  return t.is_matrix || s_.decay_norms_and_embeddings;
}

double AdamW::clip_gradients(double clip) {
  double norm = std::sqrt(be_.sum_of_squares(model_.grads()));
  // Applied inside the next step()'s update rather than by a pass over the gradients here.
  grad_scale_ = clip > 0 && norm > clip ? static_cast<float>(clip / (norm + 1e-6)) : 1.0f;
  return norm;
}

void AdamW::step(double lr) {
  ++step_;
  for (const model::ParamTensor& t : model_.layout().tensors()) {
    Tensor p = model_.master_param(t.name).reshape({t.numel}), g = model_.grad(t.name).reshape({t.numel});
    Tensor working = model_.working_param(t.name);
    if (working.data) working = working.reshape({t.numel});
    Tensor m = m_.slice_rows(t.offset, t.numel), v = v_.slice_rows(t.offset, t.numel);
    be_.adamw_update(p, working, g, m, v, static_cast<float>(lr), static_cast<float>(s_.beta1),
                     static_cast<float>(s_.beta2), static_cast<float>(s_.eps),
                     decays(t) ? static_cast<float>(s_.weight_decay) : 0.0f, step_, grad_scale_);
  }
  grad_scale_ = 1.0f;
}

}  // namespace moba
