#include "common/cli.h"

#include <charconv>
#include <cmath>
#include <cstdio>
#include <sstream>

#include "common/error.h"
#include "common/log.h"

namespace moba {

ArgParser::ArgParser(std::string command, std::string summary)
    : command_(std::move(command)), summary_(std::move(summary)) {}

void ArgParser::add_flag(const std::string& name, const std::string& help) {
  specs_.push_back({name, "", help, "", true, false, false, false});
}

void ArgParser::add_option(const std::string& name, const std::string& value_name, const std::string& help,
                           const std::string& default_value, bool repeatable) {
  specs_.push_back({name, value_name, help, default_value, false, repeatable, false, false});
}

void ArgParser::add_positional(const std::string& name, const std::string& help, bool required, bool repeated) {
  specs_.push_back({name, "", help, "", false, repeated, true, required});
}

const ArgParser::Spec* ArgParser::find(const std::string& name) const {
  for (const Spec& s : specs_)
    if (s.name == name) return &s;
  return nullptr;
}

std::string ArgParser::usage() const {
  std::ostringstream os;
  os << "usage: moba " << command_;
  for (const Spec& s : specs_)
    if (s.positional) os << (s.required ? " " : " [") << s.name << (s.repeatable ? "..." : "") << (s.required ? "" : "]");
  os << " [options]\n\n" << summary_ << "\n";
  bool any_pos = false;
  for (const Spec& s : specs_) any_pos |= s.positional;
  if (any_pos) {
    os << "\narguments:\n";
    for (const Spec& s : specs_)
      if (s.positional) os << "  " << s.name << "\n      " << s.help << "\n";
  }
  os << "\noptions:\n";
  for (const Spec& s : specs_) {
    if (s.positional) continue;
    os << "  --" << s.name;
    if (!s.is_flag) os << " " << s.value_name;
    os << "\n      " << s.help;
    if (!s.default_value.empty()) os << " (default: " << s.default_value << ")";
    if (s.repeatable) os << " (repeatable)";
    os << "\n";
  }
  os << "  --help\n      print this message\n";
  return os.str();
}

bool ArgParser::parse(const std::vector<std::string>& args) {
  std::vector<std::string> positionals;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "--help" || a == "-h") {
      if (log_rank() == 0) std::fputs(usage().c_str(), stdout);
      return false;
    }
    if (a.rfind("--", 0) == 0) {
      std::string name = a.substr(2), value;
      bool has_value = false;
      if (size_t eq = name.find('='); eq != std::string::npos) {
        value = name.substr(eq + 1);
        name = name.substr(0, eq);
        has_value = true;
      }
      const Spec* s = find(name);
      if (!s || s->positional) {
        std::string allowed;
        for (const Spec& sp : specs_)
          if (!sp.positional) allowed += " --" + sp.name;
        throw UsageError(cat("moba ", command_, ": unknown option --", name), cat("allowed:", allowed, " (see --help)"));
      }
      if (s->is_flag) {
        check(!has_value, cat("--", name, " takes no value"), "write it alone: --" + name);
        values_[name].push_back("1");
        continue;
      }
      if (!has_value) {
        check(i + 1 < args.size(), cat("--", name, " needs a value (", s->value_name, ")"), "see --help");
        value = args[++i];
      }
      check(s->repeatable || !values_.count(name), cat("--", name, " given twice"), "give it once");
      values_[name].push_back(value);
    } else {
      positionals.push_back(a);
    }
  }
  size_t next = 0;
  for (const Spec& s : specs_) {
    if (!s.positional) continue;
    if (next >= positionals.size()) {
      check(!s.required, cat("missing argument ", s.name), usage());
      continue;
    }
    if (s.repeatable) {
      while (next < positionals.size()) values_[s.name].push_back(positionals[next++]);
    } else {
      values_[s.name].push_back(positionals[next++]);
    }
  }
  check(next == positionals.size(), cat("unexpected argument '", next < positionals.size() ? positionals[next] : "", "'"),
        "see --help");
  return true;
}

bool ArgParser::flag(const std::string& name) const { return values_.count(name) > 0; }
bool ArgParser::has(const std::string& name) const { return values_.count(name) > 0; }

std::string ArgParser::get(const std::string& name) const {
  auto it = values_.find(name);
  if (it != values_.end()) return it->second.back();
  const Spec* s = find(name);
  MOBA_ASSERT(s != nullptr);
  return s->default_value;
}

std::vector<std::string> ArgParser::get_all(const std::string& name) const {
  auto it = values_.find(name);
  return it == values_.end() ? std::vector<std::string>{} : it->second;
}

void ArgParser::check(bool ok, const std::string& what, const std::string& hint) const {
  if (!ok) throw UsageError(cat("moba ", command_, ": ", what), hint);
}

long long ArgParser::get_int(const std::string& name, long long min, long long max) const {
  const std::string v = get(name);
  long long x = 0;
  auto [end, error] = std::from_chars(v.data(), v.data() + v.size(), x);
  if (error != std::errc() || end != v.data() + v.size()) {  // 1e6 is a whole number too
    double d = 0;
    auto [d_end, d_error] = std::from_chars(v.data(), v.data() + v.size(), d);
    check(d_error != std::errc::invalid_argument && d_end == v.data() + v.size() && !std::isnan(d) &&
              (d_error != std::errc() || d == std::floor(d)),
          cat("--", name, " expects a whole number, got '", v, "'"), "see --help");
    check(d_error == std::errc() && d >= static_cast<double>(min) && d <= static_cast<double>(max) &&
              std::abs(d) <= 9.0e15,
          cat("--", name, " ", v, " is out of range [", min, ", ", max, "]"), "see --help for what it means");
    x = static_cast<long long>(d);
  }
  check(x >= min && x <= max, cat("--", name, " ", v, " is out of range [", min, ", ", max, "]"),
        "see --help for what it means");
  return x;
}

double ArgParser::get_double(const std::string& name, double min, double max) const {
  const std::string v = get(name);
  double x = 0;
  auto [end, error] = std::from_chars(v.data(), v.data() + v.size(), x);
  check(error != std::errc::invalid_argument && end == v.data() + v.size(),
        cat("--", name, " expects a number, got '", v, "'"), "see --help");
  check(error == std::errc() && std::isfinite(x), cat("--", name, " expects a finite number, got '", v, "'"),
        "see --help");
  check(x >= min && x <= max, cat("--", name, " ", v, " is out of range [", min, ", ", max, "]"),
        "see --help for what it means");
  return x;
}

std::string ArgParser::get_choice(const std::string& name, const std::vector<std::string>& choices) const {
  const std::string v = get(name);
  std::string allowed;
  for (const std::string& c : choices) {
    if (c == v) return v;
    allowed += (allowed.empty() ? "" : ", ") + c;
  }
  throw UsageError(cat("moba ", command_, ": --", name, " '", v, "' is not allowed"), cat("allowed: ", allowed));
}

}  // namespace moba
