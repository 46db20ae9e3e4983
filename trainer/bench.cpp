#include "trainer/bench.h"

#include <algorithm>
#include <cmath>
#include <random>

#include "common/cli.h"
#include "common/log.h"
#include "kernels/backend.h"
#include "model/transformer.h"
#include "parallel/mpi_context.h"
#include "trainer/bench_comm.h"
#include "trainer/bench_record.h"
#include "trainer/metrics.h"
#include "trainer/optimizer.h"
#include "trainer/recipe.h"
#include "trainer/schedule.h"
#include "trainer/setup.h"
#include "trainer/train_step.h"
#include "parallel/communicator.h"
#include "parallel/context_exchange.h"

namespace moba {
namespace {

// Fills a tensor with uniform(-1, 1) values (through an f32 staging tensor when the dtype is lower).
void fill_random(Backend& be, Tensor t, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<float> host(static_cast<size_t>(t.numel()));
  for (float& x : host) x = dist(rng);
  if (t.dtype == DType::f32) {
    be.upload(t, host.data());
    return;
  }
  Tensor staging = be.allocate(DType::f32, {t.numel()});
  be.upload(staging, host.data());
  be.convert(t.reshape({t.numel()}), staging);
  be.synchronize();
  be.release(staging);
}

int bench_attention(const std::vector<std::string>& args) {
  ArgParser ap("bench attention", "Times one attention layer, forward and forward+backward (bf16 on the GPU).");
  ap.add_option("mode", "MODE", "full | moba", "full");
  ap.add_option("seq", "N", "tokens (one segment)", "8192");
  ap.add_option("heads", "H", "query heads", "16");
  ap.add_option("kv-heads", "G", "key/value heads (default: heads)");
  ap.add_option("head-dim", "D", "head dimension", "128");
  ap.add_option("block", "B", "MoBA block size", "512");
  ap.add_option("topk", "K", "MoBA top-k (counts the current block)", "3");
  ap.add_option("backend", "NAME", "cuda | cpu", "cuda");
  ap.add_option("warmup", "W", "untimed runs first", "3");
  ap.add_option("reps", "R", "timed runs (the median is reported)", "10");
  ap.add_option("deterministic", "BOOL",
                "bitwise-reproducible backward: dQ without float atomics, MoBA's dispatch in canonical order", "false");
  ap.add_option("dkv-kernel", "K", "CUDA MoBA dK/dV kernel: auto | mma (mma.sync everywhere)", "auto");
  ap.add_option("entry-budget-mb", "MIB", "CUDA MoBA per-entry buffers per query chunk, MiB", "4096");
  ap.add_option("check-finite", "BOOL", "CUDA MoBA routing: synchronise and fail on a NaN/Inf query", "false");
  ap.add_option("out", "FILE", "also append the JSON line to FILE (e.g. bench/results/attention.jsonl)");
  if (!ap.parse(args)) return 0;
  const std::string mode = ap.get_choice("mode", {"full", "moba"});
  const int64_t N = ap.get_int("seq", 1, INT32_MAX);
  const int H = static_cast<int>(ap.get_int("heads", 1, 1024));
  const int Hkv = ap.has("kv-heads") ? static_cast<int>(ap.get_int("kv-heads", 1, H)) : H;
  const int D = static_cast<int>(ap.get_int("head-dim", 2, 1024));
  const int B = static_cast<int>(ap.get_int("block", 1, INT32_MAX)), K = static_cast<int>(ap.get_int("topk", 1, 65536));
  const int warmup = static_cast<int>(ap.get_int("warmup", 0, 1000000));
  const int reps = static_cast<int>(ap.get_int("reps", 1, 1000000));
  ap.check(H % Hkv == 0, cat("--kv-heads ", Hkv, " does not divide --heads ", H), "1 = MQA, heads = MHA");
  ap.check(D % 2 == 0, cat("--head-dim ", D, " is odd"), "RoPE pairs dimensions: use an even head dimension");
  AttentionKernelSettings settings;
  settings.moba_dkv_kernel = ap.get_choice("dkv-kernel", {"auto", "mma"}) == "mma"
                                 ? AttentionKernelSettings::MobaDkvKernel::mma_sync
                                 : AttentionKernelSettings::MobaDkvKernel::automatic;
  settings.entry_budget_bytes = ap.get_int("entry-budget-mb", 1, int64_t{1} << 40) << 20;
  settings.check_finite_queries = ap.get_choice("check-finite", {"true", "false"}) == "true";
  const bool deterministic = ap.get_choice("deterministic", {"true", "false"}) == "true";

  std::unique_ptr<Backend> be = make_backend(ap.get_choice("backend", {"cuda", "cpu"}));
  const DType A = be->activation_dtype();
  {  // q, out, dout, dq (N, H, D) and k, v, dk, dv (N, Hkv, D) in the activation dtype; lse; the routing
    const size_t n = static_cast<size_t>(N), bytes = dtype_size(A);
    MemoryPlan plan;
    plan.backend = {{"q, o, dO, dQ", 4 * n * H * D * bytes},
                    {"k, v, dK, dV", 4 * n * Hkv * D * bytes},
                    {"lse (f32)", n * H * 4},
                    {"selected blocks (i32)", mode == "moba" ? n * H * K * 4 : 0}};
    plan.host = {{"random values staged on the host (f32, one q-sized tensor)", n * H * D * 4}};
    check_memory_fits(cat("attention benchmark (", N, " tokens, ", H, " heads)"), plan, *be,
                      "lower --seq or --heads");
  }
  Tensor q = be->allocate(A, {N, H, D}), k = be->allocate(A, {N, Hkv, D}), v = be->allocate(A, {N, Hkv, D});
  Tensor out = be->allocate(A, {N, H, D}), dout = be->allocate(A, {N, H, D});
  Tensor dq = be->allocate(A, {N, H, D}), dk = be->allocate(A, {N, Hkv, D}), dv = be->allocate(A, {N, Hkv, D});
  Tensor lse = be->allocate(DType::f32, {N, H});
  Tensor selected = mode == "moba" ? be->allocate(DType::i32, {N, H, K}) : Tensor();
  Tensor cu = be->allocate(DType::i32, {2});
  const int32_t cu_host[2] = {0, static_cast<int32_t>(N)};
  be->upload(cu, cu_host);
  fill_random(*be, q, 1);
  fill_random(*be, k, 2);
  fill_random(*be, v, 3);
  fill_random(*be, dout, 4);

  AttentionParams p{mode == "moba" ? AttentionMode::moba : AttentionMode::full, B, K,
                    1.0f / std::sqrt(static_cast<float>(D))};
  p.deterministic = deterministic;
  AttentionScratchShape largest;
  largest.max_queries = largest.max_keys = N;
  largest.n_heads = H;
  largest.n_kv_heads = Hkv;
  largest.head_dim = D;
  largest.min_block_size = B;
  largest.max_top_k = mode == "moba" ? K : 0;
  largest.settings = settings;
  model::AttentionLayer layer(*be, largest);
  AttentionCall call;
  call.q = q;
  call.k = k;
  call.v = v;
  call.cu_seqlens = cu;
  call.out = out;
  call.lse = lse;
  call.selected = selected;
  call.dout = dout;
  call.dq = dq;
  call.dk = dk;
  call.dv = dv;
  auto forward = [&]() { layer.forward(p, call); };
  auto backward = [&]() {  // on the outputs of the last forward
    be->zero(dq);
    be->zero(dk);
    be->zero(dv);
    layer.backward(p, call);
  };
  auto forward_backward = [&]() {
    forward();
    backward();
  };
  const double fwd_ms = median(be->time_ms(forward, warmup, reps));
  const double fwdbwd_ms = median(be->time_ms(forward_backward, warmup, reps));
  const double bwd_ms = median(be->time_ms(backward, warmup, reps));
  double routing_ms = 0;
  double pairs = 0;  // (query, key) pairs attended, over all heads
  if (p.mode == AttentionMode::moba) {
    AttentionParams reuse = p;
    reuse.reuse_routing = true;
    double attention_only = median(be->time_ms([&]() { layer.forward(reuse, call); }, warmup, reps));
    routing_ms = std::max(0.0, fwd_ms - attention_only);
    std::vector<int32_t> sel(static_cast<size_t>(N * H * K));
    be->download(sel.data(), selected);
    for (int64_t t = 0; t < N; ++t) {
      const int64_t current = t / B;
      for (int h = 0; h < H; ++h)
        for (int j = 0; j < K; ++j) {
          int32_t b = sel[static_cast<size_t>((t * H + h) * K + j)];
          if (b < 0) continue;
          pairs += b == current ? static_cast<double>(t - current * B + 1) : static_cast<double>(B);
        }
    }
  } else {
    pairs = static_cast<double>(H) * static_cast<double>(N) * static_cast<double>(N + 1) / 2.0;
  }
  const double fwd_flops = 4.0 * D * pairs, fwdbwd_flops = 3.5 * fwd_flops;  // backward = 2.5x forward
  std::vector<std::pair<std::string, std::string>> fields = {
      {"date", json_string(today())}, {"commit", json_string(git_commit())}, {"device", json_string(be->name())},
      {"command", json_string(command_line("attention", args))}, {"bench", json_string("attention")},
      {"mode", json_string(mode)}, {"seq", cat(N)}, {"heads", cat(H)}, {"kv_heads", cat(Hkv)}, {"head_dim", cat(D)},
      {"block", p.mode == AttentionMode::moba ? cat(B) : "null"}, {"topk", p.mode == AttentionMode::moba ? cat(K) : "null"},
      {"fwd_ms", json_number(fwd_ms)}, {"bwd_ms", json_number(bwd_ms)}, {"fwdbwd_ms", json_number(fwdbwd_ms)},
      {"routing_ms", p.mode == AttentionMode::moba ? json_number(routing_ms) : "null"},
      {"peak_gib", json_number(static_cast<double>(be->peak_bytes()) / (1 << 30))},
      {"useful_tflops", json_number(fwdbwd_flops / (fwdbwd_ms * 1e-3) / 1e12)},
      {"fwd_tflops", json_number(fwd_flops / (fwd_ms * 1e-3) / 1e12)}, {"attended_pairs", json_number(pairs)},
      {"reps", cat(reps)}};
  emit(fields, ap.get("out"));
  for (Tensor* t : {&q, &k, &v, &out, &dout, &dq, &dk, &dv, &lse, &cu}) be->release(*t);
  if (selected.data) be->release(selected);
  return 0;
}

int bench_train(const std::vector<std::string>& args, parallel::MpiContext& mpi) {
  ArgParser ap("bench train", "Times training steps of a recipe's model on random token ids (no dataset needed); "
                              "under mpirun, every rank runs data-parallel with the recipe's parallel settings.");
  ap.add_option("recipe", "R", "YAML recipe (model, attention, train, parallel sections are used)");
  ap.add_option("set", "KEY=VALUE", "override a recipe key", "", true);
  ap.add_option("warmup", "W", "untimed steps first", "2");
  ap.add_option("steps", "S", "timed steps (the median is reported)", "5");
  ap.add_option("profile-ops", "WHAT",
                "CUDA: per-op GPU times (CUDA events around every op, warm-up included) on stderr at the end: "
                "off | totals | calls (also every call in order)", "off");
  ap.add_option("out", "FILE", "also append the JSON line to FILE (e.g. bench/results/train.jsonl)");
  if (!ap.parse(args)) return 0;
  ap.check(ap.has("recipe"), "--recipe is required", ap.usage());
  const int warmup = static_cast<int>(ap.get_int("warmup", 0, 1000000));
  const int steps = static_cast<int>(ap.get_int("steps", 1, 1000000));
  const std::string profile = ap.get_choice("profile-ops", {"off", "totals", "calls"});
  Recipe r = load_recipe(ap.get("recipe"), ap.get_all("set"));
  MOBA_CHECK(r.model.vocab_size > 0, cat(r.source_path, ": bench train needs model.vocab_size > 0"),
             "set model.vocab_size (random token ids are drawn below it)");
  const parallel::ParallelLayout layout =
      parallel::make_layout(mpi.world_size(), mpi.rank(), r.parallel.context, r.parallel.data, r.source_path);
  check_context_parallel(r, layout.context);
  const int64_t T = r.data.seq_len, micro = r.train.micro_batch_seqs;
  const int64_t per_step = micro * T * layout.data;
  MOBA_CHECK(r.train.global_batch_tokens % per_step == 0 && r.train.global_batch_tokens >= per_step,
             cat(r.source_path, ": train.global_batch_tokens = ", r.train.global_batch_tokens,
                 " is not a positive multiple of micro_batch_seqs * seq_len * data-parallel ranks = ", per_step),
             cat("use a multiple of ", per_step));
  const int64_t accumulation = r.train.global_batch_tokens / per_step;
  const Device device = r.backend == "cuda" ? Device::cuda : Device::cpu;
  const int gpus = device == Device::cuda ? gpu_count() : 0;
  const parallel::Transport transport =
      parallel::resolve_transport(r.parallel.transport, device, mpi.local_size(), gpus, r.source_path);
  std::unique_ptr<Backend> be =
      make_backend(r.backend, gpus > 0 ? mpi.local_rank() % gpus : 0,
                   {profile == "calls" ? OpProfile::every_call : profile == "totals" ? OpProfile::totals : OpProfile::off,
                    r.train.deterministic});
  parallel::Communicator comm(mpi, layout, *be, transport, r.parallel.timeout_s);
  model::ModelConfig c = model_config_from(r, r.model.vocab_size);
  model::TransformerOptions model_options = transformer_options(r);
  model_options.parameter_shards = layout.data;
  model_options.context_size = layout.context;
  parallel::CommunicatorContextExchange exchange(comm);
  if (layout.context > 1) model_options.context = &exchange;
  check_memory_plan(r, c, micro * T / layout.context, model_options, *be, mpi.local_size());
  model::Transformer m(*be, c, micro * T / layout.context, model_options);
  AdamW opt(*be, m, r.train.optimizer, &comm, r.parallel.zero);
  {
    std::vector<float> host;
    model::initialize_parameters(m.layout(), c, static_cast<float>(r.model.init_std), r.seed, host);
    opt.set_master_from_host(host);
  }
  info("memory: ", be->allocated_bytes() >> 20, " MiB allocated on ", be->name(), " (rank 0) for ", m.layout().count(),
       " parameters and a micro-batch of ", micro, " x ", T, " tokens; ", layout.data, " data-parallel rank(s), ZeRO ",
       r.parallel.zero, ", transport ", comm.transport());

  // Random token ids, one document per sequence, different on every data-parallel rank (the ranks of a
  // context-parallel group cut the same sequences).
  std::mt19937_64 rng(r.seed + static_cast<uint64_t>(layout.data_rank));
  data::Batch whole;
  whole.batch_seqs = static_cast<int>(micro);
  whole.seq_len = T;
  for (int64_t i = 0; i < micro * T; ++i) {
    whole.inputs.push_back(static_cast<int32_t>(rng() % static_cast<uint64_t>(c.vocab_size)));
    whole.targets.push_back(static_cast<int32_t>(rng() % static_cast<uint64_t>(c.vocab_size)));
    whole.loss_mask.push_back(1);
    whole.positions.push_back(static_cast<int32_t>(i % T));
  }
  for (int64_t s = 0; s <= micro; ++s) whole.cu_seqlens.push_back(static_cast<int32_t>(s * T));
  whole.valid_len.assign(static_cast<size_t>(micro), static_cast<int32_t>(T));
  data::ContextShard shard;
  const model::TokenBatch batch = local_batch(whole, layout.context, layout.context_rank, shard);
  const std::vector<model::TokenBatch> micro_batches(static_cast<size_t>(accumulation), batch);
  std::vector<AttentionParams> attention = layer_attention(r.attention, c, r.train.deterministic);
  double loss = 0;
  int64_t step_index = 0;
  auto step = [&]() {
    loss = train_step(m, opt, &comm, micro_batches, attention, r.train.optimizer.lr, r.train.grad_clip, step_index++)
               .loss;
  };
  std::vector<double> ms = be->time_ms(step, warmup, steps);
  const double step_ms = median(ms);
  const double tokens_per_s = static_cast<double>(r.train.global_batch_tokens) / (step_ms * 1e-3);
  // MFU as in ../shared/docs/anchors.md: tokens/s * (6 N_nonembedding + 6 L d S) / 989e12 per GPU (dense attention
  // FLOPs, counted the same way for MoBA so the numbers compare with the dense PyTorch anchor).
  const double flops_per_token = 6.0 * static_cast<double>(m.layout().count_non_embedding()) +
                                 6.0 * c.n_layers * c.d_model * static_cast<double>(T);
  const double mfu = tokens_per_s * flops_per_token / 989e12 / layout.world_size;
  bool any_moba = false, any_full = false;
  for (const AttentionParams& p : attention) (p.mode == AttentionMode::moba ? any_moba : any_full) = true;
  std::string kind = any_moba && any_full ? "hybrid" : any_moba ? "moba" : "full";
  if (mpi.is_root())
    emit({{"date", json_string(today())}, {"commit", json_string(git_commit())}, {"device", json_string(be->name())},
          {"command", json_string(command_line("train", args))}, {"bench", json_string("train")},
          {"recipe", json_string(r.source_path)}, {"attention", json_string(kind)}, {"seq", cat(T)},
          {"micro_batch_seqs", cat(micro)}, {"global_batch_tokens", cat(r.train.global_batch_tokens)},
          {"ranks", cat(layout.world_size)}, {"context", cat(layout.context)}, {"zero", cat(r.parallel.zero)},
          {"transport", json_string(comm.transport())},
          {"step_ms", json_number(step_ms)}, {"tokens_per_s", json_number(std::round(tokens_per_s))},
          {"mfu", json_number(mfu)}, {"peak_gib", json_number(static_cast<double>(be->peak_bytes()) / (1 << 30))},
          {"recompute", json_string(r.train.recompute)},
          {"deterministic", r.train.deterministic ? "true" : "false"}, {"loss", json_number(loss)},
          {"steps", ap.get("steps")}},
         ap.get("out"));
  return 0;
}

}  // namespace

int bench_command(const std::vector<std::string>& args, parallel::MpiContext& mpi) {
  const char* usage =
      "usage: moba bench attention [options] | moba bench train --recipe R [options] | moba bench comm [options] "
      "(--help for each)";
  if (args.empty()) throw UsageError("moba bench: missing what to benchmark", usage);
  std::vector<std::string> rest(args.begin() + 1, args.end());
  if (args[0] == "attention") return bench_attention(rest);
  if (args[0] == "train") return bench_train(rest, mpi);
  if (args[0] == "comm") return bench_comm(rest, mpi);
  if (args[0] == "--help" || args[0] == "-h") {
    info(usage);
    return 0;
  }
  throw UsageError(cat("moba bench: unknown benchmark '", args[0], "'"), usage);
}

}  // namespace moba
