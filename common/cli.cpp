#include "common/cli.h"

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
        throw Error(cat("moba ", command_, ": unknown option --", name), cat("allowed:", allowed, " (see --help)"));
      }
      if (s->is_flag) {
        MOBA_CHECK(!has_value, cat("moba ", command_, ": --", name, " takes no value"), "write it alone: --" + name);
        values_[name].push_back("1");
        continue;
      }
      if (!has_value) {
        MOBA_CHECK(i + 1 < args.size(), cat("moba ", command_, ": --", name, " needs a value (", s->value_name, ")"),
                   "see --help");
        value = args[++i];
      }
      MOBA_CHECK(s->repeatable || !values_.count(name), cat("moba ", command_, ": --", name, " given twice"),
                 "give it once");
      values_[name].push_back(value);
    } else {
      positionals.push_back(a);
    }
  }
  size_t next = 0;
  for (const Spec& s : specs_) {
    if (!s.positional) continue;
    if (next >= positionals.size()) {
      MOBA_CHECK(!s.required, cat("moba ", command_, ": missing argument ", s.name), usage());
      continue;
    }
    if (s.repeatable) {
      while (next < positionals.size()) values_[s.name].push_back(positionals[next++]);
    } else {
      values_[s.name].push_back(positionals[next++]);
    }
  }
  MOBA_CHECK(next == positionals.size(), cat("moba ", command_, ": unexpected argument '", positionals[next], "'"),
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

long long ArgParser::get_int(const std::string& name) const {
  std::string v = get(name);
  try {
    size_t pos = 0;
    long long x = std::stoll(v, &pos);
    if (pos == v.size()) return x;
  } catch (...) {
  }
  throw Error(cat("moba ", command_, ": --", name, " expects an integer, got '", v, "'"), "see --help");
}

double ArgParser::get_double(const std::string& name) const {
  std::string v = get(name);
  try {
    size_t pos = 0;
    double x = std::stod(v, &pos);
    if (pos == v.size()) return x;
  } catch (...) {
  }
  throw Error(cat("moba ", command_, ": --", name, " expects a number, got '", v, "'"), "see --help");
}

}  // namespace moba
