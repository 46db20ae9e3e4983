// libFuzzer target: the text readers (JSON Lines records, plain text, xz/gzip detected by their magic bytes).
// The first byte chooses the mode (bit 0: SFT records, bit 1: a plain text file instead of JSON Lines, bits
// 2-3: a byte or document limit); the rest is the file. Every document read must come out or a moba::Error
// must name the problem.
#include <cstdint>
#include <string>
#include <string_view>

#include "common/error.h"
#include "data/text_reader.h"
#include "fuzz/fuzz_support.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const uint8_t mode = data[0];
  const std::string path = (moba::fuzz::scratch() / ((mode & 2) ? "input.txt" : "input.jsonl")).string();
  moba::fuzz::write_bytes(path, std::string_view(reinterpret_cast<const char*>(data) + 1, size - 1));
  moba::data::ReadOptions options;
  options.sft = mode & 1;
  if (mode & 4) options.max_bytes = 1 + (mode >> 4);
  if (mode & 8) options.max_documents = 1 + (mode >> 4);
  try {
    moba::data::DocumentReader reader({path}, options);
    moba::data::TextDocument doc;
    int64_t bytes = 0;
    while (reader.next(doc)) bytes += static_cast<int64_t>(doc.prompt.size() + doc.text.size());
    if (bytes != reader.bytes_read() || (options.max_bytes >= 0 && bytes > options.max_bytes)) std::abort();
  } catch (const moba::Error&) {
  }
  return 0;
}
