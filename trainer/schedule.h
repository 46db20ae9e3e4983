// Learning-rate schedules as pure functions of tokens seen: linear warmup, then cosine, WSD
// (warmup-stable-decay) or constant. Pure so that a resumed run gets the same lr at the same step.
#pragma once
#include "trainer/recipe.h"

namespace moba {

// lr for the optimizer step that starts after `tokens_seen` tokens and consumes `step_tokens` more.
double learning_rate(const TrainSettings& train, double tokens_seen, double step_tokens);

}  // namespace moba
