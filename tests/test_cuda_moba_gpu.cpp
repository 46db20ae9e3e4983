// Properties of the CUDA MoBA launchers that the op-test harness (test_attention_ops_gpu.cpp) does not see, checked
// on the launchers directly with a stream of our own: the layer (routing, forward, backward) captures into a CUDA
// graph whose replays give the eager results bit for bit; the deterministic backward (dq, dk, dv; MoBA and the
// dense flash kernels) is bitwise reproducible and equals the atomic path up to rounding; query chunks (a small entry
// budget) give the one-chunk forward and deterministic gradients bit for bit; a NaN/Inf query routes to its current block, or throws with check_finite_queries; and
// `moba check-vectors --backend cuda` passes on the pinned vectors.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "kernels/bf16.h"
#include "kernels/cuda/attention.h"
#include "tests/support/test_util.h"

namespace moba {
namespace {

struct DeviceBuffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  explicit DeviceBuffer(size_t n) : bytes(n) { EXPECT_EQ(cudaMalloc(&ptr, n ? n : 16), cudaSuccess); }
  ~DeviceBuffer() { cudaFree(ptr); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  template <typename T> T* as() const { return static_cast<T*>(ptr); }
};

// A context of our own (the backend's is private): its own stream.
struct OwnContext {
  cuda::CudaContext ctx;
  OwnContext() {
    cudaStreamCreateWithFlags(&ctx.stream, cudaStreamNonBlocking);
    cudaDeviceGetAttribute(&ctx.sm_count, cudaDevAttrMultiProcessorCount, 0);
  }
  ~OwnContext() {
    cudaStreamSynchronize(ctx.stream);
    for (void* p : ctx.scratch_ptr) cudaFree(p);
    cudaStreamDestroy(ctx.stream);
  }
};

struct MobaCase {
  std::vector<int32_t> cu_seqlens;
  int H, Hkv, D, B, top_k;
  bool full = false;  // the dense causal kernels (flash_attention_*) instead of MoBA
  int64_t tokens() const { return cu_seqlens.back(); }
};

// Routing, forward and one backward (gradients into zeros), as bf16 bits.
struct DirectRun {
  std::vector<uint16_t> out, dq, dk, dv;
  std::vector<float> lse;
};

// The device buffers of one layer call, filled with bf16-valued random inputs; launch() enqueues the zeroing of the
// gradients, routing, forward and backward on own's stream without synchronising (so it can be captured).
class DirectLayer {
 public:
  DirectLayer(const MobaCase& c, uint64_t seed, const AttentionKernelSettings& settings) : c_(c) {
    const int64_t N = c.tokens();
    nq_ = static_cast<size_t>(N * c.H * c.D);
    nk_ = static_cast<size_t>(N * c.Hkv * c.D);
    auto buffer = [&](size_t bytes) {
      owned_.push_back(std::make_unique<DeviceBuffer>(bytes));
      return owned_.back().get();
    };
    auto upload = [&](size_t n, uint64_t s) {
      std::vector<float> x = test::random_vector(n, s);
      DeviceBuffer* b = buffer(n * 2);
      EXPECT_EQ(cudaMemcpy(b->ptr, to_bf16(x).data(), n * 2, cudaMemcpyHostToDevice), cudaSuccess);
      return b->as<cuda::bf16>();
    };
    a_.n_queries = a_.n_keys = N;
    a_.n_heads = c.H;
    a_.n_kv_heads = c.Hkv;
    a_.head_dim = c.D;
    a_.q = upload(nq_, seed);
    a_.k = upload(nk_, seed + 1);
    a_.v = upload(nk_, seed + 2);
    a_.dout = upload(nq_, seed + 3);
    DeviceBuffer* cu = buffer(c.cu_seqlens.size() * 4);
    EXPECT_EQ(cudaMemcpy(cu->ptr, c.cu_seqlens.data(), c.cu_seqlens.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
    a_.cu_seqlens = cu->as<int32_t>();
    a_.n_segments = static_cast<int>(c.cu_seqlens.size()) - 1;
    a_.block_size = c.B;
    a_.top_k = c.top_k;
    a_.selected = buffer(static_cast<size_t>(N * c.H * c.top_k) * 4)->as<int32_t>();
    a_.softmax_scale = 1.0f / std::sqrt(static_cast<float>(c.D));
    a_.out = buffer(nq_ * 2)->as<cuda::bf16>();
    a_.lse = buffer(static_cast<size_t>(N * c.H) * 4)->as<float>();
    a_.dq = buffer(nq_ * 2)->as<cuda::bf16>();
    a_.dk = buffer(nk_ * 2)->ptr;
    a_.dv = buffer(nk_ * 2)->ptr;
    a_.settings = settings;
    AttentionScratchShape shape;
    shape.max_queries = shape.max_keys = N;
    shape.n_heads = c.H;
    shape.n_kv_heads = c.Hkv;
    shape.head_dim = c.D;
    shape.min_block_size = c.B;
    shape.max_top_k = c.full ? 0 : c.top_k;
    shape.settings = settings;
    const AttentionScratchSizes z = cuda::attention_scratch_sizes(shape);
    auto scratch = [&](size_t bytes) { return cuda::ScratchBuffer{bytes ? buffer(bytes)->ptr : nullptr, bytes}; };
    a_.scratch = {scratch(z.row_stats), scratch(z.partials), scratch(z.block_means), scratch(z.dispatch),
                  scratch(z.chunk_dispatch), scratch(z.query_index)};
  }
  void launch(OwnContext& own) {
    cudaStream_t stream = own.ctx.stream;
    EXPECT_EQ(cudaMemsetAsync(a_.dq, 0, nq_ * 2, stream), cudaSuccess);
    EXPECT_EQ(cudaMemsetAsync(a_.dk, 0, nk_ * 2, stream), cudaSuccess);
    EXPECT_EQ(cudaMemsetAsync(a_.dv, 0, nk_ * 2, stream), cudaSuccess);
    if (c_.full) {
      cuda::flash_attention_forward(own.ctx, a_);
      cuda::flash_attention_backward(own.ctx, a_);
      return;
    }
    cuda::moba_select_blocks(own.ctx, a_);
    cuda::moba_attention_forward(own.ctx, a_);
    cuda::moba_attention_backward(own.ctx, a_);
  }
  // One channel of q at (row, head) set to `value` (NaN or Inf), and routing alone, for non-finite queries.
  void poison_query(int64_t row, int head, float value) {
    const uint16_t bits = bf16_bits(value);
    cuda::bf16* at = const_cast<cuda::bf16*>(a_.q) + (row * c_.H + head) * c_.D + c_.D / 2;
    EXPECT_EQ(cudaMemcpy(at, &bits, 2, cudaMemcpyHostToDevice), cudaSuccess);
  }
  void route(OwnContext& own) { cuda::moba_select_blocks(own.ctx, a_); }
  std::vector<int32_t> selected_row(int64_t row, int head) const {
    std::vector<int32_t> out(static_cast<size_t>(c_.top_k));
    EXPECT_EQ(cudaMemcpy(out.data(), a_.selected + (row * c_.H + head) * c_.top_k, out.size() * 4,
                         cudaMemcpyDeviceToHost),
              cudaSuccess);
    return out;
  }
  DirectRun read() const {
    DirectRun r;
    auto bits = [](std::vector<uint16_t>& dst, const void* src, size_t n) {
      dst.resize(n);
      EXPECT_EQ(cudaMemcpy(dst.data(), src, n * 2, cudaMemcpyDeviceToHost), cudaSuccess);
    };
    bits(r.out, a_.out, nq_);
    bits(r.dq, a_.dq, nq_);
    bits(r.dk, a_.dk, nk_);
    bits(r.dv, a_.dv, nk_);
    r.lse.resize(static_cast<size_t>(c_.tokens() * c_.H));
    EXPECT_EQ(cudaMemcpy(r.lse.data(), a_.lse, r.lse.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
    return r;
  }

 private:
  MobaCase c_;
  size_t nq_ = 0, nk_ = 0;
  cuda::AttentionArgs a_;
  std::vector<std::unique_ptr<DeviceBuffer>> owned_;
};

DirectRun run_direct(OwnContext& own, const MobaCase& c, uint64_t seed, const AttentionKernelSettings& settings) {
  DirectLayer layer(c, seed, settings);
  layer.launch(own);
  EXPECT_EQ(cudaStreamSynchronize(own.ctx.stream), cudaSuccess);
  return layer.read();
}

double rel(const std::vector<uint16_t>& got, const std::vector<uint16_t>& want) {
  const std::vector<float> g = from_bf16(got), w = from_bf16(want);
  return test::rel_l2(g.data(), w.data(), w.size());
}

AttentionKernelSettings deterministic_settings() {
  AttentionKernelSettings s;
  s.deterministic = true;
  return s;
}

// No host synchronisation inside the layer: zeroing, routing, forward and backward capture into one CUDA graph (a
// synchronising call would end the capture with an error), and replaying the graph twice gives the eager O, LSE and
// (deterministic) dQ, dK, dV bit for bit.
TEST(CudaMoba, LayerCapturesIntoACudaGraph) {
  MOBA_REQUIRE_GPU();
  const MobaCase c{{0, 1500, 1501, 3000}, 8, 2, 128, 128, 4};
  OwnContext own;
  const DirectRun eager = run_direct(own, c, 91, deterministic_settings());
  DirectLayer layer(c, 91, deterministic_settings());
  cudaGraph_t graph = nullptr;
  ASSERT_EQ(cudaStreamBeginCapture(own.ctx.stream, cudaStreamCaptureModeGlobal), cudaSuccess);
  layer.launch(own);
  ASSERT_EQ(cudaStreamEndCapture(own.ctx.stream, &graph), cudaSuccess) << "the layer synchronised during capture";
  cudaGraphExec_t exec = nullptr;
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  size_t nodes = 0;
  ASSERT_EQ(cudaGraphGetNodes(graph, nullptr, &nodes), cudaSuccess);
  std::printf("captured MoBA layer (routing, forward, backward): %zu graph nodes\n", nodes);
  for (int replay = 0; replay < 2; ++replay) {
    ASSERT_EQ(cudaGraphLaunch(exec, own.ctx.stream), cudaSuccess);
    ASSERT_EQ(cudaStreamSynchronize(own.ctx.stream), cudaSuccess);
    const DirectRun got = layer.read();
    EXPECT_EQ(got.out, eager.out) << "replay " << replay;
    EXPECT_EQ(got.lse, eager.lse) << "replay " << replay;
    EXPECT_EQ(got.dq, eager.dq) << "replay " << replay;
    // Deterministic: dK/dV sum a bucket's rows in the canonical dispatch order (the sort is captured too).
    EXPECT_EQ(got.dk, eager.dk) << "replay " << replay;
    EXPECT_EQ(got.dv, eager.dv) << "replay " << replay;
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
}

// The deterministic backward, MoBA (also in 64-row query chunks: a 1 MiB entry budget) and dense (the flash kernels
// with the ordered dQ pass), GQA, documents of uneven lengths: dq, dk, dv equal bit for bit over two runs, and the
// atomic path the backend uses by default computes the same gradients up to rounding.
TEST(CudaMoba, DeterministicBackwardIsBitwiseReproducible) {
  MOBA_REQUIRE_GPU();
  OwnContext own;
  AttentionKernelSettings chunked = deterministic_settings();
  chunked.entry_budget_bytes = int64_t{1} << 20;
  struct Case {
    const char* name;
    MobaCase c;
    AttentionKernelSettings settings;
  };
  const Case cases[] = {
      {"moba", {{0, 1500, 3000}, 8, 2, 128, 128, 4}, deterministic_settings()},
      {"moba, query chunks", {{0, 1500, 1501, 4000}, 8, 2, 128, 128, 4}, chunked},
      {"moba D=64", {{0, 700, 2100}, 4, 1, 64, 64, 3}, deterministic_settings()},
      {"full", {{0, 1500, 1501, 3000}, 8, 2, 128, 128, 1, true}, deterministic_settings()},
      {"full D=64", {{0, 1000, 2333}, 4, 2, 64, 64, 1, true}, deterministic_settings()},
  };
  for (const Case& t : cases) {
    SCOPED_TRACE(t.name);
    const DirectRun a = run_direct(own, t.c, 61, t.settings), b = run_direct(own, t.c, 61, t.settings),
                    atomic = run_direct(own, t.c, 61, {});
    EXPECT_EQ(a.out, b.out) << "the forward is not bitwise reproducible";
    EXPECT_EQ(a.dq, b.dq) << "dq differs between two deterministic backward passes";
    EXPECT_EQ(a.dk, b.dk) << "dk differs between two deterministic backward passes";
    EXPECT_EQ(a.dv, b.dv) << "dv differs between two deterministic backward passes";
    size_t nonzero = 0;
    for (uint16_t x : a.dq) nonzero += (x & 0x7FFF) != 0;
    EXPECT_GT(nonzero, a.dq.size() / 2);
    const char* names[] = {"dq", "dk", "dv"};
    const std::vector<uint16_t>* det[] = {&a.dq, &a.dk, &a.dv};
    const std::vector<uint16_t>* atom[] = {&atomic.dq, &atomic.dk, &atomic.dv};
    for (int i = 0; i < 3; ++i) {
      const double e = rel(*atom[i], *det[i]);
      std::printf("%s: deterministic vs atomic %s: relative L2 %.2e\n", t.name, names[i], e);
      EXPECT_LE(e, 1e-2) << names[i];
    }
  }
}

// A 1 MiB entry budget splits the query rows into 64-row chunks (forward partials and deterministic dQ parts): the
// forward and the deterministic dQ equal the one-chunk result bit for bit (each row's parts are the same and summed
// in the same order), and so do dK/dV (both read the canonical dispatch of all rows).
TEST(CudaMoba, QueryChunksMatchOneChunk) {
  MOBA_REQUIRE_GPU();
  const MobaCase c{{0, 1500, 1501, 4000}, 8, 2, 128, 128, 4};
  OwnContext own;
  AttentionKernelSettings small_budget = deterministic_settings();
  small_budget.entry_budget_bytes = int64_t{1} << 20;
  const DirectRun one = run_direct(own, c, 81, deterministic_settings());
  const DirectRun chunked = run_direct(own, c, 81, small_budget);
  EXPECT_EQ(one.out, chunked.out);
  EXPECT_EQ(one.lse, chunked.lse);
  EXPECT_EQ(one.dq, chunked.dq);
  EXPECT_EQ(one.dk, chunked.dk);
  EXPECT_EQ(one.dv, chunked.dv);
}

// A NaN/Inf query: unchecked, its row routes to the current block only and nothing synchronises; with
// check_finite_queries the launcher throws naming the problem, as the CPU router does. Both routers: the top-k
// selection (k - 1 <= 64) and the exact radix select (k - 1 > 64), at a D that pads to 64 and one that pads to 128.
TEST(CudaMoba, NonFiniteQueryRoutesToItsCurrentBlockOrThrowsWhenChecked) {
  MOBA_REQUIRE_GPU();
  struct Case {
    MobaCase c;
    int64_t row;
  };
  for (const Case& t : {Case{{{0, 100, 1124}, 4, 2, 64, 128, 3}, 800}, Case{{{0, 2048}, 4, 1, 128, 16, 70}, 2000}}) {
    for (float bad : {std::nanf(""), INFINITY}) {
      SCOPED_TRACE(testing::Message() << "top_k " << t.c.top_k << ", D " << t.c.D << ", q = " << bad);
      const int head = 1;
      const int current = static_cast<int>((t.row - t.c.cu_seqlens[t.c.cu_seqlens.size() - 2]) / t.c.B);
      ASSERT_GT(current, t.c.top_k - 1) << "the row must need the gate";
      std::vector<int32_t> expected(static_cast<size_t>(t.c.top_k), -1);
      expected[0] = current;
      OwnContext own;
      DirectLayer unchecked(t.c, 17, {});
      unchecked.poison_query(t.row, head, bad);
      unchecked.route(own);
      ASSERT_EQ(cudaStreamSynchronize(own.ctx.stream), cudaSuccess);
      EXPECT_EQ(unchecked.selected_row(t.row, head), expected);
      EXPECT_EQ(unchecked.selected_row(t.row, head - 1).back(), current) << "a finite row routes as usual";
      AttentionKernelSettings check;
      check.check_finite_queries = true;
      DirectLayer checked(t.c, 17, check);
      checked.poison_query(t.row, head, bad);
      try {
        checked.route(own);
        ADD_FAILURE() << "expected moba::Error";
      } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("q holds NaN or Inf"), std::string::npos) << e.what();
      }
    }
  }
}

TEST(CudaMoba, CheckVectorsCommandPassesOnCuda) {
  MOBA_REQUIRE_GPU();
  const std::string path = test::shared_data("moba-vectors.h5");
  MOBA_REQUIRE_SHARED(path);
  std::string output;
  const int rc = test::run_moba("check-vectors " + path + " --backend cuda", &output);
  std::printf("%s\n", output.c_str());
  EXPECT_EQ(rc, 0) << output;
}

}  // namespace
}  // namespace moba
