#include "trainer/schedule.h"

#include <algorithm>
#include <cmath>

namespace moba {

double learning_rate(const TrainSettings& t, double tokens_seen, double step_tokens) {
  const ScheduleSettings& s = t.schedule;
  const double base = t.optimizer.lr, floor = base * s.min_lr_ratio;
  const double warmup = s.warmup_tokens;
  const double done = tokens_seen + step_tokens;  // tokens processed once this step completes
  if (warmup > 0 && done <= warmup) return base * done / warmup;
  if (s.kind == "constant") return base;
  if (s.kind == "wsd") {
    const double decay_start = std::max(warmup, t.tokens * (1.0 - s.decay_fraction));
    if (tokens_seen < decay_start) return base;
    double p = std::clamp((tokens_seen - decay_start) / std::max(1.0, t.tokens - decay_start), 0.0, 1.0);
    return base + (floor - base) * p;
  }
  // cosine from the end of warmup to the end of training
  double p = std::clamp((tokens_seen - warmup) / std::max(1.0, t.tokens - warmup), 0.0, 1.0);
  return floor + (base - floor) * 0.5 * (1.0 + std::cos(M_PI * p));
}

}  // namespace moba
