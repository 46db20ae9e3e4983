// `moba check-vectors`: checks MoBA routing, forward and backward against the pinned test vectors, one printed
// line per case, on the CPU backend (fp32) or the CUDA backend (bf16 activations), both through the Backend interface. Invariant: this only reads the file and calls public APIs; it never changes what it
// measures (see check_vectors.h for why errors use the expected selection).
#include "kernels/check_vectors.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <sstream>

#include "common/cli.h"
#include "common/error.h"
#include "common/log.h"
#include "kernels/backend.h"
#include "kernels/bf16.h"

namespace moba {
namespace {

// ||ours - expected|| / ||expected|| in float64.
double relative_l2(const std::vector<float>& ours, const std::vector<float>& expected) {
  double diff = 0, norm = 0;
  for (size_t i = 0; i < ours.size(); ++i) {
    const double d = static_cast<double>(ours[i]) - expected[i];
    diff += d * d;
    norm += static_cast<double>(expected[i]) * expected[i];
  }
  return std::sqrt(diff / std::max(norm, 1e-300));
}

// One case's inputs and expected outputs, read from group `name`.
struct VectorCase {
  int64_t tokens = 0;  // N
  int heads = 0, kv_heads = 0, head_dim = 0, block_size = 0, top_k = 0;
  float softmax_scale = 0;
  std::vector<int32_t> cu_seqlens;                 // (segments + 1)
  std::vector<float> q, k, v, dout;                // (N, H, D), (N, Hkv, D) x2, (N, H, D)
  std::vector<int32_t> selected;                   // (N, H, top_k) expected
  std::vector<float> o, lse, dq, dk, dv;           // expected, float64 math stored as float32
};

VectorCase read_case(const h5::File& file, const std::string& name) {
  const std::string where = cat(file.path(), ": case '", name, "'");
  const char* datasets[] = {"q", "k", "v", "do", "cu_seqlens", "selected_blocks", "o", "lse", "dq", "dk", "dv"};
  for (const char* d : datasets)
    MOBA_CHECK(file.exists(name + "/" + d), cat(where, " has no dataset '", d, "'"),
               "a vector file holds, per case group, q k v do cu_seqlens selected_blocks o lse dq dk dv "
               "(see ../shared/data/README.md)");
  const char* attributes[] = {"block_size", "top_k", "heads", "kv_heads", "head_dim", "softmax_scale"};
  for (const char* a : attributes)
    MOBA_CHECK(file.has_attr(name, a), cat(where, " has no attribute '", a, "'"),
               "each case group carries block_size top_k heads kv_heads head_dim softmax_scale");

  VectorCase c;
  c.block_size = static_cast<int>(file.attr_int(name, "block_size"));
  c.top_k = static_cast<int>(file.attr_int(name, "top_k"));
  c.heads = static_cast<int>(file.attr_int(name, "heads"));
  c.kv_heads = static_cast<int>(file.attr_int(name, "kv_heads"));
  c.head_dim = static_cast<int>(file.attr_int(name, "head_dim"));
  c.softmax_scale = static_cast<float>(file.attr_double(name, "softmax_scale"));
  const std::vector<int64_t> q_shape = file.shape(name + "/q");
  MOBA_CHECK(q_shape.size() == 3, cat(where, ": q must be 3-D (N, H, D)"), "recreate the vector file");
  c.tokens = q_shape[0];
  const int64_t N = c.tokens, H = c.heads, Hkv = c.kv_heads, D = c.head_dim;
  auto expect_shape = [&](const std::string& d, const std::vector<int64_t>& want) {
    const std::vector<int64_t> got = file.shape(name + "/" + d);
    std::string got_text, want_text;
    for (int64_t x : got) got_text += cat(got_text.empty() ? "" : ",", x);
    for (int64_t x : want) want_text += cat(want_text.empty() ? "" : ",", x);
    MOBA_CHECK(got == want, cat(where, ": ", d, " has shape (", got_text, "), expected (", want_text, ")"),
               "the datasets disagree with the attributes heads/kv_heads/head_dim/top_k; recreate the file");
  };
  expect_shape("q", {N, H, D});
  expect_shape("do", {N, H, D});
  expect_shape("o", {N, H, D});
  expect_shape("dq", {N, H, D});
  for (const char* d : {"k", "v", "dk", "dv"}) expect_shape(d, {N, Hkv, D});
  expect_shape("lse", {N, H});
  expect_shape("selected_blocks", {N, H, c.top_k});
  c.cu_seqlens = file.read<int32_t>(name + "/cu_seqlens");
  MOBA_CHECK(c.cu_seqlens.size() >= 2, cat(where, ": cu_seqlens needs at least 2 entries"), "recreate the file");
  c.q = file.read<float>(name + "/q");
  c.k = file.read<float>(name + "/k");
  c.v = file.read<float>(name + "/v");
  c.dout = file.read<float>(name + "/do");
  c.selected = file.read<int32_t>(name + "/selected_blocks");
  c.o = file.read<float>(name + "/o");
  c.lse = file.read<float>(name + "/lse");
  c.dq = file.read<float>(name + "/dq");
  c.dk = file.read<float>(name + "/dk");
  c.dv = file.read<float>(name + "/dv");
  return c;
}

std::string format_errors(const AttentionErrors& e) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "o %.2e lse %.2e dq %.2e dk %.2e dv %.2e", e.o, e.lse, e.dq, e.dk, e.dv);
  return buf;
}

std::string format_result(const VectorCaseResult& r) {
  char head[200];
  std::snprintf(head, sizeof head, "%-22s N=%-5lld segs=%d H=%d/%d D=%d B=%d k=%-2d selection %.6f (%lld/%lld)",
                r.name.c_str(), static_cast<long long>(r.tokens), r.segments, r.heads, r.kv_heads, r.head_dim,
                r.block_size, r.top_k, r.selection_agreement, static_cast<long long>(r.rows_agreeing),
                static_cast<long long>(r.rows));
  return cat(head, "  expected-selection: ", format_errors(r.over_expected),
             "  own-selection: ", format_errors(r.over_own));
}

std::vector<std::string> split_commas(const std::string& text) {
  std::vector<std::string> parts;
  std::stringstream in(text);
  for (std::string part; std::getline(in, part, ',');)
    if (!part.empty()) parts.push_back(part);
  return parts;
}

}  // namespace

std::vector<std::string> vector_case_names(const h5::File& file) {
  std::vector<std::string> names = file.list("/");
  MOBA_CHECK(!names.empty(), cat(file.path(), " holds no case groups"),
             "expected a MoBA test-vector file such as ../shared/data/moba-vectors.h5");
  return names;
}

namespace {

// Acceptance thresholds for the CUDA backend (bf16 q/k/v/dO/O/dQ/dK/dV, f32 statistics): bf16 storage of O and the
// gradients alone costs ~2e-3 relative, bf16 P and dS in the matrix products a few 1e-3 more; LSE stays f32 from
// the same bf16 inputs. The routing arithmetic equals the CPU's, but a near-tie may still flip, hence 0.99.
VectorTolerances cuda_tolerances() {
  VectorTolerances t;
  t.o = 2e-2;
  t.lse = 1e-3;
  t.grad = 3e-2;
  t.min_selection_agreement = 0.99;
  return t;
}

using RouteFn = std::function<std::vector<int32_t>(const VectorCase&)>;
using AttentionFn = std::function<AttentionErrors(const VectorCase&, const std::vector<int32_t>&)>;

// Routing agreement with the file's selection, and errors over the expected and over our own selection.
VectorCaseResult check_case_with(const h5::File& file, const std::string& case_name, const RouteFn& route,
                                 const AttentionFn& attention) {
  const VectorCase c = read_case(file, case_name);
  const int n_segments = static_cast<int>(c.cu_seqlens.size()) - 1;
  VectorCaseResult r;
  r.name = case_name;
  r.tokens = c.tokens;
  r.segments = n_segments;
  r.heads = c.heads;
  r.kv_heads = c.kv_heads;
  r.head_dim = c.head_dim;
  r.block_size = c.block_size;
  r.top_k = c.top_k;

  const std::vector<int32_t> own = route(c);  // (N, H, top_k)
  r.rows = c.tokens * c.heads;
  for (int64_t row = 0; row < r.rows; ++row) {
    bool same = true;  // both rows are ascending and -1 padded, so equal sets means equal rows
    for (int i = 0; i < c.top_k; ++i) same = same && own[row * c.top_k + i] == c.selected[row * c.top_k + i];
    r.rows_agreeing += same;
  }
  r.selection_agreement = r.rows ? static_cast<double>(r.rows_agreeing) / static_cast<double>(r.rows) : 1.0;
  r.over_expected = attention(c, c.selected);
  r.over_own = r.rows_agreeing == r.rows ? r.over_expected : attention(c, own);
  return r;
}

// One case on a backend through the Backend interface (f32 tensors on the CPU, bf16 on CUDA; the file's inputs are
// bf16 values, so the conversion is exact): routing, then forward and backward over a given selection (gradients
// accumulate into zeroed buffers).
class BackendCaseRunner {
 public:
  BackendCaseRunner(Backend& be, const VectorCase& c) : be_(be), c_(c) {
    const int64_t N = c.tokens, H = c.heads, Hkv = c.kv_heads, D = c.head_dim;
    const DType A = be.activation_dtype();
    call_.q = upload(c.q, {N, H, D});
    call_.k = upload(c.k, {N, Hkv, D});
    call_.v = upload(c.v, {N, Hkv, D});
    call_.dout = upload(c.dout, {N, H, D});
    call_.out = tensor(A, {N, H, D});
    call_.dq = tensor(A, {N, H, D});
    call_.dk = tensor(A, {N, Hkv, D});
    call_.dv = tensor(A, {N, Hkv, D});
    call_.lse = tensor(DType::f32, {N, H});
    call_.selected = tensor(DType::i32, {N, H, c.top_k});
    call_.cu_seqlens = tensor(DType::i32, {static_cast<int64_t>(c.cu_seqlens.size())});
    be_.upload(call_.cu_seqlens, c.cu_seqlens.data());
    call_.mode = AttentionMode::moba;
    call_.block_size = c.block_size;
    call_.top_k = c.top_k;
    call_.softmax_scale = c.softmax_scale;
    AttentionScratchShape shape;
    shape.max_queries = shape.max_keys = N;
    shape.n_heads = c.heads;
    shape.n_kv_heads = c.kv_heads;
    shape.head_dim = c.head_dim;
    shape.min_block_size = c.block_size;
    shape.max_top_k = c.top_k;
    call_.scratch = allocate_attention_scratch(be_, shape);
  }
  ~BackendCaseRunner() {
    release_attention_scratch(be_, call_.scratch);
    for (Tensor& t : owned_) be_.release(t);
  }

  std::vector<int32_t> route() {
    be_.moba_select_blocks(call_);
    std::vector<int32_t> sel(static_cast<size_t>(call_.selected.numel()));
    be_.download(sel.data(), call_.selected);
    return sel;
  }

  AttentionErrors attention(const std::vector<int32_t>& selection) {
    be_.upload(call_.selected, selection.data());
    be_.attention_forward(call_);
    for (Tensor* t : {&call_.dq, &call_.dk, &call_.dv}) be_.zero(*t);
    be_.attention_backward(call_);
    return {relative_l2(download(call_.out), c_.o), relative_l2(download(call_.lse), c_.lse),
            relative_l2(download(call_.dq), c_.dq), relative_l2(download(call_.dk), c_.dk),
            relative_l2(download(call_.dv), c_.dv)};
  }

 private:
  Tensor tensor(DType dtype, std::initializer_list<int64_t> shape) {
    owned_.push_back(be_.allocate(dtype, shape));
    return owned_.back();
  }
  Tensor upload(const std::vector<float>& x, std::initializer_list<int64_t> shape) {
    Tensor t = tensor(be_.activation_dtype(), shape);
    if (t.dtype == DType::bf16) be_.upload(t, to_bf16(x).data());
    else be_.upload(t, x.data());
    return t;
  }
  std::vector<float> download(const Tensor& t) {
    if (t.dtype == DType::f32) {
      std::vector<float> x(static_cast<size_t>(t.numel()));
      be_.download(x.data(), t);
      return x;
    }
    std::vector<uint16_t> raw(static_cast<size_t>(t.numel()));
    be_.download(raw.data(), t);
    return from_bf16(raw);
  }

  Backend& be_;
  const VectorCase& c_;
  std::vector<Tensor> owned_;
  AttentionCall call_;
};

}  // namespace

VectorCaseResult check_vector_case(Backend& be, const h5::File& file, const std::string& case_name) {
  std::unique_ptr<BackendCaseRunner> runner;
  auto runner_for = [&](const VectorCase& c) -> BackendCaseRunner& {
    if (!runner) runner = std::make_unique<BackendCaseRunner>(be, c);
    return *runner;
  };
  return check_case_with(
      file, case_name, [&](const VectorCase& c) { return runner_for(c).route(); },
      [&](const VectorCase& c, const std::vector<int32_t>& selection) { return runner_for(c).attention(selection); });
}

std::vector<std::string> vector_case_failures(const VectorCaseResult& r, const VectorTolerances& tol) {
  std::vector<std::string> failures;
  auto check = [&](const char* what, double value, double limit) {
    if (!(value <= limit))  // NaN fails too
      failures.push_back(cat(r.name, ": ", what, " relative L2 error ", value, " exceeds tolerance ", limit));
  };
  if (!(r.selection_agreement >= tol.min_selection_agreement))
    failures.push_back(cat(r.name, ": selection agreement ", r.selection_agreement, " is below ",
                           tol.min_selection_agreement, " (", r.rows - r.rows_agreeing, " of ", r.rows,
                           " rows differ)"));
  check("o", r.over_expected.o, tol.o);
  check("lse", r.over_expected.lse, tol.lse);
  check("dq", r.over_expected.dq, tol.grad);
  check("dk", r.over_expected.dk, tol.grad);
  check("dv", r.over_expected.dv, tol.grad);
  return failures;
}

int check_vectors_command(const std::vector<std::string>& args) {
  const VectorTolerances defaults;
  ArgParser parser("check-vectors",
                   "Runs MoBA routing, forward and backward on every case of a test-vector file and compares them "
                   "with the stored results (selection agreement and relative L2 errors of O, LSE, dQ, dK, dV).");
  parser.add_positional("FILE.h5", "test vectors, e.g. ../shared/data/moba-vectors.h5");
  parser.add_option("backend", "NAME", "cpu or cuda", "cpu");
  parser.add_option("cases", "A,B", "comma-separated case groups to run (default: all)");
  const VectorTolerances cuda = cuda_tolerances();
  parser.add_option("tol-o", "X", cat("max relative L2 error of O (cuda default ", cuda.o, ")"), cat(defaults.o));
  parser.add_option("tol-lse", "X", cat("max relative L2 error of LSE (cuda default ", cuda.lse, ")"),
                    cat(defaults.lse));
  parser.add_option("tol-grad", "X", cat("max relative L2 error of dQ, dK, dV (cuda default ", cuda.grad, ")"),
                    cat(defaults.grad));
  parser.add_option("min-selection-agreement", "X",
                    cat("min fraction of (token, head) rows routed exactly as expected (cuda default ",
                        cuda.min_selection_agreement, ")"),
                    cat(defaults.min_selection_agreement));
  if (!parser.parse(args)) return 0;

  const std::string backend = parser.get_choice("backend", {"cpu", "cuda"});
  // Tolerances are read before any work: a NaN tolerance would pass every comparison.
  VectorTolerances tol = backend == "cuda" ? cuda_tolerances() : VectorTolerances{};
  const double max_error = std::numeric_limits<double>::max();
  if (parser.has("tol-o")) tol.o = parser.get_double("tol-o", 0, max_error);
  if (parser.has("tol-lse")) tol.lse = parser.get_double("tol-lse", 0, max_error);
  if (parser.has("tol-grad")) tol.grad = parser.get_double("tol-grad", 0, max_error);
  if (parser.has("min-selection-agreement"))
    tol.min_selection_agreement = parser.get_double("min-selection-agreement", 0, 1);
  std::unique_ptr<Backend> be;
  if (backend == "cuda") {
    try {
      be = make_backend("cuda");
    } catch (const Error& e) {
      log_error(cat("moba check-vectors: --backend cuda is not available: ", e.what()));
      std::fprintf(stderr, "  hint: run on a machine with an NVIDIA GPU, or use --backend cpu\n");
      return 2;
    }
  } else {
    be = make_cpu_backend();
  }

  const h5::File file = h5::File::open_read(parser.get("FILE.h5"));
  const std::vector<std::string> all_cases = vector_case_names(file);
  std::vector<std::string> cases = all_cases;
  if (parser.has("cases")) {
    cases = split_commas(parser.get("cases"));
    std::string available;
    for (const std::string& name : all_cases) available += " " + name;
    for (const std::string& name : cases)
      MOBA_CHECK(std::find(all_cases.begin(), all_cases.end(), name) != all_cases.end(),
                 cat("moba check-vectors: ", file.path(), " has no case '", name, "'"), cat("cases:", available));
  }

  info("check-vectors ", file.path(), " backend ", be->name(), " (", dtype_name(be->activation_dtype()), " activations)",
       "; tolerances: o ", tol.o, " lse ", tol.lse, " grads ", tol.grad, " selection agreement >= ",
       tol.min_selection_agreement);
  std::vector<std::string> failures;
  for (const std::string& name : cases) {
    const VectorCaseResult result = check_vector_case(*be, file, name);
    info(format_result(result));
    for (std::string& f : vector_case_failures(result, tol)) failures.push_back(std::move(f));
  }
  if (failures.empty()) {
    info("check-vectors: all ", cases.size(), " cases pass");
    return 0;
  }
  for (const std::string& f : failures) log_error(cat("check-vectors: ", f));
  log_error(cat("check-vectors: ", failures.size(), " check(s) failed"));
  return 1;
}

}  // namespace moba
