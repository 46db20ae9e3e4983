// `moba prep`: reads raw text (JSONL with "text", or "prompt"/"response" for SFT, optionally .xz/.gz; plain
// text files; directories of either), tokenizes it, and writes <out>/train.h5, <out>/val.h5 (split by
// document, deterministic in the seed) plus the tokenizer (<out>/tokenizer.model for SentencePiece).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace moba::data {

struct PrepOptions {
  std::vector<std::string> inputs;
  std::string output_dir;
  std::string tokenizer = "byte";     // byte | sentencepiece
  std::string sp_model_type = "bpe";  // bpe | unigram (when training SentencePiece)
  int vocab_size = 8000;              // when training SentencePiece
  std::string sp_model;               // existing .model to load instead of training
  double val_fraction = 0.05;         // in [0, 1); with >= 2 documents train and val each get at least one
  uint64_t seed = 1234;
  bool sft = false;                   // inputs are prompt/response pairs; writes loss_mask
  int64_t max_documents = -1;         // -1 = all
  int64_t max_bytes = -1;             // stop reading after this many bytes of text (-1 = all); the document
                                      // crossing the limit is cut to fit (an SFT pair is left out instead)
};

struct PrepResult {
  std::string train_path, val_path, tokenizer_path;
  int64_t train_documents = 0, val_documents = 0, train_tokens = 0, val_tokens = 0;
  int vocab_size = 0;
};

PrepResult run_prep(const PrepOptions& options);
// CLI entry: parses args (after "prep"), runs, prints a summary. Returns the exit code.
int prep_command(const std::vector<std::string>& args);

}  // namespace moba::data
