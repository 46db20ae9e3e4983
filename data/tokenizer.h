// Tokenizers: a built-in byte-level one and SentencePiece (BPE or unigram, trained here or loaded from a
// .model file). A tokenizer is saved inside every dataset file so a dataset is self-describing.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace moba::h5 { class File; }

namespace moba::data {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  virtual std::vector<uint32_t> encode(std::string_view text) const = 0;
  // Control pieces (EOS, pad) decode to nothing; an id outside the vocabulary decodes to U+FFFD.
  virtual std::string decode(const std::vector<uint32_t>& ids) const = 0;
  virtual int vocab_size() const = 0;
  virtual uint32_t eos_id() const = 0;
  virtual std::string kind() const = 0;  // "byte" or "sentencepiece"
  // Stores itself into an open dataset file (attributes and, for SentencePiece, the serialized model).
  virtual void save(h5::File& file) const = 0;
};

// Byte-level: ids 0..255 are bytes, 256 = <eos>, 257 = <pad>; vocab_size 258.
std::unique_ptr<Tokenizer> make_byte_tokenizer();
// Loads a SentencePiece .model file.
std::unique_ptr<Tokenizer> load_sentencepiece(const std::string& model_path);
// Trains SentencePiece (model_type "bpe" or "unigram") on text files and writes <model_prefix>.model.
std::unique_ptr<Tokenizer> train_sentencepiece(const std::vector<std::string>& text_files,
                                               const std::string& model_prefix, const std::string& model_type,
                                               int vocab_size, uint64_t seed);
// Reconstructs the tokenizer saved in a dataset file.
std::unique_ptr<Tokenizer> load_tokenizer(const h5::File& file);

}  // namespace moba::data
