// A minimal JSON reader for one JSON Lines record: a single object whose string members are returned decoded
// (escapes incl. \uXXXX and surrogate pairs become UTF-8); members of other types are validated and skipped.
// Invariant: anything that is not one well-formed JSON object throws JsonSyntaxError naming the column.
#pragma once
#include <map>
#include <stdexcept>
#include <string>
#include <string_view>

namespace moba::data {

// A syntax error at a 1-based byte column of the line; the caller adds the file and line number.
class JsonSyntaxError : public std::runtime_error {
 public:
  JsonSyntaxError(size_t column, const std::string& what) : std::runtime_error(what), column_(column) {}
  size_t column() const { return column_; }

 private:
  size_t column_;
};

// Parses `line` as one JSON object and returns its string members (key -> decoded UTF-8 value). A lone
// surrogate escape (\uD800 without its pair) decodes to U+FFFD, as Python's and most decoders' lenient modes do.
// A key given twice keeps the last value (as JSON parsers conventionally do).
std::map<std::string, std::string> parse_json_object_strings(std::string_view line);

}  // namespace moba::data
