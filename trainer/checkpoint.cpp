#include "trainer/checkpoint.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <regex>

#include "common/hdf5_io.h"
#include "common/log.h"

namespace fs = std::filesystem;

namespace moba {
namespace {

constexpr int64_t kFormatFile = 1;       // step_N.h5: one file, whole arenas
constexpr int64_t kFormatDirectory = 2;  // step_N/: shards + model.h5 + manifest.yaml

std::string step_name(int64_t step) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "step_%08lld", static_cast<long long>(step));
  return buf;
}

std::string shard_name(int index) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "shard_%05d.h5", index);
  return buf;
}

bool is_directory_checkpoint(const std::string& path) { return fs::is_directory(path); }
std::string weights_file(const std::string& path) {
  return is_directory_checkpoint(path) ? (fs::path(path) / "model.h5").string() : path;
}

std::string shape_string(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

// A group of per-tensor datasets (params/, optimizer/m/, optimizer/v/) into a full arena of `layout`.
std::vector<float> read_tensors(const h5::File& file, const std::string& group, const model::ParameterLayout& layout) {
  const std::string first = group + "/" + layout.tensors().front().name;
  if (group == "params" && file.exists(first) && !file.has_checksum(first))
    info("note: ", file.path(), " carries no checksums (written before moba added them), so corruption in it cannot "
         "be detected");
  std::vector<float> arena(static_cast<size_t>(layout.total()), 0.0f);
  for (const model::ParamTensor& t : layout.tensors()) {
    const std::string name = group + "/" + t.name;
    MOBA_CHECK(file.exists(name), cat(file.path(), ": ", name, " is missing"),
               "the checkpoint is incomplete or the recipe's model section differs from the one it was trained with");
    std::vector<int64_t> shape = file.shape(name);
    MOBA_CHECK(shape == t.shape,
               cat(file.path(), ": ", name, " has shape ", shape_string(shape), " but the model needs ",
                   shape_string(t.shape)),
               "the recipe's model section differs from the one the checkpoint was trained with; restore it, or use "
               "another run_dir to start afresh");
    layout.write_tensor(arena, t, file.read<float>(name));
  }
  return arena;
}

void write_tensors(h5::File& file, const std::string& group, const std::vector<float>& arena,
                   const model::ParameterLayout& layout) {
  for (const model::ParamTensor& t : layout.tensors())
    file.write(group + "/" + t.name, layout.read_tensor(arena, t).data(), t.shape);
}

void write_attributes(h5::File& file, const CheckpointState& s, int64_t format, int64_t optimizer_steps) {
  file.set_attr("/", "format_version", format);
  file.set_attr("/", "step", s.step);
  file.set_attr("/", "tokens_seen", s.tokens_seen);
  file.set_attr("/", "optimizer_steps", optimizer_steps);
  file.set_attr("/", "sampler_epoch", s.sampler.epoch);
  file.set_attr("/", "sampler_cursor", s.sampler.cursor);
  file.set_attr("/", "seed", static_cast<int64_t>(s.seed));
  file.set_attr("/", "recipe", s.recipe_yaml);
}

// One shard's owned ranges as recorded in the manifest: (bucket, begin, numel) and where they sit in its arrays.
struct ShardRanges {
  std::string file;
  std::vector<std::array<int64_t, 3>> ranges;
};

struct Manifest {
  int64_t step = 0;
  std::vector<ShardRanges> shards;
};

Manifest read_manifest(const std::string& dir) {
  const std::string path = (fs::path(dir) / "manifest.yaml").string();
  MOBA_CHECK(fs::exists(path), cat(dir, " has no manifest.yaml: the checkpoint is incomplete"),
             "use an earlier checkpoint (complete ones are renamed from step_N.tmp only once written)");
  Manifest m;
  try {
    YAML::Node root = YAML::LoadFile(path);
    MOBA_CHECK(root["format_version"].as<int64_t>() == kFormatDirectory,
               cat(path, ": checkpoint format ", root["format_version"].as<std::string>(), " is not supported"),
               "use the moba version that wrote it");
    m.step = root["step"].as<int64_t>();
    for (const YAML::Node& s : root["shards"]) {
      ShardRanges sr;
      sr.file = s["file"].as<std::string>();
      for (const YAML::Node& r : s["ranges"]) sr.ranges.push_back({r[0].as<int64_t>(), r[1].as<int64_t>(), r[2].as<int64_t>()});
      m.shards.push_back(std::move(sr));
    }
  } catch (const YAML::Exception& e) {
    throw Error(cat(path, " is not a readable checkpoint manifest: ", e.what()), "use an earlier checkpoint");
  }
  return m;
}

void write_manifest(const std::string& dir, const CheckpointState& s, const std::vector<ShardRanges>& shards,
                    int data_ranks) {
  YAML::Emitter e;
  e << YAML::BeginMap << YAML::Key << "format_version" << YAML::Value << kFormatDirectory << YAML::Key << "step"
    << YAML::Value << s.step << YAML::Key << "weights" << YAML::Value << "model.h5" << YAML::Key << "data_ranks"
    << YAML::Value << data_ranks << YAML::Key << "shards" << YAML::Value << YAML::BeginSeq;
  for (const ShardRanges& sr : shards) {
    e << YAML::BeginMap << YAML::Key << "file" << YAML::Value << sr.file << YAML::Key << "ranges" << YAML::Value
      << YAML::BeginSeq;
    for (const auto& r : sr.ranges) e << YAML::Flow << YAML::BeginSeq << r[0] << r[1] << r[2] << YAML::EndSeq;
    e << YAML::EndSeq << YAML::EndMap;
  }
  e << YAML::EndSeq << YAML::EndMap;
  std::ofstream out(fs::path(dir) / "manifest.yaml");
  out << e.c_str() << "\n";
  out.close();
  MOBA_CHECK(out.good(), cat("cannot write ", dir, "/manifest.yaml"), "check free space and permissions");
}

// The state arrays of an optimizer's owned ranges without the alignment gaps, and back.
std::vector<float> packed_ranges(const AdamW& opt, const std::vector<float>& state) {
  std::vector<float> out;
  for (const AdamW::OwnedRange& r : opt.owned())
    out.insert(out.end(), state.begin() + r.state_offset, state.begin() + r.state_offset + r.numel);
  return out;
}

// Opens a shard of a directory checkpoint, checking that the manifest (plain YAML, no checksum) records the ranges
// the shard itself holds (a checksummed dataset), so a damaged manifest cannot place values at wrong offsets.
h5::File open_shard(const std::string& checkpoint, const ShardRanges& shard) {
  h5::File file = h5::File::open_read((fs::path(checkpoint) / shard.file).string());
  std::vector<int64_t> flat;
  for (const auto& r : shard.ranges) flat.insert(flat.end(), r.begin(), r.end());
  MOBA_CHECK(file.read<int64_t>("ranges") == flat,
             cat(checkpoint, "/manifest.yaml does not record the ranges that ", shard.file, " holds"),
             "the manifest is damaged; use an earlier checkpoint");
  return file;
}

bool writes_shard(const AdamW& opt, const parallel::Communicator* comm, int zero_shards) {
  if (!comm) return true;
  // Context-parallel ranks hold identical optimizer shards, and under zero 0 every data rank holds everything.
  return comm->rank(parallel::Group::context) == 0 && comm->rank(parallel::Group::data) < zero_shards;
}

// Reads every dataset of an HDF5 file, so each chunk's checksum is verified; throws on the first mismatch.
void read_back(const std::string& path, const h5::File& file, const std::string& group = "/") {
  for (const std::string& name : file.list(group)) {
    const std::string object = (group == "/" ? "" : group) + "/" + name;
    if (file.is_group(object)) read_back(path, file, object);
    else if (file.stored_type(object) == h5::StoredType::i64) file.read<int64_t>(object);
    else file.read<float>(object);
  }
}
void read_back(const std::string& path) { read_back(path, h5::File::open_read(path)); }

// Removes a checkpoint's temp directory unless the save reached the rename (a failed write, e.g. a full disk).
class TempDirectoryGuard {
 public:
  explicit TempDirectoryGuard(fs::path path) : path_(std::move(path)) {}
  ~TempDirectoryGuard() {
    std::error_code ignored;
    if (!path_.empty()) fs::remove_all(path_, ignored);
  }
  void release() { path_.clear(); }

 private:
  fs::path path_;
};

void remove_old(const std::string& dir, int keep) {
  std::vector<UnreadableCheckpoint> unreadable;
  std::error_code ec;
  for (const CheckpointCandidate& old :
       checkpoints_to_delete(list_checkpoints(dir), keep, checkpoint_problem, &unreadable))
    fs::remove_all(old.path, ec);
  for (const UnreadableCheckpoint& u : unreadable)
    warn("keeping unreadable checkpoint ", u.checkpoint.path, " (not counted in checkpoint.keep): ", u.reason);
}

}  // namespace

std::vector<CheckpointCandidate> list_checkpoints(const std::string& dir) {
  std::vector<CheckpointCandidate> found;
  if (!fs::is_directory(dir)) return found;
  static const std::regex file_pattern(R"(step_(\d+)\.h5)"), dir_pattern(R"(step_(\d+))");
  for (const auto& entry : fs::directory_iterator(dir)) {
    std::smatch m;
    const std::string name = entry.path().filename().string();
    if ((entry.is_regular_file() && std::regex_match(name, m, file_pattern)) ||
        (entry.is_directory() && std::regex_match(name, m, dir_pattern)))
      found.push_back({std::stoll(m[1]), entry.path().string()});
  }
  std::sort(found.begin(), found.end(),
            [](const CheckpointCandidate& a, const CheckpointCandidate& b) { return a.step < b.step; });
  return found;
}

std::string checkpoint_problem(const std::string& path) {
  try {
    read_checkpoint_state(path);
    if (is_directory_checkpoint(path)) read_manifest(path);
    return "";
  } catch (const Error& e) {
    return e.what();
  }
}

std::string save_checkpoint(const std::string& dir, const CheckpointState& state, const model::Transformer& model,
                            const AdamW& optimizer, parallel::Communicator* comm, int keep,
                            const std::function<void()>& after_shards) {
  const bool root = !comm || comm->layout().rank == 0;
  const fs::path final_path = fs::path(dir) / step_name(state.step);
  const fs::path temp_path = fs::path(dir) / (step_name(state.step) + ".tmp");
  auto barrier = [&](const char* what) {
    if (comm) comm->host(parallel::Group::world).barrier(what);
  };
  TempDirectoryGuard temp(root ? temp_path : fs::path());
  if (root) {
    std::error_code ec;
    fs::remove_all(temp_path, ec);  // left by a save that was killed
    fs::create_directories(temp_path);
  }
  barrier("checkpoint: directory created");

  // Every data-parallel shard (once) writes its owned ranges of master weights and moments.
  const int data_ranks = comm ? comm->size(parallel::Group::data) : 1;
  const int shards = optimizer.zero() == 1 ? data_ranks : 1;
  const int my_shard = comm ? comm->rank(parallel::Group::data) : 0;
  if (writes_shard(optimizer, comm, shards)) {
    h5::File file = h5::File::create((temp_path / shard_name(my_shard)).string());
    std::vector<int64_t> ranges;
    for (const AdamW::OwnedRange& r : optimizer.owned()) ranges.insert(ranges.end(), {r.bucket, r.begin, r.numel});
    file.write("ranges", ranges.data(), {static_cast<int64_t>(optimizer.owned().size()), 3});
    file.write("master", packed_ranges(optimizer, optimizer.state_to_host(AdamW::State::master)));
    file.write("m", packed_ranges(optimizer, optimizer.state_to_host(AdamW::State::first_moment)));
    file.write("v", packed_ranges(optimizer, optimizer.state_to_host(AdamW::State::second_moment)));
    file.set_attr("/", "shard", static_cast<int64_t>(my_shard));
    file.set_attr("/", "shards", static_cast<int64_t>(shards));
    file.flush();
    file.close();
    read_back(file.path());
  }
  if (after_shards) after_shards();
  barrier("checkpoint: shards written");

  // Rank 0: the whole f32 weights (read back from the shards: no gather through memory), the manifest, the rename.
  if (root) {
    const model::ParameterLayout& layout = model.layout();
    std::vector<float> arena(static_cast<size_t>(layout.total()), 0.0f);
    std::vector<ShardRanges> manifest_shards;
    for (int s = 0; s < shards; ++s) {
      h5::File file = h5::File::open_read((temp_path / shard_name(s)).string());
      std::vector<int64_t> flat = file.read<int64_t>("ranges");
      std::vector<float> master = file.read<float>("master");
      ShardRanges sr;
      sr.file = shard_name(s);
      int64_t at = 0;
      for (size_t i = 0; i + 2 < flat.size(); i += 3) {
        const model::Bucket& b = layout.buckets()[static_cast<size_t>(flat[i])];
        std::copy_n(master.begin() + at, flat[i + 2], arena.begin() + b.offset + flat[i + 1]);
        at += flat[i + 2];
        sr.ranges.push_back({flat[i], flat[i + 1], flat[i + 2]});
      }
      manifest_shards.push_back(std::move(sr));
    }
    {
      h5::File file = h5::File::create((temp_path / "model.h5").string());
      write_tensors(file, "params", arena, layout);
      write_attributes(file, state, kFormatDirectory, optimizer.steps_taken());
      file.flush();
    }
    read_back((temp_path / "model.h5").string());
    write_manifest(temp_path.string(), state, manifest_shards, data_ranks);
    const std::string problem = checkpoint_problem(temp_path.string());
    MOBA_CHECK(problem.empty(), cat("the checkpoint just written does not read back: ", problem),
               "check the disk holding the run directory (free space, errors in the system log); older checkpoints "
               "were left as they are");
    std::error_code ec;
    fs::remove_all(final_path, ec);
    fs::rename(temp_path, final_path, ec);
    MOBA_CHECK(!ec, cat("cannot rename ", temp_path.string(), " to ", final_path.string(), ": ", ec.message()),
               "check the run directory's permissions and free space");
    temp.release();
    remove_old(dir, keep);
  }
  barrier("checkpoint: complete");
  return final_path.string();
}

std::optional<std::string> latest_checkpoint(const std::string& dir) {
  ResumeChoice choice = choose_resume(list_checkpoints(dir), checkpoint_problem);
  for (const UnreadableCheckpoint& u : choice.unreadable)
    warn("skipping unreadable checkpoint ", u.checkpoint.path, ": ", u.reason);
  if (!choice.resume_from) return std::nullopt;
  return choice.resume_from->path;
}

std::string resolve_checkpoint(const std::string& path, const std::string& what) {
  if (!fs::is_directory(path) || fs::exists(fs::path(path) / "model.h5")) return path;  // a checkpoint itself
  const fs::path dir = fs::exists(fs::path(path) / "checkpoints") ? fs::path(path) / "checkpoints" : fs::path(path);
  std::optional<std::string> latest = latest_checkpoint(dir.string());
  MOBA_CHECK(latest.has_value(), cat(what, ": no checkpoint found in ", path),
             "pass a checkpoint (checkpoints/step_N/ or step_N.h5), or a run directory whose checkpoints/ holds one");
  return *latest;
}

CheckpointState read_checkpoint_state(const std::string& path) {
  const std::string weights = weights_file(path);
  h5::File file = h5::File::open_read(weights);
  MOBA_CHECK(file.has_attr("/", "format_version") && file.exists("params"), cat(path, " is not a moba checkpoint"),
             "pass a checkpoint from a run's checkpoints/ directory (step_N/ or step_N.h5), or the run directory");
  const int64_t version = file.attr_int("/", "format_version");
  const int64_t expected = is_directory_checkpoint(path) ? kFormatDirectory : kFormatFile;
  MOBA_CHECK(version == expected,
             cat(path, ": checkpoint format ", version, " is not supported here (expected ", expected, ")"),
             "use the moba version that wrote it");
  CheckpointState s;
  s.step = file.attr_int("/", "step");
  s.tokens_seen = file.attr_double("/", "tokens_seen");
  s.sampler.epoch = file.attr_int("/", "sampler_epoch");
  s.sampler.cursor = file.attr_int("/", "sampler_cursor");
  s.seed = static_cast<uint64_t>(file.attr_int("/", "seed"));
  s.recipe_yaml = file.attr_string("/", "recipe");
  return s;
}

std::vector<float> read_checkpoint_weights(const std::string& path, const model::ParameterLayout& layout) {
  h5::File file = h5::File::open_read(weights_file(path));
  return read_tensors(file, "params", layout);
}

CheckpointState load_weights(const std::string& path, model::Transformer& model, AdamW* optimizer) {
  CheckpointState s = read_checkpoint_state(path);
  std::vector<float> arena = read_checkpoint_weights(path, model.layout());
  if (optimizer) optimizer->set_master_from_host(arena);
  else model.set_weights_from_host(arena);
  return s;
}

CheckpointState load_checkpoint(const std::string& path, model::Transformer& model, AdamW& optimizer) {
  CheckpointState s = read_checkpoint_state(path);
  const model::ParameterLayout& layout = model.layout();
  std::vector<float> state[3];  // master, m, v of the owned ranges (AdamW's state layout)
  for (auto& v : state) v.assign(static_cast<size_t>(optimizer.state_numel()), 0.0f);
  int64_t optimizer_steps = 0;
  if (!is_directory_checkpoint(path)) {  // format 1: whole arenas
    h5::File file = h5::File::open_read(path);
    const char* groups[3] = {"params", "optimizer/m", "optimizer/v"};
    for (int k = 0; k < 3; ++k) {
      std::vector<float> arena = read_tensors(file, groups[k], layout);
      for (const AdamW::OwnedRange& r : optimizer.owned())
        std::copy_n(arena.begin() + r.offset, r.numel, state[k].begin() + r.state_offset);
    }
    optimizer_steps = file.attr_int("/", "optimizer_steps");
  } else {  // format 2: the pieces of each old shard that this rank's ranges cover
    const Manifest manifest = read_manifest(path);
    int64_t covered = 0, needed = 0;
    for (const AdamW::OwnedRange& mine : optimizer.owned()) needed += mine.numel;
    for (const ShardRanges& shard : manifest.shards) {
      std::optional<h5::File> file;
      int64_t at = 0;  // position of the shard's current range in its arrays
      for (const auto& old : shard.ranges) {
        MOBA_CHECK(old[0] >= 0 && old[0] < static_cast<int64_t>(layout.buckets().size()) &&
                       old[1] + old[2] <= layout.buckets()[static_cast<size_t>(old[0])].size,
                   cat(path, ": shard ", shard.file, " covers bucket ", old[0], " [", old[1], ", ", old[1] + old[2],
                       ") which this model does not have"),
                   "the recipe's model section differs from the one the checkpoint was trained with");
        for (const AdamW::OwnedRange& mine : optimizer.owned()) {
          if (mine.bucket != old[0]) continue;
          const int64_t lo = std::max(mine.begin, old[1]), hi = std::min(mine.begin + mine.numel, old[1] + old[2]);
          if (lo >= hi) continue;
          if (!file) file.emplace(open_shard(path, shard));
          const char* names[3] = {"master", "m", "v"};
          for (int k = 0; k < 3; ++k)
            file->read_range<float>(names[k], at + (lo - old[1]), hi - lo,
                                    state[k].data() + mine.state_offset + (lo - mine.begin));
          covered += hi - lo;
        }
        at += old[2];
      }
    }
    MOBA_CHECK(covered == needed,
               cat(path, ": its shards cover ", covered, " of the ", needed, " optimizer values this rank needs"),
               "a shard file is missing from the checkpoint, or the model differs; use an earlier checkpoint");
    optimizer_steps = h5::File::open_read(weights_file(path)).attr_int("/", "optimizer_steps");
  }
  optimizer.state_from_host(AdamW::State::master, state[0]);
  optimizer.state_from_host(AdamW::State::first_moment, state[1]);
  optimizer.state_from_host(AdamW::State::second_moment, state[2]);
  optimizer.set_steps_taken(optimizer_steps);
  optimizer.publish_weights();
  return s;
}

}  // namespace moba
