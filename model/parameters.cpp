#include "model/parameters.h"

#include <algorithm>
#include <cmath>
#include <iterator>
#include <random>

#include "common/error.h"

namespace moba::model {

namespace {
constexpr int64_t kShardAlign = 64;  // elements: 256 bytes of f32 per shard
}

int64_t Bucket::shard() const { return padded / shard_count; }

ParameterLayout::ParameterLayout(const ModelConfig& c, int shard_count) : shard_count_(shard_count) {
  MOBA_ASSERT(shard_count >= 1);
  const int64_t L = c.n_layers, C = c.d_model, V = c.vocab_size, F = c.ffn_hidden;
  struct Spec {
    const char* name;
    std::vector<int64_t> shape;  // one layer's (or the whole tensor's)
    bool matrix, embedding;
  };
  const std::vector<Spec> layer_specs = {
      {"layers.ln1", {C}, false, false},                    // RMSNorm gain before attention
      {"layers.wqkv", {c.qkv_dim(), C}, true, false},       // rows: [q heads | k heads | v heads]
      {"layers.wo", {C, c.q_dim()}, true, false},           // attention output projection
      {"layers.ln2", {C}, false, false},                    // RMSNorm gain before the MLP
      {"layers.w_gate_up", {2 * F, C}, true, false},        // rows: [gate | up]
      {"layers.w_down", {C, F}, true, false}};              // MLP output projection
  auto numel_of = [](const std::vector<int64_t>& shape) {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    return n;
  };
  auto add_tensor = [&](const std::string& name, std::vector<int64_t> shape, bool matrix, bool embedding,
                        int64_t offset, int64_t layer_stride) {
    ParamTensor t;
    t.name = name;
    t.shape = std::move(shape);
    t.numel = numel_of(t.shape);
    t.offset = offset;
    t.layer_stride = layer_stride;
    t.is_matrix = matrix;
    t.is_embedding = embedding;
    tensors_.push_back(std::move(t));
  };
  auto open_bucket = [&](const std::string& name) {
    Bucket b;
    b.name = name;
    b.offset = total_;
    b.shard_count = shard_count_;
    buckets_.push_back(b);
  };
  auto close_bucket = [&]() {
    Bucket& b = buckets_.back();
    b.size = total_ - b.offset;
    const int64_t unit = kShardAlign * shard_count_;
    b.padded = (b.size + unit - 1) / unit * unit;
    total_ = b.offset + b.padded;
  };

  open_bucket("embedding");
  add_tensor("wte", {V, C}, false, true, total_, 0);  // token embedding
  total_ += V * C;
  close_bucket();
  // Per-layer tensors: offsets inside one layer's block; the block repeats every layer_block elements.
  int64_t layer_block = 0;
  std::vector<int64_t> inside;
  for (const Spec& s : layer_specs) {
    inside.push_back(layer_block);
    layer_block += numel_of(s.shape);
  }
  const int64_t unit = kShardAlign * shard_count_;
  const int64_t layer_stride = (layer_block + unit - 1) / unit * unit;  // each layer's bucket, padded
  const int64_t first_layer = total_;
  for (size_t i = 0; i < layer_specs.size(); ++i) {
    std::vector<int64_t> stacked = layer_specs[i].shape;
    stacked.insert(stacked.begin(), L);
    add_tensor(layer_specs[i].name, stacked, layer_specs[i].matrix, layer_specs[i].embedding, first_layer + inside[i],
               layer_stride);
  }
  for (int64_t l = 0; l < L; ++l) {
    open_bucket(cat("layer ", l));
    total_ += layer_block;
    close_bucket();
  }
  open_bucket("head");
  add_tensor("ln_f", {C}, false, false, total_, 0);  // final RMSNorm gain
  total_ += C;
  if (!c.tie_embeddings) {
    add_tensor("lm_head", {V, C}, true, true, total_, 0);  // untied LM head
    total_ += V * C;
  }
  close_bucket();

  for (const ParamTensor& t : tensors_)
    for (int l = 0; l < t.slices(); ++l) slices_.push_back({&t, t.per_layer() ? l : 0, t.offset_of(l), t.slice_numel()});
  std::sort(slices_.begin(), slices_.end(), [](const ParamSlice& a, const ParamSlice& b) { return a.offset < b.offset; });
}

const ParamTensor& ParameterLayout::get(const std::string& name) const {
  for (const ParamTensor& t : tensors_)
    if (t.name == name) return t;
  throw Error(cat("no parameter tensor named '", name, "'"), "this is a bug in the caller");
}

int64_t ParameterLayout::count() const {
  int64_t n = 0;
  for (const ParamTensor& t : tensors_) n += t.numel;
  return n;
}

int64_t ParameterLayout::count_non_embedding() const {
  int64_t n = 0;
  for (const ParamTensor& t : tensors_)
    if (!t.is_embedding) n += t.numel;
  return n;
}

std::vector<float> ParameterLayout::read_tensor(const std::vector<float>& arena, const ParamTensor& t) const {
  MOBA_ASSERT(static_cast<int64_t>(arena.size()) == total_);
  std::vector<float> out(static_cast<size_t>(t.numel));
  const int64_t n = t.slice_numel();
  for (int l = 0; l < t.slices(); ++l)
    std::copy_n(arena.begin() + t.offset_of(l), n, out.begin() + l * n);
  return out;
}

void ParameterLayout::write_tensor(std::vector<float>& arena, const ParamTensor& t,
                                   const std::vector<float>& values) const {
  MOBA_ASSERT(static_cast<int64_t>(arena.size()) == total_ && static_cast<int64_t>(values.size()) == t.numel);
  const int64_t n = t.slice_numel();
  for (int l = 0; l < t.slices(); ++l)
    std::copy_n(values.begin() + l * n, n, arena.begin() + t.offset_of(l));
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
  // Streams are seeded by the tensor's index in this (historical, tensor-major) order, and values are drawn in
  // the tensor's logical order, so the layer-major arena holds exactly the values of the earlier layouts.
  static const char* const kOrder[] = {"wte",   "layers.ln1",       "layers.wqkv",  "layers.wo",
                                       "layers.ln2", "layers.w_gate_up", "layers.w_down", "ln_f", "lm_head"};
  for (uint64_t index = 0; index < std::size(kOrder); ++index) {
    if (std::string(kOrder[index]) == "lm_head" && c.tie_embeddings) continue;
    const ParamTensor& t = layout.get(kOrder[index]);
    std::vector<float> values(static_cast<size_t>(t.numel));
    if (t.name == "layers.ln1" || t.name == "layers.ln2" || t.name == "ln_f") {
      std::fill(values.begin(), values.end(), 1.0f);
    } else {
      // One stream per tensor (seeded by tensor index) so adding a tensor never shifts the others' values.
      NormalSampler normal(seed * 1000003ull + index);
      double std_dev = init_std;
      if (t.name == "layers.wo" || t.name == "layers.w_down") std_dev *= residual_scale;
      for (float& v : values) v = static_cast<float>(normal.next() * std_dev);
    }
    layout.write_tensor(host, t, values);
  }
}

}  // namespace moba::model
