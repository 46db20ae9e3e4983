#include "trainer/eval.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>

#include "common/cli.h"
#include "common/log.h"
#include "data/dataset.h"
#include "data/sampler.h"
#include "parallel/communicator.h"
#include "parallel/context_exchange.h"
#include "parallel/mpi_context.h"
#include "trainer/checkpoint.h"
#include "trainer/metrics.h"
#include "trainer/setup.h"

namespace fs = std::filesystem;

namespace moba {

namespace {

// What one `moba eval` call asks of every checkpoint it evaluates.
struct EvalRequest {
  std::string data;                  // the dataset's path
  int64_t seq_len = 0;               // N
  std::optional<int64_t> bucket, trailing;  // unset: the checkpoint's recipe eval.* (at most N)
  std::string mode = "as-trained";   // full | moba | as-trained
  std::optional<int> block_size, top_k;
  int batch_seqs = 1;
  int context = 1;                   // context-parallel ranks per sequence
  int64_t max_docs = -1;
  std::string out;                   // empty: <run dir>/eval
};

void evaluate_checkpoint(const std::string& ckpt, const EvalRequest& q, const data::TokenDataset& dataset,
                         parallel::MpiContext& mpi) {
  const int64_t N = q.seq_len;
  const int batch_seqs = q.batch_seqs;
  const int64_t max_docs = q.max_docs;
  CheckpointState saved = read_checkpoint_state(ckpt);
  Recipe r = parse_recipe_text(saved.recipe_yaml, ckpt + " (saved recipe)");
  const int64_t bucket = q.bucket.value_or(std::min(N, r.eval.position_bucket));
  const int64_t trailing = q.trailing.value_or(std::min(N, r.eval.trailing));

  model::ModelConfig c = model_config_from(r, 0);
  MOBA_CHECK(dataset.info().vocab_size <= c.vocab_size,
             cat(q.data, " has vocabulary ", dataset.info().vocab_size, " but ", ckpt, " was trained with ",
                 c.vocab_size),
             "evaluate on data prepared with the model's tokenizer");

  AttentionSettings attention = r.attention_at(saved.tokens_seen);
  if (q.mode == "full" || q.mode == "moba") {
    attention.mode = q.mode == "moba" ? AttentionMode::moba : AttentionMode::full;
    attention.full_layers = LayerSelection{};
  }
  if (q.block_size) attention.moba.block_size = *q.block_size;
  if (q.top_k) attention.moba.top_k = *q.top_k;
  std::vector<AttentionParams> layers = layer_attention(attention, c);

  // Context parallelism: each sequence's zigzag chunks over `context` ranks, data parallelism over the rest.
  const parallel::ParallelLayout layout = parallel::make_layout(
      mpi.world_size(), mpi.rank(), q.context, 0, "moba eval --context");
  {
    Recipe as_evaluated = r;
    as_evaluated.data.seq_len = N;
    as_evaluated.attention = attention;
    as_evaluated.phases.clear();
    check_context_parallel(as_evaluated, layout.context);
  }
  const Device device = r.backend == "cuda" ? Device::cuda : Device::cpu;
  const int gpus = device == Device::cuda ? gpu_count() : 0;
  std::unique_ptr<Backend> backend = make_backend(r.backend, gpus > 0 ? mpi.local_rank() % gpus : 0);
  parallel::Communicator comm(
      mpi, layout, *backend,
      parallel::resolve_transport(r.parallel.transport, device, mpi.local_size(), gpus, "moba eval"),
      r.parallel.timeout_s);
  parallel::CommunicatorContextExchange exchange(comm);
  model::TransformerOptions options;
  options.max_top_k = attention.moba.top_k;
  options.min_block_size = attention.moba.block_size;
  options.context_size = layout.context;
  options.context = layout.context > 1 ? &exchange : nullptr;
  const int64_t tokens = static_cast<int64_t>(batch_seqs) * N / layout.context;  // this rank's rows per pass
  MemoryPlan plan;
  plan.backend = model::Transformer::memory_plan(c, tokens, options, *backend);
  const size_t batch_tokens = static_cast<size_t>(batch_seqs) * static_cast<size_t>(N);
  plan.host = {{"checkpoint weights read on the host (f32)", 4 * static_cast<size_t>(model::ParameterLayout(c, 1).total())},
               {"batch: inputs, targets, positions, loss mask, per-token losses", 17 * batch_tokens},
               {"position-wise loss sums and counts (f64, 2 x seq-len)", 16 * static_cast<size_t>(N)}};
  check_memory_fits(cat("evaluation (", batch_seqs, " x ", N, " tokens per forward pass", layout.context > 1 ?
                        cat(", ", tokens, " rows on each of ", layout.context, " context ranks") : std::string(), ")"),
                    plan, *backend, cat("lower --seq-len (", N, ") or --batch-seqs (", batch_seqs, ")",
                                        layout.context > 1 ? std::string() : ", or raise --context"),
                    mpi.local_size());
  model::Transformer model(*backend, c, tokens, options);
  load_weights(ckpt, model, nullptr);

  data::SamplerConfig sc;
  sc.seq_len = N;
  sc.batch_seqs = batch_seqs;
  sc.pack = data::PackMode::long_documents;
  sc.shuffle = false;
  sc.single_pass = true;
  sc.use_loss_mask = r.data.sft && dataset.info().has_loss_mask;
  sc.shard_index = layout.data_rank;  // the ranks of a context-parallel group share their sequences
  sc.shard_count = layout.data;
  data::Sampler sampler(dataset, sc);

  // Accumulators (summed over ranks at the end): per position over full-length sequences, and overall.
  std::vector<double> pos_sum(static_cast<size_t>(N), 0.0), pos_count(static_cast<size_t>(N), 0.0);
  double totals[4] = {0, 0, 0, 0};  // loss sum, token count, full-length sequences, sequences
  int64_t docs = 0;
  data::ContextShard shard;
  info("evaluating ", ckpt, " (step ", saved.step, ") on ", q.data, ": seq_len ", N, ", bucket ", bucket,
       ", attention ", describe_attention(layers));
  while (max_docs < 0 || docs < max_docs) {
    std::optional<data::Batch> batch = sampler.next();
    if (!batch) break;
    const model::TokenBatch local = local_batch(*batch, layout.context, layout.context_rank, shard);
    model.forward(local, layers);
    std::vector<float> losses = model.token_losses();
    for (int s = 0; s < batch->batch_seqs; ++s) {
      if (batch->valid_len[static_cast<size_t>(s)] <= 0) continue;
      ++docs;
      if (layout.context_rank != 0) continue;  // every rank of the group sees the sequence: count it once
      totals[3] += 1;
      if (batch->valid_len[static_cast<size_t>(s)] == N) totals[2] += 1;
    }
    // This rank's rows, binned at their positions in the whole sequence.
    for (int64_t i = 0; i < local.num_tokens; ++i) {
      const int64_t row = local.global_rows ? local.global_rows[i] : i;
      const int64_t s = row / N, t = row % N, valid = batch->valid_len[static_cast<size_t>(s)];
      if (t >= valid || !local.loss_mask[i]) continue;
      totals[0] += losses[static_cast<size_t>(i)];
      totals[1] += 1;
      if (valid == N) {
        pos_sum[static_cast<size_t>(t)] += losses[static_cast<size_t>(i)];
        pos_count[static_cast<size_t>(t)] += 1;
      }
    }
  }
  mpi.world().all_reduce(pos_sum.data(), N, parallel::ReduceOp::sum, "position-wise loss");
  mpi.world().all_reduce(pos_count.data(), N, parallel::ReduceOp::sum, "position-wise counts");
  mpi.world().all_reduce(totals, 4, parallel::ReduceOp::sum, "evaluation totals");
  MOBA_CHECK(totals[1] > 0, cat(q.data, " yields no evaluation tokens"), "check the dataset");

  const int64_t n_buckets = (N + bucket - 1) / bucket;
  std::vector<double> bucket_loss(static_cast<size_t>(n_buckets), NAN);
  for (int64_t b = 0; b < n_buckets; ++b) {
    double s = 0, n = 0;
    for (int64_t t = b * bucket; t < std::min(N, (b + 1) * bucket); ++t) s += pos_sum[t], n += pos_count[t];
    if (n > 0) bucket_loss[static_cast<size_t>(b)] = s / n;
  }
  double trail_s = 0, trail_n = 0;
  for (int64_t t = N - trailing; t < N; ++t) trail_s += pos_sum[t], trail_n += pos_count[t];
  const double mean_loss = totals[0] / totals[1];
  const double trailing_loss = trail_n > 0 ? trail_s / trail_n : NAN;
  if (totals[2] == 0)
    warn("no document reaches ", N, " tokens: position-wise and trailing losses are empty; lower --seq-len");

  if (mpi.is_root()) {
    fs::path out = q.out.empty() ? fs::path(r.run_dir) / "eval" : fs::path(q.out);
    fs::create_directories(out);
    std::string stem = cat("eval_", r.name, "_step", saved.step, "_", q.mode, "_N", N);
    std::ofstream csv(out / (stem + ".csv"));
    csv << "bucket_start,bucket_end,loss,tokens\n";
    for (int64_t b = 0; b < n_buckets; ++b) {
      double n = 0;
      for (int64_t t = b * bucket; t < std::min(N, (b + 1) * bucket); ++t) n += pos_count[t];
      csv << b * bucket << "," << std::min(N, (b + 1) * bucket) << "," << json_number(bucket_loss[b]) << "," << n << "\n";
    }
    std::string buckets = "[";
    for (int64_t b = 0; b < n_buckets; ++b) buckets += (b ? ", " : "") + json_number(bucket_loss[b]);
    buckets += "]";
    std::ofstream json(out / (stem + ".json"));
    json << "{" << json_string("name") << ": " << json_string(r.name) << ", " << json_string("checkpoint") << ": "
         << json_string(ckpt) << ", " << json_string("step") << ": " << saved.step << ", "
         << json_string("tokens_seen") << ": " << json_number(saved.tokens_seen) << ", " << json_string("data")
         << ": " << json_string(q.data) << ", "
         << json_string("attention") << ": " << json_string(describe_attention(layers)) << ", "
         << json_string("seq_len") << ": " << N << ", " << json_string("bucket") << ": " << bucket << ", "
         << json_string("trailing") << ": " << trailing << ", " << json_string("mean_loss") << ": "
         << json_number(mean_loss) << ", " << json_string("trailing_loss") << ": " << json_number(trailing_loss)
         << ", " << json_string("sequences") << ": " << totals[3] << ", " << json_string("full_length_sequences")
         << ": " << totals[2] << ", " << json_string("tokens") << ": " << totals[1] << ", "
         << json_string("position_loss") << ": " << buckets << "}\n";
    info("mean_loss ", mean_loss, " over ", static_cast<int64_t>(totals[1]), " tokens of ",
         static_cast<int64_t>(totals[3]), " documents; trailing_loss [", N - trailing, ", ", N, ") ", trailing_loss,
         " over ", static_cast<int64_t>(totals[2]), " documents reaching ", N);
    for (int64_t b = 0; b < n_buckets; ++b)
      info(cat("  positions [", b * bucket, ", ", std::min(N, (b + 1) * bucket), "): ", bucket_loss[b]));
    info("wrote ", (out / (stem + ".json")).string(), " and ", (out / (stem + ".csv")).string());
  }
}

}  // namespace

int eval_command(const std::vector<std::string>& args, parallel::MpiContext& mpi) {
  ArgParser ap("eval",
               "Evaluates checkpoints on long documents: mean, position-wise and trailing LM loss (one JSON + CSV "
               "per checkpoint, named eval_<run name>_step<S>_<attention>_N<N>).");
  ap.add_option("checkpoint", "PATH",
                "checkpoint (a step_N/ directory or step_N.h5 file) or a run directory (its newest checkpoint); repeat "
                "to evaluate several",
                "", true);
  ap.add_option("data", "PATH", "tokenized dataset (HDF5 from moba prep), e.g. the validation split");
  ap.add_option("seq-len", "N", "evaluation length N: each document's first N tokens", "4096");
  ap.add_option("bucket", "B", "position bucket width (default: the recipe's eval.position_bucket, at most N)");
  ap.add_option("trailing", "T", "trailing loss over positions [N - T, N) (default: the recipe's eval.trailing, at most N)");
  ap.add_option("attention", "MODE", "full | moba | as-trained (the attention in force at the checkpoint)", "as-trained");
  ap.add_option("block-size", "B", "override the MoBA block size (with --attention moba)");
  ap.add_option("top-k", "K", "override the MoBA top_k (with --attention moba)");
  ap.add_option("batch-seqs", "S", "sequences per forward pass", "1");
  ap.add_option("context", "C", "context-parallel ranks per sequence (under mpirun, a divisor of the world size): "
                "sequences too long for one GPU", "1");
  ap.add_option("max-docs", "M", "evaluate at most M documents (default: all)");
  ap.add_option("out", "DIR", "where to write eval JSON/CSV", "<run dir>/eval");
  if (!ap.parse(args)) return 0;
  ap.check(ap.has("checkpoint") && ap.has("data"), "--checkpoint and --data are required", ap.usage());

  // Every option is checked before anything is read.
  EvalRequest q;
  q.data = ap.get("data");
  q.seq_len = ap.get_int("seq-len", 2, INT32_MAX);
  q.batch_seqs = static_cast<int>(ap.get_int("batch-seqs", 1, INT32_MAX));
  ap.check(q.batch_seqs * q.seq_len <= INT32_MAX,
           cat("--batch-seqs ", q.batch_seqs, " x --seq-len ", q.seq_len, " is more than ", INT32_MAX,
               " tokens per forward pass"),
           "lower --batch-seqs");
  if (ap.has("bucket")) q.bucket = ap.get_int("bucket", 1, q.seq_len);
  if (ap.has("trailing")) q.trailing = ap.get_int("trailing", 1, q.seq_len);
  q.mode = ap.get_choice("attention", {"full", "moba", "as-trained"});
  if (ap.has("block-size")) q.block_size = static_cast<int>(ap.get_int("block-size", 1, INT32_MAX));
  if (ap.has("top-k")) q.top_k = static_cast<int>(ap.get_int("top-k", 1, INT32_MAX));
  q.context = static_cast<int>(ap.get_int("context", 1, INT32_MAX));
  q.max_docs = ap.has("max-docs") ? ap.get_int("max-docs", 1, std::numeric_limits<int64_t>::max()) : -1;
  if (ap.has("out")) q.out = ap.get("out");

  // Resolve every checkpoint first, so a typo in the last one fails before the first is evaluated.
  std::vector<std::string> checkpoints;
  for (const std::string& given : ap.get_all("checkpoint")) checkpoints.push_back(resolve_checkpoint(given, "moba eval"));
  const data::TokenDataset dataset = data::TokenDataset::open(q.data);
  // A document reaches N when it has N + 1 tokens (N inputs, each with its next token as target).
  int64_t longest = 0;
  for (int64_t d = 0; d < dataset.num_documents(); ++d) longest = std::max(longest, dataset.doc_length(d) - 1);
  MOBA_CHECK(longest >= q.seq_len,
             cat(q.data, ": no document reaches --seq-len ", q.seq_len, " tokens (the longest gives ", longest,
                 "), so the position-wise and trailing losses would be empty"),
             cat("use --seq-len ", longest, " or less, or data with longer documents"));
  for (const std::string& ckpt : checkpoints) evaluate_checkpoint(ckpt, q, dataset, mpi);
  return 0;
}

}  // namespace moba
