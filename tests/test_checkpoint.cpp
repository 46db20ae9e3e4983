// Checkpoints: save/load round trip; corruption anywhere in the file is an error or harmless, never different
// weights; files written before checksums still load (with a note); a write that fails (file size limit, as
// on a full disk) leaves no temp file and the older checkpoints as they were; and the rotation policy
// (trainer/checkpoint_rotation.h) never trades a readable checkpoint for an unreadable one.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include "common/error.h"
#include "common/hdf5_io.h"
#include "kernels/backend.h"
#include "model/transformer.h"
#include "tests/support/test_util.h"
#include "tests/support/tiny_model.h"
#include "trainer/checkpoint.h"
#include "trainer/checkpoint_rotation.h"
#include "trainer/optimizer.h"

namespace fs = std::filesystem;

namespace moba {
namespace {

// A tiny model with its optimizer on the CPU backend.
struct TinyModel {
  std::unique_ptr<Backend> backend = make_cpu_backend();
  model::ModelConfig config = test::tiny_model_config();
  model::Transformer model{*backend, config, 8, 0};
  AdamW optimizer{*backend, model, OptimizerSettings{}};

  // Random weights and moments (seeded), so a load that drops or changes anything shows.
  void randomize(uint64_t seed) {
    optimizer.set_master_from_host(test::random_vector(static_cast<size_t>(model.layout().total()), seed));
    const size_t n = static_cast<size_t>(optimizer.state_numel());
    optimizer.state_from_host(AdamW::State::first_moment, test::random_vector(n, seed + 1));
    optimizer.state_from_host(AdamW::State::second_moment, test::random_vector(n, seed + 2, 0.0f, 1.0f));
    optimizer.set_steps_taken(static_cast<int64_t>(seed));
  }
  // The owned ranges of master weights and moments (what a checkpoint holds; alignment gaps left out).
  std::vector<float> saved_state() const {
    std::vector<float> out;
    for (AdamW::State which : {AdamW::State::master, AdamW::State::first_moment, AdamW::State::second_moment}) {
      std::vector<float> state = optimizer.state_to_host(which);
      for (const AdamW::OwnedRange& r : optimizer.owned())
        out.insert(out.end(), state.begin() + r.state_offset, state.begin() + r.state_offset + r.numel);
    }
    return out;
  }
  bool same_as(const TinyModel& o) const {
    return saved_state() == o.saved_state() && model.weights_to_host() == o.model.weights_to_host() &&
           optimizer.steps_taken() == o.optimizer.steps_taken();
  }
};

CheckpointState state_at(int64_t step) {
  CheckpointState s;
  s.step = step;
  s.tokens_seen = 1024.0 * static_cast<double>(step);
  s.sampler.epoch = 1;
  s.sampler.cursor = 17;
  s.seed = 99;
  s.recipe_yaml = "name: tiny\n";
  return s;
}

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

std::set<std::string> names_in(const std::string& dir) {
  std::set<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.insert(e.path().filename().string());
  return names;
}

// The whole checkpoint directory as {file name: bytes}.
std::map<std::string, std::string> read_directory(const std::string& dir) {
  std::map<std::string, std::string> files;
  for (const auto& e : fs::directory_iterator(dir)) files[e.path().filename().string()] = read_bytes(e.path().string());
  return files;
}

void write_directory(const std::string& dir, const std::map<std::string, std::string>& files) {
  fs::remove_all(dir);
  fs::create_directories(dir);
  for (const auto& [name, bytes] : files) std::ofstream(dir + "/" + name, std::ios::binary) << bytes;
}

TEST(Checkpoint, SavesAndLoadsEverything) {
  std::string dir = test::scratch_dir("ckpt-roundtrip");
  TinyModel a, b;
  a.randomize(5);
  std::string path = save_checkpoint(dir, state_at(12), a.model, a.optimizer, nullptr, 2);
  EXPECT_EQ(path, dir + "/step_00000012");
  CheckpointState s = load_checkpoint(path, b.model, b.optimizer);
  EXPECT_TRUE(b.same_as(a));
  EXPECT_EQ(s.step, 12);
  EXPECT_EQ(s.sampler.cursor, 17);
  EXPECT_EQ(s.recipe_yaml, "name: tiny\n");
  EXPECT_TRUE(h5::File::open_read(path + "/model.h5").has_checksum("params/wte"));
  EXPECT_TRUE(h5::File::open_read(path + "/shard_00000.h5").has_checksum("v"));
}

// Any byte flipped anywhere in any file of a checkpoint (metadata, chunk indexes, attributes, data, the manifest)
// must either make the load fail with a moba::Error naming the file, or leave everything loaded exactly as saved.
TEST(Checkpoint, AFlippedByteAnywhereIsAnErrorNeverDifferentWeights) {
  std::string dir = test::scratch_dir("ckpt-flip");
  TinyModel saved;
  saved.randomize(7);
  const std::string path = save_checkpoint(dir, state_at(3), saved.model, saved.optimizer, nullptr, 1);
  const std::map<std::string, std::string> files = read_directory(path);
  ASSERT_EQ(files.size(), 3u);  // model.h5, shard_00000.h5, manifest.yaml
  const std::string bad = dir + "/bad/step_00000003";
  const std::vector<float> weights = read_checkpoint_weights(path, saved.model.layout());
  int errors = 0, harmless = 0;
  for (const auto& [name, bytes] : files) {
    for (size_t offset = 0; offset < bytes.size();
         offset += name == "manifest.yaml" || offset < 4096 || offset + 4096 > bytes.size() ? 13 : 127) {
      std::map<std::string, std::string> flipped = files;
      flipped[name][offset] = static_cast<char>(flipped[name][offset] ^ 0x5A);
      write_directory(bad, flipped);
      // What a resume reads (the shards, the attributes) and what eval reads (model.h5's weights).
      bool failed = false;
      TinyModel loaded;
      try {
        CheckpointState s = load_checkpoint(bad, loaded.model, loaded.optimizer);
        ASSERT_TRUE(loaded.same_as(saved)) << name << " byte " << offset << " changed the weights";
        ASSERT_EQ(s.recipe_yaml, "name: tiny\n") << name << " byte " << offset;
        ASSERT_EQ(s.sampler.cursor, 17) << name << " byte " << offset;
      } catch (const Error& e) {
        ASSERT_NE(std::string(e.what()).find(bad), std::string::npos) << e.what();
        failed = true;
      }
      try {
        ASSERT_EQ(read_checkpoint_weights(bad, saved.model.layout()), weights) << name << " byte " << offset;
      } catch (const Error& e) {
        ASSERT_NE(std::string(e.what()).find(bad), std::string::npos) << e.what();
        failed = true;
      }
      ++(failed ? errors : harmless);
    }
  }
  EXPECT_GT(errors, 5 * harmless) << "most bytes of a checkpoint are data or metadata";

  // A flip inside the moments names the file and dataset and says the file is corrupt.
  auto [chunk, size] = test::first_chunk(path + "/shard_00000.h5", "v");
  std::map<std::string, std::string> flipped = files;
  flipped["shard_00000.h5"][chunk + size / 2] ^= 0x5A;
  write_directory(bad, flipped);
  TinyModel loaded;
  try {
    load_checkpoint(bad, loaded.model, loaded.optimizer);
    FAIL() << "a corrupt moment chunk loaded";
  } catch (const Error& e) {
    std::string message = e.what();
    EXPECT_NE(message.find(bad + "/shard_00000.h5: cannot read dataset 'v': the file is corrupt, a checksum does not "
                                 "match"),
              std::string::npos)
        << message;
    EXPECT_NE(e.hint().find("resume from an older one"), std::string::npos) << e.hint();
  }
}

// Single-file checkpoints (format 1) written before checksums still load, with a note.
TEST(Checkpoint, SingleFileCheckpointsWithoutChecksumsLoadWithANote) {
  std::string dir = test::scratch_dir("ckpt-legacy");
  TinyModel saved, loaded;
  saved.randomize(9);
  test::write_single_file_checkpoint(dir + "/new.h5", saved.optimizer, saved.model.layout(), state_at(4));
  const std::string legacy = dir + "/step_00000004.h5";
  test::write_legacy_copy(dir + "/new.h5", legacy);
  EXPECT_FALSE(h5::File::open_read(legacy).has_checksum("params/wte"));
  testing::internal::CaptureStdout();
  CheckpointState s = load_checkpoint(legacy, loaded.model, loaded.optimizer);
  std::string out = testing::internal::GetCapturedStdout();
  EXPECT_TRUE(loaded.same_as(saved));
  EXPECT_EQ(s.recipe_yaml, "name: tiny\n");
  EXPECT_NE(out.find("note: " + legacy + " carries no checksums"), std::string::npos) << out;
}

TEST(Checkpoint, AFailedWriteLeavesNoTempFileAndTheOlderCheckpoints) {
  std::string dir = test::scratch_dir("ckpt-full");
  TinyModel m;
  m.randomize(3);
  save_checkpoint(dir, state_at(1), m.model, m.optimizer, nullptr, 1);
  const std::map<std::string, std::string> older = read_directory(dir + "/step_00000001");
  for (rlim_t limit : {rlim_t{1000}, rlim_t{20000}, static_cast<rlim_t>(older.at("model.h5").size() - 100)}) {
    std::string message;
    {
      test::FileSizeLimit full(limit);
      try {
        save_checkpoint(dir, state_at(2), m.model, m.optimizer, nullptr, 1);
      } catch (const Error& e) {
        message = e.what();
      }
    }
    EXPECT_FALSE(message.empty()) << "a checkpoint was saved although the file size limit is " << limit;
    EXPECT_NE(message.find("step_00000002.tmp"), std::string::npos) << message;
    EXPECT_EQ(names_in(dir), (std::set<std::string>{"step_00000001"})) << "limit " << limit << ": " << message;
    EXPECT_EQ(read_directory(dir + "/step_00000001"), older);
  }
}

// ---- rotation policy -------------------------------------------------------------------------------------

// A readability check over a fixed table that records the order of the paths it was asked about.
struct FakeDirectory {
  std::map<std::string, std::string> problems;  // path -> reason; absent = readable
  std::vector<std::string> asked;
  ReadabilityCheck check() {
    return [this](const std::string& path) {
      asked.push_back(path);
      auto it = problems.find(path);
      return it == problems.end() ? std::string() : it->second;
    };
  }
};

std::vector<CheckpointCandidate> steps(std::initializer_list<int64_t> list) {
  std::vector<CheckpointCandidate> out;
  for (int64_t s : list) out.push_back({s, cat("step_", s)});
  return out;
}

TEST(CheckpointRotation, ResumesFromTheNewestReadableAndReportsTheNewerUnreadable) {
  FakeDirectory dir;
  dir.problems = {{"step_30", "truncated"}, {"step_20", "format 2"}};
  ResumeChoice choice = choose_resume(steps({10, 30, 5, 20}), dir.check());
  ASSERT_TRUE(choice.resume_from.has_value());
  EXPECT_EQ(choice.resume_from->step, 10);
  ASSERT_EQ(choice.unreadable.size(), 2u);
  EXPECT_EQ(choice.unreadable[0].checkpoint.path, "step_30");
  EXPECT_EQ(choice.unreadable[1].reason, "format 2");
  EXPECT_EQ(dir.asked, (std::vector<std::string>{"step_30", "step_20", "step_10"}));  // stops at the first readable
  EXPECT_NO_THROW(require_consent_to_start_over(choice, "ck", false, "--flag"));     // resuming needs no consent
}

TEST(CheckpointRotation, StartingOverBesideUnreadableCheckpointsNeedsConsent) {
  FakeDirectory dir;
  dir.problems = {{"step_30", "truncated"}, {"step_20", "format 2"}};
  ResumeChoice choice = choose_resume(steps({20, 30}), dir.check());
  EXPECT_FALSE(choice.resume_from.has_value());
  try {
    require_consent_to_start_over(choice, "run/checkpoints", false, "--ignore-unreadable-checkpoints");
    FAIL() << "started over beside unreadable checkpoints without consent";
  } catch (const Error& e) {
    std::string message = e.what();
    EXPECT_NE(message.find("run/checkpoints holds 2 checkpoint(s) that cannot be read"), std::string::npos) << message;
    EXPECT_NE(message.find("step_30: truncated"), std::string::npos) << message;
    EXPECT_NE(e.hint().find("pass --ignore-unreadable-checkpoints"), std::string::npos) << e.hint();
  }
  EXPECT_NO_THROW(require_consent_to_start_over(choice, "run/checkpoints", true, "--ignore-unreadable-checkpoints"));
  EXPECT_NO_THROW(require_consent_to_start_over(choose_resume({}, dir.check()), "ck", false, "--flag"));
}

TEST(CheckpointRotation, KeepCountsOnlyReadableCheckpointsAndNeverDeletesUnreadableOnes) {
  FakeDirectory dir;
  dir.problems = {{"step_40", "truncated"}, {"step_50", "format 2"}, {"step_5", "truncated"}};
  std::vector<UnreadableCheckpoint> kept;
  std::vector<CheckpointCandidate> doomed =
      checkpoints_to_delete(steps({10, 50, 20, 5, 40, 30}), 2, dir.check(), &kept);
  ASSERT_EQ(doomed.size(), 1u);  // 30 and 20 are the newest two readable ones
  EXPECT_EQ(doomed[0].step, 10);
  ASSERT_EQ(kept.size(), 3u);
  EXPECT_EQ(kept[0].checkpoint.step, 50);
  EXPECT_EQ(kept[1].checkpoint.step, 40);
  EXPECT_EQ(kept[2].checkpoint.step, 5);
  EXPECT_TRUE(checkpoints_to_delete(steps({10, 20}), 2, dir.check(), nullptr).empty());
}

TEST(CheckpointRotation, SetAsideMovesFilesAndDirectoriesWithoutOverwriting) {
  std::string dir = test::scratch_dir("ckpt-aside");
  std::ofstream(dir + "/step_00000009.h5") << "x";
  fs::create_directories(dir + "/step_00000010");
  std::ofstream(dir + "/step_00000010/shard_0.h5") << "y";
  set_aside({dir + "/step_00000009.h5", dir + "/step_00000010"}, dir + "/unreadable");
  EXPECT_EQ(names_in(dir), (std::set<std::string>{"unreadable"}));
  EXPECT_TRUE(fs::exists(dir + "/unreadable/step_00000010/shard_0.h5"));
  std::ofstream(dir + "/step_00000009.h5") << "z";
  EXPECT_THROW(set_aside({dir + "/step_00000009.h5"}, dir + "/unreadable"), Error);
  EXPECT_EQ(read_bytes(dir + "/unreadable/step_00000009.h5"), "x");
}

}  // namespace
}  // namespace moba
