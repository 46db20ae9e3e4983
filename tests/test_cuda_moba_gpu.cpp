// MoBA on the CUDA backend against the CPU reference backend (fp32) on the same bf16-rounded inputs: routing
// agreement, then O/LSE/dQ/dK/dV over ONE selection (the GPU's, replayed on the CPU with reuse_routing) so that a
// rare near-tie flip cannot pollute the numeric comparison; spec edge cases (packed and empty segments, N < B,
// k = 1, k above the block count, ties, GQA/MQA, head dims); top_k above 65 (general router: selections equal to the
// CPU's); deterministic dQ (bitwise, and equal to the atomic path up to rounding); query chunks (bitwise equal to one
// chunk); the pinned vectors through `moba check-vectors --backend cuda`; and CudaMoba.Benchmark*, which only
// prints timings.
// Tolerances (relative L2 vs the fp32 CPU result): O 1e-2, LSE 1e-3, dQ/dK/dV 2e-2 (bf16 storage and bf16 P/dS in
// the matrix products); the measured values are printed for every case.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/backend.h"
#include "kernels/cpu/attention.h"
#include "kernels/cuda/moba.h"
#include "kernels/cuda/timing.h"
#include "tests/support/test_util.h"

namespace moba {
namespace {

// ---- host helpers ----------------------------------------------------------------------------------------------
std::vector<uint16_t> to_bf16_bits(const std::vector<float>& x) {  // x holds bf16 values already
  std::vector<uint16_t> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    uint32_t u;
    std::memcpy(&u, &x[i], 4);
    out[i] = static_cast<uint16_t>(u >> 16);
  }
  return out;
}
std::vector<float> from_bf16_bits(const std::vector<uint16_t>& x) {
  std::vector<float> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const uint32_t u = static_cast<uint32_t>(x[i]) << 16;
    std::memcpy(&out[i], &u, 4);
  }
  return out;
}

struct MobaCase {
  const char* name;
  std::vector<int32_t> cu_seqlens;
  int H, Hkv, D, B, top_k;
  bool duplicate_blocks = false;  // every block of every segment holds the same keys: all gate scores tie
  int64_t tokens() const { return cu_seqlens.back(); }
};

struct Inputs {
  std::vector<float> q, k, v, dout;  // bf16 values
};

Inputs make_inputs(const MobaCase& c, uint64_t seed) {
  const int64_t N = c.tokens();
  Inputs in;
  in.q = test::random_vector(static_cast<size_t>(N * c.H * c.D), seed);
  in.k = test::random_vector(static_cast<size_t>(N * c.Hkv * c.D), seed + 1);
  in.v = test::random_vector(static_cast<size_t>(N * c.Hkv * c.D), seed + 2);
  in.dout = test::random_vector(static_cast<size_t>(N * c.H * c.D), seed + 3);
  if (c.duplicate_blocks) {  // token u copies the keys of position (u - segment start) % B of its segment
    for (size_t s = 0; s + 1 < c.cu_seqlens.size(); ++s)
      for (int64_t u = c.cu_seqlens[s]; u < c.cu_seqlens[s + 1]; ++u) {
        const int64_t src = c.cu_seqlens[s] + (u - c.cu_seqlens[s]) % c.B;
        std::copy_n(in.k.begin() + src * c.Hkv * c.D, c.Hkv * c.D, in.k.begin() + u * c.Hkv * c.D);
      }
  }
  for (std::vector<float>* x : {&in.q, &in.k, &in.v, &in.dout}) test::round_to_bf16(*x);
  return in;
}

struct Outputs {
  std::vector<int32_t> selected;
  std::vector<float> out, lse, dq, dk, dv;
};

// One MoBA forward + backward on `be` (cpu: f32 tensors; cuda: bf16). With `replay`, its selection is uploaded and
// routing is skipped (reuse_routing). Gradients accumulate into zeros; `backward_twice` runs the backward a second
// time into the same buffers (then dq/dk/dv hold twice the gradient).
Outputs run_moba(Backend& be, const MobaCase& c, const Inputs& in, const std::vector<int32_t>* replay,
                 bool backward_twice = false) {
  const int64_t N = c.tokens();
  const DType act = be.activation_dtype();
  std::vector<Tensor> owned;
  auto make = [&](DType dt, std::initializer_list<int64_t> shape) {
    owned.push_back(be.allocate(dt, shape));
    return owned.back();
  };
  auto upload = [&](Tensor t, const std::vector<float>& x) {
    if (t.dtype == DType::bf16)
      be.upload(t, to_bf16_bits(x).data());
    else
      be.upload(t, x.data());
  };
  auto download = [&](const Tensor& t) {
    std::vector<float> x(static_cast<size_t>(t.numel()));
    if (t.dtype == DType::bf16) {
      std::vector<uint16_t> raw(x.size());
      be.download(raw.data(), t);
      x = from_bf16_bits(raw);
    } else {
      be.download(x.data(), t);
    }
    return x;
  };
  Tensor q = make(act, {N, c.H, c.D}), k = make(act, {N, c.Hkv, c.D}), v = make(act, {N, c.Hkv, c.D});
  Tensor dout = make(act, {N, c.H, c.D}), out = make(act, {N, c.H, c.D});
  Tensor dq = make(act, {N, c.H, c.D}), dk = make(act, {N, c.Hkv, c.D}), dv = make(act, {N, c.Hkv, c.D});
  Tensor lse = make(DType::f32, {N, c.H});
  Tensor selected = make(DType::i32, {N, c.H, c.top_k});
  Tensor cu = make(DType::i32, {static_cast<int64_t>(c.cu_seqlens.size())});
  upload(q, in.q);
  upload(k, in.k);
  upload(v, in.v);
  upload(dout, in.dout);
  be.upload(cu, c.cu_seqlens.data());
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
  call.mode = AttentionMode::moba;
  call.block_size = c.B;
  call.top_k = c.top_k;
  call.softmax_scale = 1.0f / std::sqrt(static_cast<float>(c.D));
  if (replay) be.upload(selected, replay->data());
  else be.moba_select_blocks(call);
  be.attention_forward(call);
  for (int rep = 0; rep < (backward_twice ? 2 : 1); ++rep) be.attention_backward(call);
  Outputs r;
  r.selected.resize(static_cast<size_t>(selected.numel()));
  be.download(r.selected.data(), selected);
  r.out = download(out);
  r.lse = download(lse);
  r.dq = download(dq);
  r.dk = download(dk);
  r.dv = download(dv);
  for (Tensor& t : owned) be.release(t);
  return r;
}

double rel(const std::vector<float>& got, const std::vector<float>& ref) {
  return test::rel_l2(got.data(), ref.data(), ref.size());
}

// Fraction of (t, h) rows whose selections are identical.
double agreement(const std::vector<int32_t>& a, const std::vector<int32_t>& b, int top_k) {
  const size_t rows = a.size() / static_cast<size_t>(top_k);
  size_t same = 0;
  for (size_t r = 0; r < rows; ++r)
    same += std::equal(a.begin() + r * top_k, a.begin() + (r + 1) * top_k, b.begin() + r * top_k);
  return rows ? static_cast<double>(same) / static_cast<double>(rows) : 1.0;
}

// min_agreement: 0.999 for the tensor-core router (top_k <= 65, its gate sums in another order than the CPU's, which
// can flip a near-tie); 1.0 for the general router (exact CPU gate arithmetic).
void check_against_cpu(const MobaCase& c, uint64_t seed, double min_agreement = 0.999) {
  SCOPED_TRACE(c.name);
  const Inputs in = make_inputs(c, seed);
  auto cpu = make_cpu_backend();
  auto gpu = make_backend("cuda");
  const Outputs g = run_moba(*gpu, c, in, nullptr, /*backward_twice=*/true);
  std::vector<int32_t> cpu_selected(g.selected.size());  // the CPU's own routing
  {
    cpu::AttentionArgs a;
    a.n_queries = a.n_keys = c.tokens();
    a.n_heads = c.H;
    a.n_kv_heads = c.Hkv;
    a.head_dim = c.D;
    a.q = in.q.data();
    a.k = in.k.data();
    a.cu_seqlens = c.cu_seqlens.data();
    a.n_segments = static_cast<int>(c.cu_seqlens.size()) - 1;
    a.block_size = c.B;
    a.top_k = c.top_k;
    a.softmax_scale = 1.0f;
    a.selected = cpu_selected.data();
    cpu::moba_select_blocks(a);
  }
  const Outputs ref = run_moba(*cpu, c, in, &g.selected);  // the CPU over the GPU's selection
  const double agree = agreement(g.selected, cpu_selected, c.top_k);
  std::vector<float> dq = g.dq, dk = g.dk, dv = g.dv;  // accumulated twice: halve (exact in bf16 -> f32)
  for (std::vector<float>* x : {&dq, &dk, &dv})
    for (float& f : *x) f *= 0.5f;
  const double e_o = rel(g.out, ref.out), e_lse = rel(g.lse, ref.lse), e_dq = rel(dq, ref.dq),
               e_dk = rel(dk, ref.dk), e_dv = rel(dv, ref.dv);
  std::printf("%-26s N=%-5lld H=%d/%d D=%-3d B=%-3d k=%-3d selection %.6f  o %.2e lse %.2e dq %.2e dk %.2e dv %.2e\n",
              c.name, static_cast<long long>(c.tokens()), c.H, c.Hkv, c.D, c.B, c.top_k, agree, e_o, e_lse, e_dq,
              e_dk, e_dv);
  EXPECT_GE(agree, min_agreement);
  EXPECT_LE(e_o, 1e-2);
  EXPECT_LE(e_lse, 1e-3);
  EXPECT_LE(e_dq, 2e-2);
  EXPECT_LE(e_dk, 2e-2);
  EXPECT_LE(e_dv, 2e-2);
  if (c.duplicate_blocks) {  // every past score ties: the lowest blocks win, exactly as on the CPU
    EXPECT_EQ(g.selected, cpu_selected);
  }
}

TEST(CudaMoba, SingleDocumentMatchesCpu) {
  MOBA_REQUIRE_GPU();
  check_against_cpu({"single_doc_d64", {0, 1000}, 4, 4, 64, 64, 3}, 11);
  check_against_cpu({"single_doc_d128_b256", {0, 2048}, 4, 4, 128, 256, 3}, 12);
}

TEST(CudaMoba, PackedAndEmptySegments) {
  MOBA_REQUIRE_GPU();
  check_against_cpu({"packed_empty_segments", {0, 0, 300, 300, 1100, 1101, 1500}, 4, 2, 128, 64, 4}, 21);
  check_against_cpu({"many_short_segments", {0, 10, 80, 150, 151, 400, 401, 402, 700}, 2, 2, 64, 32, 3}, 22);
}

TEST(CudaMoba, SmallAndOddShapes) {
  MOBA_REQUIRE_GPU();
  check_against_cpu({"n_less_than_block", {0, 100}, 2, 2, 64, 256, 3}, 31);
  check_against_cpu({"k1_current_block_only", {0, 777}, 2, 2, 64, 64, 1}, 32);
  check_against_cpu({"k_above_block_count", {0, 1024}, 2, 2, 64, 128, 16}, 33);
  check_against_cpu({"k40_b16_many_blocks", {0, 1024}, 2, 1, 32, 16, 40}, 34);
  check_against_cpu({"block_not_multiple_of_64", {0, 900}, 2, 2, 96, 48, 3}, 35);
  check_against_cpu({"block_100_head_dim_16", {0, 1000}, 4, 2, 16, 100, 3}, 36);
  check_against_cpu({"head_dim_40", {0, 600}, 2, 2, 40, 64, 2}, 37);
}

TEST(CudaMoba, TiesGoToTheLowerBlock) {
  MOBA_REQUIRE_GPU();
  MobaCase c{"ties_duplicate_blocks", {0, 1024}, 2, 2, 64, 64, 3};
  c.duplicate_blocks = true;
  check_against_cpu(c, 41);
}

TEST(CudaMoba, GroupedQueryAttention) {
  MOBA_REQUIRE_GPU();
  check_against_cpu({"gqa_g1", {0, 1536}, 8, 8, 64, 128, 3}, 51);
  check_against_cpu({"gqa_g2", {0, 1536}, 8, 4, 128, 128, 3}, 52);
  check_against_cpu({"gqa_g4", {0, 700, 1536}, 8, 2, 64, 128, 4}, 53);
  check_against_cpu({"gqa_g8_mqa", {0, 1536}, 8, 1, 128, 128, 3}, 54);
  check_against_cpu({"mqa_4q_1kv", {0, 1000, 1536}, 4, 1, 64, 256, 2}, 55);
}

// top_k - 1 > 64 past blocks: the general router (exact CPU gate, radix-select threshold) must reproduce every CPU
// selection; many selections per row stress the forward merge and the dK/dV buckets. Block counts per segment are
// in the names; k = blocks selects every past block.
TEST(CudaMoba, LargeTopKMatchesCpuExactly) {
  MOBA_REQUIRE_GPU();
  check_against_cpu({"k66_b64_packed_gqa4", {0, 3000, 9000, 16384}, 4, 1, 64, 64, 66}, 71, 1.0);   // 46, 93, 115
  check_against_cpu({"k100_b128_gqa2", {0, 16384}, 2, 1, 64, 128, 100}, 72, 1.0);                   // 128
  check_against_cpu({"k257_b64_packed", {0, 20000, 32768}, 2, 2, 32, 64, 257}, 73, 1.0);           // 312, 199
  check_against_cpu({"k_equals_blocks_b128", {0, 16384}, 4, 2, 64, 128, 128}, 74, 1.0);            // 128
  MobaCase ties{"k80_ties_duplicate_blocks", {0, 8192}, 2, 2, 64, 64, 80};                          // 128
  ties.duplicate_blocks = true;
  check_against_cpu(ties, 75, 1.0);
}

// ---- direct launchers: determinism, query chunks and timing ------------------------------------------------------------------
#define CHECK_CUDA(call) ASSERT_EQ((call), cudaSuccess) << #call

struct DeviceBuffer {
  void* ptr = nullptr;
  explicit DeviceBuffer(size_t bytes) { EXPECT_EQ(cudaMalloc(&ptr, bytes ? bytes : 16), cudaSuccess); }
  ~DeviceBuffer() { cudaFree(ptr); }
  template <typename T> T* as() const { return static_cast<T*>(ptr); }
};

// A context of our own (the backend's is private): its own stream; scratch freed at the end.
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

// Routing, forward and one backward (gradients into zeros) through the direct launchers on own's stream; bf16 bits.
struct DirectRun {
  std::vector<uint16_t> out, dq, dk, dv;
  std::vector<float> lse;
};

// The device buffers of one layer call, filled from `in`; launch() enqueues zeroing of the gradients, routing,
// forward and backward on own's stream without synchronising (so it can be captured into a CUDA graph).
struct DirectLayer {
  const MobaCase& c;
  int64_t N;
  size_t nq, nk;
  DeviceBuffer q, k, v, dout, out, dq, dk, dv, lse, sel, cu;
  DirectLayer(const MobaCase& mc, const Inputs& in)
      : c(mc), N(mc.tokens()), nq(static_cast<size_t>(N * mc.H * mc.D)), nk(static_cast<size_t>(N * mc.Hkv * mc.D)),
        q(nq * 2), k(nk * 2), v(nk * 2), dout(nq * 2), out(nq * 2), dq(nq * 2), dk(nk * 2), dv(nk * 2),
        lse(static_cast<size_t>(N * mc.H) * 4), sel(static_cast<size_t>(N * mc.H * mc.top_k) * 4),
        cu(mc.cu_seqlens.size() * 4) {
    auto up = [](const DeviceBuffer& dst, const std::vector<float>& x) {
      EXPECT_EQ(cudaMemcpy(dst.ptr, to_bf16_bits(x).data(), x.size() * 2, cudaMemcpyHostToDevice), cudaSuccess);
    };
    up(q, in.q);
    up(k, in.k);
    up(v, in.v);
    up(dout, in.dout);
    EXPECT_EQ(cudaMemcpy(cu.ptr, c.cu_seqlens.data(), c.cu_seqlens.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
  }
  void launch(OwnContext& own, bool deterministic) {
    cudaStream_t stream = own.ctx.stream;
    EXPECT_EQ(cudaMemsetAsync(dq.ptr, 0, nq * 2, stream), cudaSuccess);
    EXPECT_EQ(cudaMemsetAsync(dk.ptr, 0, nk * 2, stream), cudaSuccess);
    EXPECT_EQ(cudaMemsetAsync(dv.ptr, 0, nk * 2, stream), cudaSuccess);
    const int S = static_cast<int>(c.cu_seqlens.size()) - 1;
    const float scale = 1.0f / std::sqrt(static_cast<float>(c.D));
    using cuda::bf16;
    cuda::moba_select_blocks(own.ctx, sel.as<int32_t>(), q.as<bf16>(), k.as<bf16>(), cu.as<int32_t>(), S, N, c.H,
                             c.Hkv, c.D, c.B, c.top_k);
    cuda::moba_attention_forward(own.ctx, out.as<bf16>(), lse.as<float>(), q.as<bf16>(), k.as<bf16>(), v.as<bf16>(),
                                 sel.as<int32_t>(), cu.as<int32_t>(), S, N, c.H, c.Hkv, c.D, c.B, c.top_k, scale);
    cuda::moba_attention_backward(own.ctx, dq.as<bf16>(), dk.as<bf16>(), dv.as<bf16>(), dout.as<bf16>(), q.as<bf16>(),
                                  k.as<bf16>(), v.as<bf16>(), out.as<bf16>(), lse.as<float>(), sel.as<int32_t>(),
                                  cu.as<int32_t>(), S, N, c.H, c.Hkv, c.D, c.B, c.top_k, scale, deterministic);
  }
  DirectRun read() const {
    DirectRun r;
    for (auto [dst, buf, n] : {std::tuple{&r.out, &out, nq}, std::tuple{&r.dq, &dq, nq}, std::tuple{&r.dk, &dk, nk},
                               std::tuple{&r.dv, &dv, nk}}) {
      dst->resize(n);
      EXPECT_EQ(cudaMemcpy(dst->data(), buf->ptr, n * 2, cudaMemcpyDeviceToHost), cudaSuccess);
    }
    r.lse.resize(static_cast<size_t>(N * c.H));
    EXPECT_EQ(cudaMemcpy(r.lse.data(), lse.ptr, r.lse.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
    return r;
  }
};

DirectRun run_direct(OwnContext& own, const MobaCase& c, const Inputs& in, bool deterministic) {
  DirectLayer layer(c, in);
  layer.launch(own, deterministic);
  EXPECT_EQ(cudaStreamSynchronize(own.ctx.stream), cudaSuccess);
  return layer.read();
}

// No host synchronisation inside the layer: once a first call has sized the scratch, zeroing, routing, forward and
// backward capture into one CUDA graph (a synchronising call would end the capture with an error), and replaying
// the graph twice gives the eager O, LSE and (deterministic) dQ bit for bit.
TEST(CudaMoba, LayerCapturesIntoACudaGraph) {
  MOBA_REQUIRE_GPU();
  const MobaCase c{"graph", {0, 1500, 1501, 3000}, 8, 2, 128, 128, 4};
  const Inputs in = make_inputs(c, 91);
  OwnContext own;
  const DirectRun eager = run_direct(own, c, in, true);
  DirectLayer layer(c, in);
  cudaGraph_t graph = nullptr;
  ASSERT_EQ(cudaStreamBeginCapture(own.ctx.stream, cudaStreamCaptureModeGlobal), cudaSuccess);
  layer.launch(own, true);
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
    // dK/dV sum a bucket's rows in the dispatch's fill order, which atomics make vary run to run.
    EXPECT_LE(rel(from_bf16_bits(got.dk), from_bf16_bits(eager.dk)), 1e-3) << "replay " << replay;
    EXPECT_LE(rel(from_bf16_bits(got.dv), from_bf16_bits(eager.dv)), 1e-3) << "replay " << replay;
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
}

TEST(CudaMoba, DeterministicDqIsBitwiseReproducible) {
  MOBA_REQUIRE_GPU();
  const MobaCase c{"deterministic", {0, 1500, 3000}, 8, 2, 128, 128, 4};
  const Inputs in = make_inputs(c, 61);
  OwnContext own;
  // deterministic = true twice (dq must match bit for bit), then deterministic = false (the atomic path the backend
  // uses): both compute the same gradients up to rounding.
  const DirectRun a = run_direct(own, c, in, true), b = run_direct(own, c, in, true),
                  atomic = run_direct(own, c, in, false);
  EXPECT_EQ(a.dq, b.dq) << "dq differs between two deterministic backward passes";
  EXPECT_EQ(a.out, b.out) << "the forward is not bitwise reproducible";
  size_t nonzero = 0;
  for (uint16_t x : a.dq) nonzero += (x & 0x7FFF) != 0;
  EXPECT_GT(nonzero, a.dq.size() / 2);
  const char* names[] = {"dq", "dk", "dv"};
  const std::vector<uint16_t>* det[] = {&a.dq, &a.dk, &a.dv};
  const std::vector<uint16_t>* atom[] = {&atomic.dq, &atomic.dk, &atomic.dv};
  for (int i = 0; i < 3; ++i) {
    const double e = rel(from_bf16_bits(*atom[i]), from_bf16_bits(*det[i]));
    std::printf("deterministic vs atomic %s: relative L2 %.2e\n", names[i], e);
    EXPECT_LE(e, 1e-2) << names[i];
  }
}

// Sets MOBA_CUDA_ENTRY_BUDGET_MB for the scope (the per-entry buffers' budget that sizes the query chunks).
struct EntryBudget {
  explicit EntryBudget(const char* mib) { setenv("MOBA_CUDA_ENTRY_BUDGET_MB", mib, 1); }
  ~EntryBudget() { unsetenv("MOBA_CUDA_ENTRY_BUDGET_MB"); }
};

// A 1 MiB budget splits the query tokens into 64-token chunks (forward partials and deterministic dQ parts): the
// forward and the deterministic dQ must equal the one-chunk result bit for bit (each row's parts are the same and
// summed in the same order), dK/dV up to the dispatch's row order, and the chunked run must match the CPU.
TEST(CudaMoba, QueryChunksMatchOneChunk) {
  MOBA_REQUIRE_GPU();
  const MobaCase c{"query_chunks", {0, 1500, 1501, 4000}, 8, 2, 128, 128, 4};
  const Inputs in = make_inputs(c, 81);
  OwnContext own;
  const DirectRun one = run_direct(own, c, in, true);
  DirectRun chunked;
  {
    EntryBudget budget("1");
    chunked = run_direct(own, c, in, true);
    check_against_cpu({"query_chunks_gqa_packed", {0, 700, 2000, 2001, 3072}, 8, 4, 64, 64, 5}, 82);
    check_against_cpu({"query_chunks_k66", {0, 5000}, 2, 1, 64, 64, 66}, 83, 1.0);
  }
  EXPECT_EQ(one.out, chunked.out);
  EXPECT_EQ(one.lse, chunked.lse);
  EXPECT_EQ(one.dq, chunked.dq);
  EXPECT_LE(rel(from_bf16_bits(chunked.dk), from_bf16_bits(one.dk)), 1e-3);
  EXPECT_LE(rel(from_bf16_bits(chunked.dv), from_bf16_bits(one.dv)), 1e-3);
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

// ---- benchmark (prints only) -----------------------------------------------------------------------------------
// Useful FLOPs: 4 * D * H * (attended pairs) forward, 2.5x that backward (moba-spec.md, Cost model).
int64_t attended_pairs_per_head(int64_t N, int64_t B, int64_t top_k) {
  int64_t pairs = 0;
  for (int64_t t = 0; t < N; ++t) {
    const int64_t current = t / B;
    pairs += t - current * B + 1 + std::min(current, top_k - 1) * B;
  }
  return pairs;
}

void fill_device_random(void* dst, size_t n, uint64_t seed) {  // uniform(-1, 1) bf16 values
  std::vector<uint16_t> host(n);
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  for (size_t i = 0; i < n; ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    const float f = static_cast<float>(static_cast<int64_t>(x >> 40) - (1 << 23)) / static_cast<float>(1 << 23);
    uint32_t u;
    std::memcpy(&u, &f, 4);
    host[i] = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
  ASSERT_EQ(cudaMemcpy(dst, host.data(), n * 2, cudaMemcpyHostToDevice), cudaSuccess);
}

void benchmark(int64_t N, int H, int B, int top_k) {
  const int D = 128, Hkv = H;
  OwnContext own;
  cudaStream_t st = own.ctx.stream;
  const size_t nq = static_cast<size_t>(N) * H * D, nk = static_cast<size_t>(N) * Hkv * D;
  DeviceBuffer q(nq * 2), k(nk * 2), v(nk * 2), dout(nq * 2), out(nq * 2), dq(nq * 2), dk(nk * 2), dv(nk * 2);
  DeviceBuffer lse(static_cast<size_t>(N) * H * 4), sel(static_cast<size_t>(N) * H * top_k * 4), cu(8);
  fill_device_random(q.ptr, nq, 1);
  fill_device_random(k.ptr, nk, 2);
  fill_device_random(v.ptr, nk, 3);
  fill_device_random(dout.ptr, nq, 4);
  const int32_t cu_host[2] = {0, static_cast<int32_t>(N)};
  CHECK_CUDA(cudaMemcpy(cu.ptr, cu_host, sizeof cu_host, cudaMemcpyHostToDevice));
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  using cuda::bf16;
  auto route = [&] {
    cuda::moba_select_blocks(own.ctx, sel.as<int32_t>(), q.as<bf16>(), k.as<bf16>(), cu.as<int32_t>(), 1, N, H, Hkv, D,
                             B, top_k);
  };
  auto forward = [&] {
    cuda::moba_attention_forward(own.ctx, out.as<bf16>(), lse.as<float>(), q.as<bf16>(), k.as<bf16>(), v.as<bf16>(),
                                 sel.as<int32_t>(), cu.as<int32_t>(), 1, N, H, Hkv, D, B, top_k, scale);
  };
  auto backward = [&] {
    cuda::moba_attention_backward(own.ctx, dq.as<bf16>(), dk.as<bf16>(), dv.as<bf16>(), dout.as<bf16>(), q.as<bf16>(),
                                  k.as<bf16>(), v.as<bf16>(), out.as<bf16>(), lse.as<float>(), sel.as<int32_t>(),
                                  cu.as<int32_t>(), 1, N, H, Hkv, D, B, top_k, scale, false);
  };
  auto time_ms = [&](const std::function<void()>& fn, int reps) {
    std::vector<double> ms = cuda::time_on_stream(st, fn, 0, reps);
    std::sort(ms.begin(), ms.end());
    return ms[ms.size() / 2];
  };
  for (int w = 0; w < 3; ++w) {  // warm-up: scratch allocation, module load
    route();
    forward();
    backward();
  }
  CHECK_CUDA(cudaStreamSynchronize(st));
  const int reps = N >= 100000 ? 7 : 21;
  const double route_ms = time_ms(route, reps);
  const double attn_fwd_ms = time_ms(forward, reps);
  const double bwd_ms = time_ms(backward, reps);
  const double fwd_ms = time_ms([&] { route(); forward(); }, reps);
  const double step_ms = time_ms([&] { route(); forward(); backward(); }, reps);
  CHECK_CUDA(cudaGetLastError());
  const double flops_fwd = 4.0 * D * H * static_cast<double>(attended_pairs_per_head(N, B, top_k));
  std::printf(
      "BENCH moba N=%lld H=%d D=%d B=%d k=%d | routing %.3f ms | attn fwd %.3f ms | fwd (routing+attn) %.3f ms "
      "%.0f TFLOP/s | bwd %.3f ms %.0f TFLOP/s | fwd+bwd %.3f ms %.0f TFLOP/s | routing share %.1f%%\n",
      static_cast<long long>(N), H, D, B, top_k, route_ms, attn_fwd_ms, fwd_ms, flops_fwd / fwd_ms * 1e-9, bwd_ms,
      2.5 * flops_fwd / bwd_ms * 1e-9, step_ms, 3.5 * flops_fwd / step_ms * 1e-9, 100.0 * route_ms / step_ms);
}

TEST(CudaMoba, Benchmark8K) {
  MOBA_REQUIRE_GPU();
  benchmark(8192, 16, 512, 3);
}
TEST(CudaMoba, Benchmark32K) {
  MOBA_REQUIRE_GPU();
  benchmark(32768, 16, 512, 3);
}
TEST(CudaMoba, Benchmark128K) {
  MOBA_REQUIRE_GPU();
  benchmark(131072, 16, 2048, 3);
}

}  // namespace
}  // namespace moba
