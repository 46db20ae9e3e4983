// `moba prep`: raw text -> tokenizer -> <out>/train.h5 and <out>/val.h5 (format in dataset.h).
// Invariant: outputs are written under temporary names and renamed only once complete, so a crash never leaves
// a half-written dataset that looks finished; the split and the token order depend only on inputs and seed.
#include "data/prep.h"

#include <chrono>
#include <exception>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>

#include "common/cli.h"
#include "common/error.h"
#include "common/hdf5_io.h"
#include "common/log.h"
#include "data/text_reader.h"
#include "data/tokenizer.h"

namespace moba::data {
namespace fs = std::filesystem;

namespace {

constexpr int64_t kBatchDocuments = 512;             // documents tokenized together (in parallel)
constexpr int64_t kBatchBytes = 64ll << 20;          // ... or this much text, whichever comes first
constexpr int64_t kTokenizerTextLimit = 512ll << 20;  // SentencePiece trains on at most this much train text

// A uniform draw in [0, 1) that depends only on (seed, document index): splitmix64 of both.
double split_draw(uint64_t seed, int64_t document) {
  uint64_t x = seed ^ (0x9E3779B97F4A7C15ull * (static_cast<uint64_t>(document) + 1));
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  x ^= x >> 31;
  return static_cast<double>(x >> 11) * 0x1.0p-53;
}

// Documents in reading order, each tagged train or val: val when split_draw(seed, index) < val_fraction, except
// that the last document goes to a split that would otherwise be empty (train first, so one document is train).
class SplitDocumentStream {
 public:
  explicit SplitDocumentStream(const PrepOptions& options)
      : reader_(options.inputs, ReadOptions{options.sft, options.max_documents, options.max_bytes}),
        seed_(options.seed),
        val_fraction_(options.val_fraction) {
    has_pending_ = reader_.next(pending_);
  }

  bool next(TextDocument& doc, bool& is_val) {
    if (!has_pending_) return false;
    doc = std::move(pending_);
    has_pending_ = reader_.next(pending_);
    is_val = split_draw(seed_, index_) < val_fraction_;
    if (!has_pending_) {  // the last document
      if (train_count_ == 0) is_val = false;
      else if (val_count_ == 0) is_val = true;
    }
    ++(is_val ? val_count_ : train_count_);
    ++index_;
    return true;
  }
  int64_t bytes_read() const { return reader_.bytes_read(); }

 private:
  DocumentReader reader_;
  uint64_t seed_;
  double val_fraction_;
  TextDocument pending_;  // read one ahead so the last document is known as such
  bool has_pending_ = false;
  int64_t index_ = 0, train_count_ = 0, val_count_ = 0;
};

struct TokenizedDocument {
  std::vector<uint32_t> tokens;  // (n,) the document's tokens then EOS
  std::vector<uint8_t> mask;     // (n,) SFT only: 0 on prompt tokens, 1 on response tokens and EOS
};

TokenizedDocument tokenize(const Tokenizer& tokenizer, const TextDocument& doc, bool sft) {
  TokenizedDocument out;
  if (sft) {
    out.tokens = tokenizer.encode(doc.prompt);
    out.mask.assign(out.tokens.size(), 0);
  }
  std::vector<uint32_t> body = tokenizer.encode(doc.text);
  out.tokens.insert(out.tokens.end(), body.begin(), body.end());
  out.tokens.push_back(tokenizer.eos_id());
  if (sft) out.mask.resize(out.tokens.size(), 1);
  return out;
}

// One output file written incrementally: tokens (uint16 when the vocabulary fits, else uint32), loss_mask for
// SFT, and on finish() doc_offsets plus the attributes.
class SplitWriter {
 public:
  SplitWriter(const std::string& path, const Tokenizer& tokenizer, bool sft)
      : file_(h5::File::create(path)), wide_tokens_(tokenizer.vocab_size() > 65536) {
    if (wide_tokens_) wide_.emplace(file_, "tokens");
    else narrow_.emplace(file_, "tokens");
    if (sft) mask_.emplace(file_, "loss_mask");
  }

  void add(const TokenizedDocument& doc) {
    const int64_t n = static_cast<int64_t>(doc.tokens.size());
    if (wide_tokens_) {
      wide_->append(doc.tokens.data(), n);
    } else {
      narrow_buffer_.assign(doc.tokens.begin(), doc.tokens.end());
      narrow_->append(narrow_buffer_.data(), n);
    }
    if (mask_) mask_->append(doc.mask.data(), n);
    offsets_.push_back(offsets_.back() + static_cast<uint64_t>(n));
  }

  void finish(const Tokenizer& tokenizer, const std::string& split, const std::string& source) {
    file_.write("doc_offsets", offsets_);
    tokenizer.save(file_);
    file_.set_attr("/", "source", source);
    file_.set_attr("/", "split", split);
    file_.set_attr("/", "format_version", int64_t{1});
    file_.flush();
    file_.close();
  }

  int64_t documents() const { return static_cast<int64_t>(offsets_.size()) - 1; }
  int64_t tokens() const { return static_cast<int64_t>(offsets_.back()); }

 private:
  h5::File file_;
  bool wide_tokens_;
  std::optional<h5::Appender<uint16_t>> narrow_;
  std::optional<h5::Appender<uint32_t>> wide_;
  std::optional<h5::Appender<uint8_t>> mask_;
  std::vector<uint16_t> narrow_buffer_;
  std::vector<uint64_t> offsets_{0};  // (D+1,)
};

// Removes the listed temporary files when prep stops early; disarmed once the outputs are renamed.
class TemporaryFiles {
 public:
  ~TemporaryFiles() {
    std::error_code ignored;
    for (const std::string& p : paths_) fs::remove(p, ignored);
  }
  const std::string& add(const std::string& path) { return paths_.emplace_back(path); }
  void keep_all() { paths_.clear(); }

 private:
  std::vector<std::string> paths_;
};

// The output directory, created with any missing parents; when prep fails, the directories it created are
// removed again (only if empty: the temporaries are removed first), so a failed prep leaves nothing behind.
class OutputDirectory {
 public:
  explicit OutputDirectory(const std::string& path) {
    for (fs::path p = fs::absolute(path); !p.empty() && !fs::exists(p); p = p.parent_path()) created_.push_back(p);
    std::error_code ec;
    fs::create_directories(path, ec);
    MOBA_CHECK(!ec && fs::is_directory(path),
               cat("moba prep: cannot create output directory ", path, ": ", ec.message()),
               "check the --out path and its permissions");
  }
  ~OutputDirectory() {
    std::error_code ignored;
    for (const fs::path& p : created_) fs::remove(p, ignored);  // deepest first; a non-empty one stays
  }
  void keep() { created_.clear(); }

 private:
  std::vector<fs::path> created_;
};

// Renames (or, with copy, copies) a finished file into place; filesystem errors become moba::Error.
void place_file(const std::string& from, const std::string& to, bool copy = false) {
  std::error_code ec;
  if (copy) fs::copy_file(from, to, fs::copy_options::overwrite_existing, ec);
  else fs::rename(from, to, ec);
  MOBA_CHECK(!ec, cat("moba prep: cannot ", copy ? "copy " : "rename ", from, " to ", to, ": ", ec.message()),
             "check that the output directory is writable and not full");
}

void validate(const PrepOptions& o) {
  MOBA_CHECK(!o.output_dir.empty(), "moba prep: no output directory", "pass --out DIR");
  MOBA_CHECK(o.tokenizer == "byte" || o.tokenizer == "sentencepiece",
             cat("moba prep: unknown --tokenizer '", o.tokenizer, "'"), "use byte or sentencepiece");
  MOBA_CHECK(o.sp_model_type == "bpe" || o.sp_model_type == "unigram",
             cat("moba prep: unknown --sp-model-type '", o.sp_model_type, "'"), "use bpe or unigram");
  MOBA_CHECK(o.sp_model.empty() || o.tokenizer == "sentencepiece",
             "moba prep: --sp-model needs --tokenizer sentencepiece", "drop --tokenizer byte or --sp-model");
  MOBA_CHECK(o.val_fraction >= 0 && o.val_fraction < 1,
             cat("moba prep: --val-fraction ", o.val_fraction, " is outside [0, 1)"),
             "use e.g. 0.05 (with 2 or more documents, one document goes to val whatever the fraction)");
  MOBA_CHECK(o.max_documents == -1 || o.max_documents > 0,
             cat("moba prep: --max-documents ", o.max_documents, " must be positive"), "omit it to read everything");
  MOBA_CHECK(o.max_bytes == -1 || o.max_bytes > 0, cat("moba prep: --max-bytes ", o.max_bytes, " must be positive"),
             "omit it to read everything");
}

std::string describe_source(const PrepOptions& o) {
  std::string source;
  for (const std::string& input : o.inputs) source += (source.empty() ? "" : ", ") + input;
  if (o.max_documents >= 0) source += cat(" [max_documents ", o.max_documents, "]");
  if (o.max_bytes >= 0) source += cat(" [max_bytes ", o.max_bytes, "]");
  if (o.sft) source += " [sft]";
  return source;
}

// Trains SentencePiece on the train split's text (up to kTokenizerTextLimit bytes); writes <prefix>.model.
std::unique_ptr<Tokenizer> train_tokenizer_on_inputs(const PrepOptions& o, const std::string& prefix,
                                                    TemporaryFiles& temporaries) {
  const std::string text_path = temporaries.add(o.output_dir + "/.tokenizer-text.tmp");
  int64_t written = 0;
  {
    std::ofstream text(text_path, std::ios::binary | std::ios::trunc);
    MOBA_CHECK(text.good(), cat("cannot write ", text_path), "check that --out is writable");
    SplitDocumentStream documents(o);
    TextDocument doc;
    bool is_val = false;
    while (written < kTokenizerTextLimit && documents.next(doc, is_val)) {
      if (is_val) continue;
      for (const std::string* part : {&doc.prompt, &doc.text}) {
        if (part->empty()) continue;
        text << *part << '\n';
        written += static_cast<int64_t>(part->size()) + 1;
      }
    }
    MOBA_CHECK(text.good(), cat("cannot write ", text_path, " (disk full?)"), "free some space");
  }
  MOBA_CHECK(written > 0, "moba prep: the inputs hold no text to train SentencePiece on",
             "check the inputs (and --max-documents / --max-bytes)");
  info("prep: training SentencePiece ", o.sp_model_type, " (vocab ", o.vocab_size, ") on ", written,
       " bytes of train text");
  std::unique_ptr<Tokenizer> tokenizer =
      train_sentencepiece({text_path}, prefix, o.sp_model_type, o.vocab_size, o.seed);
  std::error_code ignored;
  fs::remove(text_path, ignored);  // free the disk now; TemporaryFiles would only do so at the end
  return tokenizer;
}

// Encodes `docs` in parallel (each document independently, so the result does not depend on the thread count).
std::vector<TokenizedDocument> tokenize_batch(const Tokenizer& tokenizer, const std::vector<TextDocument>& docs,
                                              bool sft) {
  std::vector<TokenizedDocument> out(docs.size());
  std::vector<std::exception_ptr> errors(docs.size());
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t i = 0; i < static_cast<int64_t>(docs.size()); ++i) {
    try {
      out[static_cast<size_t>(i)] = tokenize(tokenizer, docs[static_cast<size_t>(i)], sft);
    } catch (...) {
      errors[static_cast<size_t>(i)] = std::current_exception();
    }
  }
  for (const std::exception_ptr& e : errors)
    if (e) std::rethrow_exception(e);
  return out;
}

}  // namespace

PrepResult run_prep(const PrepOptions& options) {
  validate(options);
  const auto start_time = std::chrono::steady_clock::now();
  const std::vector<std::string> files = list_input_files(options.inputs);  // fails early on a missing input
  OutputDirectory output_dir(options.output_dir);  // declared before the temporaries: removed after them
  info("prep: reading ", files.size(), " input file(s) into ", options.output_dir);

  PrepResult result;
  result.train_path = options.output_dir + "/train.h5";
  result.val_path = options.output_dir + "/val.h5";
  const std::string tokenizer_model = options.output_dir + "/tokenizer.model";
  TemporaryFiles temporaries;

  std::unique_ptr<Tokenizer> tokenizer;
  std::string tokenizer_temp;  // the .model to rename into place (SentencePiece only)
  if (options.tokenizer == "byte") {
    tokenizer = make_byte_tokenizer();
  } else if (!options.sp_model.empty()) {
    tokenizer = load_sentencepiece(options.sp_model);
    tokenizer_temp = temporaries.add(tokenizer_model + ".tmp");
    place_file(options.sp_model, tokenizer_temp, /*copy=*/true);
  } else {
    const std::string prefix = options.output_dir + "/tokenizer.tmp";
    tokenizer_temp = temporaries.add(prefix + ".model");
    tokenizer = train_tokenizer_on_inputs(options, prefix, temporaries);
  }

  const std::string train_temp = temporaries.add(result.train_path + ".tmp");
  const std::string val_temp = temporaries.add(result.val_path + ".tmp");
  SplitWriter train(train_temp, *tokenizer, options.sft), val(val_temp, *tokenizer, options.sft);
  SplitDocumentStream documents(options);
  std::vector<TextDocument> batch;
  std::vector<bool> batch_is_val;
  TextDocument doc;
  bool is_val = false, more = true;
  while (more) {
    batch.clear();
    batch_is_val.clear();
    int64_t batch_bytes = 0;
    while (static_cast<int64_t>(batch.size()) < kBatchDocuments && batch_bytes < kBatchBytes &&
           (more = documents.next(doc, is_val))) {
      batch_bytes += static_cast<int64_t>(doc.prompt.size() + doc.text.size());
      batch.push_back(std::move(doc));
      batch_is_val.push_back(is_val);
    }
    std::vector<TokenizedDocument> tokenized = tokenize_batch(*tokenizer, batch, options.sft);
    for (size_t i = 0; i < tokenized.size(); ++i) (batch_is_val[i] ? val : train).add(tokenized[i]);
  }
  MOBA_CHECK(train.documents() > 0, cat("moba prep: no documents found in ", describe_source(options)),
             "check that the inputs hold text (JSONL needs a \"text\" member per line; SFT needs --sft)");

  const std::string source = describe_source(options);
  train.finish(*tokenizer, "train", source);
  val.finish(*tokenizer, "val", source);
  if (!tokenizer_temp.empty()) {
    place_file(tokenizer_temp, tokenizer_model);
    result.tokenizer_path = tokenizer_model;
  } else {
    std::error_code ignored;
    fs::remove(tokenizer_model, ignored);  // a stale SentencePiece model from an earlier run would mislead
  }
  place_file(val_temp, result.val_path);
  place_file(train_temp, result.train_path);
  temporaries.keep_all();
  output_dir.keep();

  result.train_documents = train.documents();
  result.val_documents = val.documents();
  result.train_tokens = train.tokens();
  result.val_tokens = val.tokens();
  result.vocab_size = tokenizer->vocab_size();
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start_time).count();
  info("prep: ", documents.bytes_read(), " bytes of text -> ", tokenizer->kind(), " tokenizer (vocab ",
       result.vocab_size, ", eos ", tokenizer->eos_id(), ")");
  info("prep: train ", result.train_documents, " documents, ", result.train_tokens, " tokens -> ", result.train_path);
  info("prep: val   ", result.val_documents, " documents, ", result.val_tokens, " tokens -> ", result.val_path);
  if (!result.tokenizer_path.empty()) info("prep: tokenizer -> ", result.tokenizer_path);
  info("prep: done in ", static_cast<int64_t>(seconds * 10) / 10.0, " s");
  return result;
}

int prep_command(const std::vector<std::string>& args) {
  const PrepOptions defaults;
  ArgParser parser("prep",
                   "Tokenizes raw text into <out>/train.h5 and <out>/val.h5 (split by document) for training.");
  parser.add_positional("inputs", "JSON Lines (.jsonl, optionally .xz/.gz) or plain text files, or directories of them",
                        true, true);
  parser.add_option("out", "DIR", "output directory (required)");
  parser.add_option("tokenizer", "KIND", "byte or sentencepiece", defaults.tokenizer);
  parser.add_option("sp-model-type", "TYPE", "bpe or unigram, when training SentencePiece", defaults.sp_model_type);
  parser.add_option("vocab-size", "N", "vocabulary size when training SentencePiece", cat(defaults.vocab_size));
  parser.add_option("sp-model", "PATH", "existing SentencePiece .model to use instead of training one");
  parser.add_option("val-fraction", "F", "fraction of documents held out for validation", cat(defaults.val_fraction));
  parser.add_option("seed", "S", "seed of the train/val split and of SentencePiece training", cat(defaults.seed));
  parser.add_flag("sft", "inputs are {\"prompt\", \"response\"} records; writes a loss_mask (0 on prompts)");
  parser.add_option("max-documents", "N", "read at most N documents (default: all)");
  parser.add_option("max-bytes", "N", "read at most N bytes of text, cutting the last document (default: all)");
  if (!parser.parse(args)) return 0;

  parser.check(parser.has("out"), "--out DIR is required",
               "e.g. moba prep data/sample/python-docs.jsonl.xz --out data/prepared/python-docs");
  PrepOptions options;
  options.inputs = parser.get_all("inputs");
  options.output_dir = parser.get("out");
  options.tokenizer = parser.get_choice("tokenizer", {"byte", "sentencepiece"});
  options.sp_model_type = parser.get_choice("sp-model-type", {"bpe", "unigram"});
  options.sp_model = parser.get("sp-model");
  if (!options.sp_model.empty() && !parser.has("tokenizer")) options.tokenizer = "sentencepiece";
  const bool trains_sentencepiece = options.tokenizer == "sentencepiece" && options.sp_model.empty();
  for (const char* training_option : {"vocab-size", "sp-model-type"})
    if (parser.has(training_option) && !trains_sentencepiece)
      warn("moba prep: --", training_option, " only applies when training SentencePiece; ignored");
  options.vocab_size = static_cast<int>(parser.get_int("vocab-size", 300, 1000000));  // SentencePiece's range
  options.val_fraction = parser.get_double("val-fraction", 0, 1);
  parser.check(options.val_fraction < 1, "--val-fraction 1 would hold out every document",
               "use e.g. 0.05 (with 2 or more documents, one document goes to val whatever the fraction)");
  options.seed = static_cast<uint64_t>(parser.get_int("seed", 0, std::numeric_limits<long long>::max()));
  options.sft = parser.flag("sft");
  const long long no_limit = std::numeric_limits<long long>::max();
  if (parser.has("max-documents")) options.max_documents = parser.get_int("max-documents", 1, no_limit);
  if (parser.has("max-bytes")) options.max_bytes = parser.get_int("max-bytes", 1, no_limit);
  run_prep(options);
  return 0;
}

}  // namespace moba::data
