// Recursive-descent JSON reader for one JSON Lines record (see json_string.h).
// Invariant: pos_ always indexes the next unread byte; every error reports pos_ + 1 as the column.
#include "data/json_string.h"

#include <cstdint>

namespace moba::data {
namespace {

// Nesting limit for skipped arrays/objects, so a hostile line cannot overflow the stack.
constexpr int kMaxDepth = 256;

void append_utf8(uint32_t code_point, std::string& out) {
  if (code_point < 0x80) {
    out += static_cast<char>(code_point);
  } else if (code_point < 0x800) {
    out += static_cast<char>(0xC0 | (code_point >> 6));
    out += static_cast<char>(0x80 | (code_point & 0x3F));
  } else if (code_point < 0x10000) {
    out += static_cast<char>(0xE0 | (code_point >> 12));
    out += static_cast<char>(0x80 | ((code_point >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (code_point & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (code_point >> 18));
    out += static_cast<char>(0x80 | ((code_point >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((code_point >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (code_point & 0x3F));
  }
}

class Parser {
 public:
  explicit Parser(std::string_view text) : text_(text) {}

  std::map<std::string, std::string> parse_record() {
    std::map<std::string, std::string> strings;
    skip_space();
    if (at_end()) fail("expected a JSON object '{', found an empty line");
    expect('{', "expected a JSON object starting with '{'");
    skip_space();
    if (peek() == '}') {
      ++pos_;
    } else {
      while (true) {
        skip_space();
        if (peek() != '"') fail("expected a member name in double quotes");
        std::string key = parse_string();
        skip_space();
        expect(':', "expected ':' after the member name");
        skip_space();
        if (peek() == '"') {
          strings[key] = parse_string();
        } else {
          skip_value(1);
        }
        skip_space();
        if (peek() == ',') {
          ++pos_;
          continue;
        }
        expect('}', "expected ',' or '}' after a member value");
        break;
      }
    }
    skip_space();
    if (!at_end()) fail("unexpected text after the end of the JSON object (one object per line)");
    return strings;
  }

 private:
  [[noreturn]] void fail(const std::string& what) const { throw JsonSyntaxError(pos_ + 1, what); }
  bool at_end() const { return pos_ >= text_.size(); }
  char peek() const { return at_end() ? '\0' : text_[pos_]; }
  void expect(char c, const std::string& what) {
    if (at_end() || text_[pos_] != c) fail(what);
    ++pos_;
  }
  void skip_space() {
    while (!at_end() && (text_[pos_] == ' ' || text_[pos_] == '\t' || text_[pos_] == '\r' || text_[pos_] == '\n'))
      ++pos_;
  }

  uint32_t parse_hex4() {
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) {
      char c = peek();
      uint32_t digit;
      if (c >= '0' && c <= '9') digit = static_cast<uint32_t>(c - '0');
      else if (c >= 'a' && c <= 'f') digit = static_cast<uint32_t>(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F') digit = static_cast<uint32_t>(c - 'A' + 10);
      else fail("expected 4 hex digits after \\u");
      v = v * 16 + digit;
      ++pos_;
    }
    return v;
  }

  // pos_ is at the opening quote; returns the decoded value and leaves pos_ after the closing quote.
  std::string parse_string() {
    ++pos_;
    std::string out;
    while (true) {
      if (at_end()) fail("unterminated string (missing closing '\"')");
      unsigned char c = static_cast<unsigned char>(text_[pos_]);
      if (c == '"') {
        ++pos_;
        return out;
      }
      if (c < 0x20) fail("raw control character inside a string (JSON needs it escaped, e.g. \\n or \\t)");
      if (c != '\\') {
        out += static_cast<char>(c);
        ++pos_;
        continue;
      }
      ++pos_;
      if (at_end()) fail("unterminated string (missing closing '\"')");
      char e = text_[pos_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': append_utf8(parse_unicode_escape(), out); break;
        default: --pos_; fail("invalid escape in a string (allowed: \\\" \\\\ \\/ \\b \\f \\n \\r \\t \\uXXXX)");
      }
    }
  }

  // After "\u": one code point, joining a high surrogate with the low surrogate escape that follows it.
  uint32_t parse_unicode_escape() {
    constexpr uint32_t kReplacement = 0xFFFD;
    uint32_t unit = parse_hex4();
    if (unit >= 0xDC00 && unit <= 0xDFFF) return kReplacement;  // low surrogate without a high one
    if (unit < 0xD800 || unit > 0xDBFF) return unit;
    bool low_follows = pos_ + 6 <= text_.size() && text_[pos_] == '\\' && text_[pos_ + 1] == 'u';
    if (!low_follows) return kReplacement;
    size_t saved = pos_;
    pos_ += 2;
    uint32_t low = parse_hex4();
    if (low < 0xDC00 || low > 0xDFFF) {  // not a pair: decode the next escape on its own
      pos_ = saved;
      return kReplacement;
    }
    return 0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00);
  }

  void skip_literal(std::string_view word) {
    if (text_.substr(pos_, word.size()) != word) fail("expected a JSON value (string, number, object, array, true, false or null)");
    pos_ += word.size();
  }

  void skip_number() {
    size_t start = pos_;
    if (peek() == '-') ++pos_;
    auto digits = [&] {
      size_t from = pos_;
      while (peek() >= '0' && peek() <= '9') ++pos_;
      return pos_ - from;
    };
    if (digits() == 0) {
      pos_ = start;
      fail("expected a JSON value (string, number, object, array, true, false or null)");
    }
    if (peek() == '.') {
      ++pos_;
      if (digits() == 0) fail("expected digits after the decimal point");
    }
    if (peek() == 'e' || peek() == 'E') {
      ++pos_;
      if (peek() == '+' || peek() == '-') ++pos_;
      if (digits() == 0) fail("expected digits in the exponent");
    }
  }

  void skip_value(int depth) {
    if (depth > kMaxDepth) fail("nesting deeper than 256 levels");
    char c = peek();
    if (c == '"') {
      parse_string();
    } else if (c == '{' || c == '[') {
      char close = c == '{' ? '}' : ']';
      ++pos_;
      skip_space();
      if (peek() == close) {
        ++pos_;
        return;
      }
      while (true) {
        skip_space();
        if (c == '{') {
          if (peek() != '"') fail("expected a member name in double quotes");
          parse_string();
          skip_space();
          expect(':', "expected ':' after the member name");
          skip_space();
        }
        skip_value(depth + 1);
        skip_space();
        if (peek() == ',') {
          ++pos_;
          continue;
        }
        expect(close, c == '{' ? "expected ',' or '}' in an object" : "expected ',' or ']' in an array");
        return;
      }
    } else if (c == 't') {
      skip_literal("true");
    } else if (c == 'f') {
      skip_literal("false");
    } else if (c == 'n') {
      skip_literal("null");
    } else {
      skip_number();
    }
  }

  std::string_view text_;
  size_t pos_ = 0;
};

}  // namespace

std::map<std::string, std::string> parse_json_object_strings(std::string_view line) {
  return Parser(line).parse_record();
}

}  // namespace moba::data
