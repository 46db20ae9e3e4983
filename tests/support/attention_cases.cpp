// The attention op-test harness (see attention_cases.h): the case table, the inputs, one run on a backend, the
// float64 reference with its bf16 baseline, and the query-subset checks.
#include "tests/support/attention_cases.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>

#include "common/error.h"
#include "kernels/bf16.h"
#include "kernels/cpu/attention.h"
#include "tests/support/test_util.h"

namespace moba::test {

double AttentionCase::cost() const {
  double pairs = 0;
  for (size_t s = 0; s + 1 < cu_seqlens.size(); ++s) {
    const double n = cu_seqlens[s + 1] - cu_seqlens[s];
    const double per_query = top_k > 0 ? std::min(n, static_cast<double>(top_k) * block_size) : n / 2;
    pairs += n * per_query;
  }
  return pairs * heads * head_dim;
}

const std::vector<AttentionCase>& attention_cases() {
  using C = AttentionCase;
  // Documents of 37, 0, 1, 212 and 83 rows: N = 333 is no multiple of any tile, tiles straddle boundaries.
  const std::vector<int32_t> packed{0, 37, 37, 38, 250, 333};
  const std::vector<int32_t> gqa_docs{0, 100, 100, 101, 517, 700};
  std::vector<int32_t> short_docs{0};  // 80 documents of 0..40 rows, empty ones included
  uint64_t state = 12345;
  for (int s = 0; s < 80; ++s) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    short_docs.push_back(short_docs.back() + static_cast<int32_t>((state >> 33) % 41));
  }
  static const std::vector<AttentionCase> cases = [&] {
    std::vector<AttentionCase> t;
    // ---- dense causal attention: the tensor-core head dims, padded ones, GQA groups, MQA, short and long documents
    for (int D : {16, 32, 64, 128}) t.push_back(C{"dense_d" + std::to_string(D), packed, 4, 2, D});
    for (int D : {6, 20, 40, 96}) t.push_back(C{"dense_padded_d" + std::to_string(D), packed, 2, 1, D});
    for (int Hkv : {8, 4, 2, 1}) t.push_back(C{"dense_gqa_group" + std::to_string(8 / Hkv), gqa_docs, 8, Hkv, 64});
    t.push_back(C{"dense_mqa_d128", gqa_docs, 4, 1, 128});
    t.push_back(C{"dense_80_short_documents_d32", short_docs, 2, 1, 32});
    t.push_back(C{"dense_80_short_documents_d128", short_docs, 4, 2, 128});
    t.push_back(C{"dense_long_4096", {0, 4096}, 4, 4, 128});
    t.push_back(C{"dense_long_packed_gqa", {0, 1000, 1000, 1001, 2900, 3000}, 8, 2, 128});
    // ---- MoBA: the spec's edge cases (moba-spec.md, "Numerics and edge cases")
    t.push_back(C{"moba_single_doc_d64", {0, 1000}, 4, 4, 64, 64, 3});
    t.push_back(C{"moba_single_doc_d128_b256", {0, 2048}, 4, 4, 128, 256, 3});
    t.push_back(C{"moba_packed_empty_documents", {0, 0, 300, 300, 1100, 1101, 1500}, 4, 2, 128, 64, 4});
    t.push_back(C{"moba_many_short_documents", {0, 10, 80, 150, 151, 400, 401, 402, 700}, 2, 2, 64, 32, 3});
    t.push_back(C{"moba_n_less_than_block", {0, 100}, 2, 2, 64, 256, 3});
    t.push_back(C{"moba_k1_current_block_only", {0, 777}, 2, 2, 64, 64, 1});
    t.push_back(C{"moba_k_above_block_count", {0, 1024}, 2, 2, 64, 128, 16});
    t.push_back(C{"moba_k40_b16_many_blocks", {0, 1024}, 2, 1, 32, 16, 40});
    t.push_back(C{"moba_block_48_d96", {0, 900}, 2, 2, 96, 48, 3});
    t.push_back(C{"moba_block_100_d16", {0, 1000}, 4, 2, 16, 100, 3});
    t.push_back(C{"moba_d40_k2", {0, 600}, 2, 2, 40, 64, 2});
    C ties{"moba_ties_duplicate_blocks", {0, 1024}, 2, 2, 64, 64, 3};
    ties.duplicate_blocks = true;
    t.push_back(ties);
    t.push_back(C{"moba_gqa_g1", {0, 1536}, 8, 8, 64, 128, 3});
    t.push_back(C{"moba_gqa_g2_d128", {0, 1536}, 8, 4, 128, 128, 3});
    t.push_back(C{"moba_gqa_g4", {0, 700, 1536}, 8, 2, 64, 128, 4});
    t.push_back(C{"moba_gqa_g8_mqa_d128", {0, 1536}, 8, 1, 128, 128, 3});
    t.push_back(C{"moba_mqa_4q_1kv_b256", {0, 1000, 1536}, 4, 1, 64, 256, 2});
    // top_k - 1 > 64 past blocks: the exact radix-select router must reproduce every CPU selection.
    auto exact = [](C c) {
      c.min_agreement = 1.0;
      return c;
    };
    t.push_back(exact(C{"moba_k66_b64_packed_gqa4", {0, 5000, 10000}, 2, 1, 64, 64, 66}));
    t.push_back(exact(C{"moba_k100_b32_gqa2", {0, 4000}, 2, 1, 64, 32, 100}));
    t.push_back(exact(C{"moba_k257_b16_packed", {0, 5000, 6500}, 2, 2, 32, 16, 257}));
    t.push_back(exact(C{"moba_k_equals_blocks_b32", {0, 4096}, 2, 2, 64, 32, 128}));
    C radix_ties = exact(C{"moba_k80_ties_duplicate_blocks", {0, 4096}, 2, 2, 64, 32, 80});
    radix_ties.duplicate_blocks = true;
    t.push_back(radix_ties);
    // ---- zigzag query subsets (context parallelism): documents cross chunk boundaries, GQA 4:1 and MQA, blocks of
    // 64 .. 4096, top_k up to every block
    auto ranks = [](C c, int r) {
      c.cp_ranks = r;
      return c;
    };
    t.push_back(ranks(C{"cp_dense_gqa4_d128", {0, 1000, 2500, 4096}, 8, 2, 128}, 2));
    t.push_back(ranks(C{"cp_dense_mqa_d64", {0, 300, 1100, 2048}, 4, 1, 64}, 4));
    t.push_back(ranks(C{"cp_dense_small_d32", {0, 50, 130, 256}, 4, 2, 32}, 2));
    t.push_back(ranks(C{"cp_moba_gqa4_b64_k3", {0, 1000, 2500, 4096}, 8, 2, 128, 64, 3}, 2));
    t.push_back(ranks(C{"cp_moba_mqa_b128_k4", {0, 1300, 4096}, 4, 1, 64, 128, 4}, 4));
    t.push_back(ranks(C{"cp_moba_b512_every_block", {0, 4096}, 2, 2, 128, 512, 8}, 2));
    t.push_back(ranks(C{"cp_moba_b4096_k3", {0, 10000, 16384}, 1, 1, 64, 4096, 3}, 2));
    t.push_back(ranks(exact(C{"cp_moba_k66_b64", {0, 5000, 8192}, 2, 1, 64, 64, 66}), 2));
    t.push_back(ranks(C{"cp_moba_small_b16_k3", {0, 50, 130, 256}, 8, 2, 32, 16, 3}, 2));
    return t;
  }();
  return cases;
}

namespace {

// bf16-valued random inputs, seeded by the case name (the same inputs on every backend).
struct Inputs {
  std::vector<float> q, k, v, dout;  // (N, H, D), (N, Hkv, D) x 2, (N, H, D)
};
Inputs make_inputs(const AttentionCase& c) {
  const uint64_t seed = std::hash<std::string>{}(c.name) % 100000;
  const int64_t N = c.tokens();
  Inputs in;
  in.q = random_vector(static_cast<size_t>(N * c.heads * c.head_dim), seed);
  in.k = random_vector(static_cast<size_t>(N * c.kv_heads * c.head_dim), seed + 1);
  in.v = random_vector(static_cast<size_t>(N * c.kv_heads * c.head_dim), seed + 2);
  in.dout = random_vector(static_cast<size_t>(N * c.heads * c.head_dim), seed + 3);
  if (c.duplicate_blocks) {  // key row u copies the keys of position (u - document start) % B of its document
    const int64_t width = int64_t{c.kv_heads} * c.head_dim;
    for (size_t s = 0; s + 1 < c.cu_seqlens.size(); ++s)
      for (int64_t u = c.cu_seqlens[s]; u < c.cu_seqlens[s + 1]; ++u) {
        const int64_t src = c.cu_seqlens[s] + (u - c.cu_seqlens[s]) % c.block_size;
        std::copy_n(in.k.begin() + src * width, width, in.k.begin() + u * width);
      }
  }
  for (std::vector<float>* x : {&in.q, &in.k, &in.v, &in.dout}) round_to_bf16(*x);
  return in;
}

// Tensors on a backend, released at the end of the scope.
class Tensors {
 public:
  explicit Tensors(Backend& be) : be_(be) {}
  ~Tensors() {
    for (Tensor& t : owned_) be_.release(t);
  }
  Tensor zeros(DType dtype, std::initializer_list<int64_t> shape) {
    owned_.push_back(be_.allocate(dtype, shape));  // allocate() zero-fills
    return owned_.back();
  }
  Tensor values(const std::vector<float>& x, std::initializer_list<int64_t> shape) {
    Tensor t = zeros(be_.activation_dtype(), shape);
    if (t.dtype == DType::bf16) be_.upload(t, to_bf16(x).data());
    else be_.upload(t, x.data());
    return t;
  }
  Tensor indices(const std::vector<int32_t>& x, std::initializer_list<int64_t> shape) {
    Tensor t = zeros(DType::i32, shape);
    be_.upload(t, x.data());
    return t;
  }
  std::vector<float> download(const Tensor& t) {
    std::vector<float> x(static_cast<size_t>(t.numel()));
    if (t.dtype == DType::bf16) {
      std::vector<uint16_t> raw(x.size());
      be_.download(raw.data(), t);
      x = from_bf16(raw);
    } else {
      be_.download(x.data(), t);
    }
    return x;
  }
  std::vector<int32_t> download_indices(const Tensor& t) {
    std::vector<int32_t> x(static_cast<size_t>(t.numel()));
    be_.download(x.data(), t);
    return x;
  }

 private:
  Backend& be_;
  std::vector<Tensor> owned_;
};

// rows (n) of x, an (N, width) matrix.
template <typename T>
std::vector<T> gather_rows(const std::vector<T>& x, const std::vector<int32_t>& rows, int64_t width) {
  std::vector<T> out;
  for (int32_t t : rows) out.insert(out.end(), x.begin() + t * width, x.begin() + (t + 1) * width);
  return out;
}

// The query rows of rank r of `ranks` under zigzag context parallelism: chunks r and 2 ranks - 1 - r of N.
std::vector<int32_t> zigzag_rows(int64_t N, int ranks, int r) {
  const int64_t chunk = N / (2 * ranks);
  std::vector<int32_t> rows;
  for (int64_t c : {int64_t{r}, int64_t{2 * ranks - 1 - r}})
    for (int64_t t = c * chunk; t < (c + 1) * chunk; ++t) rows.push_back(static_cast<int32_t>(t));
  return rows;
}

double agreement(const std::vector<int32_t>& a, const std::vector<int32_t>& b, int top_k) {
  const size_t rows = a.size() / static_cast<size_t>(top_k);
  size_t same = 0;
  for (size_t r = 0; r < rows; ++r)
    same += std::equal(a.begin() + r * top_k, a.begin() + (r + 1) * top_k, b.begin() + r * top_k);
  return rows ? static_cast<double>(same) / static_cast<double>(rows) : 1.0;
}

double rel(const std::vector<float>& got, const std::vector<double>& want) {
  return rel_l2(got.data(), want.data(), want.size());
}
double rel(const std::vector<double>& got, const std::vector<double>& want) {
  double diff = 0, norm = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    diff += (got[i] - want[i]) * (got[i] - want[i]);
    norm += want[i] * want[i];
  }
  return std::sqrt(diff / std::max(norm, 1e-300));
}
bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// The five outputs of one forward + backward, as floats.
struct Outputs {
  std::vector<float> out, lse, dq, dk, dv;
};

}  // namespace

void check_attention_case(Backend& be, const AttentionCase& c, const AttentionKernelSettings& settings) {
  SCOPED_TRACE(c.name);
  const bool moba = c.top_k > 0, bf16_backend = be.activation_dtype() == DType::bf16;
  const int64_t N = c.tokens();
  const int H = c.heads, Hkv = c.kv_heads, D = c.head_dim;
  const Inputs in = make_inputs(c);
  Tensors tensors(be);

  AttentionCall call;
  call.q = tensors.values(in.q, {N, H, D});
  call.k = tensors.values(in.k, {N, Hkv, D});
  call.v = tensors.values(in.v, {N, Hkv, D});
  call.dout = tensors.values(in.dout, {N, H, D});
  call.cu_seqlens = tensors.indices(c.cu_seqlens, {static_cast<int64_t>(c.cu_seqlens.size())});
  call.out = tensors.zeros(be.activation_dtype(), {N, H, D});
  call.lse = tensors.zeros(DType::f32, {N, H});
  call.dq = tensors.zeros(be.activation_dtype(), {N, H, D});
  call.dk = tensors.zeros(be.activation_dtype(), {N, Hkv, D});
  call.dv = tensors.zeros(be.activation_dtype(), {N, Hkv, D});
  call.softmax_scale = 1.0f / std::sqrt(static_cast<float>(D));
  call.settings = settings;
  if (moba) {
    call.mode = AttentionMode::moba;
    call.block_size = c.block_size;
    call.top_k = c.top_k;
    call.selected = tensors.zeros(DType::i32, {N, H, c.top_k});
  }
  AttentionScratchShape shape;
  shape.max_queries = shape.max_keys = N;
  shape.n_heads = H;
  shape.n_kv_heads = Hkv;
  shape.head_dim = D;
  shape.min_block_size = moba ? c.block_size : 1;
  shape.max_top_k = c.top_k;
  shape.query_rows = c.cp_ranks > 0;
  shape.settings = settings;
  call.scratch = allocate_attention_scratch(be, shape);
  struct ScratchGuard {
    Backend& be;
    AttentionScratch& scratch;
    ~ScratchGuard() { release_attention_scratch(be, scratch); }
  } scratch_guard{be, call.scratch};

  // ---- routing, compared with the CPU router on the same inputs ----
  cpu::AttentionArgs host;
  host.n_queries = host.n_keys = N;
  host.n_heads = H;
  host.n_kv_heads = Hkv;
  host.head_dim = D;
  host.q = in.q.data();
  host.k = in.k.data();
  host.v = in.v.data();
  host.cu_seqlens = c.cu_seqlens.data();
  host.n_segments = static_cast<int>(c.cu_seqlens.size()) - 1;
  host.block_size = c.block_size;
  host.top_k = c.top_k;
  host.softmax_scale = call.softmax_scale;
  host.dout = in.dout.data();
  std::vector<int32_t> selected;  // the backend's routing, which every result below uses
  double agree = 1.0;
  if (moba) {
    be.moba_select_blocks(call);
    selected = tensors.download_indices(call.selected);
    std::vector<int32_t> cpu_selected(selected.size());
    host.selected = cpu_selected.data();
    cpu::moba_select_blocks(host);
    agree = agreement(selected, cpu_selected, c.top_k);
    EXPECT_GE(agree, c.min_agreement) << "routing agreement with the CPU router";
    if (c.duplicate_blocks) EXPECT_EQ(selected, cpu_selected) << "ties go to the lower block";
    host.selected = selected.data();
  }

  // ---- the whole sequence against the reference ----
  be.attention_forward(call);
  be.attention_backward(call);
  const Outputs whole{tensors.download(call.out), tensors.download(call.lse), tensors.download(call.dq),
                      tensors.download(call.dk), tensors.download(call.dv)};
  cpu::ReferenceResults baseline;
  const cpu::ReferenceResults ref = cpu::attention_masked_reference(host, bf16_backend ? &baseline : nullptr);
  // Tolerance of one output: a bf16 backend within kBaselineFactor x the bf16 baseline's error (+ a floor for the
  // fp32 statistics), an f32 backend within fp32 rounding of these sums.
  auto tolerance = [&](const std::vector<double>& base, const std::vector<double>& exact, double floor) {
    return bf16_backend ? kBaselineFactor * rel(base, exact) + floor : 1e-5;
  };
  const double tol[5] = {tolerance(baseline.out, ref.out, 1e-4), tolerance(baseline.lse, ref.lse, 1e-5),
                         tolerance(baseline.dq, ref.dq, 1e-4), tolerance(baseline.dk, ref.dk, 1e-4),
                         tolerance(baseline.dv, ref.dv, 1e-4)};
  const double err[5] = {rel(whole.out, ref.out), rel(whole.lse, ref.lse), rel(whole.dq, ref.dq),
                         rel(whole.dk, ref.dk), rel(whole.dv, ref.dv)};
  const char* names[5] = {"out", "lse", "dq", "dk", "dv"};
  std::printf("[attention %s] %-34s N=%-6lld H=%d/%d D=%-3d B=%-4d k=%-3d selection %.6f |", be.name().c_str(),
              c.name.c_str(), static_cast<long long>(N), H, Hkv, D, c.block_size, c.top_k, agree);
  for (int i = 0; i < 5; ++i) std::printf(" %s %.2e (tol %.2e)", names[i], err[i], tol[i]);
  std::printf("\n");
  for (int i = 0; i < 5; ++i) EXPECT_LE(err[i], tol[i]) << names[i] << " against the float64 reference";

  // ---- zigzag query subsets: each rank's rows against the whole K/V ----
  if (c.cp_ranks == 0) return;
  ASSERT_EQ(N % (2 * c.cp_ranks), 0) << "the chunks must divide the sequence";
  std::vector<double> dk_sum(whole.dk.size(), 0.0), dv_sum(whole.dv.size(), 0.0);
  double worst[3] = {0, 0, 0};  // out, lse, dq: the subsets' rows against the whole run's
  for (int r = 0; r < c.cp_ranks; ++r) {
    SCOPED_TRACE(cat("rank ", r, " of ", c.cp_ranks));
    const std::vector<int32_t> rows = zigzag_rows(N, c.cp_ranks, r);
    const int64_t n = static_cast<int64_t>(rows.size());
    AttentionCall sub = call;
    sub.q_rows = tensors.indices(rows, {n});
    sub.q = tensors.values(gather_rows(in.q, rows, H * D), {n, H, D});
    sub.dout = tensors.values(gather_rows(in.dout, rows, H * D), {n, H, D});
    sub.out = tensors.zeros(be.activation_dtype(), {n, H, D});
    sub.lse = tensors.zeros(DType::f32, {n, H});
    sub.dq = tensors.zeros(be.activation_dtype(), {n, H, D});
    sub.dk = tensors.zeros(DType::f32, {N, Hkv, D});  // partial sums, reduced over the ranks in f32
    sub.dv = tensors.zeros(DType::f32, {N, Hkv, D});
    if (moba) {
      sub.selected = tensors.zeros(DType::i32, {n, H, c.top_k});
      be.moba_select_blocks(sub);
      const std::vector<int32_t> want = gather_rows(selected, rows, int64_t{H} * c.top_k);
      const std::vector<int32_t> got = tensors.download_indices(sub.selected);
      if (bf16_backend) EXPECT_GE(agreement(got, want, c.top_k), c.min_agreement) << "routing of the subset";
      else EXPECT_EQ(got, want) << "routing of the subset";
      be.upload(sub.selected, want.data());  // the same routing as the whole run, for the comparisons below
    }
    be.attention_forward(sub);
    be.attention_backward(sub);
    const std::vector<float> out = tensors.download(sub.out), lse = tensors.download(sub.lse),
                             dq = tensors.download(sub.dq);
    const std::vector<float> want_out = gather_rows(whole.out, rows, H * D), want_lse = gather_rows(whole.lse, rows, H),
                             want_dq = gather_rows(whole.dq, rows, H * D);
    if (!bf16_backend) {  // the f32 reference kernels: bit for bit
      EXPECT_TRUE(same_bits(out, want_out)) << "out rows";
      EXPECT_TRUE(same_bits(lse, want_lse)) << "lse rows";
      EXPECT_TRUE(same_bits(dq, want_dq)) << "dq rows";
    }
    worst[0] = std::max(worst[0], rel_l2(out.data(), want_out.data(), out.size()));
    worst[1] = std::max(worst[1], rel_l2(lse.data(), want_lse.data(), lse.size()));
    worst[2] = std::max(worst[2], rel_l2(dq.data(), want_dq.data(), dq.size()));
    const std::vector<float> dk = tensors.download(sub.dk), dv = tensors.download(sub.dv);
    for (size_t e = 0; e < dk.size(); ++e) {
      dk_sum[e] += dk[e];
      dv_sum[e] += dv[e];
    }
  }
  // Against the whole run: rows within the bf16 noise of one run (f32: identical, checked above); the summed partial
  // dK/dV against the reference like the whole run's (fp32 sums of the rows of each rank).
  const double e_dk = rel(dk_sum, ref.dk), e_dv = rel(dv_sum, ref.dv);
  std::printf("[attention %s] %-34s %d ranks: rows vs whole out %.2e lse %.2e dq %.2e | summed partial dk %.2e dv "
              "%.2e\n",
              be.name().c_str(), c.name.c_str(), c.cp_ranks, worst[0], worst[1], worst[2], e_dk, e_dv);
  EXPECT_LE(worst[0], tol[0]) << "out rows of the subsets";
  EXPECT_LE(worst[1], tol[1]) << "lse rows of the subsets";
  EXPECT_LE(worst[2], tol[2]) << "dq rows of the subsets";
  EXPECT_LE(e_dk, tol[3]) << "summed partial dk";
  EXPECT_LE(e_dv, tol[4]) << "summed partial dv";
}

}  // namespace moba::test
