// Byte-level and SentencePiece tokenizers, and their storage inside dataset files (see tokenizer.h).
// Invariant: encode() never yields an id >= vocab_size(), and decode(encode(text)) == text for the byte
// tokenizer and for SentencePiece models trained here (identity normalization + byte fallback).
#include "data/tokenizer.h"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <thread>
#include <unordered_map>

#include "common/error.h"
#include "common/hdf5_io.h"

namespace moba::data {
namespace {

constexpr const char* kReplacementChar = "\xEF\xBF\xBD";  // U+FFFD, shown for ids outside the vocabulary

// Writes the attributes every tokenizer stores: kind, vocab_size, eos_id.
void save_common_attributes(const Tokenizer& tok, h5::File& file) {
  file.set_attr("/", "tokenizer", tok.kind());
  file.set_attr("/", "vocab_size", static_cast<int64_t>(tok.vocab_size()));
  file.set_attr("/", "eos_id", static_cast<int64_t>(tok.eos_id()));
}

class ByteTokenizer : public Tokenizer {
 public:
  static constexpr uint32_t kEos = 256, kPad = 257;
  std::vector<uint32_t> encode(std::string_view text) const override {
    std::vector<uint32_t> ids(text.size());
    for (size_t i = 0; i < text.size(); ++i) ids[i] = static_cast<unsigned char>(text[i]);
    return ids;
  }
  // <eos> and <pad> decode to nothing; ids outside the vocabulary to U+FFFD.
  std::string decode(const std::vector<uint32_t>& ids) const override {
    std::string text;
    text.reserve(ids.size());
    for (uint32_t id : ids) {
      if (id < 256) text += static_cast<char>(id);
      else if (id != kEos && id != kPad) text += kReplacementChar;
    }
    return text;
  }
  int vocab_size() const override { return 258; }
  uint32_t eos_id() const override { return kEos; }
  std::string kind() const override { return "byte"; }
  void save(h5::File& file) const override { save_common_attributes(*this, file); }
};

class SentencePieceTokenizer : public Tokenizer {
 public:
  // `origin` names where the model came from, for error messages.
  SentencePieceTokenizer(std::string serialized_model, const std::string& origin)
      : serialized_model_(std::move(serialized_model)) {
    auto status = processor_.LoadFromSerializedProto(serialized_model_);
    MOBA_CHECK(status.ok(), cat(origin, " is not a valid SentencePiece model: ", status.ToString()),
               "pass a .model file written by SentencePiece (spm_train) or by moba prep");
    MOBA_CHECK(processor_.eos_id() >= 0, cat("the SentencePiece model in ", origin, " has no <eos> piece"),
               "every document ends with EOS: retrain it with eos enabled (spm_train --eos_id=N), or let "
               "moba prep train one (--tokenizer sentencepiece without --sp-model)");
    vocab_size_ = processor_.GetPieceSize();
  }

  std::vector<uint32_t> encode(std::string_view text) const override {
    std::vector<int> pieces;
    auto status = processor_.Encode(absl::string_view(text.data(), text.size()), &pieces);
    MOBA_CHECK(status.ok(), cat("SentencePiece encoding failed: ", status.ToString()),
               "the model may be corrupt; retrain it with moba prep");
    return std::vector<uint32_t>(pieces.begin(), pieces.end());
  }

  // Runs of in-vocabulary ids decode through SentencePiece; an id outside the vocabulary shows as U+FFFD.
  std::string decode(const std::vector<uint32_t>& ids) const override {
    std::string text, piece_text;
    std::vector<int> run;
    auto flush_run = [&] {
      if (run.empty()) return;
      auto status = processor_.Decode(run, &piece_text);
      MOBA_CHECK(status.ok(), cat("SentencePiece decoding failed: ", status.ToString()),
                 "the model may be corrupt; retrain it with moba prep");
      text += piece_text;
      run.clear();
    };
    for (uint32_t id : ids) {
      if (id < static_cast<uint32_t>(vocab_size_)) {
        run.push_back(static_cast<int>(id));
      } else {
        flush_run();
        text += kReplacementChar;
      }
    }
    flush_run();
    return text;
  }

  int vocab_size() const override { return vocab_size_; }
  uint32_t eos_id() const override { return static_cast<uint32_t>(processor_.eos_id()); }
  std::string kind() const override { return "sentencepiece"; }
  void save(h5::File& file) const override {
    save_common_attributes(*this, file);
    file.write("tokenizer_model", reinterpret_cast<const uint8_t*>(serialized_model_.data()),
               {static_cast<int64_t>(serialized_model_.size())});
  }

 private:
  std::string serialized_model_;
  sentencepiece::SentencePieceProcessor processor_;
  int vocab_size_ = 0;
};

std::string read_binary_file(const std::string& path) {
  MOBA_CHECK(std::filesystem::is_regular_file(path), cat("SentencePiece model not found: ", path),
             "check the --sp-model path (a .model file from spm_train or from a previous moba prep)");
  std::ifstream in(path, std::ios::binary);
  MOBA_CHECK(in.good(), cat("cannot open ", path), "check its permissions");
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

}  // namespace

std::unique_ptr<Tokenizer> make_byte_tokenizer() { return std::make_unique<ByteTokenizer>(); }

std::unique_ptr<Tokenizer> load_sentencepiece(const std::string& model_path) {
  return std::make_unique<SentencePieceTokenizer>(read_binary_file(model_path), model_path);
}

std::unique_ptr<Tokenizer> train_sentencepiece(const std::vector<std::string>& text_files,
                                               const std::string& model_prefix, const std::string& model_type,
                                               int vocab_size, uint64_t seed) {
  MOBA_CHECK(model_type == "bpe" || model_type == "unigram",
             cat("unknown SentencePiece model type '", model_type, "'"), "use bpe or unigram");
  MOBA_CHECK(vocab_size >= 300 && vocab_size <= 1000000,
             cat("SentencePiece vocab size ", vocab_size, " is out of range"),
             "use 300 .. 1000000 (256 byte-fallback pieces and the special pieces come first)");
  MOBA_CHECK(!text_files.empty(), "no text to train SentencePiece on", "pass at least one non-empty input");
  std::string inputs;
  for (const std::string& f : text_files) {
    MOBA_CHECK(f.find(',') == std::string::npos, cat("SentencePiece cannot read a path with a comma: ", f),
               "rename the file or directory");
    inputs += (inputs.empty() ? "" : ",") + f;
  }
  // The model comes back serialized (SentencePiece then writes no files; the .model is written below).
  // Exact round trip: no normalization, whitespace kept as is (indentation matters in code), bytes the
  // vocabulary lacks fall back to <0xNN> pieces. Lines longer than max_sentence_length are skipped.
  std::unordered_map<std::string, std::string> spec = {
      {"input", inputs},
      {"model_type", model_type},
      {"vocab_size", std::to_string(vocab_size)},
      {"normalization_rule_name", "identity"},
      {"remove_extra_whitespaces", "false"},
      {"add_dummy_prefix", "false"},
      {"allow_whitespace_only_pieces", "true"},
      {"split_digits", "true"},
      {"byte_fallback", "true"},
      {"character_coverage", "0.9995"},
      {"unk_id", "0"},
      {"bos_id", "1"},
      {"eos_id", "2"},
      {"pad_id", "-1"},
      {"max_sentence_length", "16384"},
      {"input_sentence_size", "2000000"},
      {"shuffle_input_sentence", "true"},
      {"num_threads", std::to_string(std::max(1u, std::thread::hardware_concurrency()))},
      {"minloglevel", "1"},
  };
  // SentencePiece reserves seed 0xFFFFFFFF for "random"; fold the 64-bit seed into the rest.
  sentencepiece::SetRandomGeneratorSeed(static_cast<unsigned>(seed % 0xFFFFFFFFull));
  std::string serialized;
  auto status = sentencepiece::SentencePieceTrainer::Train(spec, nullptr, &serialized);
  MOBA_CHECK(status.ok(), cat("SentencePiece training failed: ", status.ToString()),
             "'Vocabulary size too high' means the text is too small for --vocab-size (lower it or add text); "
             "'smaller than required_chars' means --vocab-size is too small for the characters seen (raise it)");
  std::string model_path = model_prefix + ".model";
  {
    std::ofstream out(model_path, std::ios::binary | std::ios::trunc);
    out.write(serialized.data(), static_cast<std::streamsize>(serialized.size()));
    MOBA_CHECK(out.good(), cat("cannot write ", model_path), "check that the directory is writable and not full");
  }
  return std::make_unique<SentencePieceTokenizer>(std::move(serialized), model_path);
}

std::unique_ptr<Tokenizer> load_tokenizer(const h5::File& file) {
  std::string kind = file.attr_string("/", "tokenizer");
  std::unique_ptr<Tokenizer> tok;
  if (kind == "byte") {
    tok = make_byte_tokenizer();
  } else if (kind == "sentencepiece") {
    MOBA_CHECK(file.exists("tokenizer_model"),
               cat(file.path(), " says tokenizer=sentencepiece but holds no 'tokenizer_model' dataset"),
               "the file is incomplete; recreate it with moba prep");
    std::vector<uint8_t> bytes = file.read<uint8_t>("tokenizer_model");
    tok = std::make_unique<SentencePieceTokenizer>(std::string(bytes.begin(), bytes.end()),
                                                   file.path() + ":tokenizer_model");
  } else {
    throw Error(cat(file.path(), ": unknown tokenizer '", kind, "'"),
                "expected byte or sentencepiece; recreate the file with moba prep");
  }
  if (file.has_attr("/", "vocab_size")) {
    int64_t stored = file.attr_int("/", "vocab_size");
    MOBA_CHECK(stored == tok->vocab_size(),
               cat(file.path(), ": vocab_size attribute ", stored, " does not match its tokenizer (",
                   tok->vocab_size(), ")"),
               "the file was edited or is corrupt; recreate it with moba prep");
  }
  return tok;
}

}  // namespace moba::data
