// `moba check-vectors`: checks the CPU MoBA routing, forward and backward against the pinned test vectors, one
// printed line per case. Invariant: this only reads the file and calls the public kernels/cpu/attention.h API;
// it never changes what it measures (see check_vectors.h for why errors use the expected selection).
#include "kernels/check_vectors.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <sstream>

#include "common/cli.h"
#include "common/error.h"
#include "common/log.h"
#include "kernels/cpu/attention.h"

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
  cpu::AttentionShape shape;
  cpu::MobaParams params;
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
  c.params.block_size = static_cast<int>(file.attr_int(name, "block_size"));
  c.params.top_k = static_cast<int>(file.attr_int(name, "top_k"));
  c.shape.n_heads = static_cast<int>(file.attr_int(name, "heads"));
  c.shape.n_kv_heads = static_cast<int>(file.attr_int(name, "kv_heads"));
  c.shape.head_dim = static_cast<int>(file.attr_int(name, "head_dim"));
  c.softmax_scale = static_cast<float>(file.attr_double(name, "softmax_scale"));
  const std::vector<int64_t> q_shape = file.shape(name + "/q");
  MOBA_CHECK(q_shape.size() == 3, cat(where, ": q must be 3-D (N, H, D)"), "recreate the vector file");
  c.shape.total_tokens = q_shape[0];
  const int64_t N = c.shape.total_tokens, H = c.shape.n_heads, Hkv = c.shape.n_kv_heads, D = c.shape.head_dim;
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
  expect_shape("selected_blocks", {N, H, c.params.top_k});
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

// Forward + backward over `selected`; relative errors against the expected results.
AttentionErrors run_attention(const VectorCase& c, const std::vector<int32_t>& selected) {
  const int n_segments = static_cast<int>(c.cu_seqlens.size()) - 1;
  std::vector<float> o(c.o.size()), lse(c.lse.size());
  std::vector<float> dq(c.dq.size(), 0.0f), dk(c.dk.size(), 0.0f), dv(c.dv.size(), 0.0f);
  cpu::moba_attention_forward(o.data(), lse.data(), c.q.data(), c.k.data(), c.v.data(), selected.data(),
                              c.cu_seqlens.data(), n_segments, c.shape, c.params, c.softmax_scale);
  cpu::moba_attention_backward(dq.data(), dk.data(), dv.data(), c.dout.data(), c.q.data(), c.k.data(), c.v.data(),
                               o.data(), lse.data(), selected.data(), c.cu_seqlens.data(), n_segments, c.shape,
                               c.params, c.softmax_scale);
  return {relative_l2(o, c.o), relative_l2(lse, c.lse), relative_l2(dq, c.dq), relative_l2(dk, c.dk),
          relative_l2(dv, c.dv)};
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

VectorCaseResult check_vector_case(const h5::File& file, const std::string& case_name) {
  const VectorCase c = read_case(file, case_name);
  const int n_segments = static_cast<int>(c.cu_seqlens.size()) - 1;
  VectorCaseResult r;
  r.name = case_name;
  r.tokens = c.shape.total_tokens;
  r.segments = n_segments;
  r.heads = c.shape.n_heads;
  r.kv_heads = c.shape.n_kv_heads;
  r.head_dim = c.shape.head_dim;
  r.block_size = c.params.block_size;
  r.top_k = c.params.top_k;

  std::vector<int32_t> own(c.selected.size());  // (N, H, top_k)
  cpu::moba_select_blocks(own.data(), c.q.data(), c.k.data(), c.cu_seqlens.data(), n_segments, c.shape, c.params);
  r.rows = c.shape.total_tokens * c.shape.n_heads;
  for (int64_t row = 0; row < r.rows; ++row) {
    bool same = true;  // both rows are ascending and -1 padded, so equal sets means equal rows
    for (int i = 0; i < c.params.top_k; ++i) same = same && own[row * c.params.top_k + i] == c.selected[row * c.params.top_k + i];
    r.rows_agreeing += same;
  }
  r.selection_agreement = r.rows ? static_cast<double>(r.rows_agreeing) / static_cast<double>(r.rows) : 1.0;
  r.over_expected = run_attention(c, c.selected);
  r.over_own = r.rows_agreeing == r.rows ? r.over_expected : run_attention(c, own);
  return r;
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
  parser.add_option("tol-o", "X", "max relative L2 error of O", cat(defaults.o));
  parser.add_option("tol-lse", "X", "max relative L2 error of LSE", cat(defaults.lse));
  parser.add_option("tol-grad", "X", "max relative L2 error of dQ, dK, dV", cat(defaults.grad));
  parser.add_option("min-selection-agreement", "X", "min fraction of (token, head) rows routed exactly as expected",
                    cat(defaults.min_selection_agreement));
  if (!parser.parse(args)) return 0;

  const std::string backend = parser.get("backend");
  MOBA_CHECK(backend == "cpu" || backend == "cuda",
             cat("moba check-vectors: unknown --backend '", backend, "'"), "use --backend cpu or --backend cuda");
  if (backend == "cuda") {
    log_error(cat("moba check-vectors: --backend cuda is not available: ",
                  MOBA_HAVE_CUDA ? "the CUDA MoBA kernels are not implemented yet"
                                 : "this binary was built without CUDA and the CUDA MoBA kernels are not implemented yet"));
    std::fprintf(stderr, "  hint: run with --backend cpu for now\n");
    return 2;
  }
  VectorTolerances tol;
  tol.o = parser.get_double("tol-o");
  tol.lse = parser.get_double("tol-lse");
  tol.grad = parser.get_double("tol-grad");
  tol.min_selection_agreement = parser.get_double("min-selection-agreement");

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

  info("check-vectors ", file.path(), " backend cpu (fp32); tolerances: o ", tol.o, " lse ", tol.lse, " grads ",
       tol.grad, " selection agreement >= ", tol.min_selection_agreement);
  std::vector<std::string> failures;
  for (const std::string& name : cases) {
    const VectorCaseResult result = check_vector_case(file, name);
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
