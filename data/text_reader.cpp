// Decompression (liblzma, zlib), line splitting and JSON Lines decoding for DocumentReader (see text_reader.h).
// Invariant: a file is either fully decoded or a moba::Error names it (and the line, for JSON Lines); corrupt or
// truncated compressed data never reads as a shorter, valid-looking file.
#include "data/text_reader.h"

#if MOBA_HAVE_LZMA
#include <lzma.h>
#endif
#include <zlib.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>

#include "common/error.h"
#include "data/json_string.h"

namespace moba::data {
namespace fs = std::filesystem;

namespace {

constexpr size_t kReadChunk = 1 << 20;

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}

// Owns a FILE*; errors name the path.
class InputFile {
 public:
  explicit InputFile(const std::string& path) : path_(path), file_(std::fopen(path.c_str(), "rb")) {
    MOBA_CHECK(file_ != nullptr, cat("cannot open ", path, ": ", std::strerror(errno)),
               "check that the file exists and is readable");
  }
  ~InputFile() { std::fclose(file_); }
  InputFile(const InputFile&) = delete;
  InputFile& operator=(const InputFile&) = delete;
  size_t read(char* out, size_t size) {
    size_t got = std::fread(out, 1, size, file_);
    MOBA_CHECK(got == size || !std::ferror(file_), cat("read error in ", path_, ": ", std::strerror(errno)),
               "check the disk and the file permissions");
    return got;
  }

 private:
  std::string path_;
  FILE* file_;
};

class PlainStream : public ByteStream {
 public:
  explicit PlainStream(const std::string& path) : file_(path) {}
  size_t read(char* out, size_t size) override { return file_.read(out, size); }

 private:
  InputFile file_;
};

#if MOBA_HAVE_LZMA
// .xz (and concatenated .xz streams) through liblzma's stream decoder.
class XzStream : public ByteStream {
 public:
  explicit XzStream(const std::string& path) : path_(path), file_(path), input_(kReadChunk) {
    lzma_ret r = lzma_stream_decoder(&stream_, UINT64_MAX, LZMA_CONCATENATED);
    MOBA_CHECK(r == LZMA_OK, cat("cannot start the xz decoder for ", path, " (liblzma error ", r, ")"),
               "this is an out-of-memory condition or a broken liblzma install");
  }
  ~XzStream() override { lzma_end(&stream_); }

  size_t read(char* out, size_t size) override {
    stream_.next_out = reinterpret_cast<uint8_t*>(out);
    stream_.avail_out = size;
    while (stream_.avail_out > 0 && !finished_) {
      if (stream_.avail_in == 0 && !input_done_) {
        size_t got = file_.read(input_.data(), input_.size());
        input_done_ = got == 0;
        stream_.next_in = reinterpret_cast<const uint8_t*>(input_.data());
        stream_.avail_in = got;
      }
      lzma_ret r = lzma_code(&stream_, input_done_ ? LZMA_FINISH : LZMA_RUN);
      if (r == LZMA_STREAM_END) {
        finished_ = true;
      } else if (r != LZMA_OK) {
        throw Error(cat(path_, ": ", describe(r)), "re-download or recompress the file (xz -t FILE checks it)");
      }
    }
    return size - stream_.avail_out;
  }

 private:
  static std::string describe(lzma_ret r) {
    switch (r) {
      case LZMA_BUF_ERROR: return "the xz data ends early (truncated file)";
      case LZMA_DATA_ERROR: return "corrupt xz data";
      case LZMA_FORMAT_ERROR: return "not in .xz format";
      case LZMA_OPTIONS_ERROR: return "unsupported xz options";
      case LZMA_MEM_ERROR: return "out of memory while decompressing xz";
      default: return cat("xz decoding failed (liblzma error ", static_cast<int>(r), ")");
    }
  }
  std::string path_;
  InputFile file_;
  std::vector<char> input_;
  lzma_stream stream_ = LZMA_STREAM_INIT;
  bool input_done_ = false;
  bool finished_ = false;
};
#else
// Built without liblzma (e.g. a machine without liblzma-dev): .xz inputs are refused with the fix.
class XzStream : public ByteStream {
 public:
  explicit XzStream(const std::string& path) {
    throw Error(cat(path, " is xz-compressed but this moba was built without liblzma"),
                "decompress it first (xz -dk FILE) or install liblzma-dev and rebuild");
  }
  size_t read(char*, size_t) override { return 0; }
};
#endif

// .gz (and concatenated gzip members) through zlib's gz* interface.
class GzStream : public ByteStream {
 public:
  explicit GzStream(const std::string& path) : path_(path), file_(gzopen(path.c_str(), "rb")) {
    MOBA_CHECK(file_ != nullptr, cat("cannot open ", path, ": ", std::strerror(errno)),
               "check that the file exists and is readable");
    gzbuffer(file_, kReadChunk);
  }
  ~GzStream() override { gzclose(file_); }

  size_t read(char* out, size_t size) override {
    size_t total = 0;
    while (total < size) {
      unsigned want = static_cast<unsigned>(std::min<size_t>(size - total, 1u << 30));
      int got = gzread(file_, out + total, want);
      int err = Z_OK;
      const char* message = gzerror(file_, &err);
      if (got < 0 || (err != Z_OK && err != Z_STREAM_END))
        throw Error(cat(path_, ": gzip decoding failed: ", message ? message : "unknown error",
                        err == Z_BUF_ERROR ? " (truncated file)" : ""),
                    "re-download or recompress the file (gzip -t FILE checks it)");
      if (got == 0) break;
      total += static_cast<size_t>(got);
    }
    return total;
  }

 private:
  std::string path_;
  gzFile file_;
};

}  // namespace

std::unique_ptr<ByteStream> open_byte_stream(const std::string& path) {
  unsigned char magic[6] = {0, 0, 0, 0, 0, 0};
  {
    InputFile probe(path);
    probe.read(reinterpret_cast<char*>(magic), sizeof magic);
  }
  static const unsigned char kXzMagic[6] = {0xFD, '7', 'z', 'X', 'Z', 0x00};
  if (std::memcmp(magic, kXzMagic, 6) == 0) return std::make_unique<XzStream>(path);
  if (magic[0] == 0x1F && magic[1] == 0x8B) return std::make_unique<GzStream>(path);
  MOBA_CHECK(!ends_with(lower(path), ".xz") && !ends_with(lower(path), ".gz"),
             cat(path, " is named like a compressed file but does not start with the xz or gzip signature"),
             "the file is corrupt or misnamed; re-download it or rename it");
  return std::make_unique<PlainStream>(path);
}

bool is_json_lines_name(const std::string& path) {
  std::string name = lower(fs::path(path).filename().string());
  for (const char* compressed : {".xz", ".gz"})
    if (ends_with(name, compressed)) name.resize(name.size() - 3);
  return ends_with(name, ".jsonl") || ends_with(name, ".ndjson") || ends_with(name, ".json");
}

std::vector<std::string> list_input_files(const std::vector<std::string>& inputs) {
  MOBA_CHECK(!inputs.empty(), "no input files given", "pass one or more JSONL/text files or directories");
  std::vector<std::string> files;
  for (const std::string& input : inputs) {
    std::error_code ec;
    fs::file_status status = fs::status(input, ec);
    MOBA_CHECK(fs::exists(status), cat("input not found: ", input),
               "check the path (relative paths are taken from the current directory)");
    if (!fs::is_directory(status)) {
      files.push_back(input);
      continue;
    }
    std::vector<std::string> found;
    auto it = fs::recursive_directory_iterator(input, fs::directory_options::follow_directory_symlink, ec);
    MOBA_CHECK(!ec, cat("cannot list directory ", input, ": ", ec.message()), "check its permissions");
    for (; it != fs::recursive_directory_iterator(); it.increment(ec)) {
      MOBA_CHECK(!ec, cat("cannot list directory ", input, ": ", ec.message()), "check its permissions");
      bool hidden = it->path().filename().string().rfind('.', 0) == 0;
      if (hidden) {
        if (it->is_directory()) it.disable_recursion_pending();
        continue;
      }
      if (it->is_regular_file()) found.push_back(it->path().string());
    }
    MOBA_CHECK(!found.empty(), cat("input directory ", input, " holds no files"),
               "point at a directory with .jsonl(.xz/.gz) or text files");
    std::sort(found.begin(), found.end());
    files.insert(files.end(), found.begin(), found.end());
  }
  return files;
}

// One open input file, split into lines (JSON Lines) or read whole (plain text).
class DocumentReader::LineSource {
 public:
  explicit LineSource(const std::string& path)
      : path_(path), json_lines_(is_json_lines_name(path)), stream_(open_byte_stream(path)) {}

  const std::string& path() const { return path_; }
  bool json_lines() const { return json_lines_; }
  int64_t line_number() const { return line_number_; }
  bool whole_file_read() const { return whole_file_read_; }

  // Next line without its '\n' (and '\r'); false at the end of the file.
  bool next_line(std::string& line) {
    while (true) {
      size_t newline = buffer_.find('\n', scan_from_);
      if (newline != std::string::npos) {
        line.assign(buffer_, start_, newline - start_);
        start_ = scan_from_ = newline + 1;
        break;
      }
      scan_from_ = buffer_.size();
      if (!refill()) {
        if (start_ == buffer_.size()) return false;
        line.assign(buffer_, start_, std::string::npos);
        start_ = scan_from_ = buffer_.size();
        break;
      }
    }
    ++line_number_;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line_number_ == 1) strip_byte_order_mark(line);
    return true;
  }

  // The whole (remaining) file.
  std::string read_all() {
    while (refill()) {
    }
    std::string all = buffer_.substr(start_);
    buffer_.clear();
    start_ = scan_from_ = 0;
    strip_byte_order_mark(all);
    whole_file_read_ = true;
    return all;
  }

 private:
  static void strip_byte_order_mark(std::string& s) {
    if (s.rfind("\xEF\xBB\xBF", 0) == 0) s.erase(0, 3);
  }
  // Drops consumed bytes and appends the next chunk; false at the end of the stream.
  bool refill() {
    if (start_ > 0) {
      buffer_.erase(0, start_);
      scan_from_ -= start_;
      start_ = 0;
    }
    size_t old_size = buffer_.size();
    buffer_.resize(old_size + kReadChunk);
    size_t got = stream_->read(buffer_.data() + old_size, kReadChunk);
    buffer_.resize(old_size + got);
    return got > 0;
  }

  std::string path_;
  bool json_lines_;
  std::unique_ptr<ByteStream> stream_;
  std::string buffer_;
  size_t start_ = 0;      // first unconsumed byte of buffer_
  size_t scan_from_ = 0;  // bytes before this (after start_) hold no '\n'
  int64_t line_number_ = 0;
  bool whole_file_read_ = false;
};

DocumentReader::DocumentReader(const std::vector<std::string>& inputs, const ReadOptions& options)
    : files_(list_input_files(inputs)), options_(options) {}

DocumentReader::~DocumentReader() = default;

bool DocumentReader::open_next_file() {
  if (next_file_ >= files_.size()) return false;
  current_ = std::make_unique<LineSource>(files_[next_file_++]);
  return true;
}

bool DocumentReader::next(TextDocument& doc) {
  while (!limit_reached_) {
    if (options_.max_documents >= 0 && documents_read_ >= options_.max_documents) break;
    if (!current_ && !open_next_file()) break;
    if (!read_from_current_file(doc)) {
      current_.reset();
      continue;
    }
    if (doc.prompt.empty() && doc.text.empty()) continue;  // an empty document carries nothing to learn
    if (!fits_budget(doc)) break;
    ++documents_read_;
    return true;
  }
  limit_reached_ = true;
  return false;
}

bool DocumentReader::read_from_current_file(TextDocument& doc) {
  LineSource& source = *current_;
  doc.prompt.clear();
  doc.text.clear();
  if (!source.json_lines()) {
    if (source.whole_file_read()) return false;  // plain text: its one document was returned already
    MOBA_CHECK(!options_.sft, cat(source.path(), ": SFT needs JSON Lines with \"prompt\" and \"response\""),
               "convert the file to .jsonl with one {\"prompt\": ..., \"response\": ...} object per line");
    doc.text = source.read_all();
    MOBA_CHECK(doc.text.find('\0') == std::string::npos,
               cat(source.path(), " contains NUL bytes, so it is not a text file"),
               "remove it from the inputs (or from the input directory)");
    return true;
  }
  std::string line;
  while (source.next_line(line)) {
    if (line.find_first_not_of(" \t") == std::string::npos) continue;  // blank lines separate nothing
    std::map<std::string, std::string> fields;
    try {
      fields = parse_json_object_strings(line);
    } catch (const JsonSyntaxError& e) {
      throw Error(cat(source.path(), ":", source.line_number(), ":", e.column(), ": malformed JSON: ", e.what()),
                  "every line must be one JSON object such as {\"text\": \"...\"}; fix or remove that line");
    }
    if (options_.sft) {
      auto prompt = fields.find("prompt"), response = fields.find("response");
      MOBA_CHECK(prompt != fields.end() && response != fields.end(),
                 cat(source.path(), ":", source.line_number(),
                     ": expected string members \"prompt\" and \"response\" (SFT record)"),
                 "write each line as {\"prompt\": \"...\", \"response\": \"...\"}, or drop --sft for plain text");
      doc.prompt = std::move(prompt->second);
      doc.text = std::move(response->second);
    } else {
      auto text = fields.find("text");
      MOBA_CHECK(text != fields.end(), cat(source.path(), ":", source.line_number(), ": expected a string member \"text\""),
                 fields.count("prompt") ? "this looks like SFT data: pass --sft"
                                        : "write each line as {\"text\": \"...\"}");
      doc.text = std::move(text->second);
    }
    return true;
  }
  return false;
}

bool DocumentReader::fits_budget(TextDocument& doc) {
  if (options_.max_bytes < 0) {
    bytes_read_ += static_cast<int64_t>(doc.prompt.size() + doc.text.size());
    return true;
  }
  int64_t left = options_.max_bytes - bytes_read_;
  int64_t size = static_cast<int64_t>(doc.prompt.size() + doc.text.size());
  if (size <= left) {
    bytes_read_ += size;
    return true;
  }
  if (options_.sft || left <= static_cast<int64_t>(doc.prompt.size())) return false;
  size_t cut = static_cast<size_t>(left) - doc.prompt.size();
  while (cut > 0 && (static_cast<unsigned char>(doc.text[cut]) & 0xC0) == 0x80) --cut;  // not inside a character
  if (cut == 0) return false;
  doc.text.resize(cut);
  bytes_read_ += static_cast<int64_t>(doc.prompt.size() + cut);
  limit_reached_ = true;  // this cut document is the last one
  return true;
}

}  // namespace moba::data
