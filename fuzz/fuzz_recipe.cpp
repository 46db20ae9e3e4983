// libFuzzer target: recipe text and --set overrides (NUL-separated: the YAML first, then one override per
// part). parse_recipe_text must throw a moba::Error or return a recipe whose YAML parses back to the same YAML
// (the invariant of trainer/recipe.h).
#include <cstdlib>
#include <string>
#include <vector>

#include "common/error.h"
#include "fuzz/fuzz_support.h"
#include "trainer/recipe.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::vector<std::string> parts(1);
  for (size_t i = 0; i < size; ++i) {
    if (data[i] == 0) parts.emplace_back();
    else parts.back() += static_cast<char>(data[i]);
  }
  const std::vector<std::string> overrides(parts.begin() + 1, parts.end());
  try {
    const std::string yaml = moba::recipe_to_yaml(moba::parse_recipe_text(parts[0], "fuzz.yaml", overrides));
    const std::string again = moba::recipe_to_yaml(moba::parse_recipe_text(yaml, "resaved.yaml"));
    if (again != yaml) std::abort();  // a recipe that does not survive being saved next to its checkpoints
  } catch (const moba::Error&) {
  }
  return 0;
}
