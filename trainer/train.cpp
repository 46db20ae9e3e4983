// The training loop: per optimizer step, `accumulation` micro-batches per data-parallel rank, gradients
// summed (MPI all-reduce across ranks), normalised by the number of loss tokens in the global batch, clipped,
// then one AdamW step. Every source of randomness is a function of (seed, step), so a resumed run repeats
// the uninterrupted one bit for bit on the CPU backend.
#include "trainer/train.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>

#include "common/cli.h"
#include "common/log.h"
#include "data/dataset.h"
#include "data/sampler.h"
#include "parallel/mpi_context.h"
#include "trainer/checkpoint.h"
#include "trainer/metrics.h"
#include "trainer/optimizer.h"
#include "trainer/schedule.h"
#include "trainer/setup.h"

namespace fs = std::filesystem;

namespace moba {
namespace {

std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  long s = std::lround(seconds);
  if (s >= 3600) return cat(s / 3600, "h", (s % 3600) / 60, "m");
  if (s >= 60) return cat(s / 60, "m", s % 60, "s");
  return cat(s, "s");
}

std::string format_count(double v) {
  char buf[32];
  if (v >= 1e9) std::snprintf(buf, sizeof buf, "%.2fB", v / 1e9);
  else if (v >= 1e6) std::snprintf(buf, sizeof buf, "%.2fM", v / 1e6);
  else if (v >= 1e3) std::snprintf(buf, sizeof buf, "%.1fK", v / 1e3);
  else std::snprintf(buf, sizeof buf, "%.0f", v);
  return buf;
}

// Validation batches: the same shapes as training, file order, one pass, sharded over ranks.
data::SamplerConfig validation_sampler_config(const Recipe& r, const parallel::MpiContext& mpi) {
  data::SamplerConfig sc;
  sc.seq_len = r.data.seq_len;
  sc.batch_seqs = r.train.micro_batch_seqs;
  sc.pack = pack_mode_of(r.data);
  sc.seed = r.seed;
  sc.shuffle = false;
  sc.single_pass = true;
  sc.use_loss_mask = r.data.sft;
  sc.shard_index = mpi.rank();
  sc.shard_count = mpi.world_size();
  return sc;
}

// Mean validation loss over the first `max_batches` micro-batches of the validation set (fixed order).
double validation_loss(model::Transformer& model, const data::TokenDataset& val, const Recipe& r,
                       const std::vector<AttentionParams>& attention, const parallel::MpiContext& mpi) {
  data::Sampler sampler(val, validation_sampler_config(r, mpi));
  double sums[2] = {0, 0};  // loss sum, token count
  for (int64_t b = 0; b < r.eval.max_batches; ++b) {
    std::optional<data::Batch> batch = sampler.next();
    if (!batch) break;
    sums[0] += model.forward(token_batch(*batch), attention);
    for (uint8_t m : batch->loss_mask) sums[1] += m;
  }
  if (mpi.world_size() > 1) mpi.allreduce_sum(sums, 2);
  MOBA_CHECK(sums[1] > 0, cat("the validation set ", val.info().path, " yields no full sequence of ", r.data.seq_len,
                              " tokens"),
             "use a larger validation split (moba prep --val-fraction) or a smaller data.seq_len");
  return sums[0] / sums[1];
}

struct Run {
  Run(const Recipe& r, parallel::MpiContext& m) : recipe(r), mpi(m) {}
  const Recipe& recipe;
  parallel::MpiContext& mpi;
  std::unique_ptr<Backend> backend;
  std::unique_ptr<data::TokenDataset> train_data, val_data;
  std::unique_ptr<model::Transformer> model;
  std::unique_ptr<AdamW> optimizer;
  std::unique_ptr<data::Sampler> sampler;
  model::ModelConfig config;
  int data_parallel = 1;
  int64_t accumulation = 1;  // micro-batches per rank per step
  int64_t total_steps = 0;
  std::string run_dir, checkpoint_dir;
};

void check_layout(const Recipe& r, const parallel::MpiContext& mpi, Run& run) {
  MOBA_CHECK(r.parallel.context == 1,
             cat(r.source_path, ": parallel.context = ", r.parallel.context,
                 ": context parallelism is not implemented yet"),
             "set parallel.context: 1 (sequence sharding arrives with the distributed-training work)");
  int dp = mpi.world_size() / r.parallel.context;
  MOBA_CHECK(r.parallel.data == 0 || r.parallel.data == dp,
             cat(r.source_path, ": parallel.data = ", r.parallel.data, " but ", mpi.world_size(),
                 " ranks with parallel.context = ", r.parallel.context, " give ", dp, " data-parallel ranks"),
             cat("set parallel.data: auto, or launch with mpirun -np ", r.parallel.data * r.parallel.context));
  int64_t per_step = static_cast<int64_t>(r.train.micro_batch_seqs) * r.data.seq_len * dp;
  MOBA_CHECK(r.train.global_batch_tokens % per_step == 0,
             cat(r.source_path, ": train.global_batch_tokens = ", r.train.global_batch_tokens,
                 " is not a multiple of micro_batch_seqs * seq_len * data-parallel ranks = ", per_step),
             cat("use a multiple of ", per_step, ", or change the number of ranks"));
  run.data_parallel = dp;
  run.accumulation = r.train.global_batch_tokens / per_step;
  run.total_steps = static_cast<int64_t>(std::ceil(r.train.tokens / static_cast<double>(r.train.global_batch_tokens)));
}

void open_data(const Recipe& r, const parallel::MpiContext& mpi, Run& run) {
  MOBA_CHECK(!r.data.train.empty(), cat(r.source_path, ": data.train is not set"),
             "set it to a dataset written by `moba prep` (e.g. data/prepared/sample/train.h5)");
  run.train_data = std::make_unique<data::TokenDataset>(data::TokenDataset::open(r.data.train));
  if (!r.data.val.empty()) {
    run.val_data = std::make_unique<data::TokenDataset>(data::TokenDataset::open(r.data.val));
    const data::DatasetInfo &t = run.train_data->info(), &v = run.val_data->info();
    MOBA_CHECK(t.vocab_size == v.vocab_size && t.tokenizer == v.tokenizer,
               cat("data.val (", v.path, ", ", v.tokenizer, " vocab ", v.vocab_size,
                   ") was not tokenized like data.train (", t.path, ", ", t.tokenizer, " vocab ", t.vocab_size, ")"),
               "prepare both splits with the same `moba prep` call");
  }
  if (run.val_data) {
    data::Sampler probe(*run.val_data, validation_sampler_config(r, mpi));
    MOBA_CHECK(probe.sequences_per_epoch() >= r.train.micro_batch_seqs,
               cat("data.val (", r.data.val, ", ", run.val_data->info().num_tokens, " tokens in ",
                   run.val_data->num_documents(), " documents) holds fewer than one micro-batch of ",
                   r.train.micro_batch_seqs, " x ", r.data.seq_len, " tokens per rank"),
               "prepare a larger validation split (moba prep --val-fraction), use a smaller data.seq_len, or "
               "leave data.val empty to skip validation");
  }
  MOBA_CHECK(!r.data.sft || run.train_data->info().has_loss_mask,
             cat(r.source_path, ": data.sft is true but ", r.data.train, " has no loss_mask"),
             "prepare the SFT data with `moba prep --sft` (JSONL with prompt/response)");
}

}  // namespace

int train_command(const std::vector<std::string>& args, parallel::MpiContext& mpi) {
  ArgParser ap("train", "Trains a model from a YAML recipe; resumes from the newest checkpoint of its run directory.");
  ap.add_positional("recipe", "YAML recipe (see recipes/ and docs in README.md)");
  ap.add_option("set", "KEY=VALUE", "override a recipe key, e.g. --set train.optimizer.lr=3e-4", "", true);
  ap.add_option("max-steps", "N", "stop after N optimizer steps in this invocation (writes a checkpoint; resume later)", "-1");
  if (!ap.parse(args)) return 0;

  Recipe recipe = load_recipe(ap.get("recipe"), ap.get_all("set"));
  const Recipe& r = recipe;
  const int64_t max_steps_now = ap.get_int("max-steps");
  Run run(r, mpi);
  check_layout(r, mpi, run);
  run.backend = make_backend(r.backend);
  if (run.backend->device() == Device::cpu && r.train.precision == "bf16")
    warn("train.precision: bf16 - the CPU backend computes in fp32");
  if (run.backend->device() == Device::cuda && r.train.precision == "fp32")
    warn("train.precision: fp32 - the CUDA backend computes in bf16 with f32 master weights and gradients");
  MOBA_CHECK(mpi.world_size() == 1 || run.backend->device() == Device::cpu,
             cat("backend: cuda with ", mpi.world_size(), " ranks: multi-GPU data parallelism (NCCL) is not implemented "
                 "yet"),
             "train on one GPU (mpirun -np 1, or no mpirun), or use backend: cpu for several data-parallel ranks");
  if (mpi.world_size() > 1 && r.parallel.zero == 1)
    warn("parallel.zero: 1 - optimizer-state sharding is not implemented yet; every rank keeps the full state");
  open_data(r, mpi, run);
  run.config = model_config_from(r, run.train_data->info().vocab_size);
  recipe.model.vocab_size = run.config.vocab_size;  // saved resolved, so eval rebuilds the same model
  const model::ModelConfig& c = run.config;
  const int64_t micro_tokens = static_cast<int64_t>(r.train.micro_batch_seqs) * r.data.seq_len;
  const model::TransformerOptions model_options = transformer_options(r);
  check_memory_plan(r, c, micro_tokens, model_options, *run.backend);  // every rank: each checks its own GPU
  run.model = std::make_unique<model::Transformer>(*run.backend, c, micro_tokens, model_options);
  run.optimizer = std::make_unique<AdamW>(*run.backend, *run.model, r.train.optimizer);

  data::SamplerConfig sc;
  sc.seq_len = r.data.seq_len;
  sc.batch_seqs = r.train.micro_batch_seqs;
  sc.pack = pack_mode_of(r.data);
  sc.seed = r.seed;
  sc.use_loss_mask = r.data.sft;
  sc.shard_index = mpi.rank();
  sc.shard_count = run.data_parallel;
  run.sampler = std::make_unique<data::Sampler>(*run.train_data, sc);
  MOBA_CHECK(run.sampler->sequences_per_epoch() >= r.train.micro_batch_seqs,
             cat(r.data.train, " holds fewer than ", r.train.micro_batch_seqs, " sequences of ", r.data.seq_len,
                 " tokens per rank"),
             "use more data, a smaller data.seq_len or fewer ranks");

  run.run_dir = r.run_dir;
  run.checkpoint_dir = (fs::path(run.run_dir) / "checkpoints").string();
  const std::string recipe_yaml = recipe_to_yaml(r);

  // ---- resume, or initialise ----
  CheckpointState state;
  state.seed = r.seed;
  state.recipe_yaml = recipe_yaml;
  std::optional<std::string> resume = latest_checkpoint(run.checkpoint_dir);
  if (resume) {
    CheckpointState saved = load_checkpoint(*resume, *run.model, run.optimizer.get());
    if (saved.recipe_yaml != recipe_yaml) warn("the recipe differs from the one saved in ", *resume, "; continuing with the new one");
    MOBA_CHECK(saved.seed == r.seed, cat(*resume, " was trained with seed ", saved.seed, ", the recipe says ", r.seed),
               "restore the seed, or use another run_dir to start afresh");
    state.step = saved.step;
    state.tokens_seen = saved.tokens_seen;
    state.sampler = saved.sampler;
    run.sampler->restore(saved.sampler);
    info("resumed from ", *resume, " at step ", state.step);
  } else {
    std::vector<float> host;
    if (!r.init_from.empty()) {
      load_checkpoint(r.init_from, *run.model, nullptr);
      info("initialised weights from ", r.init_from);
    } else {
      model::initialize_parameters(run.model->layout(), c, static_cast<float>(r.model.init_std), r.seed, host);
      run.model->set_params_from_host(host);
    }
  }

  if (mpi.is_root()) {
    fs::create_directories(run.run_dir);
    std::ofstream(fs::path(run.run_dir) / "recipe.yaml") << recipe_yaml;
  }
  info("==== moba train: ", r.name, " (", r.source_path, ") ====");
  info(recipe_yaml);
  const model::ParameterLayout& layout = run.model->layout();
  info("model: ", c.n_layers, " layers, d_model ", c.d_model, ", heads ", c.n_heads, " (kv ", c.n_kv_heads, ", dim ",
       c.head_dim, "), ffn ", c.ffn_hidden, ", vocab ", c.vocab_size, ": ", format_count(layout.total()),
       " parameters (", format_count(layout.count_non_embedding()), " non-embedding)");
  info("memory: ", run.backend->allocated_bytes() >> 20, " MiB on ", run.backend->name(), " (weights, gradients and ",
       "AdamW moments: ", (layout.total() * 16) >> 20, " MiB in f32; activations of one micro-batch: the rest)");
  info("data: ", run.train_data->info().num_tokens, " train tokens in ", run.train_data->num_documents(),
       " documents; pack ", r.data.pack, "; ", run.sampler->sequences_per_epoch(), " sequences of ", r.data.seq_len,
       " per epoch per rank");
  info("batch: ", r.train.global_batch_tokens, " tokens/step = ", run.data_parallel, " rank(s) x ", run.accumulation,
       " micro-batches x ", r.train.micro_batch_seqs, " x ", r.data.seq_len, "; ", run.total_steps, " steps; backend ",
       run.backend->name(), "; run dir ", run.run_dir);

  MetricsLog metrics((fs::path(run.run_dir) / "metrics.jsonl").string(), resume ? state.step : 0);
  if (state.step >= run.total_steps) {
    info("run already complete (step ", state.step, " of ", run.total_steps, ")");
    return 0;
  }

  const double step_tokens = static_cast<double>(r.train.global_batch_tokens);
  auto next_boundary = [](double every, double seen) {
    return every > 0 ? (std::floor(seen / every) + 1) * every : INFINITY;
  };
  double next_eval = next_boundary(r.eval.every_tokens, state.tokens_seen);
  double next_checkpoint = next_boundary(r.checkpoint.every_tokens, state.tokens_seen);
  std::string last_attention_desc;
  std::vector<data::Batch> micro(static_cast<size_t>(run.accumulation));
  auto t_start = std::chrono::steady_clock::now();
  const int64_t first_step = state.step;
  int64_t steps_now = 0;
  double last_val = NAN;

  auto write_checkpoint = [&]() {
    state.sampler = run.sampler->state();
    if (mpi.is_root()) {
      std::string path = save_checkpoint(run.checkpoint_dir, state, *run.model, *run.optimizer, r.checkpoint.keep);
      info("checkpoint ", path);
    }
    mpi.barrier();
  };
  auto run_validation = [&](const std::vector<AttentionParams>& attention) {
    if (!run.val_data) return;
    last_val = validation_loss(*run.model, *run.val_data, r, attention, mpi);
    info("validation | step ", state.step, " | tokens ", format_count(state.tokens_seen), " | val_loss ",
         cat(std::round(last_val * 1e4) / 1e4));
    if (mpi.is_root())
      metrics.write({{"step", cat(state.step)}, {"tokens", json_number(state.tokens_seen)},
                     {"val_loss", json_number(last_val)}});
  };

  while (state.step < run.total_steps) {
    AttentionSettings attention_now = r.attention_at(state.tokens_seen);
    std::vector<AttentionParams> attention = layer_attention(attention_now, c, r.train.deterministic);
    std::string desc = describe_attention(attention);
    if (desc != last_attention_desc) {
      info("attention from step ", state.step, ": ", desc);
      if (mpi.is_root() && !last_attention_desc.empty())
        metrics.write({{"step", cat(state.step)}, {"attention", json_string(desc)}});
      last_attention_desc = desc;
    }
    auto t0 = std::chrono::steady_clock::now();
    double loss_tokens[2] = {0, 0};  // this rank's loss-token count, then the global one
    for (auto& b : micro) {
      std::optional<data::Batch> next = run.sampler->next();
      MOBA_ASSERT(next.has_value());
      b = std::move(*next);
      for (uint8_t m : b.loss_mask) loss_tokens[0] += m;
    }
    loss_tokens[1] = loss_tokens[0];
    if (mpi.world_size() > 1) mpi.allreduce_sum(&loss_tokens[1], 1);
    const double scale = loss_tokens[1] > 0 ? 1.0 / loss_tokens[1] : 0.0;
    run.model->zero_grads();
    double loss_sum = 0;
    for (const auto& b : micro) {
      loss_sum += run.model->forward(token_batch(b), attention, static_cast<float>(scale));
      run.model->backward(static_cast<float>(scale));
    }
    if (mpi.world_size() > 1) {
      Tensor g = run.model->grads();
      MOBA_ASSERT(g.device == Device::cpu);  // NCCL takes over on GPUs
      mpi.allreduce_sum(g.as<float>(), g.numel());
      mpi.allreduce_sum(&loss_sum, 1);
    }
    const double loss = loss_sum * scale;
    const double lr = learning_rate(r.train, state.tokens_seen, step_tokens);
    const double grad_norm = run.optimizer->clip_gradients(r.train.grad_clip);
    MOBA_CHECK(std::isfinite(loss) && std::isfinite(grad_norm),
               cat("training diverged at step ", state.step, ": loss ", loss, ", grad norm ", grad_norm),
               "lower train.optimizer.lr, raise train.schedule.warmup_tokens, or resume from an earlier checkpoint");
    run.optimizer->step(lr);
    state.step += 1;
    state.tokens_seen += step_tokens;
    steps_now += 1;

    auto t1 = std::chrono::steady_clock::now();
    double step_s = std::chrono::duration<double>(t1 - t0).count();
    double elapsed = std::chrono::duration<double>(t1 - t_start).count();
    double tokens_per_s = step_tokens / step_s;
    double eta = elapsed / static_cast<double>(state.step - first_step) * static_cast<double>(run.total_steps - state.step);
    if (state.step % r.log.every_steps == 0 || state.step == run.total_steps) {
      char line[320];
      std::snprintf(line, sizeof line,
                    "step %6lld/%lld | tokens %8s | loss %.4f | lr %.3e | grad_norm %.3f | %8.0f tok/s | eta %s",
                    static_cast<long long>(state.step), static_cast<long long>(run.total_steps),
                    format_count(state.tokens_seen).c_str(), loss, lr, grad_norm, tokens_per_s,
                    format_duration(eta).c_str());
      info(line);
    }
    if (mpi.is_root())
      metrics.write({{"step", cat(state.step)}, {"tokens", json_number(state.tokens_seen)},
                     {"loss", json_number(loss)}, {"lr", json_number(lr)}, {"grad_norm", json_number(grad_norm)},
                     {"tokens_per_s", json_number(std::round(tokens_per_s))}, {"eta_s", json_number(std::round(eta))}});

    const bool finished = state.step == run.total_steps;
    if (state.tokens_seen >= next_eval && !finished) {
      run_validation(attention);
      next_eval = next_boundary(r.eval.every_tokens, state.tokens_seen);
    }
    const bool stop_now = max_steps_now >= 0 && steps_now >= max_steps_now;
    if (state.tokens_seen >= next_checkpoint || finished || stop_now) {
      write_checkpoint();
      next_checkpoint = next_boundary(r.checkpoint.every_tokens, state.tokens_seen);
    }
    if (finished) run_validation(attention);
    if (stop_now && !finished) {
      info("stopping after ", steps_now, " steps (--max-steps); run the same command again to resume");
      return 0;
    }
  }
  double total_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  info("done: ", state.step, " steps, ", format_count(state.tokens_seen), " tokens in ", format_duration(total_s),
       std::isfinite(last_val) ? cat(", final val_loss ", last_val) : std::string(), "; metrics in ",
       (fs::path(run.run_dir) / "metrics.jsonl").string());
  return 0;
}

}  // namespace moba
