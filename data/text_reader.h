// Streams documents out of raw text inputs: JSON Lines ({"text": ...}, or {"prompt": ..., "response": ...} for
// SFT), plain text files (one document per file), either optionally .xz or .gz, and directories of such files.
// Invariant: documents come out in a fixed order (inputs as given, directories sorted recursively, lines in
// order), so every pass over the same inputs sees the same documents; bad input is a moba::Error naming file:line.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace moba::data {

struct TextDocument {
  std::string prompt;  // SFT only: the prompt, which the loss ignores
  std::string text;    // the document; for SFT the response
};

struct ReadOptions {
  bool sft = false;            // JSONL records must have "prompt" and "response" instead of "text"
  int64_t max_documents = -1;  // -1 = all
  // Stop after this many bytes of text (-1 = all). The document that crosses the limit is cut at a UTF-8
  // character boundary so exactly max_bytes are read; an SFT pair that does not fit is left out instead
  // (a cut response would teach truncated answers).
  int64_t max_bytes = -1;
};

// The files that `inputs` name, in reading order: files as given, directories recursively in sorted path
// order (names starting with '.' skipped). Throws when an input does not exist or a directory holds no file.
std::vector<std::string> list_input_files(const std::vector<std::string>& inputs);

// True for names read as JSON Lines: *.jsonl, *.ndjson, *.json, each optionally followed by .xz or .gz.
bool is_json_lines_name(const std::string& path);

// Sequential source of decompressed bytes from one file; xz and gzip are recognised by their magic bytes.
class ByteStream {
 public:
  virtual ~ByteStream() = default;
  // Fills up to `size` bytes; returns 0 only at the end. Throws on a read error or corrupt/truncated data.
  virtual size_t read(char* out, size_t size) = 0;
};
std::unique_ptr<ByteStream> open_byte_stream(const std::string& path);

class DocumentReader {
 public:
  DocumentReader(const std::vector<std::string>& inputs, const ReadOptions& options);
  ~DocumentReader();
  // Reads the next document into `doc`; false when the inputs (or the limits) are exhausted.
  bool next(TextDocument& doc);
  int64_t documents_read() const { return documents_read_; }
  int64_t bytes_read() const { return bytes_read_; }

 private:
  class LineSource;
  bool open_next_file();
  bool read_from_current_file(TextDocument& doc);
  bool fits_budget(TextDocument& doc);

  std::vector<std::string> files_;
  ReadOptions options_;
  size_t next_file_ = 0;
  std::unique_ptr<LineSource> current_;  // the open file, or null between files
  int64_t documents_read_ = 0;
  int64_t bytes_read_ = 0;
  bool limit_reached_ = false;
};

}  // namespace moba::data
