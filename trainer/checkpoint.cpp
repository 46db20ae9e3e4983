#include "trainer/checkpoint.h"

#include <algorithm>
#include <filesystem>
#include <regex>

#include "common/hdf5_io.h"
#include "common/log.h"

namespace fs = std::filesystem;

namespace moba {
namespace {

constexpr int64_t kFormatVersion = 1;

std::string step_name(int64_t step) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "step_%08lld.h5", static_cast<long long>(step));
  return buf;
}

std::vector<std::pair<int64_t, fs::path>> list_checkpoints(const std::string& dir) {
  std::vector<std::pair<int64_t, fs::path>> found;
  if (!fs::is_directory(dir)) return found;
  static const std::regex pattern(R"(step_(\d+)\.h5)");
  for (const auto& entry : fs::directory_iterator(dir)) {
    std::smatch m;
    std::string name = entry.path().filename().string();
    if (entry.is_regular_file() && std::regex_match(name, m, pattern)) found.emplace_back(std::stoll(m[1]), entry.path());
  }
  std::sort(found.begin(), found.end());
  return found;
}

void write_arena(h5::File& file, const std::string& group, const std::vector<float>& host,
                 const model::ParameterLayout& layout) {
  for (const model::ParamTensor& t : layout.tensors())
    file.write(group + "/" + t.name, host.data() + t.offset, t.shape);
}

void read_arena(const h5::File& file, const std::string& group, std::vector<float>& host,
                const model::ParameterLayout& layout) {
  host.assign(static_cast<size_t>(layout.total()), 0.0f);
  for (const model::ParamTensor& t : layout.tensors()) {
    std::string name = group + "/" + t.name;
    std::vector<int64_t> shape = file.shape(name);
    if (shape != t.shape) {
      auto str = [](const std::vector<int64_t>& s) {
        std::string r = "[";
        for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
        return r + "]";
      };
      throw Error(cat(file.path(), ": ", name, " has shape ", str(shape), " but the model needs ", str(t.shape)),
                  "the recipe's model section differs from the one the checkpoint was trained with; restore it, "
                  "or use another run_dir to start afresh");
    }
    std::vector<float> values = file.read<float>(name);
    std::copy(values.begin(), values.end(), host.begin() + t.offset);
  }
}

}  // namespace

std::string save_checkpoint(const std::string& dir, const CheckpointState& state, const model::Transformer& model,
                            const AdamW& optimizer, int keep) {
  fs::create_directories(dir);
  const fs::path final_path = fs::path(dir) / step_name(state.step);
  const fs::path temp_path = fs::path(dir) / (step_name(state.step) + ".tmp");
  {
    h5::File file = h5::File::create(temp_path.string());
    write_arena(file, "params", model.params_to_host(), model.layout());
    write_arena(file, "optimizer/m", optimizer.moment_to_host(AdamW::Moment::first), model.layout());
    write_arena(file, "optimizer/v", optimizer.moment_to_host(AdamW::Moment::second), model.layout());
    file.set_attr("/", "format_version", kFormatVersion);
    file.set_attr("/", "step", state.step);
    file.set_attr("/", "tokens_seen", state.tokens_seen);
    file.set_attr("/", "optimizer_steps", optimizer.steps_taken());
    file.set_attr("/", "sampler_epoch", state.sampler.epoch);
    file.set_attr("/", "sampler_cursor", state.sampler.cursor);
    file.set_attr("/", "seed", static_cast<int64_t>(state.seed));
    file.set_attr("/", "recipe", state.recipe_yaml);
    file.flush();
  }
  std::error_code ec;
  fs::rename(temp_path, final_path, ec);
  MOBA_CHECK(!ec, cat("cannot rename ", temp_path.string(), " to ", final_path.string(), ": ", ec.message()),
             "check the run directory's permissions and free space");
  auto all = list_checkpoints(dir);
  for (size_t i = 0; i + static_cast<size_t>(keep) < all.size(); ++i) fs::remove(all[i].second, ec);
  return final_path.string();
}

std::optional<std::string> latest_checkpoint(const std::string& dir) {
  auto all = list_checkpoints(dir);
  for (auto it = all.rbegin(); it != all.rend(); ++it) {
    try {
      read_checkpoint_state(it->second.string());
      return it->second.string();
    } catch (const Error& e) {
      warn("skipping unreadable checkpoint ", it->second.string(), ": ", e.what());
    }
  }
  return std::nullopt;
}

CheckpointState read_checkpoint_state(const std::string& path) {
  h5::File file = h5::File::open_read(path);
  MOBA_CHECK(file.has_attr("/", "format_version") && file.exists("params"),
             cat(path, " is not a moba checkpoint"), "pass a step_*.h5 file from a run's checkpoints/ directory");
  int64_t version = file.attr_int("/", "format_version");
  MOBA_CHECK(version == kFormatVersion, cat(path, ": checkpoint format ", version, " is not supported (expected ",
                                            kFormatVersion, ")"),
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

CheckpointState load_checkpoint(const std::string& path, model::Transformer& model, AdamW* optimizer) {
  CheckpointState s = read_checkpoint_state(path);
  h5::File file = h5::File::open_read(path);
  std::vector<float> host;
  read_arena(file, "params", host, model.layout());
  model.set_params_from_host(host);
  if (optimizer) {
    read_arena(file, "optimizer/m", host, model.layout());
    optimizer->moment_from_host(AdamW::Moment::first, host);
    read_arena(file, "optimizer/v", host, model.layout());
    optimizer->moment_from_host(AdamW::Moment::second, host);
    optimizer->set_steps_taken(file.attr_int("/", "optimizer_steps"));
  }
  return s;
}

}  // namespace moba
