// The training loop: per optimizer step, `accumulation` micro-batches per data-parallel rank through
// train_step() (trainer/train_step.h: loss normalised by the global target-token count, per-layer gradient
// reduction overlapped with backward, ZeRO-1 AdamW), then logging, validation and collective checkpoints.
// Every source of randomness is a function of (seed, step), so a resumed run repeats the uninterrupted one bit
// for bit on the CPU backend. SIGINT / SIGTERM / SIGUSR1 finish the step, write a checkpoint and exit 0.
#include "trainer/train.h"

#include <charconv>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <memory>
#include <optional>
#include <thread>

#include "common/cli.h"
#include "common/log.h"
#include "data/dataset.h"
#include "data/sampler.h"
#include "parallel/communicator.h"
#include "parallel/context_exchange.h"
#include "parallel/mpi_context.h"
#include "trainer/checkpoint.h"
#include "trainer/metrics.h"
#include "trainer/optimizer.h"
#include "trainer/run_directory.h"
#include "trainer/schedule.h"
#include "trainer/setup.h"
#include "trainer/stop_request.h"
#include "trainer/train_step.h"

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

// A deliberate failure on one rank at one step (`--fault KIND:STEP:RANK`), so the tests can show that every kind
// of failure ends the whole job with that rank's message instead of a hang.
struct Fault {
  std::string kind;  // throw | exit | kill | hang | nan | pause | save
  int64_t step = -1;
  int rank = 0;
};

Fault parse_fault(const std::string& spec) {
  Fault f;
  if (spec.empty()) return f;
  const size_t a = spec.find(':'), b = spec.find(':', a == std::string::npos ? a : a + 1);
  if (a == std::string::npos || b == std::string::npos)
    throw UsageError(cat("moba train: --fault '", spec, "' is not KIND:STEP:RANK"), "e.g. --fault throw:3:1");
  f.kind = spec.substr(0, a);
  if (f.kind != "throw" && f.kind != "exit" && f.kind != "kill" && f.kind != "hang" && f.kind != "nan" &&
      f.kind != "pause" && f.kind != "save")
    throw UsageError(cat("moba train: --fault kind '", f.kind, "' is not allowed"),
                     "allowed: throw, exit, kill, hang, nan, pause (wait for a stop signal), save (SIGKILL while saving)");
  const std::string step = spec.substr(a + 1, b - a - 1), rank = spec.substr(b + 1);
  auto [step_end, step_error] = std::from_chars(step.data(), step.data() + step.size(), f.step);
  auto [rank_end, rank_error] = std::from_chars(rank.data(), rank.data() + rank.size(), f.rank);
  if (step_error != std::errc() || step_end != step.data() + step.size() || f.step < 0 ||
      rank_error != std::errc() || rank_end != rank.data() + rank.size() || f.rank < 0)
    throw UsageError(cat("moba train: --fault '", spec, "': STEP and RANK must be whole numbers >= 0"),
                     "e.g. --fault throw:3:1");
  return f;
}

void inject_fault(const Fault& f, int64_t step, int rank, model::Transformer& model, Backend& backend) {
  if (f.kind.empty() || f.kind == "save" || f.step != step || f.rank != rank) return;
  if (f.kind == "pause") {  // a deterministic "mid-run" for the signal tests: wait here for a stop signal
    std::fprintf(stderr, "[rank %d] paused at step %lld (--fault), waiting for a stop signal\n", rank,
                 static_cast<long long>(step));
    std::fflush(stderr);
    while (stop_signal() == 0) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    return;
  }
  if (f.kind == "throw") throw Error(cat("fault injected by --fault at step ", step, " on rank ", rank), "(a test)");
  if (f.kind == "exit") {
    log_error(cat("exiting with code 3 at step ", step, " (--fault)"));
    std::_Exit(3);
  }
  if (f.kind == "kill") std::raise(SIGKILL);
  if (f.kind == "hang")
    while (true) std::this_thread::sleep_for(std::chrono::seconds(1));
  // nan: poison one gain of the final norm in this rank's replica; the loss becomes NaN through the real forward.
  std::vector<float> nan(1, NAN);
  Tensor w = model.param("ln_f").slice_rows(0, 1);
  if (w.dtype == DType::f32) {
    backend.upload(w, nan.data());
  } else {
    Tensor staging = backend.allocate(DType::f32, {1});
    backend.upload(staging, nan.data());
    backend.convert(w, staging);
    backend.synchronize();
    backend.release(staging);
  }
}

// Validation batches: the same shapes as training, file order, one pass, sharded over the data-parallel ranks.
data::SamplerConfig validation_sampler_config(const Recipe& r, const parallel::ParallelLayout& layout) {
  data::SamplerConfig sc;
  sc.seq_len = r.data.seq_len;
  sc.batch_seqs = r.train.micro_batch_seqs;
  sc.pack = pack_mode_of(r.data);
  sc.seed = r.seed;
  sc.shuffle = false;
  sc.single_pass = true;
  sc.use_loss_mask = r.data.sft;
  sc.shard_index = layout.data_rank;
  sc.shard_count = layout.data;
  return sc;
}

// Mean validation loss over the first eval.max_batches micro-batches of the validation set (fixed order), counted
// over all data-parallel ranks (each takes every D-th sequence; rounded up to a multiple of D), so the number does
// not depend on the rank count.
double validation_loss(model::Transformer& model, const data::TokenDataset& val, const Recipe& r,
                       const std::vector<AttentionParams>& attention, parallel::Communicator& comm) {
  const parallel::ParallelLayout& layout = comm.layout();
  data::Sampler sampler(val, validation_sampler_config(r, layout));
  double sums[2] = {0, 0};  // loss sum, token count (this rank's rows; summed over every rank below)
  data::ContextShard shard;
  const int64_t per_rank = (r.eval.max_batches + layout.data - 1) / layout.data;
  for (int64_t b = 0; b < per_rank; ++b) {
    std::optional<data::Batch> batch = sampler.next();
    if (!batch) break;
    const model::TokenBatch local = local_batch(*batch, layout.context, layout.context_rank, shard);
    sums[0] += model.forward(local, attention);
    for (int64_t i = 0; i < local.num_tokens; ++i) sums[1] += local.loss_mask[i];
  }
  comm.host(parallel::Group::world).all_reduce(sums, 2, parallel::ReduceOp::sum, "validation loss");
  MOBA_CHECK(sums[1] > 0, cat("the validation set ", val.info().path, " yields no full sequence of ", r.data.seq_len,
                              " tokens"),
             "use a larger validation split (moba prep --val-fraction) or a smaller data.seq_len");
  return sums[0] / sums[1];
}

struct Run {
  std::unique_ptr<Backend> backend;
  std::unique_ptr<parallel::Communicator> comm;
  std::unique_ptr<parallel::CommunicatorContextExchange> context_exchange;
  std::unique_ptr<data::TokenDataset> train_data, val_data;
  std::unique_ptr<model::Transformer> model;
  std::unique_ptr<AdamW> optimizer;
  std::unique_ptr<data::Sampler> sampler;
  model::ModelConfig config;
  parallel::ParallelLayout layout;
  int64_t accumulation = 1;  // micro-batches per rank per step
  int64_t total_steps = 0;
  std::string run_dir, checkpoint_dir;
};

void check_layout(const Recipe& r, Run& run) {
  check_context_parallel(r, run.layout.context);
  const int dp = run.layout.data;
  const int64_t per_step = static_cast<int64_t>(r.train.micro_batch_seqs) * r.data.seq_len * dp;
  MOBA_CHECK(r.train.global_batch_tokens >= per_step,
             cat(r.source_path, ": train.global_batch_tokens = ", r.train.global_batch_tokens, " is less than one "
                 "micro-batch (", r.train.micro_batch_seqs, " x ", r.data.seq_len, " tokens) on each of ", dp,
                 " data-parallel ranks (", per_step, " tokens)"),
             cat("raise train.global_batch_tokens to a multiple of ", per_step, ", lower train.micro_batch_seqs, or "
                 "launch fewer ranks"));
  MOBA_CHECK(r.train.global_batch_tokens % per_step == 0,
             cat(r.source_path, ": train.global_batch_tokens = ", r.train.global_batch_tokens,
                 " is not a multiple of micro_batch_seqs * seq_len * data-parallel ranks = ", per_step),
             cat("use a multiple of ", per_step, ", or change the number of ranks"));
  run.accumulation = r.train.global_batch_tokens / per_step;
  run.total_steps = static_cast<int64_t>(std::ceil(r.train.tokens / static_cast<double>(r.train.global_batch_tokens)));
}

void open_data(const Recipe& r, Run& run) {
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
    data::Sampler probe(*run.val_data, validation_sampler_config(r, run.layout));
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

std::string metrics_path(const Run& run) { return (fs::path(run.run_dir) / "metrics.jsonl").string(); }

// Moves the unreadable checkpoints newer than the resume point (all of them when starting over, then with the
// metrics of the run they belonged to) into checkpoints/unreadable/, so the new steps never overwrite them and
// rotation never weighs them against readable ones. Rank 0 moves once every rank has read the directory.
void set_aside_unreadable(const ResumeChoice& choice, const Run& run, parallel::MpiContext& mpi) {
  for (const UnreadableCheckpoint& u : choice.unreadable)
    warn("skipping unreadable checkpoint ", u.checkpoint.path, ": ", u.reason);
  run.comm->host(parallel::Group::world).barrier("checkpoints read");
  if (!mpi.is_root()) return;
  std::vector<std::string> paths;
  for (const UnreadableCheckpoint& u : choice.unreadable) paths.push_back(u.checkpoint.path);
  const size_t checkpoints = paths.size();
  if (!choice.resume_from && fs::exists(metrics_path(run))) paths.push_back(metrics_path(run));
  const std::string aside = (fs::path(run.checkpoint_dir) / "unreadable").string();
  set_aside(paths, aside);
  warn("moved ", checkpoints, " unreadable checkpoint(s)", paths.size() > checkpoints ? " and metrics.jsonl" : "",
       " to ", aside, "; delete them once you no longer need them");
}

}  // namespace

int train_command(const std::vector<std::string>& args, parallel::MpiContext& mpi) {
  ArgParser ap("train", "Trains a model from a YAML recipe; resumes from the newest checkpoint of its run directory.");
  ap.add_positional("recipe", "YAML recipe (see recipes/ and docs in README.md)");
  ap.add_option("set", "KEY=VALUE", "override a recipe key, e.g. --set train.optimizer.lr=3e-4", "", true);
  ap.add_option("max-steps", "N",
                "stop after N optimizer steps in this invocation (writes a checkpoint; resume later; default: no limit)");
  ap.add_flag("ignore-unreadable-checkpoints",
              "start from step 0 although the run directory holds checkpoints that cannot be read (they are moved to "
              "checkpoints/unreadable/ with metrics.jsonl, never deleted)");
  ap.add_option("fault", "KIND:STEP:RANK",
                "testing aid: fail on RANK at STEP (throw, exit, kill, hang, nan, save) to check that the job ends "
                "cleanly, or pause there until a stop signal");
  if (!ap.parse(args)) return 0;
  const int64_t max_steps_now =
      ap.has("max-steps") ? ap.get_int("max-steps", 1, std::numeric_limits<int64_t>::max()) : -1;  // -1: no limit
  const Fault fault = parse_fault(ap.has("fault") ? ap.get("fault") : "");

  Recipe recipe = load_recipe(ap.get("recipe"), ap.get_all("set"));
  const Recipe& r = recipe;
  Run run;
  run.layout = parallel::make_layout(mpi.world_size(), mpi.rank(), r.parallel.context, r.parallel.data, r.source_path);
  check_layout(r, run);
  // Before anything is allocated or written: the same recipe on every rank, and the run directory ours alone.
  RunDirectory run_directory(r.run_dir, recipe_to_yaml(r), mpi);
  run.run_dir = run_directory.path();
  run.checkpoint_dir = (fs::path(run.run_dir) / "checkpoints").string();

  const Device device = r.backend == "cuda" ? Device::cuda : Device::cpu;
  const int gpus = device == Device::cuda ? gpu_count() : 0;
  const parallel::Transport transport =
      parallel::resolve_transport(r.parallel.transport, device, mpi.local_size(), gpus, r.source_path);
  run.backend = make_backend(r.backend, gpus > 0 ? mpi.local_rank() % gpus : 0, {OpProfile::off, r.train.deterministic});
  if (run.backend->device() == Device::cpu && r.train.precision == "bf16")
    warn("train.precision: bf16 - the CPU backend computes in fp32");
  if (run.backend->device() == Device::cuda && r.train.precision == "fp32")
    warn("train.precision: fp32 - the CUDA backend computes in bf16 with f32 master weights and gradients");
  run.comm = std::make_unique<parallel::Communicator>(mpi, run.layout, *run.backend, transport, r.parallel.timeout_s);
  open_data(r, run);
  run.config = model_config_from(r, run.train_data->info().vocab_size);
  recipe.model.vocab_size = run.config.vocab_size;  // saved resolved, so eval rebuilds the same model
  const model::ModelConfig& c = run.config;
  const int64_t micro_tokens = static_cast<int64_t>(r.train.micro_batch_seqs) * r.data.seq_len;
  model::TransformerOptions model_options = transformer_options(r);
  model_options.parameter_shards = run.layout.data;
  model_options.context_size = run.layout.context;
  if (run.layout.context > 1) {
    run.context_exchange = std::make_unique<parallel::CommunicatorContextExchange>(*run.comm);
    model_options.context = run.context_exchange.get();
  }
  const size_t planned =  // every rank checks: its own GPU, or on the CPU the machine its ranks share
      check_memory_plan(r, c, micro_tokens / run.layout.context, model_options, *run.backend,
                        mpi.local_size());
  run.model = std::make_unique<model::Transformer>(*run.backend, c, micro_tokens / run.layout.context, model_options);
  run.optimizer = std::make_unique<AdamW>(*run.backend, *run.model, r.train.optimizer, run.comm.get(), r.parallel.zero);

  data::SamplerConfig sc;
  sc.seq_len = r.data.seq_len;
  sc.batch_seqs = r.train.micro_batch_seqs;
  sc.pack = pack_mode_of(r.data);
  sc.seed = r.seed;
  sc.use_loss_mask = r.data.sft;
  sc.shard_index = run.layout.data_rank;
  sc.shard_count = run.layout.data;
  sc.epoch_multiple = r.train.global_batch_tokens / r.data.seq_len;  // the epoch does not depend on the rank count
  run.sampler = std::make_unique<data::Sampler>(*run.train_data, sc);
  MOBA_CHECK(run.sampler->sequences_per_epoch() >= r.train.micro_batch_seqs * run.accumulation,
             cat(r.data.train, " holds fewer than one global batch (", sc.epoch_multiple, " sequences of ",
                 r.data.seq_len, " tokens) per epoch"),
             "use more data, a smaller data.seq_len or a smaller train.global_batch_tokens");

  const std::string recipe_yaml = recipe_to_yaml(r);

  // ---- resume, or initialise ----
  CheckpointState state;
  state.seed = r.seed;
  state.recipe_yaml = recipe_yaml;
  CheckpointState saved;
  const ResumeChoice choice = choose_resume(list_checkpoints(run.checkpoint_dir), [&](const std::string& path) {
    try {
      saved = load_checkpoint(path, *run.model, *run.optimizer);  // applies nothing unless every read succeeds
      return std::string();
    } catch (const Error& e) {
      return std::string(e.what());
    }
  });
  require_consent_to_start_over(choice, run.checkpoint_dir, ap.flag("ignore-unreadable-checkpoints"),
                                "--ignore-unreadable-checkpoints");
  const bool resume = choice.resume_from.has_value();
  // Every rank resumes from the same step: the max of the steps and of their negatives agree only then.
  const double my_step = resume ? static_cast<double>(saved.step) : -1.0;
  double resumed_steps[2] = {my_step, -my_step};
  run.comm->host(parallel::Group::world).all_reduce(resumed_steps, 2, parallel::ReduceOp::max, "resume point");
  MOBA_CHECK(resumed_steps[0] == -resumed_steps[1],
             cat("the ranks could not agree on a checkpoint to resume from in ", run.checkpoint_dir,
                 " (some read one that others cannot)"),
             "check that every rank sees the same run directory (a shared filesystem)");
  if (!choice.unreadable.empty()) set_aside_unreadable(choice, run, mpi);
  if (resume) {
    const std::string& path = choice.resume_from->path;
    if (saved.recipe_yaml != recipe_yaml)
      warn("the recipe differs from the one saved in ", path, "; continuing with the new one");
    MOBA_CHECK(saved.seed == r.seed, cat(path, " was trained with seed ", saved.seed, ", the recipe says ", r.seed),
               "restore the seed, or use another run_dir to start afresh");
    MOBA_CHECK(saved.sampler.cursor % run.layout.data == 0,
               cat(path, " stopped at sequence ", saved.sampler.cursor, " of its epoch, which ", run.layout.data,
                   " data-parallel ranks cannot split evenly"),
               "resume on a number of data-parallel ranks that divides it (e.g. the run's earlier count)");
    state.step = saved.step;
    state.tokens_seen = saved.tokens_seen;
    run.sampler->restore({saved.sampler.epoch, saved.sampler.cursor / run.layout.data});
    info("resumed from ", path, " at step ", state.step);
  } else if (!r.init_from.empty()) {
    const std::string init = resolve_checkpoint(r.init_from, cat(r.source_path, ": init_from"));
    load_weights(init, *run.model, run.optimizer.get());
    info("initialised weights from ", init);
  } else {
    std::vector<float> host;
    model::initialize_parameters(run.model->layout(), c, static_cast<float>(r.model.init_std), r.seed, host);
    run.optimizer->set_master_from_host(host);
  }

  std::optional<MetricsLog> metrics;
  if (mpi.is_root()) {
    std::ofstream(fs::path(run.run_dir) / "recipe.yaml") << recipe_yaml;
    metrics.emplace(metrics_path(run), resume ? state.step : 0);
  }
  info("==== moba train: ", r.name, " (", r.source_path, ") ====");
  info(recipe_yaml);
  const model::ParameterLayout& layout = run.model->layout();
  info("model: ", c.n_layers, " layers, d_model ", c.d_model, ", heads ", c.n_heads, " (kv ", c.n_kv_heads, ", dim ",
       c.head_dim, "), ffn ", c.ffn_hidden, ", vocab ", c.vocab_size, ": ", format_count(layout.count()),
       " parameters (", format_count(layout.count_non_embedding()), " non-embedding)");
  info("ranks: ", run.layout.world_size, " = ", run.layout.data, " data x ", run.layout.context, " context; ZeRO ",
       r.parallel.zero, "; transport ", run.comm->transport());
  info("memory: ", cat(std::round(static_cast<double>(run.backend->allocated_bytes()) / (1 << 20) * 10) / 10),
       " MiB allocated on ", run.backend->name(), " by rank 0 (the plan: ",
       cat(std::round(static_cast<double>(planned) / (1 << 20) * 10) / 10), " MiB)");
  info("data: ", run.train_data->info().num_tokens, " train tokens in ", run.train_data->num_documents(),
       " documents; pack ", r.data.pack, "; ", run.sampler->sequences_per_epoch(), " sequences of ", r.data.seq_len,
       " per epoch per data-parallel rank");
  info("batch: ", r.train.global_batch_tokens, " tokens/step = ", run.layout.data, " rank(s) x ", run.accumulation,
       " micro-batches x ", r.train.micro_batch_seqs, " x ", r.data.seq_len, "; ", run.total_steps, " steps; backend ",
       run.backend->name(), "; run dir ", run.run_dir);

  if (state.step >= run.total_steps) {
    info("run already complete (step ", state.step, " of ", run.total_steps, ")");
    return 0;
  }
  install_stop_handlers();

  const double step_tokens = static_cast<double>(r.train.global_batch_tokens);
  auto next_boundary = [](double every, double seen) {
    return every > 0 ? (std::floor(seen / every) + 1) * every : INFINITY;
  };
  double next_eval = next_boundary(r.eval.every_tokens, state.tokens_seen);
  double next_checkpoint = next_boundary(r.checkpoint.every_tokens, state.tokens_seen);
  // The attention of the step before the first one run here: a phase switch is logged at its exact step and
  // token count even when a resume starts right on it.
  std::string previous_attention =
      state.step > 0 ? describe_attention(layer_attention(r.attention_at(state.tokens_seen - step_tokens), c)) : "";
  bool attention_announced = false;
  std::vector<data::Batch> micro(static_cast<size_t>(run.accumulation));
  std::vector<data::ContextShard> micro_shards(micro.size());  // this rank's rows under context parallelism
  std::vector<model::TokenBatch> micro_views(micro.size());
  auto t_start = std::chrono::steady_clock::now();
  const int64_t first_step = state.step;
  int64_t steps_now = 0;
  double last_val = NAN;
  parallel::MpiGroup& world = run.comm->host(parallel::Group::world);

  auto write_checkpoint = [&]() {
    state.sampler = run.sampler->state();
    state.sampler.cursor *= run.layout.data;  // global sequences of the epoch
    auto after_shards = [&]() {
      if (fault.kind == "save" && fault.step == state.step && fault.rank == run.layout.rank) std::raise(SIGKILL);
    };
    std::string path = save_checkpoint(run.checkpoint_dir, state, *run.model, *run.optimizer, run.comm.get(),
                                       r.checkpoint.keep, after_shards);
    info("checkpoint ", path);
  };
  auto run_validation = [&](const std::vector<AttentionParams>& attention) {
    if (!run.val_data) return;
    last_val = validation_loss(*run.model, *run.val_data, r, attention, *run.comm);
    info("validation | step ", state.step, " | tokens ", format_count(state.tokens_seen), " | val_loss ",
         cat(std::round(last_val * 1e4) / 1e4));
    if (metrics)
      metrics->write({{"step", cat(state.step)}, {"tokens", json_number(state.tokens_seen)},
                      {"val_loss", json_number(last_val)}});
  };

  while (state.step < run.total_steps) {
    AttentionSettings attention_now = r.attention_at(state.tokens_seen);
    std::vector<AttentionParams> attention = layer_attention(attention_now, c, r.train.deterministic);
    std::string desc = describe_attention(attention);
    if (desc != previous_attention || !attention_announced) {
      info("attention from step ", state.step, ": ", desc);
      if (metrics && !previous_attention.empty() && desc != previous_attention)
        metrics->write({{"step", cat(state.step)}, {"tokens", json_number(state.tokens_seen)},
                        {"attention", json_string(desc)}});
      previous_attention = desc;
      attention_announced = true;
    }
    auto t0 = std::chrono::steady_clock::now();
    for (size_t i = 0; i < micro.size(); ++i) {
      std::optional<data::Batch> next = run.sampler->next();
      MOBA_ASSERT(next.has_value());
      micro[i] = std::move(*next);
      micro_views[i] = local_batch(micro[i], run.layout.context, run.layout.context_rank, micro_shards[i]);
    }
    inject_fault(fault, state.step + 1, run.layout.rank, *run.model, *run.backend);
    const double lr = learning_rate(r.train, state.tokens_seen, step_tokens);
    const StepResult result = train_step(*run.model, *run.optimizer, run.comm.get(), micro_views, attention, lr,
                                         r.train.grad_clip, state.step);
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
                    format_count(state.tokens_seen).c_str(), result.loss, lr, result.grad_norm, tokens_per_s,
                    format_duration(eta).c_str());
      info(line);
    }
    if (metrics)
      metrics->write({{"step", cat(state.step)}, {"tokens", json_number(state.tokens_seen)},
                      {"loss", json_number(result.loss)}, {"lr", json_number(lr)},
                      {"grad_norm", json_number(result.grad_norm)},
                      {"tokens_per_s", json_number(std::round(tokens_per_s))}, {"eta_s", json_number(std::round(eta))}});

    const bool finished = state.step == run.total_steps;
    if (state.tokens_seen >= next_eval && !finished) {
      run_validation(attention);
      next_eval = next_boundary(r.eval.every_tokens, state.tokens_seen);
    }
    // A stop signal on any rank stops every rank after this same step.
    double signal = stop_signal();
    world.all_reduce(&signal, 1, parallel::ReduceOp::max, "stop request");
    const bool stop_now = (max_steps_now >= 0 && steps_now >= max_steps_now) || signal > 0;
    if (state.tokens_seen >= next_checkpoint || finished || stop_now) {
      write_checkpoint();
      next_checkpoint = next_boundary(r.checkpoint.every_tokens, state.tokens_seen);
    }
    if (finished) run_validation(attention);
    if (signal > 0 && !finished) {
      info("received ", signal_name(static_cast<int>(signal)), ": stopped after step ", state.step,
           " with a checkpoint; run the same command again to resume");
      return 0;
    }
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
