#include "trainer/plan.h"

#include <cstdio>
#include <filesystem>
#include <fstream>

#include "common/cli.h"
#include "common/error.h"
#include "data/dataset.h"
#include "trainer/cost.h"
#include "trainer/metrics.h"
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
  std::string line = "{";
  for (size_t i = 0; i < fields.size(); ++i) line += (i ? ", " : "") + json_string(fields[i].first) + ": " + fields[i].second;
  std::printf("%s}\n", line.c_str());
  return 0;
}

}  // namespace moba
