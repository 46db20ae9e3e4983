#include "model/parameters.h"

#include <cmath>
#include <random>

#include "common/error.h"

namespace moba::model {

ParameterLayout::ParameterLayout(const ModelConfig& c) {
  const int64_t L = c.n_layers, C = c.d_model, V = c.vocab_size, F = c.ffn_hidden;
  add("wte", {V, C}, false, true);                           // token embedding
  add("layers.ln1", {L, C}, false, false);                   // RMSNorm gain before attention
  add("layers.wqkv", {L, c.qkv_dim(), C}, true, false);      // rows: [q heads | k heads | v heads]
  add("layers.wo", {L, C, c.q_dim()}, true, false);          // attention output projection
  add("layers.ln2", {L, C}, false, false);                   // RMSNorm gain before the MLP
  add("layers.w_gate_up", {L, 2 * F, C}, true, false);       // rows: [gate | up]
  add("layers.w_down", {L, C, F}, true, false);              // MLP output projection
  add("ln_f", {C}, false, false);                            // final RMSNorm gain
  if (!c.tie_embeddings) add("lm_head", {V, C}, true, true);  // untied LM head
}

void ParameterLayout::add(const std::string& name, std::vector<int64_t> shape, bool matrix, bool embedding) {
  ParamTensor t;
  t.name = name;
  t.shape = std::move(shape);
  t.numel = 1;
  for (int64_t s : t.shape) t.numel *= s;
  t.offset = total_;
  t.is_matrix = matrix;
  t.is_embedding = embedding;
  total_ += t.numel;
  tensors_.push_back(std::move(t));
}

const ParamTensor& ParameterLayout::get(const std::string& name) const {
  for (const ParamTensor& t : tensors_)
    if (t.name == name) return t;
  throw Error(cat("no parameter tensor named '", name, "'"), "this is a bug in the caller");
}

int64_t ParameterLayout::count_non_embedding() const {
  int64_t n = 0;
  for (const ParamTensor& t : tensors_)
    if (!t.is_embedding) n += t.numel;
  return n;
}

namespace {
// Standard normal from two uniforms (Box-Muller) on mt19937_64 bits: identical on every standard library,
// unlike std::normal_distribution.
class NormalSampler {
 public:
  explicit NormalSampler(uint64_t seed) : rng_(seed) {}
  double next() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    double u1 = (static_cast<double>(rng_() >> 11) + 0.5) * 0x1.0p-53;
    double u2 = static_cast<double>(rng_() >> 11) * 0x1.0p-53;
    double r = std::sqrt(-2.0 * std::log(u1));
    spare_ = r * std::sin(2.0 * M_PI * u2);
    has_spare_ = true;
    return r * std::cos(2.0 * M_PI * u2);
  }

 private:
  std::mt19937_64 rng_;
  double spare_ = 0;
  bool has_spare_ = false;
};
}  // namespace

void initialize_parameters(const ParameterLayout& layout, const ModelConfig& c, float init_std, uint64_t seed,
                           std::vector<float>& host) {
  host.assign(static_cast<size_t>(layout.total()), 0.0f);
  const double residual_scale = 1.0 / std::sqrt(2.0 * c.n_layers);
  for (const ParamTensor& t : layout.tensors()) {
    float* p = host.data() + t.offset;
    if (t.name == "layers.ln1" || t.name == "layers.ln2" || t.name == "ln_f") {
      for (int64_t i = 0; i < t.numel; ++i) p[i] = 1.0f;
      continue;
    }
    // One stream per tensor (seeded by tensor index) so adding a tensor never shifts the others' values.
    NormalSampler normal(seed * 1000003ull + static_cast<uint64_t>(&t - layout.tensors().data()));
    double std_dev = init_std;
    if (t.name == "layers.wo" || t.name == "layers.w_down") std_dev *= residual_scale;
    for (int64_t i = 0; i < t.numel; ++i) p[i] = static_cast<float>(normal.next() * std_dev);
  }
}

}  // namespace moba::model
