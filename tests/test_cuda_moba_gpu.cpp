// MoBA on the CUDA backend against the CPU reference backend (fp32) on the same bf16-rounded inputs: routing
// agreement, then O/LSE/dQ/dK/dV over ONE selection (the GPU's, replayed on the CPU with reuse_routing) so that a
// rare near-tie flip cannot pollute the numeric comparison; spec edge cases (packed and empty segments, N < B,
// k = 1, k above the block count, ties, GQA/MQA, head dims); deterministic dQ (bitwise, and equal to the atomic
// path up to rounding); the pinned vectors through `moba check-vectors --backend cuda`; and CudaMoba.Benchmark*,
// which only prints timings.
// Tolerances (relative L2 vs the fp32 CPU result): O 1e-2, LSE 1e-3, dQ/dK/dV 2e-2 (bf16 storage and bf16 P/dS in
// the matrix products); the measured values are printed for every case.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/backend.h"
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
  AttentionParams p{AttentionMode::moba, c.B, c.top_k, 1.0f / std::sqrt(static_cast<float>(c.D))};
  if (replay) {
    be.upload(selected, replay->data());
    p.reuse_routing = true;
  }
  be.attention_forward(out, lse, selected, q, k, v, cu, p);
  for (int rep = 0; rep < (backward_twice ? 2 : 1); ++rep)
    be.attention_backward(dq, dk, dv, dout, q, k, v, out, lse, selected, cu, p);
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

void check_against_cpu(const MobaCase& c, uint64_t seed) {
  SCOPED_TRACE(c.name);
  const Inputs in = make_inputs(c, seed);
  auto cpu = make_cpu_backend();
  auto gpu = make_backend("cuda");
  const Outputs g = run_moba(*gpu, c, in, nullptr, /*backward_twice=*/true);
  const Outputs cpu_routed = run_moba(*cpu, c, in, nullptr);
  const Outputs ref = run_moba(*cpu, c, in, &g.selected);  // the CPU over the GPU's selection
  const double agree = agreement(g.selected, cpu_routed.selected, c.top_k);
  std::vector<float> dq = g.dq, dk = g.dk, dv = g.dv;  // accumulated twice: halve (exact in bf16 -> f32)
  for (std::vector<float>* x : {&dq, &dk, &dv})
    for (float& f : *x) f *= 0.5f;
  const double e_o = rel(g.out, ref.out), e_lse = rel(g.lse, ref.lse), e_dq = rel(dq, ref.dq),
               e_dk = rel(dk, ref.dk), e_dv = rel(dv, ref.dv);
  std::printf("%-26s N=%-5lld H=%d/%d D=%-3d B=%-3d k=%-2d selection %.6f  o %.2e lse %.2e dq %.2e dk %.2e dv %.2e\n",
              c.name, static_cast<long long>(c.tokens()), c.H, c.Hkv, c.D, c.B, c.top_k, agree, e_o, e_lse, e_dq,
              e_dk, e_dv);
  EXPECT_GE(agree, 0.999);
  EXPECT_LE(e_o, 1e-2);
  EXPECT_LE(e_lse, 1e-3);
  EXPECT_LE(e_dq, 2e-2);
  EXPECT_LE(e_dk, 2e-2);
  EXPECT_LE(e_dv, 2e-2);
  if (c.duplicate_blocks) {  // every past score ties: the lowest blocks win, exactly as on the CPU
    EXPECT_EQ(g.selected, cpu_routed.selected);
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

// ---- direct launchers: determinism and timing ------------------------------------------------------------------
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

TEST(CudaMoba, DeterministicDqIsBitwiseReproducible) {
  MOBA_REQUIRE_GPU();
  const MobaCase c{"deterministic", {0, 1500, 3000}, 8, 2, 128, 128, 4};
  const int64_t N = c.tokens();
  const Inputs in = make_inputs(c, 61);
  OwnContext own;
  const size_t nq = static_cast<size_t>(N * c.H * c.D), nk = static_cast<size_t>(N * c.Hkv * c.D);
  DeviceBuffer q(nq * 2), k(nk * 2), v(nk * 2), dout(nq * 2), out(nq * 2), dq(nq * 2), dk(nk * 2), dv(nk * 2);
  DeviceBuffer lse(static_cast<size_t>(N * c.H) * 4), sel(static_cast<size_t>(N * c.H * c.top_k) * 4), cu(64);
  CHECK_CUDA(cudaMemcpy(q.ptr, to_bf16_bits(in.q).data(), nq * 2, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(k.ptr, to_bf16_bits(in.k).data(), nk * 2, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(v.ptr, to_bf16_bits(in.v).data(), nk * 2, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(dout.ptr, to_bf16_bits(in.dout).data(), nq * 2, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(cu.ptr, c.cu_seqlens.data(), c.cu_seqlens.size() * 4, cudaMemcpyHostToDevice));
  const int S = static_cast<int>(c.cu_seqlens.size()) - 1;
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.D));
  cuda::moba_select_blocks(own.ctx, sel.as<int32_t>(), q.as<cuda::bf16>(), k.as<cuda::bf16>(), cu.as<int32_t>(), S, N,
                           c.H, c.Hkv, c.D, c.B, c.top_k);
  cuda::moba_attention_forward(own.ctx, out.as<cuda::bf16>(), lse.as<float>(), q.as<cuda::bf16>(), k.as<cuda::bf16>(),
                               v.as<cuda::bf16>(), sel.as<int32_t>(), cu.as<int32_t>(), S, N, c.H, c.Hkv, c.D, c.B,
                               c.top_k, scale);
  // deterministic = true twice (dq must match bit for bit), then deterministic = false (the atomic path the backend
  // uses): both compute the same gradients up to rounding.
  std::vector<std::vector<uint16_t>> grads;  // dq, dk, dv of each run
  for (bool deterministic : {true, true, false}) {
    CHECK_CUDA(cudaMemsetAsync(dq.ptr, 0, nq * 2, own.ctx.stream));
    CHECK_CUDA(cudaMemsetAsync(dk.ptr, 0, nk * 2, own.ctx.stream));
    CHECK_CUDA(cudaMemsetAsync(dv.ptr, 0, nk * 2, own.ctx.stream));
    cuda::moba_attention_backward(own.ctx, dq.as<cuda::bf16>(), dk.as<cuda::bf16>(), dv.as<cuda::bf16>(),
                                  dout.as<cuda::bf16>(), q.as<cuda::bf16>(), k.as<cuda::bf16>(), v.as<cuda::bf16>(),
                                  out.as<cuda::bf16>(), lse.as<float>(), sel.as<int32_t>(), cu.as<int32_t>(), S, N,
                                  c.H, c.Hkv, c.D, c.B, c.top_k, scale, deterministic);
    CHECK_CUDA(cudaStreamSynchronize(own.ctx.stream));
    for (auto [buf, n] : {std::pair{&dq, nq}, std::pair{&dk, nk}, std::pair{&dv, nk}}) {
      grads.emplace_back(n);
      CHECK_CUDA(cudaMemcpy(grads.back().data(), buf->ptr, n * 2, cudaMemcpyDeviceToHost));
    }
  }
  EXPECT_EQ(grads[0], grads[3]) << "dq differs between two deterministic backward passes";
  size_t nonzero = 0;
  for (uint16_t x : grads[0]) nonzero += (x & 0x7FFF) != 0;
  EXPECT_GT(nonzero, nq / 2);
  const char* names[] = {"dq", "dk", "dv"};
  for (int i = 0; i < 3; ++i) {
    const double e = rel(from_bf16_bits(grads[6 + i]), from_bf16_bits(grads[i]));
    std::printf("deterministic vs atomic %s: relative L2 %.2e\n", names[i], e);
    EXPECT_LE(e, 1e-2) << names[i];
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
