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
  EXPECT_NE(error_of("", {"train.optimzer.lr=1"}).find("unknown key 'train.optimzer'"), std::string::npos);
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
