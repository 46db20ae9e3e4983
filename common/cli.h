// Minimal command-line parser shared by every `moba` subcommand: --name value, --name=value, flags,
// positionals, and a generated --help. Unknown options are errors that list what is allowed.
// Invariant: every problem with the command line is a UsageError (exit code 2) naming the option and what is
// allowed; numeric options are read only through a range, so no value is non-finite, out of range or overflowing.
#pragma once
#include <map>
#include <string>
#include <vector>

namespace moba {

class ArgParser {
 public:
  ArgParser(std::string command, std::string summary);

  void add_flag(const std::string& name, const std::string& help);
  void add_option(const std::string& name, const std::string& value_name, const std::string& help,
                  const std::string& default_value = "", bool repeatable = false);
  void add_positional(const std::string& name, const std::string& help, bool required = true,
                      bool repeated = false);

  // Returns false when --help was asked for (usage already printed). Throws a UsageError on bad input.
  bool parse(const std::vector<std::string>& args);
  std::string usage() const;

  bool flag(const std::string& name) const;
  bool has(const std::string& name) const;  // option given on the command line (or positional present)
  std::string get(const std::string& name) const;
  std::vector<std::string> get_all(const std::string& name) const;  // repeatable options / repeated positionals
  // The value as a whole number (1000000 or 1e6) / a finite number within [min, max].
  long long get_int(const std::string& name, long long min, long long max) const;
  double get_double(const std::string& name, double min, double max) const;
  // The value, which must be one of `choices`.
  std::string get_choice(const std::string& name, const std::vector<std::string>& choices) const;
  // A UsageError "moba <command>: what" unless ok, for conditions between options (e.g. --bucket <= --seq-len).
  void check(bool ok, const std::string& what, const std::string& hint) const;

 private:
  struct Spec {
    std::string name, value_name, help, default_value;
    bool is_flag = false, repeatable = false, positional = false, required = false;
  };
  const Spec* find(const std::string& name) const;
  std::string command_, summary_;
  std::vector<Spec> specs_;
  std::map<std::string, std::vector<std::string>> values_;
};

}  // namespace moba
