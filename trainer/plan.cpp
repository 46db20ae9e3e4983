#include "trainer/plan.h"

#include <cmath>
#include <cstdio>
#include <memory>
#include <filesystem>
#include <fstream>

#include "common/cli.h"
#include "common/error.h"
#include "data/dataset.h"
#include "trainer/cost.h"
#include "trainer/metrics.h"
#include "trainer/parallel_plan.h"
#include "trainer/recipe.h"
#include "trainer/setup.h"

namespace fs = std::filesystem;

namespace moba {
namespace {

// The attention schedule in words: "moba(B=512,k=3) [layers 0-13]" or "... until 90% of tokens, then ...".
std::string describe_schedule(const Recipe& r, const model::ModelConfig& c) {
  if (r.phases.empty()) return describe_attention(layer_attention(r.attention, c));
  std::string out;
  double from = 0;
  for (const Phase& p : r.phases) {
    out += cat(out.empty() ? "" : ", then ", describe_attention(layer_attention(r.attention_at(from * r.train.tokens), c)),
               " until ", p.until * 100, "% of tokens");
    from = p.until;
  }
  return out;
}

// Writes `text` to `path` through a temporary file, so a reader never sees half a recipe.
void write_atomically(const std::string& path, const std::string& text) {
  const fs::path target(path);
  if (target.has_parent_path()) fs::create_directories(target.parent_path());
  const std::string temp = path + ".tmp";
  {
    std::ofstream out(temp, std::ios::trunc);
    out << text;
    MOBA_CHECK(out.good(), cat("moba plan: cannot write ", temp), "check that the directory is writable");
  }
  std::error_code ec;
  fs::rename(temp, path, ec);
  MOBA_CHECK(!ec, cat("moba plan: cannot rename ", temp, " to ", path, ": ", ec.message()),
             "check that the directory is writable");
}

}  // namespace

int plan_command(const std::vector<std::string>& args) {
  ArgParser ap("plan",
               "Resolves a recipe and prints its size and training cost as one JSON line: non-embedding and total "
               "parameters, tokens, steps, 6ND and attention FLOPs (full layers: causal pairs; MoBA layers: the "
               "pairs they attend; phases counted step by step).");
  ap.add_positional("recipe", "YAML recipe");
  ap.add_option("set", "KEY=VALUE", "override a recipe key, e.g. --set model.d_model=512", "", true);
  ap.add_option("write", "FILE", "also write the resolved recipe (what `moba train` would run) to FILE");
  ap.add_option("ranks", "N", "also plan a launch on N ranks with the recipe's parallel settings: memory of every "
                "buffer and bytes moved per layer and step, per rank (a table on stderr, totals in the JSON)");
  ap.add_option("bandwidth", "GB/S", "collective bus bandwidth for the --ranks times (8 H200 over NVSwitch: ~350; "
                "across nodes: the network's)", "350");
  if (!ap.parse(args)) return 0;

  const Recipe r = load_recipe(ap.get("recipe"), ap.get_all("set"));
  int vocab = r.model.vocab_size;
  if (vocab == 0 && !r.data.train.empty() && fs::exists(r.data.train))
    vocab = data::TokenDataset::open(r.data.train).info().vocab_size;  // as `moba train` would resolve it
  const model::ModelConfig c = model_config_from(r, vocab);
  const TrainingCost cost = training_cost(r, c);
  if (ap.has("write")) write_atomically(ap.get("write"), recipe_to_yaml(r));

  const std::vector<std::pair<std::string, std::string>> fields = {
      {"recipe", json_string(ap.get("recipe"))},
      {"name", json_string(r.name)},
      {"run_dir", json_string(r.run_dir)},
      {"non_embedding_parameters", cat(cost.non_embedding_parameters)},
      {"parameters", cost.parameters > 0 ? cat(cost.parameters) : "null"},
      {"seq_len", cat(r.data.seq_len)},
      {"global_batch_tokens", cat(r.train.global_batch_tokens)},
      {"steps", cat(cost.steps)},
      {"tokens", json_number(cost.tokens)},
      {"dense_flops", json_number(cost.dense_flops)},
      {"attention_flops", json_number(cost.attention_flops)},
      {"attention_flops_full", json_number(cost.attention_flops_full)},
      {"flops", json_number(cost.dense_flops + cost.attention_flops)},
      {"attention", json_string(describe_schedule(r, c))}};
  std::vector<std::pair<std::string, std::string>> parallel_fields;
  if (ap.has("ranks")) {
    const int ranks = static_cast<int>(ap.get_int("ranks", 1, 1 << 24));
    const double bandwidth = ap.get_double("bandwidth", 1e-3, 1e6);  // GB/s
    MOBA_CHECK(c.vocab_size > 0, cat(ap.get("recipe"), ": moba plan --ranks needs the vocabulary"),
               "set model.vocab_size, or data.train to a prepared dataset");
    // The recipe's own backend sizes the attention scratch when its device is here; else the plan leaves it out.
    const bool gpu_here = r.backend != "cuda" || gpu_count() > 0;
    std::unique_ptr<Backend> backend = gpu_here ? make_backend(r.backend) : nullptr;
    const DType activations = r.backend == "cuda" ? DType::bf16 : DType::f32;
    const ParallelPlan p = plan_parallel(r, c, ranks, backend.get(), activations);
    std::fputs(describe_parallel_plan(p, c, bandwidth).c_str(), stderr);
    if (!backend)
      std::fputs("  (no GPU here: the attention kernels' scratch, sized by the CUDA backend, is not included)\n", stderr);
    parallel_fields = {{"ranks", cat(ranks)},
                       {"data_ranks", cat(p.layout.data)},
                       {"context_ranks", cat(p.layout.context)},
                       {"rank_tokens", cat(p.rank_tokens)},
                       {"rank_bytes", cat(p.memory_bytes)},
                       {"kv_gather_bytes_per_layer", json_number(p.kv_gather_per_layer)},
                       {"kv_grad_bytes_per_layer", json_number(p.kv_grad_per_layer)},
                       {"context_bytes_per_step", json_number(p.context_per_step)},
                       {"gradient_bytes_per_step", json_number(p.gradients_per_step)},
                       {"weight_bytes_per_step", json_number(p.weights_per_step)},
                       {"bandwidth_gbs", json_number(bandwidth)}};
  }
  std::vector<std::pair<std::string, std::string>> all = fields;
  all.insert(all.end(), parallel_fields.begin(), parallel_fields.end());
  std::string line = "{";
  for (size_t i = 0; i < all.size(); ++i) line += (i ? ", " : "") + json_string(all[i].first) + ": " + all[i].second;
  std::printf("%s}\n", line.c_str());
  return 0;
}

}  // namespace moba
