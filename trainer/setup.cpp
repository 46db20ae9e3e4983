#include "trainer/setup.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "common/error.h"
#include "common/host_memory.h"
#include "common/log.h"
#include "trainer/optimizer.h"

namespace moba {

model::ModelConfig model_config_from(const Recipe& r, int dataset_vocab_size) {
  const ModelSettings& m = r.model;
  model::ModelConfig c;
  if (m.vocab_size == 0) {
    c.vocab_size = dataset_vocab_size;
  } else {
    MOBA_CHECK(m.vocab_size >= dataset_vocab_size,
               cat(r.source_path, ": model.vocab_size ", m.vocab_size, " is smaller than the dataset's vocabulary (",
                   dataset_vocab_size, ")"),
               "set model.vocab_size: 0 to take it from the dataset, or a value >= the dataset's");
    c.vocab_size = m.vocab_size;
  }
  c.d_model = m.d_model;
  c.n_layers = m.n_layers;
  c.n_heads = m.n_heads;
  c.n_kv_heads = m.n_kv_heads;
  c.head_dim = m.head_dim;
  c.ffn_hidden = m.ffn_hidden;
  c.rope_theta = static_cast<float>(m.rope_theta);
  c.norm_eps = static_cast<float>(m.norm_eps);
  c.tie_embeddings = m.tie_embeddings;
  return c;
}

std::vector<AttentionParams> layer_attention(const AttentionSettings& a, const model::ModelConfig& c,
                                             bool deterministic) {
  std::vector<AttentionParams> layers(static_cast<size_t>(c.n_layers));
  for (int l = 0; l < c.n_layers; ++l) {
    AttentionParams& p = layers[static_cast<size_t>(l)];
    p.mode = a.layer_mode(l);
    p.block_size = a.moba.block_size;
    p.top_k = a.moba.top_k;
    p.softmax_scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
    p.deterministic = deterministic;
  }
  return layers;
}

int max_top_k(const Recipe& r) {
  int k = r.attention.moba.top_k;
  for (const Phase& p : r.phases)
    if (p.moba) k = std::max(k, p.moba->top_k);
  return k;
}

model::TransformerOptions transformer_options(const Recipe& r) {
  model::TransformerOptions o;
  o.max_top_k = max_top_k(r);
  o.min_block_size = r.attention.moba.block_size;
  for (const Phase& p : r.phases)
    if (p.moba) o.min_block_size = std::min(o.min_block_size, p.moba->block_size);
  o.recompute = model::parse_recompute(r.train.recompute);
  return o;
}

std::vector<model::MemoryItem> rank_memory_plan(const Recipe& r, const model::ModelConfig& c, int64_t micro_tokens,
                                                const model::TransformerOptions& options, const Backend* backend,
                                                DType activations) {
  std::vector<model::MemoryItem> plan =
      backend ? model::Transformer::memory_plan(c, micro_tokens, options, *backend)
              : model::Transformer::memory_plan(c, micro_tokens, options, activations, 0);
  const model::ParameterLayout layout(c, options.parameter_shards);
  const int zero = options.parameter_shards > 1 ? r.parallel.zero : 1;
  plan.insert(plan.begin() + 2,
              {cat("f32 master weights + AdamW moments (", zero == 1 && options.parameter_shards > 1
                                                              ? cat("ZeRO-1 shard, 1/", options.parameter_shards)
                                                              : std::string("whole"), ")"),
               AdamW::state_bytes(layout, zero, options.parameter_shards)});
  return plan;
}

void check_memory_fits(const std::string& what, const MemoryPlan& plan, const Backend& backend,
                       const std::string& settings, int ranks_per_host) {
  auto mib = [](size_t bytes) { return cat(std::round(static_cast<double>(bytes) / (1 << 20) * 10) / 10); };
  auto row = [](const std::string& name, size_t bytes) {
    char line[160];
    std::snprintf(line, sizeof line, "  %-58s %10.1f MiB", name.c_str(), static_cast<double>(bytes) / (1 << 20));
    info(line);
  };
  auto total_of = [](const std::vector<model::MemoryItem>& items) {
    size_t total = 0;
    for (const model::MemoryItem& m : items) total += m.bytes;
    return total;
  };
  const bool shared = backend.device() == Device::cpu;  // the CPU backend allocates host memory
  std::vector<model::MemoryItem> on_backend = plan.backend;
  if (shared) on_backend.insert(on_backend.end(), plan.host.begin(), plan.host.end());
  info("memory plan of ", what, " on ", backend.name(), ":");
  for (const model::MemoryItem& m : on_backend) row(m.name, m.bytes);
  row(shared ? "total" : cat("total on ", backend.name()), total_of(on_backend));
  if (!shared && !plan.host.empty()) {
    for (const model::MemoryItem& m : plan.host) row(cat(m.name, " (host)"), m.bytes);
    row("total in host memory", total_of(plan.host));
  }
  // Host memory is shared by the job's ranks on this machine; each GPU's by the ranks that use it (one here).
  auto require = [&](size_t needed, size_t available, const std::string& where, int ranks) {
    MOBA_CHECK(available == 0 || needed * static_cast<size_t>(ranks) <= available,
               cat(what, " needs ", mib(needed), " MiB", ranks > 1 ? cat(" on each of ", ranks, " ranks") : "", " but ",
                   where, " has ", mib(available), " MiB available"),
               cat(settings, ranks > 1 ? ", or run fewer ranks per machine" : "",
                   "; the plan above shows where the memory goes"));
  };
  require(total_of(on_backend), backend.available_bytes(), shared ? "this machine" : backend.name(),
          shared ? ranks_per_host : 1);
  if (!shared && !plan.host.empty())
    require(total_of(plan.host), host_available_bytes(), "this machine's memory", ranks_per_host);
}

size_t check_memory_plan(const Recipe& r, const model::ModelConfig& c, int64_t micro_tokens,
                         const model::TransformerOptions& options, const Backend& backend, int ranks_per_host) {
  MemoryPlan plan;
  plan.backend = rank_memory_plan(r, c, micro_tokens, options, &backend, backend.activation_dtype());
  const bool recompute_left = options.recompute != model::Recompute::full;
  check_memory_fits(
      cat("training (micro-batch of ", micro_tokens, " tokens, recompute: ", model::recompute_name(options.recompute),
          ")"),
      plan, backend,
      cat("lower train.micro_batch_seqs (", r.train.micro_batch_seqs, ") or data.seq_len (", r.data.seq_len, ")",
          recompute_left ? cat(", or set train.recompute: ",
                               options.recompute == model::Recompute::none ? "attention or full" : "full")
                         : std::string()),
      ranks_per_host);
  size_t total = 0;
  for (const model::MemoryItem& m : plan.backend) total += m.bytes;
  return total;
}

void check_context_parallel(const Recipe& r, int context) {
  if (context == 1) return;
  const int64_t T = r.data.seq_len;
  MOBA_CHECK(T % (2 * context) == 0,
             cat(r.source_path, ": data.seq_len = ", T, " is not a multiple of 2 x parallel.context = ", 2 * context,
                 " (each rank holds two of the sequence's ", 2 * context, " chunks)"),
             cat("use a data.seq_len divisible by ", 2 * context, ", or another parallel.context"));
  std::vector<double> phase_starts = {0.0};
  for (const Phase& p : r.phases) phase_starts.push_back(p.until * r.train.tokens);
  for (double start : phase_starts) {
    const AttentionSettings a = r.attention_at(start);
    bool moba = false;
    for (int l = 0; l < r.model.n_layers; ++l) moba = moba || a.layer_mode(l) == AttentionMode::moba;
    const int64_t unit = 2 * static_cast<int64_t>(context) * a.moba.block_size;
    MOBA_CHECK(!moba || T % unit == 0,
               cat(r.source_path, ": data.seq_len = ", T, " is not a multiple of 2 x parallel.context x "
                   "attention.moba.block_size = 2 x ", context, " x ", a.moba.block_size, " = ", unit,
                   ": a MoBA block would straddle two ranks' chunks"),
               cat("use a data.seq_len that is a multiple of ", unit, ", a smaller block size, or another "
                   "parallel.context"));
  }
}

namespace {
// The rows of `b` as model input, with `cu_seqlens` describing the key sequence.
model::TokenBatch view_of(const data::Batch& b, const std::vector<int32_t>& cu_seqlens) {
  model::TokenBatch t;
  t.inputs = b.inputs.data();
  t.targets = b.targets.data();
  t.loss_mask = b.loss_mask.data();
  t.positions = b.positions.data();
  t.cu_seqlens = cu_seqlens.data();
  t.num_tokens = static_cast<int64_t>(b.inputs.size());
  t.num_segments = static_cast<int>(cu_seqlens.size()) - 1;
  t.num_global_tokens = t.num_tokens;
  return t;
}
}  // namespace

model::TokenBatch token_batch(const data::Batch& b) { return view_of(b, b.cu_seqlens); }

model::TokenBatch local_batch(const data::Batch& batch, int context, int context_rank, data::ContextShard& storage) {
  if (context == 1) return token_batch(batch);
  storage = data::shard_for_context(batch, context, context_rank);
  model::TokenBatch t = view_of(storage.local, storage.cu_seqlens);
  t.global_rows = storage.global_rows.data();
  t.gathered_rows = storage.gathered_rows.data();
  t.gathered_index = storage.gathered_index.data();
  t.num_global_tokens = static_cast<int64_t>(storage.gathered_rows.size());
  return t;
}

data::PackMode pack_mode_of(const DataSettings& d) { return data::parse_pack_mode(d.pack); }

std::string describe_attention(const std::vector<AttentionParams>& layers) {
  std::string out;
  size_t i = 0;
  while (i < layers.size()) {
    size_t j = i;
    auto same = [&](const AttentionParams& a, const AttentionParams& b) {
      return a.mode == b.mode && (a.mode == AttentionMode::full || (a.block_size == b.block_size && a.top_k == b.top_k));
    };
    while (j + 1 < layers.size() && same(layers[j + 1], layers[i])) ++j;
    const AttentionParams& p = layers[i];
    std::string what = p.mode == AttentionMode::full ? "full" : cat("moba(B=", p.block_size, ",k=", p.top_k, ")");
    out += cat(out.empty() ? "" : " + ", what, i == j ? cat(" [layer ", i, "]") : cat(" [layers ", i, "-", j, "]"));
    i = j + 1;
  }
  return out;
}

}  // namespace moba
