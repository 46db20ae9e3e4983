// Strict YAML -> Recipe parsing. Each section is read through a Section, which records the keys it consumed;
// anything left over is an unknown key and an error listing the allowed ones.
#include "trainer/recipe.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "common/error.h"

namespace moba {
namespace {

std::string join(const std::vector<std::string>& v, const char* sep = ", ") {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? sep : "") + v[i];
  return s;
}

// Where every key of one parse came from, for messages: "file:line: key" for keys read from the file,
// "--set key" for keys given (or reached) through an override.
struct Origins {
  std::string file;
  std::set<std::string> overridden;        // dotted paths assigned by --set
  std::map<std::string, std::string> of;  // dotted path -> where it was read

  bool from_override(const std::string& path) const {
    for (const std::string& o : overridden)
      if (path == o || (path.rfind(o, 0) == 0 && (path[o.size()] == '.' || path[o.size()] == '['))) return true;
    return false;
  }
  // Where a key without a value of its own (a default or a derived value) is reported.
  std::string of_key(const std::string& path) const {
    auto it = of.find(path);
    return it != of.end() ? it->second : cat(file, ": ", path);
  }
};

// A YAML map being read: knows its dotted path and where each key came from, converts values with errors that
// name both. A key written without a value (`key:`, `key: null`, `--set key=`) is an error, except for the few
// string keys where empty has a documented meaning (get_or_empty).
class Section {
 public:
  Section(YAML::Node node, std::string path, Origins* origins)
      : node_(std::move(node)), path_(std::move(path)), origins_(origins) {
    if (node_ && !node_.IsNull() && !node_.IsMap())
      throw Error(cat(where_path(path_.empty() ? "(top level)" : path_, node_), ": must be a mapping"),
                  "write it as `key: value` lines indented under it");
    if (node_ && node_.IsMap())
      for (auto it = node_.begin(); it != node_.end(); ++it)
        if (!it->first.IsScalar())
          throw Error(cat(location(path_, it->first), ": a list or map is used as a key in '",
                          path_.empty() ? "(top level)" : path_, "'"),
                      "keys are plain names, e.g. `lr: 3.0e-4`");
  }

  std::string key_path(const std::string& key) const { return path_.empty() ? key : path_ + "." + key; }
  static int line(const YAML::Node& n) { return n.Mark().line + 1; }
  // The key's line when the key is in this section (an empty value `key:` has no line of its own), else n's.
  std::string where(const std::string& key, const YAML::Node& n) const {
    if (node_ && node_.IsMap())
      for (auto it = node_.begin(); it != node_.end(); ++it)
        if (it->first.IsScalar() && it->first.Scalar() == key) return where_path(key_path(key), it->first);
    return where_path(key_path(key), n);
  }

  // The key's node; an undefined node (operator! is true) when the key or the whole section is absent.
  YAML::Node raw(const std::string& key) {
    allowed_.push_back(key);
    if (!node_ || node_.IsNull()) return YAML::Node(YAML::NodeType::Undefined);
    const YAML::Node& section = node_;  // the const lookup never inserts the key
    return section[key];
  }

  template <typename T>
  void get(const std::string& key, T& out) {
    YAML::Node n = raw(key);
    if (!n) return;
    convert(key, n, out);
  }

  // A string key where no value means empty (what the recipe documents for it: no validation set, no init).
  void get_or_empty(const std::string& key, std::string& out) {
    YAML::Node n = raw(key);
    if (!n) return;
    if (n.IsNull()) {
      record_origin(key, n);
      out.clear();
      return;
    }
    convert(key, n, out);
  }

  void get_choice(const std::string& key, std::string& out, const std::vector<std::string>& choices) {
    YAML::Node n = raw(key);
    if (!n) return;
    convert(key, n, out);
    if (std::find(choices.begin(), choices.end(), out) == choices.end())
      throw Error(cat(where(key, n), ": '", out, "' is not allowed"), cat("allowed: ", join(choices)));
  }

  Section child(const std::string& key) { return Section(raw(key), key_path(key), origins_); }
  Section child(const YAML::Node& node, const std::string& path) { return Section(node, path, origins_); }
  void record_origin(const std::string& key, const YAML::Node& n) { origins_->of[key_path(key)] = where(key, n); }

  // Errors on keys that nobody asked for.
  void finish() const {
    if (!node_ || !node_.IsMap()) return;
    for (auto it = node_.begin(); it != node_.end(); ++it) {
      std::string k = it->first.IsScalar() ? it->first.as<std::string>() : "(a list or map used as a key)";
      if (std::find(allowed_.begin(), allowed_.end(), k) == allowed_.end())
        throw Error(cat(location(key_path(k), it->first), ": unknown key '", key_path(k), "'"),
                    cat("allowed keys", path_.empty() ? "" : " in '" + path_ + "'", ": ", join(allowed_)));
    }
  }

  void convert(const std::string& key, const YAML::Node& n, std::string& out) const {
    present(key, n);
    if (!n.IsScalar()) throw Error(cat(where(key, n), ": expected a string"), "write a plain value");
    out = n.as<std::string>();
  }
  void convert(const std::string& key, const YAML::Node& n, double& out) const {
    present(key, n);
    try {
      if (!n.IsScalar()) throw YAML::Exception(n.Mark(), "");
      out = n.as<double>();
    } catch (const YAML::Exception&) {
      throw Error(cat(where(key, n), ": expected a number, got '", scalar(n), "'"), "e.g. 3.0e-4 or 1000000");
    }
    if (!std::isfinite(out))
      throw Error(cat(where(key, n), ": expected a finite number, got '", scalar(n), "'"), "e.g. 3.0e-4 or 1000000");
  }
  void convert(const std::string& key, const YAML::Node& n, int64_t& out) const {
    double d = 0;
    convert(key, n, d);  // accepts 1e6 as well as 1000000
    if (d != std::floor(d))
      throw Error(cat(where(key, n), ": expected an integer, got ", scalar(n)), "write a whole number");
    if (std::abs(d) > kMaxInteger)
      throw Error(cat(where(key, n), ": ", scalar(n), " is out of range (at most 9e15 in magnitude)"),
                  "use a smaller value");
    out = static_cast<int64_t>(d);
  }
  void convert(const std::string& key, const YAML::Node& n, int& out) const {
    int64_t v = 0;
    convert(key, n, v);
    if (v < INT32_MIN || v > INT32_MAX)
      throw Error(cat(where(key, n), ": ", v, " is out of range (at most ", INT32_MAX, ")"), "use a smaller value");
    out = static_cast<int>(v);
  }
  void convert(const std::string& key, const YAML::Node& n, uint64_t& out) const {
    int64_t v = 0;
    convert(key, n, v);
    if (v < 0) throw Error(cat(where(key, n), ": must not be negative"), "use a value >= 0");
    out = static_cast<uint64_t>(v);
  }
  void convert(const std::string& key, const YAML::Node& n, bool& out) const {
    present(key, n);
    try {
      if (!n.IsScalar()) throw YAML::Exception(n.Mark(), "");
      out = n.as<bool>();
    } catch (const YAML::Exception&) {
      throw Error(cat(where(key, n), ": expected true or false, got '", scalar(n), "'"), "write true or false");
    }
  }

 private:
  static constexpr double kMaxInteger = 9.0e15;  // integers stay exact in a double below 2^53

  static std::string scalar(const YAML::Node& n) { return n.IsScalar() ? n.as<std::string>() : "(a list or map)"; }
  // "file:line" for keys from the file, "--set" for overridden ones; where_path adds the key.
  std::string location(const std::string& path, const YAML::Node& n) const {
    return origins_->from_override(path) ? std::string("--set") : cat(origins_->file, ":", line(n));
  }
  std::string where_path(const std::string& path, const YAML::Node& n) const {
    return cat(location(path, n), origins_->from_override(path) ? " " : ": ", path);
  }
  // Records where the key was read; a key given without a value is an error here.
  void present(const std::string& key, const YAML::Node& n) const {
    origins_->of[key_path(key)] = where(key, n);  // origins_ is shared by the parse, not part of this Section
    if (n.IsNull())
      throw Error(cat(where(key, n), ": no value given"),
                  origins_->from_override(key_path(key))
                      ? cat("write --set ", key_path(key), "=VALUE, or leave the --set out to keep the recipe's value")
                      : "write a value, or delete the line to use the default");
  }

  YAML::Node node_;
  std::string path_;
  Origins* origins_;
  std::vector<std::string> allowed_;
};

AttentionMode parse_mode(Section& s, const std::string& key, AttentionMode fallback) {
  std::string m = attention_mode_name(fallback);
  s.get_choice(key, m, {"full", "moba"});
  return m == "moba" ? AttentionMode::moba : AttentionMode::full;
}

MobaSettings parse_moba(Section s, MobaSettings m) {
  s.get("block_size", m.block_size);
  s.get("top_k", m.top_k);
  s.finish();
  return m;
}

// full_layers may be a string ("last:3", "first:2", "0-3", "none") or a list of indices.
std::string layer_spec(Section& s, const std::string& key, bool* present) {
  YAML::Node n = s.raw(key);
  *present = n && !n.IsNull();  // no value: none (or, in a phase, the recipe's)
  if (n) s.record_origin(key, n);
  if (!*present) return "";
  if (n.IsScalar()) return n.as<std::string>();
  if (n.IsSequence()) {
    std::vector<std::string> parts;
    for (const auto& e : n) {
      if (!e.IsScalar()) throw Error(cat(s.where(key, e), ": list entries must be layer indices"), "e.g. [0, 5, 7]");
      parts.push_back(e.as<std::string>());
    }
    return "[" + join(parts) + "]";
  }
  throw Error(cat(s.where(key, n), ": expected \"last:N\", \"first:N\", \"a-b\" or a list of layer indices"),
              "e.g. full_layers: last:3");
}

// Applies one --set key=value (YAML syntax for the value) to the tree before the typed parse. A malformed
// assignment is a usage error; an empty value reaches the parse as "no value" (an error unless the key accepts
// empty), except on a section, which it would silently reset to its defaults.
void apply_override(YAML::Node root, const std::string& assignment, Origins& origins) {
  size_t eq = assignment.find('=');
  if (eq == std::string::npos || eq == 0)
    throw UsageError(cat("--set '", assignment, "': expected key=value"), "e.g. --set train.optimizer.lr=3e-4");
  std::string key = assignment.substr(0, eq), value = assignment.substr(eq + 1);
  if (key.front() == '.' || key.back() == '.' || key.find("..") != std::string::npos)
    throw UsageError(cat("--set '", assignment, "': empty key segment"), "e.g. --set model.d_model=512");
  std::vector<std::string> parts;
  std::stringstream ss(key);
  for (std::string p; std::getline(ss, p, '.');) parts.push_back(p);
  // Walk with YAML::Node handles; yaml-cpp nodes are references, so assignments land in root.
  std::vector<YAML::Node> chain{root};
  for (size_t i = 0; i + 1 < parts.size(); ++i) {
    YAML::Node next = chain.back()[parts[i]];
    if (!next || next.IsNull()) {  // a section the recipe does not have: it comes from --set
      chain.back()[parts[i]] = YAML::Node(YAML::NodeType::Map);
      next = chain.back()[parts[i]];
      std::string section = parts[0];
      for (size_t j = 1; j <= i; ++j) section += "." + parts[j];
      origins.overridden.insert(section);
    }
    if (!next.IsMap())
      throw UsageError(cat("--set ", key, ": '", parts[i], "' is not a section"), "check the key path");
    chain.push_back(next);
  }
  YAML::Node parsed;
  try {
    parsed = YAML::Load(value);
  } catch (const YAML::Exception& e) {
    throw UsageError(cat("--set ", key, ": cannot parse value '", value, "'"),
                     "use YAML syntax, e.g. [0, 5] or 1e-3");
  }
  YAML::Node current = chain.back()[parts.back()];
  if ((!parsed || parsed.IsNull()) && current && current.IsMap())
    throw UsageError(cat("--set ", key, "=", value, ": '", key, "' is a section and needs a value for each key"),
                     cat("set its keys one by one, e.g. --set ", key, ".KEY=VALUE"));
  chain.back()[parts.back()] = parsed;
  origins.overridden.insert(key);
}

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

void validate(Recipe& r, const Origins& origins) {
  auto fail = [&](const std::string& key, const std::string& what, const std::string& hint) {
    throw Error(cat(origins.of_key(key), ": ", what), hint);
  };
  ModelSettings& m = r.model;
  if (m.d_model <= 0) fail("model.d_model", "must be positive", "e.g. 256");
  if (m.n_layers <= 0) fail("model.n_layers", "must be positive", "e.g. 4");
  if (m.n_heads <= 0) fail("model.n_heads", "must be positive", "e.g. 4");
  if (m.n_kv_heads == 0) m.n_kv_heads = m.n_heads;
  if (m.n_kv_heads < 0 || m.n_heads % m.n_kv_heads != 0)
    fail("model.n_kv_heads", cat(m.n_kv_heads, " does not divide n_heads = ", m.n_heads),
         "use a divisor of n_heads (1 = MQA, n_heads = MHA)");
  if (m.head_dim == 0) {
    if (m.d_model % m.n_heads != 0)
      fail("model.head_dim", cat("d_model ", m.d_model, " is not divisible by n_heads ", m.n_heads),
           "set model.head_dim explicitly or change d_model/n_heads");
    m.head_dim = m.d_model / m.n_heads;
  }
  if (m.head_dim <= 0 || m.head_dim % 2 != 0) fail("model.head_dim", "must be positive and even (RoPE pairs)", "e.g. 64");
  if (m.ffn_hidden == 0) m.ffn_hidden = static_cast<int>(round_up((8 * m.d_model + 2) / 3, 64));
  if (m.ffn_hidden < 0) fail("model.ffn_hidden", "must be positive", "e.g. 4 * d_model * 2/3");
  if (m.vocab_size < 0) fail("model.vocab_size", "must not be negative", "0 takes it from the dataset");
  if (m.rope_theta <= 0) fail("model.rope_theta", "must be positive", "e.g. 10000");
  if (m.init_std <= 0) fail("model.init_std", "must be positive", "e.g. 0.02");
  if (m.norm_eps <= 0) fail("model.norm_eps", "must be positive", "e.g. 1e-5");

  auto check_moba = [&](const MobaSettings& s, const std::string& where) {
    if (s.block_size < 1) fail(where + ".block_size", "must be >= 1", "the paper uses 512..4096");
    if (s.top_k < 1) fail(where + ".top_k", "must be >= 1 (it counts the current block)", "e.g. 3");
  };
  check_moba(r.attention.moba, "attention.moba");
  r.attention.full_layers =
      resolve_layers(r.attention.full_layers.spec, m.n_layers, origins.of_key("attention.full_layers"));
  double prev = 0;
  for (size_t i = 0; i < r.phases.size(); ++i) {
    Phase& p = r.phases[i];
    std::string where = cat("phases[", i, "]");
    if (!(p.until > prev && p.until <= 1.0))
      fail(where + ".until", cat(p.until, " must be in (", prev, ", 1]"),
           "phase boundaries are increasing fractions of train.tokens");
    prev = p.until;
    if (p.moba) check_moba(*p.moba, where + ".attention.moba");
    if (p.full_layers)
      *p.full_layers =
          resolve_layers(p.full_layers->spec, m.n_layers, origins.of_key(where + ".attention.full_layers"));
  }

  DataSettings& d = r.data;
  if (d.seq_len < 2) fail("data.seq_len", "must be >= 2", "e.g. 1024");
  if (d.seq_len > INT32_MAX)
    fail("data.seq_len", cat("must be at most ", INT32_MAX, " (positions are int32)"), "e.g. 1024");
  TrainSettings& t = r.train;
  if (t.tokens <= 0) fail("train.tokens", "must be positive", "e.g. 1.0e7");
  if (t.tokens > 9.0e15) fail("train.tokens", "must be at most 9e15 (token counts stay exact)", "e.g. 1.0e12");
  if (t.micro_batch_seqs <= 0) fail("train.micro_batch_seqs", "must be positive", "e.g. 4");
  const int64_t micro_tokens = t.micro_batch_seqs * d.seq_len;  // both below 2^31: no overflow
  if (micro_tokens > INT32_MAX)
    fail("train.micro_batch_seqs",
         cat("micro_batch_seqs * seq_len = ", micro_tokens, " tokens: more than ", INT32_MAX,
             " per micro-batch (token offsets are int32)"),
         "lower train.micro_batch_seqs or data.seq_len");
  // Sizes whose products would overflow the memory plan: the parameters, and the widest activation buffer of
  // one micro-batch over all layers (the plan then refuses anything that does not fit the machine).
  const double dm = m.d_model, hd = m.head_dim, layers = m.n_layers;
  const double projections = (m.n_heads + 2.0 * m.n_kv_heads) * hd;
  const double parameters = 2.0 * std::max(m.vocab_size, 1) * dm +
                            layers * (projections * dm + m.n_heads * hd * dm + 3.0 * m.ffn_hidden * dm + 2 * dm);
  if (parameters > 1.0e14)
    fail("model", cat("d_model ", m.d_model, ", n_layers ", m.n_layers, ", heads ", m.n_heads, " x ", m.head_dim,
                      ", ffn_hidden ", m.ffn_hidden, " and vocab_size ", m.vocab_size, " make ", parameters,
                      " parameters, more than 1e14"),
         "use smaller model sizes");
  double top_k = r.attention.moba.top_k;
  for (const Phase& p : r.phases)
    if (p.moba) top_k = std::max<double>(top_k, p.moba->top_k);
  const double widest = std::max({dm, 2.0 * m.ffn_hidden, projections, m.n_heads * top_k});
  if (static_cast<double>(micro_tokens) * layers * widest > std::pow(2.0, 56))
    fail("train.micro_batch_seqs",
         cat("a micro-batch of ", micro_tokens, " tokens through ", m.n_layers, " layers of width ", widest,
             " needs more than 2^56 activation values"),
         "lower train.micro_batch_seqs or data.seq_len, or use a smaller model");
  if (t.global_batch_tokens <= 0 || t.global_batch_tokens % micro_tokens != 0)
    fail("train.global_batch_tokens",
         cat(t.global_batch_tokens, " is not a positive multiple of micro_batch_seqs * seq_len = ", micro_tokens),
         cat("use e.g. ", std::max<int64_t>(1, t.global_batch_tokens / micro_tokens) * micro_tokens));
  const OptimizerSettings& o = t.optimizer;
  if (o.lr <= 0) fail("train.optimizer.lr", "must be positive", "e.g. 1e-3");
  if (o.beta1 < 0 || o.beta1 >= 1 || o.beta2 < 0 || o.beta2 >= 1)
    fail("train.optimizer.betas", "each beta must be in [0, 1)", "e.g. [0.9, 0.95]");
  if (o.eps <= 0) fail("train.optimizer.eps", "must be positive", "e.g. 1e-8");
  if (o.weight_decay < 0) fail("train.optimizer.weight_decay", "must not be negative", "e.g. 0.1");
  const ScheduleSettings& s = t.schedule;
  if (s.warmup_tokens < 0) fail("train.schedule.warmup_tokens", "must not be negative", "e.g. 1e5");
  if (s.decay_fraction < 0 || s.decay_fraction > 1) fail("train.schedule.decay_fraction", "must be in [0, 1]", "e.g. 0.2");
  if (s.min_lr_ratio < 0 || s.min_lr_ratio > 1) fail("train.schedule.min_lr_ratio", "must be in [0, 1]", "e.g. 0.1");
  if (t.grad_clip < 0) fail("train.grad_clip", "must not be negative", "0 turns clipping off");
  if (r.parallel.context < 1) fail("parallel.context", "must be >= 1", "1 = no context parallelism");
  if (r.parallel.data < 0) fail("parallel.data", "must be >= 1 or auto", "auto uses the remaining ranks");
  if (r.parallel.zero != 0 && r.parallel.zero != 1) fail("parallel.zero", "must be 0 or 1", "1 shards optimizer state");
  if (!(r.parallel.timeout_s > 0) || r.parallel.timeout_s > 1.0e6)
    fail("parallel.timeout_s", "must be a positive number of seconds, at most 1e6", "e.g. 120");
  if (r.eval.every_tokens < 0) fail("eval.every_tokens", "must not be negative", "0 evaluates only at the end");
  if (r.checkpoint.every_tokens < 0)
    fail("checkpoint.every_tokens", "must not be negative", "0 writes a checkpoint only at the end");
  if (r.eval.max_batches < 1) fail("eval.max_batches", "must be >= 1", "e.g. 16");
  if (r.eval.position_bucket < 1) fail("eval.position_bucket", "must be >= 1", "e.g. 2048");
  if (r.eval.trailing < 1) fail("eval.trailing", "must be >= 1", "e.g. 2048");
  if (r.checkpoint.keep < 1) fail("checkpoint.keep", "must be >= 1", "e.g. 3");
  if (r.log.every_steps < 1) fail("log.every_steps", "must be >= 1", "e.g. 10");
  if (r.run_dir.empty()) r.run_dir = "runs/" + r.name;
}

}  // namespace

AttentionMode AttentionSettings::layer_mode(int layer) const {
  if (std::binary_search(full_layers.layers.begin(), full_layers.layers.end(), layer)) return AttentionMode::full;
  return mode;
}

AttentionSettings Recipe::attention_at(double tokens_seen) const {
  AttentionSettings a = attention;
  // The last step can end past train.tokens (whole batches): a checkpoint there was trained, and is evaluated, in
  // the phase that ends at 1.0, so fractions from 1 on count as just below it.
  const double fraction = std::min(tokens_seen / train.tokens, std::nextafter(1.0, 0.0));
  for (const Phase& p : phases) {
    if (fraction < p.until) {
      if (p.mode) a.mode = *p.mode;
      if (p.moba) a.moba = *p.moba;
      if (p.full_layers) a.full_layers = *p.full_layers;
      break;
    }
  }
  return a;
}

LayerSelection resolve_layers(const std::string& spec_in, int n_layers, const std::string& where) {
  LayerSelection sel;
  sel.spec = spec_in;
  std::string spec = spec_in;
  spec.erase(std::remove(spec.begin(), spec.end(), ' '), spec.end());
  auto bad = [&](const std::string& why) -> Error {
    return Error(cat(where, ": full_layers '", spec_in, "': ", why),
                 cat("use \"last:N\", \"first:N\", \"a-b\", \"none\" or a list like [0, 5] with indices in [0, ",
                     n_layers, ")"));
  };
  auto to_int = [&](const std::string& s) {
    try {
      size_t pos = 0;
      int v = std::stoi(s, &pos);
      if (pos != s.size()) throw bad("'" + s + "' is not an integer");
      return v;
    } catch (const Error&) {
      throw;
    } catch (...) {
      throw bad("'" + s + "' is not an integer");
    }
  };
  std::set<int> layers;
  if (spec.empty() || spec == "none") {
  } else if (spec.rfind("last:", 0) == 0 || spec.rfind("first:", 0) == 0) {
    bool last = spec[0] == 'l';
    int n = to_int(spec.substr(last ? 5 : 6));
    if (n < 0 || n > n_layers) throw bad(cat("N must be in [0, ", n_layers, "]"));
    for (int i = 0; i < n; ++i) layers.insert(last ? n_layers - 1 - i : i);
  } else if (spec.front() == '[' && spec.back() == ']') {
    std::stringstream ss(spec.substr(1, spec.size() - 2));
    for (std::string part; std::getline(ss, part, ',');) {
      if (part.empty()) continue;
      int v = to_int(part);
      if (v < 0 || v >= n_layers) throw bad(cat("layer ", v, " is out of range"));
      layers.insert(v);
    }
  } else if (size_t dash = spec.find('-'); dash != std::string::npos && dash > 0) {
    int a = to_int(spec.substr(0, dash)), b = to_int(spec.substr(dash + 1));
    if (a < 0 || b >= n_layers || a > b) throw bad("range out of bounds");
    for (int i = a; i <= b; ++i) layers.insert(i);
  } else {
    int v = to_int(spec);
    if (v < 0 || v >= n_layers) throw bad(cat("layer ", v, " is out of range"));
    layers.insert(v);
  }
  sel.layers.assign(layers.begin(), layers.end());
  return sel;
}

Recipe parse_recipe_text(const std::string& text, const std::string& source, const std::vector<std::string>& overrides) {
  YAML::Node root;
  try {
    root = YAML::Load(text);
  } catch (const YAML::ParserException& e) {
    throw Error(cat(source, ":", e.mark.line + 1, ": YAML syntax error: ", e.msg), "fix the YAML syntax at that line");
  }
  if (!root || root.IsNull()) root = YAML::Node(YAML::NodeType::Map);
  Origins origins{source, {}, {}};
  if (!root.IsMap()) Section(root, "", &origins);  // throws: the top level must be a mapping
  for (const std::string& o : overrides) apply_override(root, o, origins);

  Recipe r;
  r.source_path = source;
  Section top(root, "", &origins);
  top.get("name", r.name);
  top.get("seed", r.seed);
  top.get_choice("backend", r.backend, {"cpu", "cuda"});
  top.get_or_empty("run_dir", r.run_dir);      // empty: runs/<name>
  top.get_or_empty("init_from", r.init_from);  // empty: initialise from the seed

  Section model = top.child("model");
  ModelSettings& m = r.model;
  model.get("vocab_size", m.vocab_size);
  model.get("d_model", m.d_model);
  model.get("n_layers", m.n_layers);
  model.get("n_heads", m.n_heads);
  model.get("n_kv_heads", m.n_kv_heads);
  model.get("head_dim", m.head_dim);
  model.get("ffn_hidden", m.ffn_hidden);
  model.get("rope_theta", m.rope_theta);
  model.get("tie_embeddings", m.tie_embeddings);
  model.get("init_std", m.init_std);
  model.get("norm_eps", m.norm_eps);
  model.finish();

  Section attn = top.child("attention");
  r.attention.mode = parse_mode(attn, "mode", AttentionMode::full);
  r.attention.moba = parse_moba(attn.child("moba"), MobaSettings{});
  bool present = false;
  r.attention.full_layers.spec = layer_spec(attn, "full_layers", &present);
  attn.finish();

  YAML::Node phases = top.raw("phases");
  if (phases && !phases.IsNull()) {
    if (!phases.IsSequence())
      throw Error(cat(top.where("phases", phases), ": must be a list"),
                  "e.g. phases: [{until: 0.9, attention: {mode: moba}}, {until: 1.0, attention: {mode: full}}]");
    for (size_t i = 0; i < phases.size(); ++i) {
      Section ps = top.child(phases[i], cat("phases[", i, "]"));
      Phase p;
      YAML::Node until = ps.raw("until");
      if (!until) throw Error(cat(top.where(cat("phases[", i, "]"), phases[i]), ": needs 'until'"),
                              "a fraction of train.tokens in (0, 1]");
      ps.convert("until", until, p.until);
      Section pa = ps.child("attention");
      YAML::Node mode_node = pa.raw("mode");
      if (mode_node && !mode_node.IsNull()) {
        std::string mode;
        pa.convert("mode", mode_node, mode);
        if (mode != "full" && mode != "moba")
          throw Error(cat(pa.where("mode", mode_node), ": '", mode, "' is not allowed"), "allowed: full, moba");
        p.mode = mode == "moba" ? AttentionMode::moba : AttentionMode::full;
      }
      YAML::Node moba_node = pa.raw("moba");
      if (moba_node && !moba_node.IsNull())
        p.moba = parse_moba(pa.child(moba_node, pa.key_path("moba")), r.attention.moba);
      bool has_layers = false;
      std::string spec = layer_spec(pa, "full_layers", &has_layers);
      if (has_layers) p.full_layers = LayerSelection{spec, {}};
      pa.finish();
      ps.finish();
      r.phases.push_back(p);
    }
  }

  Section data = top.child("data");
  data.get_or_empty("train", r.data.train);  // empty: not set (moba train says so; bench train needs none)
  data.get_or_empty("val", r.data.val);      // empty: no validation
  data.get("seq_len", r.data.seq_len);
  data.get_choice("pack", r.data.pack, {"documents", "concat", "long_documents"});
  data.get("sft", r.data.sft);
  data.finish();

  Section train = top.child("train");
  TrainSettings& t = r.train;
  train.get("tokens", t.tokens);
  train.get("global_batch_tokens", t.global_batch_tokens);
  train.get("micro_batch_seqs", t.micro_batch_seqs);
  Section opt = train.child("optimizer");
  opt.get_choice("name", t.optimizer.name, {"adamw"});
  opt.get("lr", t.optimizer.lr);
  YAML::Node betas = opt.raw("betas");
  if (betas && !betas.IsNull()) {
    if (!betas.IsSequence() || betas.size() != 2)
      throw Error(cat(opt.where("betas", betas), ": expected two numbers"), "e.g. betas: [0.9, 0.95]");
    opt.convert("betas", betas[0], t.optimizer.beta1);
    opt.convert("betas", betas[1], t.optimizer.beta2);
  }
  opt.get("eps", t.optimizer.eps);
  opt.get("weight_decay", t.optimizer.weight_decay);
  opt.get("decay_norms_and_embeddings", t.optimizer.decay_norms_and_embeddings);
  opt.finish();
  Section sched = train.child("schedule");
  sched.get_choice("kind", t.schedule.kind, {"cosine", "wsd", "constant"});
  sched.get("warmup_tokens", t.schedule.warmup_tokens);
  sched.get("decay_fraction", t.schedule.decay_fraction);
  sched.get("min_lr_ratio", t.schedule.min_lr_ratio);
  sched.finish();
  train.get("grad_clip", t.grad_clip);
  train.get_choice("precision", t.precision, {"auto", "fp32", "bf16"});
  train.get_choice("recompute", t.recompute, {"none", "attention", "full"});
  train.get("deterministic", t.deterministic);
  train.finish();

  Section par = top.child("parallel");
  par.get("context", r.parallel.context);
  YAML::Node dp = par.raw("data");
  if (dp && !dp.IsNull()) {
    if (dp.IsScalar() && dp.as<std::string>() == "auto") r.parallel.data = 0;
    else par.convert("data", dp, r.parallel.data);
  }
  par.get("zero", r.parallel.zero);
  par.get_choice("transport", r.parallel.transport, {"auto", "nccl", "mpi"});
  par.get("timeout_s", r.parallel.timeout_s);
  par.finish();

  Section ev = top.child("eval");
  ev.get("every_tokens", r.eval.every_tokens);
  ev.get("max_batches", r.eval.max_batches);
  ev.get("position_bucket", r.eval.position_bucket);
  ev.get("trailing", r.eval.trailing);
  ev.finish();

  Section ck = top.child("checkpoint");
  ck.get("every_tokens", r.checkpoint.every_tokens);
  ck.get("keep", r.checkpoint.keep);
  ck.finish();

  Section lg = top.child("log");
  lg.get("every_steps", r.log.every_steps);
  lg.finish();
  top.finish();

  validate(r, origins);
  return r;
}

Recipe load_recipe(const std::string& path, const std::vector<std::string>& overrides) {
  std::ifstream in(path);
  MOBA_CHECK(in.good(), cat("recipe not found: ", path), "pass the path of a YAML recipe, e.g. recipes/quickstart.yaml");
  std::stringstream ss;
  ss << in.rdbuf();
  return parse_recipe_text(ss.str(), path, overrides);
}

std::string recipe_to_yaml(const Recipe& r) {
  YAML::Emitter e;
  // Doubles print in the shortest form that reads back exactly (0.2, not 0.20000000000000001).
  e.SetDoublePrecision(17);
  auto num = [](double v) {
    char buf[40];
    for (int precision = 6; precision <= 17; ++precision) {
      std::snprintf(buf, sizeof buf, "%.*g", precision, v);
      if (std::strtod(buf, nullptr) == v) break;
    }
    return std::string(buf);
  };
  e << YAML::BeginMap;
  e << YAML::Key << "name" << YAML::Value << r.name;
  e << YAML::Key << "seed" << YAML::Value << r.seed;
  e << YAML::Key << "backend" << YAML::Value << r.backend;
  e << YAML::Key << "run_dir" << YAML::Value << r.run_dir;
  if (!r.init_from.empty()) e << YAML::Key << "init_from" << YAML::Value << r.init_from;
  const ModelSettings& m = r.model;
  e << YAML::Key << "model" << YAML::Value << YAML::BeginMap;
  e << YAML::Key << "vocab_size" << YAML::Value << m.vocab_size << YAML::Key << "d_model" << YAML::Value << m.d_model
    << YAML::Key << "n_layers" << YAML::Value << m.n_layers << YAML::Key << "n_heads" << YAML::Value << m.n_heads
    << YAML::Key << "n_kv_heads" << YAML::Value << m.n_kv_heads << YAML::Key << "head_dim" << YAML::Value
    << m.head_dim << YAML::Key << "ffn_hidden" << YAML::Value << m.ffn_hidden << YAML::Key << "rope_theta"
    << YAML::Value << num(m.rope_theta) << YAML::Key << "tie_embeddings" << YAML::Value << m.tie_embeddings
    << YAML::Key << "init_std" << YAML::Value << num(m.init_std) << YAML::Key << "norm_eps" << YAML::Value << num(m.norm_eps);
  e << YAML::EndMap;
  auto emit_moba = [&](const MobaSettings& s) {
    e << YAML::Flow << YAML::BeginMap << YAML::Key << "block_size" << YAML::Value << s.block_size << YAML::Key
      << "top_k" << YAML::Value << s.top_k << YAML::EndMap;
  };
  e << YAML::Key << "attention" << YAML::Value << YAML::BeginMap;
  e << YAML::Key << "mode" << YAML::Value << attention_mode_name(r.attention.mode);
  e << YAML::Key << "moba" << YAML::Value;
  emit_moba(r.attention.moba);
  e << YAML::Key << "full_layers" << YAML::Value
    << (r.attention.full_layers.spec.empty() ? std::string("none") : r.attention.full_layers.spec);
  e << YAML::EndMap;
  if (!r.phases.empty()) {
    e << YAML::Key << "phases" << YAML::Value << YAML::BeginSeq;
    for (const Phase& p : r.phases) {
      e << YAML::BeginMap << YAML::Key << "until" << YAML::Value << num(p.until);
      e << YAML::Key << "attention" << YAML::Value << YAML::BeginMap;
      if (p.mode) e << YAML::Key << "mode" << YAML::Value << attention_mode_name(*p.mode);
      if (p.moba) {
        e << YAML::Key << "moba" << YAML::Value;
        emit_moba(*p.moba);
      }
      if (p.full_layers) e << YAML::Key << "full_layers" << YAML::Value << p.full_layers->spec;
      e << YAML::EndMap << YAML::EndMap;
    }
    e << YAML::EndSeq;
  }
  e << YAML::Key << "data" << YAML::Value << YAML::BeginMap;
  e << YAML::Key << "train" << YAML::Value << r.data.train << YAML::Key << "val" << YAML::Value << r.data.val
    << YAML::Key << "seq_len" << YAML::Value << r.data.seq_len << YAML::Key << "pack" << YAML::Value << r.data.pack
    << YAML::Key << "sft" << YAML::Value << r.data.sft;
  e << YAML::EndMap;
  const TrainSettings& t = r.train;
  e << YAML::Key << "train" << YAML::Value << YAML::BeginMap;
  e << YAML::Key << "tokens" << YAML::Value << num(t.tokens) << YAML::Key << "global_batch_tokens" << YAML::Value
    << t.global_batch_tokens << YAML::Key << "micro_batch_seqs" << YAML::Value << t.micro_batch_seqs;
  e << YAML::Key << "optimizer" << YAML::Value << YAML::BeginMap << YAML::Key << "name" << YAML::Value
    << t.optimizer.name << YAML::Key << "lr" << YAML::Value << num(t.optimizer.lr) << YAML::Key << "betas" << YAML::Value
    << YAML::Flow << YAML::BeginSeq << num(t.optimizer.beta1) << num(t.optimizer.beta2) << YAML::EndSeq << YAML::Key << "eps"
    << YAML::Value << num(t.optimizer.eps) << YAML::Key << "weight_decay" << YAML::Value << num(t.optimizer.weight_decay)
    << YAML::Key << "decay_norms_and_embeddings" << YAML::Value << t.optimizer.decay_norms_and_embeddings
    << YAML::EndMap;
  e << YAML::Key << "schedule" << YAML::Value << YAML::BeginMap << YAML::Key << "kind" << YAML::Value
    << t.schedule.kind << YAML::Key << "warmup_tokens" << YAML::Value << num(t.schedule.warmup_tokens) << YAML::Key
    << "decay_fraction" << YAML::Value << num(t.schedule.decay_fraction) << YAML::Key << "min_lr_ratio" << YAML::Value
    << num(t.schedule.min_lr_ratio) << YAML::EndMap;
  e << YAML::Key << "grad_clip" << YAML::Value << num(t.grad_clip) << YAML::Key << "precision" << YAML::Value
    << t.precision << YAML::Key << "recompute" << YAML::Value << t.recompute << YAML::Key << "deterministic"
    << YAML::Value << t.deterministic;
  e << YAML::EndMap;
  e << YAML::Key << "parallel" << YAML::Value << YAML::BeginMap << YAML::Key << "context" << YAML::Value
    << r.parallel.context << YAML::Key << "data" << YAML::Value;
  if (r.parallel.data == 0) e << "auto"; else e << r.parallel.data;
  e << YAML::Key << "zero" << YAML::Value << r.parallel.zero << YAML::Key << "transport" << YAML::Value
    << r.parallel.transport << YAML::Key << "timeout_s" << YAML::Value << r.parallel.timeout_s << YAML::EndMap;
  e << YAML::Key << "eval" << YAML::Value << YAML::BeginMap << YAML::Key << "every_tokens" << YAML::Value
    << num(r.eval.every_tokens) << YAML::Key << "max_batches" << YAML::Value << r.eval.max_batches << YAML::Key
    << "position_bucket" << YAML::Value << r.eval.position_bucket << YAML::Key << "trailing" << YAML::Value
    << r.eval.trailing << YAML::EndMap;
  e << YAML::Key << "checkpoint" << YAML::Value << YAML::BeginMap << YAML::Key << "every_tokens" << YAML::Value
    << num(r.checkpoint.every_tokens) << YAML::Key << "keep" << YAML::Value << r.checkpoint.keep << YAML::EndMap;
  e << YAML::Key << "log" << YAML::Value << YAML::BeginMap << YAML::Key << "every_steps" << YAML::Value
    << r.log.every_steps << YAML::EndMap;
  e << YAML::EndMap;
  return std::string(e.c_str()) + "\n";
}

}  // namespace moba
