// A recipe (YAML) parsed once into typed structs with defaults. Every key is known: an unknown key, a wrong
// type or an impossible value is a moba::Error naming the file, the key (dotted path), the line and what is
// allowed. `--set a.b=v` overrides apply to the YAML tree before the typed parse, so they are checked alike.
// Invariant: to_yaml(parse(x)) parses back to the same Recipe (it is what runs and checkpoints save).
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "kernels/backend.h"  // AttentionMode

namespace moba {

struct MobaSettings {
  int block_size = 512;  // B, tokens per key block
  int top_k = 3;         // k, blocks attended per query, the current block included
};

// Which layers use full attention regardless of `mode` ("last:N", "first:N", "a-b", or a list of indices).
struct LayerSelection {
  std::string spec;       // as written; empty = none
  std::vector<int> layers;  // resolved against model.n_layers, ascending
};

struct AttentionSettings {
  AttentionMode mode = AttentionMode::full;
  MobaSettings moba;
  LayerSelection full_layers;
  // The mode of layer l under these settings.
  AttentionMode layer_mode(int layer) const;
};

// One phase of a hybrid schedule: from the previous boundary until `until` (fraction of train.tokens, in
// (0, 1]) the attention settings below apply (unset fields keep the recipe's attention section).
struct Phase {
  double until = 1.0;
  std::optional<AttentionMode> mode;
  std::optional<MobaSettings> moba;
  std::optional<LayerSelection> full_layers;
};

struct ModelSettings {
  int vocab_size = 0;  // 0: take it from the training dataset's tokenizer
  int d_model = 256;
  int n_layers = 4;
  int n_heads = 4;
  int n_kv_heads = 0;  // 0: = n_heads (MHA); 1 = MQA; otherwise GQA, must divide n_heads
  int head_dim = 0;    // 0: d_model / n_heads
  int ffn_hidden = 0;  // 0: SwiGLU default, 8/3 d_model rounded up to a multiple of 64
  double rope_theta = 10000.0;
  bool tie_embeddings = false;
  double init_std = 0.02;
  double norm_eps = 1e-5;
};

enum class PackSetting { documents, concat, long_documents };

struct DataSettings {
  std::string train;   // HDF5 dataset from `moba prep`
  std::string val;     // optional
  int64_t seq_len = 1024;
  std::string pack = "documents";  // documents | concat | long_documents
  bool sft = false;    // apply the dataset's loss_mask (prompt tokens excluded)
};

struct OptimizerSettings {
  std::string name = "adamw";
  double lr = 1e-3;
  double beta1 = 0.9, beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;
  bool decay_norms_and_embeddings = false;  // weight decay on RMSNorm gains and embeddings too
};

struct ScheduleSettings {
  std::string kind = "cosine";  // cosine | wsd | constant
  double warmup_tokens = 0;
  double decay_fraction = 0.2;  // wsd: last fraction of training spent decaying
  double min_lr_ratio = 0.1;
};

struct TrainSettings {
  double tokens = 1e6;                 // total training tokens
  int64_t global_batch_tokens = 8192;  // tokens per optimizer step, over all data-parallel ranks
  int micro_batch_seqs = 1;            // sequences per forward/backward
  OptimizerSettings optimizer;
  ScheduleSettings schedule;
  double grad_clip = 1.0;              // 0 = off
  std::string precision = "auto";      // auto (fp32 on CPU, bf16 on CUDA) | fp32 | bf16
  std::string recompute = "none";      // none | attention | full
  // CUDA: bitwise-reproducible training run to run (same GPU model, build, recipe and seed, one rank): the backward
  // ops that add with float atomics by default (embedding, RMSNorm dweight, attention dQ, MoBA's dispatch order for
  // dK/dV) take ordered paths instead; slower. Not across GPU models, SM counts or CUDA versions, nor over ranks'
  // reductions (README "Reproducibility"). The CPU backend always is reproducible.
  bool deterministic = false;
};

struct ParallelSettings {
  int context = 1;               // context-parallel group size
  int data = 0;                  // 0 = auto: world_size / context
  int zero = 1;                  // optimizer-state sharding stage: 0 (replicated) or 1 (sharded over data ranks)
  std::string transport = "auto";  // GPU tensors: auto | nccl | mpi (staged through host memory; ranks may share a GPU)
  double timeout_s = 120;        // deadline of every collective; past it the job ends naming the call
};

struct EvalSettings {
  double every_tokens = 0;     // 0 = only at the end
  int64_t max_batches = 16;    // validation micro-batches per evaluation
  int64_t position_bucket = 2048;
  int64_t trailing = 2048;
};

struct CheckpointSettings {
  double every_tokens = 0;  // 0 = only at the end
  int keep = 3;
};

struct LogSettings {
  int every_steps = 1;
};

struct Recipe {
  std::string source_path;  // the YAML file it came from
  std::string name = "run";
  uint64_t seed = 1234;
  std::string backend = "cpu";  // cpu | cuda
  std::string run_dir;          // default runs/<name>
  std::string init_from;        // checkpoint to initialise weights from (SFT, continued pre-training)
  ModelSettings model;
  AttentionSettings attention;
  std::vector<Phase> phases;
  DataSettings data;
  TrainSettings train;
  ParallelSettings parallel;
  EvalSettings eval;
  CheckpointSettings checkpoint;
  LogSettings log;

  // Attention settings in force after `tokens_seen` tokens (phases applied).
  AttentionSettings attention_at(double tokens_seen) const;
};

// Parses a recipe file, applying `overrides` ("a.b=value", YAML syntax for the value) first.
Recipe load_recipe(const std::string& path, const std::vector<std::string>& overrides = {});
Recipe parse_recipe_text(const std::string& yaml_text, const std::string& source_name,
                         const std::vector<std::string>& overrides = {});
std::string recipe_to_yaml(const Recipe& r);

// Resolves "last:N" / "first:N" / "a-b" / "[i, j]" for n_layers; throws naming `where` on bad specs.
LayerSelection resolve_layers(const std::string& spec, int n_layers, const std::string& where);

}  // namespace moba
