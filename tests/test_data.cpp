// Tests of the data layer: JSON/text reading, tokenizers, moba prep, dataset validation and the sampler.
// Invariant: each test runs in well under a few seconds on small slices; tests needing ../shared/data skip
// without it, and every error case checks that the message names the file/value and what to do.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#if MOBA_HAVE_LZMA
#include <lzma.h>
#endif
#include <zlib.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <numeric>
#include <set>

#include "common/error.h"
#include "common/hdf5_io.h"
#include "data/dataset.h"
#include "data/json_string.h"
#include "data/prep.h"
#include "data/sampler.h"
#include "data/text_reader.h"
#include "data/tokenizer.h"
#include "tests/support/test_util.h"

namespace moba::data {
namespace {

namespace fs = std::filesystem;
using moba::test::scratch_dir;
using moba::test::shared_data;

// The moba::Error message (and hint) that f throws, or "<no error>".
std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const moba::Error& e) {
    return std::string(e.what()) + " | hint: " + e.hint();
  }
  return "<no error>";
}

void write_file(const std::string& path, const std::string& content) {
  std::ofstream out(path, std::ios::binary);
  out << content;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// Tests that need .xz files skip on builds without liblzma (moba prep refuses .xz there, tested below).
#define REQUIRE_LZMA() \
  if (!MOBA_HAVE_LZMA) GTEST_SKIP() << "built without liblzma: .xz inputs are not supported"

#if MOBA_HAVE_LZMA
std::string xz_compress(const std::string& data) {
  std::string out(lzma_stream_buffer_bound(data.size()), '\0');
  size_t written = 0;
  lzma_ret r = lzma_easy_buffer_encode(6, LZMA_CHECK_CRC64, nullptr, reinterpret_cast<const uint8_t*>(data.data()),
                                       data.size(), reinterpret_cast<uint8_t*>(out.data()), &written, out.size());
  EXPECT_EQ(r, LZMA_OK);
  out.resize(written);
  return out;
}
#else
std::string xz_compress(const std::string&) { return "\xFD" "7zXZ"; }  // never reached: REQUIRE_LZMA skips
#endif

void write_gz(const std::string& path, const std::string& data) {
  gzFile f = gzopen(path.c_str(), "wb");
  ASSERT_NE(f, nullptr);
  gzwrite(f, data.data(), static_cast<unsigned>(data.size()));
  gzclose(f);
}

std::vector<TextDocument> read_all(const std::vector<std::string>& inputs, ReadOptions options = {}) {
  DocumentReader reader(inputs, options);
  std::vector<TextDocument> docs;
  TextDocument doc;
  while (reader.next(doc)) docs.push_back(doc);
  return docs;
}

// A dataset file written by hand: tokens (uint32), doc_offsets, attributes, optional loss mask.
void write_dataset(const std::string& path, const std::vector<uint32_t>& tokens, const std::vector<uint64_t>& offsets,
                   int64_t vocab_size, int64_t eos_id, const std::vector<uint8_t>* loss_mask = nullptr) {
  h5::File f = h5::File::create(path);
  f.write("tokens", tokens);
  f.write("doc_offsets", offsets);
  if (loss_mask) f.write("loss_mask", *loss_mask);
  f.set_attr("/", "vocab_size", vocab_size);
  f.set_attr("/", "eos_id", eos_id);
  f.set_attr("/", "tokenizer", std::string("byte"));
  f.set_attr("/", "source", std::string("test"));
  f.set_attr("/", "split", std::string("train"));
  f.set_attr("/", "format_version", int64_t{1});
}

// ---- JSON and text reading --------------------------------------------------------------------------------

TEST(Json, DecodesEscapesAndSurrogatePairs) {
  auto fields = parse_json_object_strings(
      R"( {"id": 7, "text": "a\"b\\c\/d\b\f\n\r\t \u00e9\u20AC \ud834\udd1e|\ud800x|\udc00", "nested": {"a": [1, -2.5e3, true, null, "x"]}, "k": "v"} )");
  EXPECT_EQ(fields.count("id"), 0u);  // numbers are skipped
  EXPECT_EQ(fields["k"], "v");
  EXPECT_EQ(fields["text"], "a\"b\\c/d\b\f\n\r\t \xC3\xA9\xE2\x82\xAC \xF0\x9D\x84\x9E|\xEF\xBF\xBDx|\xEF\xBF\xBD");
  EXPECT_EQ(parse_json_object_strings(R"({"text": "raw UTF-8 é stays"})")["text"], "raw UTF-8 é stays");
  EXPECT_TRUE(parse_json_object_strings("{}").empty());
}

TEST(Json, ReportsTheColumnAndWhatWasExpected) {
  auto column_and_message = [](const std::string& line) {
    try {
      parse_json_object_strings(line);
    } catch (const JsonSyntaxError& e) {
      return std::to_string(e.column()) + ": " + e.what();
    }
    return std::string("<no error>");
  };
  EXPECT_EQ(column_and_message(R"({"a": "x" "b": 1})"), "11: expected ',' or '}' after a member value");
  EXPECT_NE(column_and_message(R"({"a": "x)").find("unterminated string"), std::string::npos);
  EXPECT_NE(column_and_message("{\"a\": \"x\ny\"}").find("raw control character"), std::string::npos);
  EXPECT_NE(column_and_message(R"({"a": "\q"})").find("invalid escape"), std::string::npos);
  EXPECT_NE(column_and_message(R"({"a": "\u12G4"})").find("4 hex digits"), std::string::npos);
  EXPECT_NE(column_and_message(R"({"a": 1} x)").find("after the end of the JSON object"), std::string::npos);
  EXPECT_NE(column_and_message(R"(["a"])").find("expected a JSON object"), std::string::npos);
  EXPECT_NE(column_and_message(R"({"a": tru})").find("expected a JSON value"), std::string::npos);
}

TEST(TextReader, ReadsJsonLinesPlainGzipXzAndDirectories) {
  REQUIRE_LZMA();
  std::string dir = scratch_dir("reader");
  std::string jsonl = "{\"text\": \"first\"}\n\n{\"text\": \"second\\n\"}\r\n{\"id\": 3, \"text\": \"third\"}";
  write_file(dir + "/a.jsonl", jsonl);
  write_gz(dir + "/b.jsonl.gz", "{\"text\": \"gz doc\"}\n");
  write_file(dir + "/c.jsonl.xz", xz_compress("{\"text\": \"xz doc\"}\n"));
  fs::create_directories(dir + "/tree/sub");
  fs::create_directories(dir + "/tree/.hidden");
  write_file(dir + "/tree/z.txt", "plain z");
  write_file(dir + "/tree/sub/a.txt", "\xEF\xBB\xBFplain sub/a");  // a UTF-8 byte order mark is dropped
  write_file(dir + "/tree/.hidden/x.txt", "hidden");
  write_file(dir + "/tree/empty.txt", "");

  auto docs = read_all({dir + "/a.jsonl", dir + "/b.jsonl.gz", dir + "/c.jsonl.xz", dir + "/tree"});
  std::vector<std::string> texts;
  for (auto& d : docs) texts.push_back(d.text);
  EXPECT_EQ(texts, (std::vector<std::string>{"first", "second\n", "third", "gz doc", "xz doc", "plain sub/a",
                                             "plain z"}));
}

TEST(TextReader, LimitsCutTheLastDocumentAtACharacterBoundary) {
  std::string dir = scratch_dir("reader_limits");
  write_file(dir + "/d.jsonl", "{\"text\": \"abcd\"}\n{\"text\": \"\\u00e9\\u00e9\\u00e9\"}\n{\"text\": \"zz\"}\n");
  EXPECT_EQ(read_all({dir + "/d.jsonl"}, ReadOptions{false, 2, -1}).size(), 2u);
  // 4 bytes + 3 of "ééé" (6 bytes): the cut lands inside the second é, so only one é is kept.
  auto docs = read_all({dir + "/d.jsonl"}, ReadOptions{false, -1, 7});
  ASSERT_EQ(docs.size(), 2u);
  EXPECT_EQ(docs[1].text, "\xC3\xA9");
  EXPECT_EQ(read_all({dir + "/d.jsonl"}, ReadOptions{false, -1, 4}).size(), 1u);
}

TEST(TextReader, CorruptInputsAreClearErrors) {
  REQUIRE_LZMA();
  std::string dir = scratch_dir("reader_errors");
  write_file(dir + "/bad.jsonl", "{\"text\": \"ok\"}\n{\"text\": \"ok\"}\n{\"text\": \"missing quote}\n");
  std::string message = error_of([&] { read_all({dir + "/bad.jsonl"}); });
  EXPECT_NE(message.find("bad.jsonl:3:"), std::string::npos) << message;
  EXPECT_NE(message.find("unterminated string"), std::string::npos) << message;

  write_file(dir + "/notext.jsonl", "{\"prompt\": \"p\", \"response\": \"r\"}\n");
  message = error_of([&] { read_all({dir + "/notext.jsonl"}); });
  EXPECT_NE(message.find("notext.jsonl:1: expected a string member \"text\""), std::string::npos) << message;
  EXPECT_NE(message.find("--sft"), std::string::npos) << message;

  std::string compressed = xz_compress(std::string(100000, 'x'));
  write_file(dir + "/cut.jsonl.xz", compressed.substr(0, compressed.size() / 2));
  message = error_of([&] { read_all({dir + "/cut.jsonl.xz"}); });
  EXPECT_NE(message.find("cut.jsonl.xz"), std::string::npos) << message;
  EXPECT_NE(message.find("truncated"), std::string::npos) << message;

  write_file(dir + "/fake.jsonl.gz", "not gzip");
  message = error_of([&] { read_all({dir + "/fake.jsonl.gz"}); });
  EXPECT_NE(message.find("does not start with the xz or gzip signature"), std::string::npos) << message;

  message = error_of([&] { read_all({dir + "/does-not-exist.jsonl"}); });
  EXPECT_NE(message.find("input not found: " + dir + "/does-not-exist.jsonl"), std::string::npos) << message;
}

TEST(TextReader, BundledSampleCorpusReads) {
  REQUIRE_LZMA();
  auto docs = read_all({moba::test::source_path("data/sample/python-docs.jsonl.xz")});
  ASSERT_EQ(docs.size(), 137u);
  int64_t bytes = 0;
  for (const auto& d : docs) bytes += static_cast<int64_t>(d.text.size());
  EXPECT_EQ(bytes, 2481114);
  EXPECT_EQ(docs[0].text.rfind("=====================\nAbout these documents", 0), 0u);
}

// ---- tokenizers ------------------------------------------------------------------------------------------

TEST(ByteTokenizer, RoundTripsUtf8AndBinary) {
  auto tok = make_byte_tokenizer();
  EXPECT_EQ(tok->vocab_size(), 258);
  EXPECT_EQ(tok->eos_id(), 256u);
  EXPECT_EQ(tok->kind(), "byte");
  std::string text = std::string("h\xC3\xA9llo \xE2\x9C\x93 \xF0\x9D\x84\x9E\n\t", 17) + std::string(1, '\0') + "\xFF";
  std::vector<uint32_t> ids = tok->encode(text);
  ASSERT_EQ(ids.size(), text.size());
  EXPECT_EQ(ids[1], 0xC3u);
  EXPECT_EQ(ids.back(), 0xFFu);
  EXPECT_EQ(tok->decode(ids), text);
  ids.push_back(256);  // EOS decodes to nothing, an id past the vocabulary to U+FFFD
  ids.push_back(999);
  EXPECT_EQ(tok->decode(ids), text + "\xEF\xBF\xBD");
}

TEST(SentencePiece, TrainsSavesAndLoadsRoundTrip) {
  std::string corpus = shared_data("python-3.11-docs.jsonl.xz");
  MOBA_REQUIRE_SHARED(corpus);
  std::string dir = scratch_dir("sentencepiece");
  PrepOptions o;
  o.inputs = {corpus};
  o.output_dir = dir;
  o.tokenizer = "sentencepiece";
  o.vocab_size = 500;
  o.max_bytes = 300000;
  PrepResult r = run_prep(o);
  EXPECT_EQ(r.vocab_size, 500);
  EXPECT_EQ(r.tokenizer_path, dir + "/tokenizer.model");
  EXPECT_FALSE(fs::exists(dir + "/tokenizer.tmp.model"));
  EXPECT_FALSE(fs::exists(dir + "/.tokenizer-text.tmp"));

  auto tok = load_sentencepiece(r.tokenizer_path);
  EXPECT_EQ(tok->kind(), "sentencepiece");
  EXPECT_EQ(tok->vocab_size(), 500);
  const std::string text = "def f(x):\n    return x  *  2\t# caf\xC3\xA9 \xE2\x9C\x93 \xF0\x9F\x98\x80\n\n";
  std::vector<uint32_t> ids = tok->encode(text);
  EXPECT_LT(ids.size(), text.size());  // merges happened
  for (uint32_t id : ids) EXPECT_LT(id, 500u);
  EXPECT_EQ(tok->decode(ids), text);  // exact round trip: identity normalization + byte fallback

  // The dataset carries the model: load_tokenizer rebuilds the same tokenizer, and the tokens decode back.
  TokenDataset ds = TokenDataset::open(r.train_path);
  EXPECT_EQ(ds.info().tokenizer, "sentencepiece");
  EXPECT_EQ(ds.info().eos_id, tok->eos_id());
  h5::File file = h5::File::open_read(r.train_path);
  auto from_file = load_tokenizer(file);
  EXPECT_EQ(from_file->vocab_size(), 500);
  EXPECT_EQ(from_file->encode(text), ids);
  std::vector<int32_t> doc(static_cast<size_t>(ds.doc_length(0)));
  ds.read_tokens(ds.doc_begin(0), ds.doc_length(0), doc.data());
  EXPECT_EQ(static_cast<uint32_t>(doc.back()), tok->eos_id());
  std::string decoded = tok->decode(std::vector<uint32_t>(doc.begin(), doc.end() - 1));
  EXPECT_NE(decoded.find("Python"), std::string::npos);

  // Reusing the model with --sp-model gives identical tokens.
  std::string dir2 = scratch_dir("sentencepiece_reuse");
  o.output_dir = dir2;
  o.sp_model = r.tokenizer_path;
  run_prep(o);
  EXPECT_EQ(read_file(dir2 + "/tokenizer.model"), read_file(r.tokenizer_path));
  TokenDataset ds2 = TokenDataset::open(dir2 + "/train.h5");
  EXPECT_EQ(ds2.info().num_tokens, ds.info().num_tokens);
}

TEST(SentencePiece, BadModelFilesAreClearErrors) {
  std::string dir = scratch_dir("sentencepiece_errors");
  EXPECT_NE(error_of([&] { load_sentencepiece(dir + "/missing.model"); }).find("SentencePiece model not found"),
            std::string::npos);
  write_file(dir + "/junk.model", "this is not a protobuf");
  EXPECT_NE(error_of([&] { load_sentencepiece(dir + "/junk.model"); }).find("is not a valid SentencePiece model"),
            std::string::npos);
}

// ---- prep ------------------------------------------------------------------------------------------------

TEST(Prep, LinuxSliceWritesConsistentByteDatasets) {
  std::string corpus = shared_data("linux-6.1-core.jsonl.xz");
  MOBA_REQUIRE_SHARED(corpus);
  std::string dir = scratch_dir("prep_linux");
  PrepOptions o;
  o.inputs = {corpus};
  o.output_dir = dir;
  o.max_bytes = 4000000;  // the first documents are ~2 MB each: 4 whole ones and a cut fifth
  o.val_fraction = 0.2;
  PrepResult r = run_prep(o);
  EXPECT_EQ(r.vocab_size, 258);
  EXPECT_EQ(r.train_documents + r.val_documents, 5);
  EXPECT_GE(r.train_documents, 1);
  EXPECT_GE(r.val_documents, 1);
  EXPECT_EQ(r.train_tokens + r.val_tokens, 4000000 + 5);  // one byte per token plus one EOS per document
  EXPECT_TRUE(r.tokenizer_path.empty());
  for (const char* leftover : {"train.h5.tmp", "val.h5.tmp", "tokenizer.model"})
    EXPECT_FALSE(fs::exists(dir + "/" + leftover)) << leftover;

  for (const std::string& path : {r.train_path, r.val_path}) {
    TokenDataset ds = TokenDataset::open(path);
    const DatasetInfo& info = ds.info();
    EXPECT_EQ(info.vocab_size, 258);
    EXPECT_EQ(info.eos_id, 256u);
    EXPECT_EQ(info.tokenizer, "byte");
    EXPECT_NE(info.source.find("linux-6.1-core.jsonl.xz"), std::string::npos);
    EXPECT_EQ(info.split, path == r.train_path ? "train" : "val");
    EXPECT_FALSE(info.has_loss_mask);
    h5::File f = h5::File::open_read(path);
    EXPECT_EQ(f.attr_int("/", "format_version"), 1);
    EXPECT_EQ(f.stored_type("tokens"), h5::StoredType::u16);
    EXPECT_EQ(f.stored_type("doc_offsets"), h5::StoredType::u64);
    for (int64_t d = 0; d < ds.num_documents(); ++d) {
      int32_t last = -1, first = -1;
      ds.read_tokens(ds.doc_end(d) - 1, 1, &last);
      ds.read_tokens(ds.doc_begin(d), 1, &first);
      EXPECT_EQ(last, 256);
      EXPECT_EQ(first, '/');  // every document starts with "// file: PATH"
    }
  }
  // The split is a function of the seed: the same options give byte-identical token arrays.
  std::string dir2 = scratch_dir("prep_linux_again");
  o.output_dir = dir2;
  run_prep(o);
  EXPECT_EQ(h5::File::open_read(dir2 + "/train.h5").read<uint16_t>("tokens"),
            h5::File::open_read(r.train_path).read<uint16_t>("tokens"));
}

TEST(Prep, SftMasksPromptTokens) {
  std::string dir = scratch_dir("prep_sft");
  write_file(dir + "/pairs.jsonl",
             "{\"prompt\": \"Q: 2+2?\\n\", \"response\": \"A: 4\"}\n"
             "{\"prompt\": \"Q: capital of France?\\n\", \"response\": \"A: Paris\"}\n"
             "{\"prompt\": \"\", \"response\": \"unprompted\"}\n");
  PrepOptions o;
  o.inputs = {dir + "/pairs.jsonl"};
  o.output_dir = dir + "/out";
  o.sft = true;
  o.val_fraction = 0.0;  // still one document goes to val
  PrepResult r = run_prep(o);
  EXPECT_EQ(r.train_documents, 2);
  EXPECT_EQ(r.val_documents, 1);
  TokenDataset train = TokenDataset::open(r.train_path);
  ASSERT_TRUE(train.info().has_loss_mask);
  ASSERT_EQ(train.num_documents(), 2);
  const std::vector<std::pair<std::string, std::string>> pairs = {{"Q: 2+2?\n", "A: 4"},
                                                                  {"Q: capital of France?\n", "A: Paris"}};
  for (int64_t d = 0; d < 2; ++d) {
    const auto& [prompt, response] = pairs[static_cast<size_t>(d)];
    ASSERT_EQ(train.doc_length(d), static_cast<int64_t>(prompt.size() + response.size() + 1));
    std::vector<uint8_t> mask(static_cast<size_t>(train.doc_length(d)));
    train.read_loss_mask(train.doc_begin(d), train.doc_length(d), mask.data());
    std::vector<uint8_t> expected(prompt.size(), 0);
    expected.resize(mask.size(), 1);  // response tokens and the EOS count
    EXPECT_EQ(mask, expected);
  }
  EXPECT_EQ(TokenDataset::open(r.val_path).info().num_tokens, static_cast<int64_t>(std::string("unprompted").size()) + 1);

  write_file(dir + "/plain.jsonl", "{\"text\": \"no prompt here\"}\n");
  o.inputs = {dir + "/plain.jsonl"};
  std::string message = error_of([&] { run_prep(o); });
  EXPECT_NE(message.find("plain.jsonl:1: expected string members \"prompt\" and \"response\""), std::string::npos)
      << message;
}

TEST(Prep, CommandLineParsesAndValidates) {
  std::string dir = scratch_dir("prep_cli");
  write_file(dir + "/docs.jsonl", "{\"text\": \"one\"}\n{\"text\": \"two\"}\n{\"text\": \"three\"}\n");
  EXPECT_EQ(prep_command({dir + "/docs.jsonl", "--out", dir + "/out", "--val-fraction", "0.3", "--seed", "7",
                          "--max-documents", "2"}),
            0);
  EXPECT_EQ(TokenDataset::open(dir + "/out/train.h5").num_documents() +
                TokenDataset::open(dir + "/out/val.h5").num_documents(),
            2);
  EXPECT_EQ(prep_command({"--help"}), 0);

  std::string message = error_of([&] { prep_command({dir + "/docs.jsonl", "--out", dir + "/o", "--tokenizer", "wordpiece"}); });
  EXPECT_NE(message.find("--tokenizer 'wordpiece' is not allowed"), std::string::npos) << message;
  EXPECT_NE(message.find("allowed: byte, sentencepiece"), std::string::npos) << message;
  message = error_of([&] { prep_command({dir + "/docs.jsonl"}); });
  EXPECT_NE(message.find("--out DIR is required"), std::string::npos) << message;
  message = error_of([&] { prep_command({dir + "/docs.jsonl", "--out", dir + "/o", "--val-fraction", "1.5"}); });
  EXPECT_NE(message.find("--val-fraction 1.5 is out of range [0, 1]"), std::string::npos) << message;
  message = error_of([&] { prep_command({dir + "/missing.jsonl", "--out", dir + "/o"}); });
  EXPECT_NE(message.find("input not found: " + dir + "/missing.jsonl"), std::string::npos) << message;
  EXPECT_FALSE(fs::exists(dir + "/o"));  // nothing is created before the inputs are known to exist

  write_file(dir + "/empty.jsonl", "\n\n");
  message = error_of([&] { prep_command({dir + "/empty.jsonl", "--out", dir + "/o/deeper"}); });
  EXPECT_NE(message.find("no documents found"), std::string::npos) << message;
  EXPECT_FALSE(fs::exists(dir + "/o"));  // a failed prep removes the directories it created
  fs::create_directories(dir + "/mine");
  write_file(dir + "/mine/keep.txt", "not moba's");
  message = error_of([&] { prep_command({dir + "/empty.jsonl", "--out", dir + "/mine"}); });
  EXPECT_NE(message.find("no documents found"), std::string::npos) << message;
  EXPECT_EQ(read_file(dir + "/mine/keep.txt"), "not moba's");  // a directory it did not create stays
}

TEST(Prep, AFullDiskLeavesNoTemporaryFilesOrEmptyDirectory) {
  std::string dir = scratch_dir("prep_full");
  std::string text;
  for (int i = 0; i < 30000; ++i)
    text += "{\"text\": \"document " + std::to_string(i) + " " + std::string(200, 'x') + "\"}\n";
  write_file(dir + "/docs.jsonl", text);
  for (rlim_t limit : {rlim_t{100}, rlim_t{100000}, rlim_t{3000000}, rlim_t{9000000}}) {
    std::string message;
    {
      test::FileSizeLimit full(limit);
      message = error_of([&] {
        PrepOptions o;
        o.inputs = {dir + "/docs.jsonl"};
        o.output_dir = dir + "/out";
        o.val_fraction = 0.01;
        run_prep(o);
      });
    }
    EXPECT_NE(message.find(".h5.tmp"), std::string::npos) << "limit " << limit << ": " << message;
    EXPECT_FALSE(fs::exists(dir + "/out")) << "limit " << limit << ": " << message;
  }
}

// ---- dataset validation ----------------------------------------------------------------------------------

TEST(Dataset, RejectsTruncatedInconsistentAndOutOfRangeFiles) {
  std::string dir = scratch_dir("dataset_errors");
  std::vector<uint32_t> tokens(40000);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<uint32_t>(i % 256);
  write_dataset(dir + "/good.h5", tokens, {0, 10000, 40000}, 258, 256);
  EXPECT_EQ(TokenDataset::open(dir + "/good.h5").num_documents(), 2);

  std::string bytes = read_file(dir + "/good.h5");
  std::string message;
  for (double kept : {0.1, 0.5, 0.9, 0.999}) {
    write_file(dir + "/truncated.h5", bytes.substr(0, static_cast<size_t>(static_cast<double>(bytes.size()) * kept)));
    message = error_of([&] { TokenDataset::open(dir + "/truncated.h5"); });
    EXPECT_NE(message.find(dir + "/truncated.h5"), std::string::npos) << message;
    EXPECT_NE(message.find("truncated"), std::string::npos) << message;
    EXPECT_NE(message.find("re-run moba prep"), std::string::npos) << message;
  }

  write_dataset(dir + "/range.h5", {1, 2, 300, 256}, {0, 4}, 258, 256);
  message = error_of([&] { TokenDataset::open(dir + "/range.h5"); });
  EXPECT_NE(message.find("tokens[2] = 300 is not below vocab_size 258"), std::string::npos) << message;
  EXPECT_NE(message.find("re-run moba prep with the right --tokenizer"), std::string::npos) << message;

  write_dataset(dir + "/decreasing.h5", {1, 2, 3, 256}, {0, 3, 2, 4}, 258, 256);
  message = error_of([&] { TokenDataset::open(dir + "/decreasing.h5"); });
  EXPECT_NE(message.find("doc_offsets decreases at index 2 (3 then 2)"), std::string::npos) << message;

  write_dataset(dir + "/short.h5", {1, 2, 3, 256}, {0, 3}, 258, 256);
  message = error_of([&] { TokenDataset::open(dir + "/short.h5"); });
  EXPECT_NE(message.find("doc_offsets ends at 3 but 'tokens' has 4 entries"), std::string::npos) << message;

  write_dataset(dir + "/eos.h5", {1, 2}, {0, 2}, 258, 258);
  message = error_of([&] { TokenDataset::open(dir + "/eos.h5"); });
  EXPECT_NE(message.find("eos_id 258 is not below vocab_size 258"), std::string::npos) << message;

  std::vector<uint8_t> mask = {1, 1, 0};
  write_dataset(dir + "/mask.h5", {1, 2, 3, 256}, {0, 4}, 258, 256, &mask);
  message = error_of([&] { TokenDataset::open(dir + "/mask.h5"); });
  EXPECT_NE(message.find("'loss_mask' has 3 entries but 'tokens' has 4"), std::string::npos) << message;

  {
    h5::File f = h5::File::create(dir + "/noattr.h5");
    f.write("tokens", std::vector<uint32_t>{1});
    f.write("doc_offsets", std::vector<uint64_t>{0, 1});
  }
  message = error_of([&] { TokenDataset::open(dir + "/noattr.h5"); });
  EXPECT_NE(message.find("lacks the attribute 'format_version'"), std::string::npos) << message;

  message = error_of([&] { TokenDataset::open(dir + "/missing.h5"); });
  EXPECT_NE(message.find("file not found"), std::string::npos) << message;
}

// Any byte flipped anywhere (metadata, the chunk index, attributes, tokens) must make open() fail with a
// moba::Error naming the file, or leave the dataset exactly as written: never tokens read as something else.
TEST(Dataset, AFlippedByteAnywhereIsAnErrorNeverDifferentTokens) {
  std::string dir = scratch_dir("dataset_flip");
  std::vector<uint32_t> tokens(40000);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<uint32_t>((i * 7) % 256);
  std::vector<uint8_t> mask(tokens.size(), 1);
  write_dataset(dir + "/good.h5", tokens, {0, 10000, 40000}, 258, 256, &mask);
  const std::string bytes = read_file(dir + "/good.h5");
  const std::string bad = dir + "/bad.h5";
  int errors = 0, harmless = 0;
  for (size_t offset = 0; offset < bytes.size(); offset += offset < 4096 || offset + 4096 > bytes.size() ? 13 : 401) {
    std::string flipped = bytes;
    flipped[offset] = static_cast<char>(flipped[offset] ^ 0x5A);
    write_file(bad, flipped);
    try {
      TokenDataset ds = TokenDataset::open(bad);
      std::vector<int32_t> read(tokens.size());
      ASSERT_EQ(ds.info().num_tokens, static_cast<int64_t>(tokens.size())) << "byte " << offset;
      ds.read_tokens(0, ds.info().num_tokens, read.data());
      ASSERT_TRUE(std::equal(read.begin(), read.end(), tokens.begin())) << "byte " << offset << " changed tokens";
      ASSERT_EQ(ds.num_documents(), 2) << "byte " << offset;
      ASSERT_EQ(ds.doc_end(0), 10000) << "byte " << offset;
      ASSERT_EQ(ds.info().source, "test") << "byte " << offset;
      ++harmless;
    } catch (const moba::Error& e) {
      ASSERT_NE(std::string(e.what()).find(bad), std::string::npos) << e.what();
      ++errors;
    }
  }
  EXPECT_GT(errors, 10 * harmless);

  // Flipped bytes inside the tokens name the dataset and the corruption.
  auto [chunk, size] = test::first_chunk(dir + "/good.h5", "tokens");
  std::string flipped = bytes;
  for (size_t i = chunk + size / 2; i < chunk + size / 2 + 16; ++i) flipped[i] = static_cast<char>(flipped[i] ^ 0xFF);
  write_file(bad, flipped);
  std::string message = error_of([&] { TokenDataset::open(bad); });
  EXPECT_NE(message.find(bad + ": cannot read dataset 'tokens': the file is corrupt, a checksum does not match"),
            std::string::npos)
      << message;
}

TEST(Dataset, FilesWrittenBeforeChecksumsOpenWithANote) {
  std::string dir = scratch_dir("dataset_legacy");
  std::vector<uint32_t> tokens = {1, 2, 3, 256, 4, 5, 256};
  write_dataset(dir + "/new.h5", tokens, {0, 4, 7}, 258, 256);
  test::write_legacy_copy(dir + "/new.h5", dir + "/legacy.h5");
  EXPECT_TRUE(h5::File::open_read(dir + "/new.h5").has_checksum("tokens"));
  EXPECT_FALSE(h5::File::open_read(dir + "/legacy.h5").has_checksum("tokens"));
  testing::internal::CaptureStdout();
  TokenDataset ds = TokenDataset::open(dir + "/legacy.h5");
  std::string out = testing::internal::GetCapturedStdout();
  EXPECT_NE(out.find("note: " + dir + "/legacy.h5 carries no checksums"), std::string::npos) << out;
  std::vector<int32_t> read(tokens.size());
  ds.read_tokens(0, 7, read.data());
  EXPECT_TRUE(std::equal(read.begin(), read.end(), tokens.begin()));
  testing::internal::CaptureStdout();
  TokenDataset::open(dir + "/new.h5");
  EXPECT_EQ(testing::internal::GetCapturedStdout(), "");

  // Without checksums a damaged chunk index can drop chunks, which HDF5 then reads as zeros: a dataset whose
  // chunks do not cover its extent is refused. (Built here as moba's old Appender would leave it: extended to
  // 3 chunks, only the first written.)
  const std::string sparse = dir + "/sparse.h5";
  write_dataset(sparse, {}, {0}, 258, 256);
  {
    h5::File f = h5::File::open_write(sparse);
    H5Ldelete(f.id(), "tokens", H5P_DEFAULT);
    H5Ldelete(f.id(), "doc_offsets", H5P_DEFAULT);
    hsize_t zero = 0, unlimited = H5S_UNLIMITED, chunk = 100, size = 300;
    hid_t space = H5Screate_simple(1, &zero, &unlimited), dcpl = H5Pcreate(H5P_DATASET_CREATE);
    H5Pset_chunk(dcpl, 1, &chunk);
    hid_t tokens = H5Dcreate2(f.id(), "tokens", H5T_NATIVE_UINT32, space, H5P_DEFAULT, dcpl, H5P_DEFAULT);
    H5Dset_extent(tokens, &size);
    std::vector<uint32_t> first(100, 7);
    hid_t file_space = H5Dget_space(tokens), memory = H5Screate_simple(1, &chunk, nullptr);
    hsize_t start = 0;
    H5Sselect_hyperslab(file_space, H5S_SELECT_SET, &start, nullptr, &chunk, nullptr);
    H5Dwrite(tokens, H5T_NATIVE_UINT32, memory, file_space, H5P_DEFAULT, first.data());
    for (hid_t id : {memory, file_space, space}) H5Sclose(id);
    H5Pclose(dcpl);
    H5Dclose(tokens);
    f.write("doc_offsets", std::vector<uint64_t>{0, 300});
  }
  std::string message = error_of([&] { TokenDataset::open(sparse); });
  EXPECT_NE(message.find(sparse + ": dataset 'tokens' stores 400 bytes for 300 elements (1200 bytes): the file is "
                                  "corrupt"),
            std::string::npos)
      << message;
}

// ---- sampler ---------------------------------------------------------------------------------------------

// A dataset whose token at stream index g is g itself (vocab large enough), so windows are easy to trace.
struct TracedDataset {
  std::string path;
  std::vector<uint64_t> offsets;
  TokenDataset open() const { return TokenDataset::open(path); }
  int64_t document_of(int64_t token) const {
    return std::upper_bound(offsets.begin(), offsets.end(), static_cast<uint64_t>(token)) - offsets.begin() - 1;
  }
};

TracedDataset make_traced_dataset(const std::string& name, const std::vector<int64_t>& lengths, bool with_mask = false) {
  TracedDataset t;
  t.path = scratch_dir(name) + "/traced.h5";
  t.offsets = {0};
  for (int64_t n : lengths) t.offsets.push_back(t.offsets.back() + static_cast<uint64_t>(n));
  std::vector<uint32_t> tokens(t.offsets.back());
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<uint32_t>(i);
  std::vector<uint8_t> mask(tokens.size());
  for (size_t i = 0; i < mask.size(); ++i) mask[i] = static_cast<uint8_t>(i % 3 != 0);
  write_dataset(t.path, tokens, t.offsets, static_cast<int64_t>(tokens.size()) + 1,
                static_cast<int64_t>(tokens.size()), with_mask ? &mask : nullptr);
  return t;
}

const std::vector<int64_t> kLengths = {5, 17, 3, 40, 9, 1, 26, 12, 8, 31, 2, 19, 7, 23, 14, 6};  // 223 tokens

bool same_batch(const Batch& a, const Batch& b) {
  return a.inputs == b.inputs && a.targets == b.targets && a.loss_mask == b.loss_mask &&
         a.positions == b.positions && a.cu_seqlens == b.cu_seqlens && a.valid_len == b.valid_len;
}

TEST(Sampler, DocumentsModeWindowsFollowTheShuffledStream) {
  TracedDataset traced = make_traced_dataset("sampler_documents", kLengths);
  TokenDataset ds = traced.open();
  SamplerConfig c;
  c.seq_len = 16;
  c.batch_seqs = 1;  // one window per batch, so the epoch's 13 batches hold every window
  c.seed = 5;
  Sampler sampler(ds, c);
  EXPECT_EQ(sampler.sequences_per_epoch(), (223 - 1) / 16);  // 13
  std::vector<std::vector<int32_t>> windows;  // inputs of each window, in the order served
  std::vector<int32_t> last_targets;
  for (int b = 0; b < 13; ++b) {
    Batch batch = *sampler.next();
    ASSERT_EQ(batch.inputs.size(), 16u);
    std::vector<int32_t> expected_cu = {0};
    for (int t = 0; t < 16; ++t) {
      size_t i = static_cast<size_t>(t);
      EXPECT_EQ(batch.positions[i], t);
      EXPECT_EQ(batch.loss_mask[i], 1);
      int32_t input = batch.inputs[i], target = batch.targets[i];
      if (t + 1 < 16) EXPECT_EQ(batch.inputs[i + 1], target);
      // Inside a document the target follows the input; otherwise the input ends its document and the
      // target starts another one.
      if (t > 0 && static_cast<uint64_t>(input) == traced.offsets[static_cast<size_t>(traced.document_of(input))])
        expected_cu.push_back(static_cast<int32_t>(i));
      if (target != input + 1) {
        EXPECT_EQ(static_cast<uint64_t>(input) + 1, traced.offsets[static_cast<size_t>(traced.document_of(input)) + 1]);
        EXPECT_EQ(static_cast<uint64_t>(target), traced.offsets[static_cast<size_t>(traced.document_of(target))]);
      }
    }
    expected_cu.push_back(16);
    EXPECT_EQ(batch.cu_seqlens, expected_cu);
    windows.emplace_back(batch.inputs.begin(), batch.inputs.end());
    last_targets.push_back(batch.targets.back());
  }
  // Windows are served in a shuffled order: some consecutive pair is not consecutive in the stream.
  int chained = 0;
  for (size_t w = 0; w + 1 < windows.size(); ++w) chained += last_targets[w] == windows[w + 1][0];
  EXPECT_LT(chained, 12);
  // Re-chain them (a window's last target is the next window's first input) to recover the stream.
  std::vector<int32_t> stream;
  std::vector<bool> used(windows.size(), false);
  size_t current = windows.size();
  for (size_t w = 0; w < windows.size(); ++w) {
    bool has_predecessor = false;
    for (size_t v = 0; v < windows.size(); ++v) has_predecessor |= last_targets[v] == windows[w][0];
    if (!has_predecessor) current = w;
  }
  ASSERT_LT(current, windows.size()) << "no window starts the stream";
  for (size_t n = 0; n < windows.size(); ++n) {
    ASSERT_FALSE(used[current]);
    used[current] = true;
    stream.insert(stream.end(), windows[current].begin(), windows[current].end());
    if (n + 1 == windows.size()) break;
    size_t next = windows.size();
    for (size_t v = 0; v < windows.size(); ++v)
      if (!used[v] && windows[v][0] == last_targets[current]) next = v;
    ASSERT_LT(next, windows.size()) << "the windows do not tile one stream";
    current = next;
  }
  // The epoch's windows tile a stream made of whole documents, each appearing once, in a shuffled order.
  std::vector<int64_t> order;
  for (size_t i = 0; i < stream.size(); ++i) {
    int64_t d = traced.document_of(stream[i]);
    if (order.empty() || order.back() != d) {
      EXPECT_EQ(static_cast<uint64_t>(stream[i]), traced.offsets[static_cast<size_t>(d)]);
      order.push_back(d);
    }
  }
  EXPECT_EQ(std::set<int64_t>(order.begin(), order.end()).size(), order.size());
  std::vector<int64_t> file_order(order.size());
  std::iota(file_order.begin(), file_order.end(), int64_t{0});
  EXPECT_NE(order, file_order);
  EXPECT_EQ(sampler.state().epoch, 0);
  EXPECT_EQ(sampler.state().cursor, 13);
  sampler.next();  // 13 sequences = 13 batches of one: the 14th starts epoch 1
  EXPECT_EQ(sampler.state().epoch, 1);
  EXPECT_EQ(sampler.state().cursor, 1);
}

TEST(Sampler, IsDeterministicAndResumesExactlyAcrossEpochs) {
  TracedDataset traced = make_traced_dataset("sampler_resume", kLengths);
  TokenDataset ds = traced.open();
  for (PackMode mode : {PackMode::documents, PackMode::concat, PackMode::long_documents}) {
    SCOPED_TRACE(pack_mode_name(mode));
    SamplerConfig c;
    c.seq_len = 8;
    c.batch_seqs = 3;
    c.pack = mode;
    c.seed = 11;
    Sampler original(ds, c), twin(ds, c);
    std::vector<Batch> batches;
    std::vector<SamplerState> states;
    for (int i = 0; i < 20; ++i) {  // several epochs
      states.push_back(original.state());
      batches.push_back(*original.next());
      EXPECT_TRUE(same_batch(batches.back(), *twin.next()));
    }
    EXPECT_GE(original.state().epoch, 2);
    for (int from : {0, 3, 7, 13}) {
      Sampler resumed(ds, c);
      resumed.restore(states[static_cast<size_t>(from)]);
      for (int i = from; i < 20; ++i) EXPECT_TRUE(same_batch(*resumed.next(), batches[static_cast<size_t>(i)])) << i;
    }
    c.seed = 12;
    Sampler other_seed(ds, c);
    bool any_difference = false;
    for (int i = 0; i < 5; ++i) any_difference |= !same_batch(*other_seed.next(), batches[static_cast<size_t>(i)]);
    EXPECT_TRUE(any_difference);
  }
  SamplerConfig c;
  c.seq_len = 8;
  Sampler sampler(ds, c);
  std::string message = error_of([&] { sampler.restore({0, 1000}); });
  EXPECT_NE(message.find("cursor 1000"), std::string::npos) << message;
}

TEST(Sampler, ShardsAreDisjointAndEqualSized) {
  TracedDataset traced = make_traced_dataset("sampler_shards", kLengths);
  TokenDataset ds = traced.open();
  for (PackMode mode : {PackMode::documents, PackMode::long_documents}) {
    SCOPED_TRACE(pack_mode_name(mode));
    std::vector<std::set<int32_t>> first_tokens(3);  // first input token of every sequence, per shard
    int64_t per_shard = -1;
    for (int shard = 0; shard < 3; ++shard) {
      SamplerConfig c;
      c.seq_len = 8;
      c.pack = mode;
      c.shard_index = shard;
      c.shard_count = 3;
      Sampler sampler(ds, c);
      if (per_shard < 0) per_shard = sampler.sequences_per_epoch();
      EXPECT_EQ(sampler.sequences_per_epoch(), per_shard);
      for (int64_t i = 0; i < per_shard; ++i) first_tokens[static_cast<size_t>(shard)].insert(sampler.next()->inputs[0]);
      EXPECT_EQ(sampler.state().epoch, 0);
    }
    std::set<int32_t> all;
    for (auto& s : first_tokens) {
      EXPECT_EQ(static_cast<int64_t>(s.size()), per_shard);
      all.insert(s.begin(), s.end());
    }
    EXPECT_EQ(static_cast<int64_t>(all.size()), 3 * per_shard);
    SamplerConfig whole;
    whole.seq_len = 8;
    whole.pack = mode;
    Sampler unsharded(ds, whole);
    EXPECT_EQ(per_shard, unsharded.sequences_per_epoch() / 3);
    std::set<int32_t> unsharded_first;
    for (int64_t i = 0; i < 3 * per_shard; ++i) unsharded_first.insert(unsharded.next()->inputs[0]);
    EXPECT_EQ(all, unsharded_first);  // the shards split exactly the unsharded epoch's sequences
  }
}

TEST(Sampler, LongDocumentsStartAtDocumentsAndPadTheRest) {
  TracedDataset traced = make_traced_dataset("sampler_long", kLengths, /*with_mask=*/true);
  TokenDataset ds = traced.open();
  SamplerConfig c;
  c.seq_len = 20;
  c.batch_seqs = 2;
  c.pack = PackMode::long_documents;
  c.min_doc_tokens = 5;
  c.shuffle = false;
  c.single_pass = true;
  c.use_loss_mask = true;
  Sampler sampler(ds, c);
  std::vector<int64_t> eligible;
  for (size_t d = 0; d < kLengths.size(); ++d)
    if (kLengths[d] >= 5) eligible.push_back(static_cast<int64_t>(d));
  EXPECT_EQ(sampler.sequences_per_epoch(), static_cast<int64_t>(eligible.size()));  // 13
  const int32_t eos = static_cast<int32_t>(ds.info().eos_id);
  size_t next_doc = 0;
  int batches = 0;
  while (auto batch = sampler.next()) {
    ++batches;
    std::vector<int32_t> expected_cu = {0};
    for (int row = 0; row < 2; ++row) {
      int64_t d = eligible[next_doc++];
      int32_t begin = static_cast<int32_t>(traced.offsets[static_cast<size_t>(d)]);
      int32_t real = static_cast<int32_t>(std::min<int64_t>(kLengths[static_cast<size_t>(d)] - 1, 20));
      EXPECT_EQ(batch->valid_len[static_cast<size_t>(row)], real);
      for (int t = 0; t < 20; ++t) {
        size_t i = static_cast<size_t>(row * 20 + t);
        EXPECT_EQ(batch->positions[i], t);
        if (t < real) {
          EXPECT_EQ(batch->inputs[i], begin + t);
          EXPECT_EQ(batch->targets[i], begin + t + 1);
          EXPECT_EQ(batch->loss_mask[i], (begin + t + 1) % 3 != 0);  // the target's mask from the file
        } else {
          EXPECT_EQ(batch->inputs[i], eos);
          EXPECT_EQ(batch->targets[i], eos);
          EXPECT_EQ(batch->loss_mask[i], 0);
        }
      }
      if (real < 20) expected_cu.push_back(row * 20 + real);
      expected_cu.push_back((row + 1) * 20);
    }
    EXPECT_EQ(batch->cu_seqlens, expected_cu);
  }
  EXPECT_EQ(batches, 6);  // 13 documents in batches of 2: the incomplete last batch is dropped
  EXPECT_FALSE(sampler.next().has_value());
}

TEST(Sampler, ConcatModeAndLossMaskFollowTheTargets) {
  TracedDataset traced = make_traced_dataset("sampler_concat", kLengths, /*with_mask=*/true);
  TokenDataset ds = traced.open();
  SamplerConfig c;
  c.seq_len = 10;
  c.batch_seqs = 4;
  c.pack = PackMode::concat;
  c.shuffle = false;
  c.use_loss_mask = true;
  Sampler sampler(ds, c);
  Batch batch = *sampler.next();
  EXPECT_EQ(batch.cu_seqlens, (std::vector<int32_t>{0, 10, 20, 30, 40}));
  for (int i = 0; i < 40; ++i) {  // file order: the stream is the token array itself
    EXPECT_EQ(batch.inputs[static_cast<size_t>(i)], i);
    EXPECT_EQ(batch.targets[static_cast<size_t>(i)], i + 1);
    EXPECT_EQ(batch.loss_mask[static_cast<size_t>(i)], (i + 1) % 3 != 0);
  }
}

TEST(Sampler, RejectsDatasetsTooSmallForOneBatchAndBadModes) {
  TracedDataset traced = make_traced_dataset("sampler_small", {4, 4});
  TokenDataset ds = traced.open();
  SamplerConfig c;
  c.seq_len = 8;
  std::string message = error_of([&] { Sampler s(ds, c); });
  EXPECT_NE(message.find("fewer than one batch"), std::string::npos) << message;
  EXPECT_NE(message.find("shorter seq_len"), std::string::npos) << message;
  c.seq_len = 7;  // 8 tokens give exactly one window of 7 + 1
  EXPECT_EQ(Sampler(ds, c).sequences_per_epoch(), 1);
  c.shard_index = 2;
  c.shard_count = 2;
  EXPECT_NE(error_of([&] { Sampler s(ds, c); }).find("not a valid shard"), std::string::npos);
  EXPECT_EQ(parse_pack_mode("long_documents"), PackMode::long_documents);
  EXPECT_NE(error_of([&] { parse_pack_mode("packed"); }).find("use documents, concat or long_documents"),
            std::string::npos);
}

}  // namespace
}  // namespace moba::data
