// Bandwidth as nccl-tests reports it (NVIDIA/nccl-tests, doc/PERFORMANCE.md): S bytes moved in t seconds give the
// algorithm bandwidth S / t; the bus bandwidth scales it by the share of the data each link must carry on n ranks,
// 2 (n - 1) / n for all-reduce and (n - 1) / n for reduce-scatter and all-gather (S is the whole buffer: n blocks).
#include "trainer/bench_comm.h"

#include <algorithm>
#include <memory>

#include "common/cli.h"
#include "common/log.h"
#include "kernels/backend.h"
#include "parallel/communicator.h"
#include "parallel/layout.h"
#include "parallel/mpi_context.h"
#include "trainer/bench_record.h"
#include "trainer/metrics.h"

namespace moba {
namespace {

using parallel::Group;

// "64K", "16M", "1G" or plain bytes -> bytes; throws a usage error naming the value.
int64_t parse_bytes(const std::string& text) {
  size_t used = 0;
  double value = 0;
  try {
    value = std::stod(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  const std::string suffix = text.substr(used);
  const double unit = suffix.empty() ? 1 : suffix == "K" ? 1 << 10 : suffix == "M" ? 1 << 20 : suffix == "G" ? 1 << 30 : 0;
  if (used == 0 || unit == 0 || !(value > 0)) {
    throw UsageError(cat("moba bench comm: --bytes: '", text, "' is not a size"),
                     "give sizes like 64K,16M,1G (binary units), comma-separated");
  }
  return static_cast<int64_t>(value * unit);
}

std::vector<std::string> split_commas(const std::string& text) {
  std::vector<std::string> parts;
  size_t begin = 0;
  while (begin <= text.size()) {
    const size_t end = std::min(text.find(',', begin), text.size());
    if (end > begin) parts.push_back(text.substr(begin, end - begin));
    begin = end + 1;
  }
  return parts;
}

// One collective at one size on the world group: `count` f32 values in the whole buffer (ranks x block for
// reduce-scatter and all-gather).
struct CommCase {
  std::string op;  // all_reduce | reduce_scatter | all_gather
  int64_t count;
};

// Runs the case once on values that make every element's expected result exact in f32, and throws if any
// element differs: a wrong sum is a broken transport, not a slow one.
void check_case(Backend& be, parallel::Communicator& comm, const CommCase& c, Tensor whole, Tensor block) {
  const int n = comm.size(Group::world), rank = comm.rank(Group::world);
  const int64_t per_rank = c.count / n;
  std::vector<float> host(static_cast<size_t>(c.count));
  std::vector<float> expected;
  if (c.op == "all_reduce") {  // every rank holds rank + 1 -> n (n + 1) / 2 everywhere
    std::fill(host.begin(), host.end(), static_cast<float>(rank + 1));
    be.upload(whole, host.data());
    comm.all_reduce(whole, Group::world, "bench all-reduce check");
    expected.assign(host.size(), static_cast<float>(n * (n + 1) / 2));
  } else if (c.op == "reduce_scatter") {  // block b holds (rank + 1) (b + 1) -> this rank's block (b + 1) n (n + 1) / 2
    for (int64_t i = 0; i < c.count; ++i) host[static_cast<size_t>(i)] = static_cast<float>((rank + 1) * (i / per_rank + 1));
    be.upload(whole, host.data());
    comm.reduce_scatter(whole, block, Group::world, "bench reduce-scatter check");
    expected.assign(static_cast<size_t>(per_rank), static_cast<float>((rank + 1) * n * (n + 1) / 2));
  } else {  // all_gather: each rank's block holds rank + 1 -> block b of the result is b + 1
    std::vector<float> mine(static_cast<size_t>(per_rank), static_cast<float>(rank + 1));
    be.upload(block, mine.data());
    comm.all_gather(block, whole, Group::world, "bench all-gather check");
    expected.resize(host.size());
    for (int64_t i = 0; i < c.count; ++i) expected[static_cast<size_t>(i)] = static_cast<float>(i / per_rank + 1);
  }
  comm.wait_all();
  be.synchronize();
  std::vector<float> got(expected.size());
  be.download(got.data(), c.op == "reduce_scatter" ? block : whole);
  for (size_t i = 0; i < got.size(); ++i) {
    MOBA_CHECK(got[i] == expected[i],
               cat("[rank ", rank, "] bench comm: ", c.op, " of ", c.count * 4, " bytes gave ", got[i], " at element ", i,
                   " where ", expected[i], " was expected"),
               "the transport returns wrong data: try parallel.transport=mpi to compare, and NCCL_DEBUG=WARN");
  }
}

}  // namespace

int bench_comm(const std::vector<std::string>& args, parallel::MpiContext& mpi) {
  ArgParser ap("bench comm",
               "Times the collectives training uses on the world group (under mpirun: one process per GPU with NCCL, "
               "or any number with MPI); each is checked once for exact results first.");
  ap.add_option("backend", "NAME", "cuda | cpu (where the tensors live)", "cuda");
  ap.add_option("transport", "T", "auto | nccl | mpi (as parallel.transport)", "auto");
  ap.add_option("op", "OP", "all_reduce | reduce_scatter | all_gather | all", "all");
  ap.add_option("bytes", "LIST", "buffer sizes, comma-separated (K, M, G binary units)", "1M,16M,256M");
  ap.add_option("warmup", "W", "untimed runs first", "3");
  ap.add_option("iters", "N", "timed runs (the median is reported)", "10");
  ap.add_option("timeout-s", "S", "deadline of each collective (as parallel.timeout_s)", "120");
  ap.add_option("out", "FILE", "also append the JSON lines to FILE (e.g. bench/results/comm.jsonl)");
  if (!ap.parse(args)) return 0;
  const std::string backend_name = ap.get_choice("backend", {"cuda", "cpu"});
  const std::string op = ap.get_choice("op", {"all_reduce", "reduce_scatter", "all_gather", "all"});
  const int warmup = static_cast<int>(ap.get_int("warmup", 0, 1000000));
  const int iters = static_cast<int>(ap.get_int("iters", 1, 1000000));
  const double timeout_s = ap.get_double("timeout-s", 1, 1e6);
  const int n = mpi.world_size();

  std::vector<CommCase> cases;
  for (const std::string& size : split_commas(ap.get("bytes"))) {
    // Whole f32 values, divisible into one block per rank.
    const int64_t count = std::max<int64_t>(n, parse_bytes(size) / 4 / n * n);
    for (const std::string& o : std::vector<std::string>{"all_reduce", "reduce_scatter", "all_gather"})
      if (op == "all" || op == o) cases.push_back({o, count});
  }
  ap.check(!cases.empty(), "--bytes lists no size", "e.g. --bytes 1M,16M,256M");

  const Device device = backend_name == "cuda" ? Device::cuda : Device::cpu;
  const int gpus = device == Device::cuda ? gpu_count() : 0;
  const parallel::Transport transport =
      parallel::resolve_transport(ap.get("transport"), device, mpi.local_size(), gpus, "--transport");
  std::unique_ptr<Backend> be = make_backend(backend_name, gpus > 0 ? mpi.local_rank() % gpus : 0);
  const parallel::ParallelLayout layout = parallel::make_layout(n, mpi.rank(), 1, 0, "moba bench comm");
  parallel::Communicator comm(mpi, layout, *be, transport, timeout_s);

  for (const CommCase& c : cases) {
    Tensor whole = be->allocate(DType::f32, {c.count});
    Tensor block = whole.slice_rows(c.count / n * comm.rank(Group::world), c.count / n);
    check_case(*be, comm, c, whole, block);
    be->zero(whole);  // timed on zeros: repeated in-place sums stay finite
    auto run = [&]() {
      if (c.op == "all_reduce") comm.all_reduce(whole, Group::world, "bench all-reduce");
      else if (c.op == "reduce_scatter") comm.reduce_scatter(whole, block, Group::world, "bench reduce-scatter");
      else comm.all_gather(block, whole, Group::world, "bench all-gather");
      comm.wait_all();
    };
    const double ms = median(be->time_ms(run, warmup, iters));
    const double bytes = static_cast<double>(c.count) * 4;
    const double algbw = bytes / (ms * 1e-3) / 1e9;
    const double share = c.op == "all_reduce" ? 2.0 * (n - 1) / n : static_cast<double>(n - 1) / n;
    if (mpi.is_root())
      emit({{"date", json_string(today())}, {"commit", json_string(git_commit())}, {"device", json_string(be->name())},
            {"command", json_string(command_line("comm", args))}, {"bench", json_string("comm")},
            {"op", json_string(c.op)}, {"bytes", cat(c.count * 4)}, {"ranks", cat(n)},
            {"transport", json_string(comm.transport())}, {"time_ms", json_number(ms)},
            {"algbw_gbps", json_number(algbw)}, {"busbw_gbps", json_number(algbw * share)},
            {"checked", "true"}, {"iters", cat(iters)}},
           ap.get("out"));
    be->release(whole);
  }
  return 0;
}

}  // namespace moba
