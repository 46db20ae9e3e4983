#include "trainer/parallel_plan.h"

#include <cstdio>

#include "common/error.h"
#include "model/parameters.h"
#include "trainer/setup.h"

namespace moba {

ParallelPlan plan_parallel(const Recipe& r, const model::ModelConfig& c, int ranks, const Backend* backend,
                           DType activations) {
  ParallelPlan p;
  p.layout = parallel::make_layout(ranks, 0, r.parallel.context, r.parallel.data, r.source_path);
  check_context_parallel(r, p.layout.context);
  const int D = p.layout.data, C = p.layout.context;
  const int64_t micro_tokens = static_cast<int64_t>(r.train.micro_batch_seqs) * r.data.seq_len;
  const int64_t per_step = micro_tokens * D;
  MOBA_CHECK(r.train.global_batch_tokens % per_step == 0,
             cat(r.source_path, ": train.global_batch_tokens = ", r.train.global_batch_tokens,
                 " is not a multiple of micro_batch_seqs * seq_len * data-parallel ranks = ", per_step),
             cat("use a multiple of ", per_step, ", or another number of ranks"));
  p.rank_tokens = micro_tokens / C;
  p.accumulation = r.train.global_batch_tokens / per_step;

  model::TransformerOptions options = transformer_options(r);
  options.parameter_shards = D;
  options.context_size = C;
  p.memory = rank_memory_plan(r, c, p.rank_tokens, options, backend, activations);
  for (const model::MemoryItem& m : p.memory) p.memory_bytes += m.bytes;

  const double act = static_cast<double>(dtype_size(activations));
  const double kv_rows = static_cast<double>(p.rank_tokens) * c.n_kv_heads * c.head_dim;  // per K (or V), per rank
  if (C > 1) {
    p.kv_gather_per_layer = (C - 1) * kv_rows * 2 * act;
    p.kv_grad_per_layer = (C - 1) * kv_rows * 2 * 4.0;
    // Forward gathers once per layer; backward gathers again (recompute: the recomputed forward gathers and the
    // backward reuses it) and reduce-scatters the gradients.
    p.context_per_step =
        static_cast<double>(p.accumulation) * c.n_layers * (2 * p.kv_gather_per_layer + p.kv_grad_per_layer);
  }
  const double P = static_cast<double>(model::ParameterLayout(c, D).total());
  if (D > 1) p.gradients_per_step = (r.parallel.zero == 1 ? 1.0 : 2.0) * (D - 1) / D * P * 4;
  if (C > 1) p.gradients_per_step += 2.0 * (C - 1) / C * (r.parallel.zero == 1 ? P / D : P) * 4;
  if (D > 1 && r.parallel.zero == 1) p.weights_per_step = static_cast<double>(D - 1) / D * P * act;
  return p;
}

std::string describe_parallel_plan(const ParallelPlan& p, const model::ModelConfig& c, double bandwidth_gbs) {
  auto gib = [](double bytes) { return bytes / (1u << 30); };
  auto ms = [&](double bytes) { return bytes / (bandwidth_gbs * 1e9) * 1e3; };
  std::string out;
  char line[200];
  std::snprintf(line, sizeof line, "layout: %d ranks = %d data x %d context; %lld tokens per rank per micro-batch, "
                "%lld micro-batch(es) per step\n", p.layout.world_size, p.layout.data, p.layout.context,
                static_cast<long long>(p.rank_tokens), static_cast<long long>(p.accumulation));
  out += line;
  out += "memory per rank:\n";
  for (const model::MemoryItem& m : p.memory) {
    std::snprintf(line, sizeof line, "  %-62s %10.2f GiB\n", m.name.c_str(), gib(static_cast<double>(m.bytes)));
    out += line;
  }
  std::snprintf(line, sizeof line, "  %-62s %10.2f GiB\n", "total", gib(static_cast<double>(p.memory_bytes)));
  out += line;
  std::snprintf(line, sizeof line, "communication per rank (received; times at %.0f GB/s bus bandwidth):\n",
                bandwidth_gbs);
  out += line;
  auto traffic = [&](const std::string& what, double bytes) {
    std::snprintf(line, sizeof line, "  %-40s %10.3f GiB  %9.2f ms\n", what.c_str(), gib(bytes), ms(bytes));
    out += line;
  };
  if (p.layout.context > 1) {
    traffic("K and V all-gather, one layer", p.kv_gather_per_layer);
    traffic("dK and dV reduce-scatter, one layer", p.kv_grad_per_layer);
    traffic(cat("context parallel, one step (", c.n_layers, " layers)"), p.context_per_step);
  }
  traffic("gradients, one step", p.gradients_per_step);
  traffic("weights all-gather, one step", p.weights_per_step);
  return out;
}

}  // namespace moba
