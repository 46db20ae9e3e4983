// Recipe parsing: defaults, overrides, and that every bad recipe is an error naming the file, the key and the
// fix. Also the learning-rate schedules and the hybrid phase lookup.
#include <gtest/gtest.h>

#include <cmath>

#include "common/error.h"
#include "tests/support/test_util.h"
#include "trainer/recipe.h"
#include "trainer/schedule.h"

namespace moba {
namespace {

std::string error_of(const std::string& yaml, const std::vector<std::string>& overrides = {}) {
  try {
    parse_recipe_text(yaml, "bad.yaml", overrides);
  } catch (const Error& e) {
    return std::string(e.what()) + " | " + e.hint();
  }
  return "(no error)";
}

TEST(Recipe, DefaultsAndDerivedValues) {
  Recipe r = parse_recipe_text("name: x\nmodel: {d_model: 128, n_heads: 4}\n", "r.yaml");
  EXPECT_EQ(r.model.n_kv_heads, 4);
  EXPECT_EQ(r.model.head_dim, 32);
  EXPECT_EQ(r.model.ffn_hidden, 384);  // 8/3 * 128 rounded up to 64
  EXPECT_EQ(r.run_dir, "runs/x");
  EXPECT_EQ(r.attention.mode, AttentionMode::full);
}

TEST(Recipe, QuickstartParsesAndRoundTrips) {
  Recipe r = load_recipe(test::source_path("recipes/quickstart.yaml"));
  std::string yaml = recipe_to_yaml(r);
  Recipe again = parse_recipe_text(yaml, "resaved.yaml");
  EXPECT_EQ(recipe_to_yaml(again), yaml);
  EXPECT_EQ(r.attention.mode, AttentionMode::moba);
  EXPECT_EQ(r.attention.layer_mode(3), AttentionMode::full);
  EXPECT_EQ(r.attention.layer_mode(0), AttentionMode::moba);
}

TEST(Recipe, OverridesApplyBeforeValidation) {
  Recipe r = parse_recipe_text("model: {d_model: 64, n_heads: 2}\n", "r.yaml",
                               {"train.optimizer.lr=3e-4", "attention.full_layers=[0, 1]", "model.n_layers=3"});
  EXPECT_DOUBLE_EQ(r.train.optimizer.lr, 3e-4);
  EXPECT_EQ(r.attention.full_layers.layers, (std::vector<int>{0, 1}));
  EXPECT_NE(error_of("", {"train.optimzer.lr=1"}).find("--set: unknown key 'train.optimzer'"), std::string::npos);
  EXPECT_NE(error_of("", {"novalue"}).find("expected key=value"), std::string::npos);
}

TEST(Recipe, UnknownKeyNamesFileLineKeyAndAllowed) {
  std::string e = error_of("model:\n  d_model: 64\n  n_head: 4\n");
  EXPECT_NE(e.find("bad.yaml:3"), std::string::npos) << e;
  EXPECT_NE(e.find("unknown key 'model.n_head'"), std::string::npos) << e;
  EXPECT_NE(e.find("n_heads"), std::string::npos) << e;  // the allowed list
}

TEST(Recipe, BadValuesAreClearErrors) {
  EXPECT_NE(error_of("train: {tokens: lots}\n").find("train.tokens: expected a number"), std::string::npos);
  EXPECT_NE(error_of("attention: {mode: sparse}\n").find("'sparse' is not allowed"), std::string::npos);
  EXPECT_NE(error_of("model: {n_heads: 6, n_kv_heads: 4, d_model: 96}\n").find("does not divide"), std::string::npos);
  EXPECT_NE(error_of("model: {n_layers: 4}\nattention: {full_layers: last:9}\n").find("full_layers"), std::string::npos);
  EXPECT_NE(error_of("model: {n_layers: 4}\nattention: {full_layers: [0, 4]}\n").find("out of range"), std::string::npos);
  EXPECT_NE(error_of("data: {seq_len: 100}\ntrain: {global_batch_tokens: 250, micro_batch_seqs: 1}\n")
                .find("not a positive multiple"),
            std::string::npos);
  EXPECT_NE(error_of("phases: [{until: 0.5}, {until: 0.4}]\n").find("phases[1].until"), std::string::npos);
  EXPECT_NE(error_of("model: [1, 2]\n").find("must be a mapping"), std::string::npos);
  EXPECT_NE(error_of("model: {d_model: 64\n").find("YAML syntax error"), std::string::npos);
  EXPECT_NE(error_of("attention: {moba: {block_size: 0}}\n").find("block_size"), std::string::npos);
  try {
    load_recipe("/nonexistent/recipe.yaml");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("recipe not found"), std::string::npos);
  }
}

// Every numeric key, given through --set (so the message must say --set, not a file line): non-finite,
// negative, zero where zero means nothing, fractional where whole numbers are needed, and overflowing values
// are errors at parse time naming the key.
TEST(Recipe, EveryNumericKeyRejectsNonsenseValues) {
  const struct {
    std::string key;
    std::vector<std::pair<std::string, std::string>> values;  // value, expected part of the message
  } table[] = {
      {"seed", {{"-1", "must not be negative"}, {".nan", "finite number"}, {"1e300", "out of range"}, {"0.5", "integer"}}},
      {"model.vocab_size", {{"-1", "must not be negative"}, {".nan", "finite"}, {"3e9", "out of range"}}},
      {"model.d_model", {{"0", "must be positive"}, {"-64", "must be positive"}, {".inf", "finite"},
                         {"1e12", "out of range"}, {"2.5", "integer"}}},
      {"model.n_layers", {{"0", "must be positive"}, {"-1", "must be positive"}, {".nan", "finite"}, {"1e10", "out of range"}}},
      {"model.n_heads", {{"0", "must be positive"}, {"-4", "must be positive"}}},
      {"model.n_kv_heads", {{"-1", "does not divide"}, {"3", "does not divide"}}},
      {"model.head_dim", {{"-2", "positive and even"}, {"3", "positive and even"}}},
      {"model.ffn_hidden", {{"-1", "must be positive"}}},
      {"model.rope_theta", {{"0", "must be positive"}, {"-1", "must be positive"}, {".inf", "finite"}, {".nan", "finite"}}},
      {"model.init_std", {{"0", "must be positive"}, {"-0.02", "must be positive"}, {".nan", "finite"}}},
      {"model.norm_eps", {{"0", "must be positive"}, {".inf", "finite"}}},
      {"attention.moba.block_size", {{"0", "must be >= 1"}, {"-1", "must be >= 1"}, {"1e10", "out of range"}}},
      {"attention.moba.top_k", {{"0", "must be >= 1"}, {".nan", "finite"}}},
      {"data.seq_len", {{"0", "must be >= 2"}, {"1", "must be >= 2"}, {"-5", "must be >= 2"}, {".inf", "finite"},
                        {"3e9", "at most 2147483647"}}},
      {"train.tokens", {{"0", "must be positive"}, {"-1", "must be positive"}, {".inf", "finite"}, {".nan", "finite"},
                        {"1e300", "at most 9e15"}}},
      {"train.global_batch_tokens", {{"0", "positive multiple"}, {"-8192", "positive multiple"},
                                     {"1e300", "out of range"}, {"1000", "positive multiple"}}},
      {"train.micro_batch_seqs", {{"0", "must be positive"}, {"-1", "must be positive"}, {".nan", "finite"},
                                  {"3000000", "more than 2147483647"}}},
      {"train.optimizer.lr", {{"0", "must be positive"}, {"-1e-3", "must be positive"}, {".inf", "finite"}, {".nan", "finite"}}},
      {"train.optimizer.betas", {{"[.nan, 0.95]", "finite"}, {"[1, 0.95]", "[0, 1)"}, {"[-0.1, 0.9]", "[0, 1)"}}},
      {"train.optimizer.eps", {{"0", "must be positive"}, {".nan", "finite"}}},
      {"train.optimizer.weight_decay", {{"-0.1", "must not be negative"}, {".inf", "finite"}}},
      {"train.schedule.warmup_tokens", {{"-1", "must not be negative"}, {".inf", "finite"}}},
      {"train.schedule.decay_fraction", {{"-0.1", "[0, 1]"}, {"1.5", "[0, 1]"}, {".nan", "finite"}}},
      {"train.schedule.min_lr_ratio", {{"-1", "[0, 1]"}, {"2", "[0, 1]"}, {".nan", "finite"}}},
      {"train.grad_clip", {{"-1", "must not be negative"}, {".inf", "finite"}}},
      {"parallel.context", {{"0", "must be >= 1"}, {"-1", "must be >= 1"}}},
      {"parallel.data", {{"-1", "must be >= 1 or auto"}, {".nan", "finite"}}},
      {"parallel.zero", {{"2", "must be 0 or 1"}, {"-1", "must be 0 or 1"}}},
      {"parallel.timeout_s", {{"0", "positive number of seconds"}, {"-1", "positive number"}, {".inf", "finite"},
                              {"1e300", "at most 1e6"}}},
      {"eval.every_tokens", {{"-1", "must not be negative"}, {".nan", "finite"}}},
      {"eval.max_batches", {{"0", "must be >= 1"}, {"-3", "must be >= 1"}}},
      {"eval.position_bucket", {{"0", "must be >= 1"}}},
      {"eval.trailing", {{"0", "must be >= 1"}, {"1e30", "out of range"}}},
      {"checkpoint.every_tokens", {{"-1", "must not be negative"}, {".inf", "finite"}}},
      {"checkpoint.keep", {{"0", "must be >= 1"}, {"-1", "must be >= 1"}}},
      {"log.every_steps", {{"0", "must be >= 1"}, {".nan", "finite"}}},
  };
  for (const auto& row : table)
    for (const auto& [value, expected] : row.values) {
      std::string e = error_of("", {row.key + "=" + value});
      EXPECT_NE(e.find("--set " + row.key), std::string::npos) << row.key << "=" << value << ": " << e;
      EXPECT_NE(e.find(expected), std::string::npos) << row.key << "=" << value << ": " << e;
    }
  for (const std::string& until : {".nan", "0", "1.5", "-0.5"}) {
    std::string e = error_of("", {"phases=[{until: " + until + "}]"});
    EXPECT_NE(e.find("--set phases[0].until"), std::string::npos) << until << ": " << e;
  }
  // Sizes whose products overflow: the parameter count, and one micro-batch's activations.
  EXPECT_NE(error_of("", {"model.d_model=32768", "model.n_heads=256", "model.n_layers=100000"}).find("more than 1e14"),
            std::string::npos);
  EXPECT_NE(error_of("", {"data.seq_len=1073741824", "train.global_batch_tokens=1073741824", "model.d_model=65536",
                          "model.n_heads=512", "model.n_layers=400", "model.ffn_hidden=65536"})
                .find("more than 2^56 activation values"),
            std::string::npos);
  // In a file, the same mistakes name the file and line.
  EXPECT_NE(error_of("train:\n  tokens: .inf\n").find("bad.yaml:2: train.tokens: expected a finite number"),
            std::string::npos);
  EXPECT_NE(error_of("train:\n  tokens: 0\n").find("bad.yaml:2: train.tokens: must be positive"), std::string::npos);
}

// A key without a value (`key:`, `key: null`, `--set key=`) is an error instead of silently meaning the
// built-in default, except where the recipe documents what empty means.
TEST(Recipe, EmptyValuesAreErrorsUnlessTheKeyAcceptsEmpty) {
  std::string e = error_of("model: {d_model: 128}\n", {"model.d_model="});
  EXPECT_NE(e.find("--set model.d_model: no value given"), std::string::npos) << e;
  EXPECT_NE(e.find("leave the --set out"), std::string::npos) << e;
  EXPECT_NE(error_of("", {"train.optimizer.lr="}).find("--set train.optimizer.lr: no value given"), std::string::npos);
  EXPECT_NE(error_of("", {"backend=~"}).find("--set backend: no value given"), std::string::npos);
  EXPECT_NE(error_of("model:\n  d_model:\n").find("bad.yaml:2: model.d_model: no value given"), std::string::npos)
      << error_of("model:\n  d_model:\n");
  EXPECT_NE(error_of("train: {optimizer: {lr: null}}\n").find("train.optimizer.lr: no value given"), std::string::npos);
  // Keys where empty means something: no validation set, no initial checkpoint, the default run directory,
  // no layers kept full.
  Recipe r = parse_recipe_text("name: x\nrun_dir: r\ninit_from: c\ndata: {val: v.h5}\nattention: {full_layers: last:1}\n",
                               "r.yaml", {"data.val=", "init_from=", "run_dir=", "attention.full_layers="});
  EXPECT_EQ(r.data.val, "");
  EXPECT_EQ(r.init_from, "");
  EXPECT_EQ(r.run_dir, "runs/x");
  EXPECT_TRUE(r.attention.full_layers.layers.empty());
  // A whole section given no value would reset it to the defaults: a usage error.
  EXPECT_THROW(parse_recipe_text("model: {d_model: 128}\n", "r.yaml", {"model="}), UsageError);
  EXPECT_THROW(parse_recipe_text("", "r.yaml", {"novalue"}), UsageError);
  EXPECT_THROW(parse_recipe_text("", "r.yaml", {"a..b=1"}), UsageError);
  EXPECT_THROW(parse_recipe_text("", "r.yaml", {"model.=1"}), UsageError);
  EXPECT_THROW(parse_recipe_text("", "r.yaml", {"model.d_model=[1"}), UsageError);
}

TEST(Recipe, HybridPhasesSwitchAttention) {
  Recipe r = parse_recipe_text(
      "model: {n_layers: 4}\nattention: {mode: full, moba: {block_size: 64, top_k: 2}}\n"
      "train: {tokens: 1000, global_batch_tokens: 1024, micro_batch_seqs: 1}\ndata: {seq_len: 1024}\n"
      "phases:\n  - {until: 0.9, attention: {mode: moba}}\n  - {until: 1.0, attention: {mode: full, full_layers: last:2}}\n",
      "h.yaml");
  EXPECT_EQ(r.attention_at(0).mode, AttentionMode::moba);
  EXPECT_EQ(r.attention_at(899).mode, AttentionMode::moba);
  AttentionSettings late = r.attention_at(900);
  EXPECT_EQ(late.mode, AttentionMode::full);
  EXPECT_EQ(late.full_layers.layers, (std::vector<int>{2, 3}));
  // The end of training (the last whole batch ends past train.tokens): still the last phase, which `moba eval
  // --attention as-trained` relies on for a final checkpoint.
  for (double end : {1000.0, 1024.0}) {
    EXPECT_EQ(r.attention_at(end).mode, AttentionMode::full) << end;
    EXPECT_EQ(r.attention_at(end).full_layers.layers, (std::vector<int>{2, 3})) << end;
  }
  // Phases that end before 1.0 leave the base attention in force after them, to the end.
  Recipe early = parse_recipe_text(
      "model: {n_layers: 4}\nattention: {mode: full}\n"
      "train: {tokens: 1000, global_batch_tokens: 1024, micro_batch_seqs: 1}\ndata: {seq_len: 1024}\n"
      "phases:\n  - {until: 0.5, attention: {mode: moba}}\n",
      "e.yaml");
  EXPECT_EQ(early.attention_at(499).mode, AttentionMode::moba);
  EXPECT_EQ(early.attention_at(500).mode, AttentionMode::full);
  EXPECT_EQ(early.attention_at(1024).mode, AttentionMode::full);
}

TEST(Recipe, LayerSelections) {
  EXPECT_EQ(resolve_layers("last:2", 5, "w").layers, (std::vector<int>{3, 4}));
  EXPECT_EQ(resolve_layers("first:1", 5, "w").layers, (std::vector<int>{0}));
  EXPECT_EQ(resolve_layers("1-3", 5, "w").layers, (std::vector<int>{1, 2, 3}));
  EXPECT_EQ(resolve_layers("[4, 0]", 5, "w").layers, (std::vector<int>{0, 4}));
  EXPECT_TRUE(resolve_layers("none", 5, "w").layers.empty());
  EXPECT_THROW(resolve_layers("last:x", 5, "w"), Error);
  EXPECT_THROW(resolve_layers("3-1", 5, "w"), Error);
}

TEST(Schedule, WarmupCosineWsdConstant) {
  TrainSettings t;
  t.tokens = 1000;
  t.optimizer.lr = 1.0;
  t.schedule.warmup_tokens = 100;
  t.schedule.min_lr_ratio = 0.1;
  t.schedule.kind = "cosine";
  EXPECT_DOUBLE_EQ(learning_rate(t, 0, 10), 0.1);    // warmup reaches lr after the step's tokens
  EXPECT_DOUBLE_EQ(learning_rate(t, 100, 10), 1.0);  // start of the cosine
  EXPECT_NEAR(learning_rate(t, 550, 10), 0.55, 1e-12);
  EXPECT_NEAR(learning_rate(t, 1000, 10), 0.1, 1e-12);
  t.schedule.kind = "wsd";
  t.schedule.decay_fraction = 0.2;
  EXPECT_DOUBLE_EQ(learning_rate(t, 700, 10), 1.0);
  EXPECT_NEAR(learning_rate(t, 900, 10), 0.55, 1e-12);
  EXPECT_NEAR(learning_rate(t, 1000, 10), 0.1, 1e-12);
  t.schedule.kind = "constant";
  EXPECT_DOUBLE_EQ(learning_rate(t, 900, 10), 1.0);
}

}  // namespace
}  // namespace moba
