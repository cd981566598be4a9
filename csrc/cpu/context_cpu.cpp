// Context embedding update on the CPU (SPEC.md Op 1). Stats: OpenMP over
// samples, masked means in one pass. Apply: OpenMP over channels, each channel
// walking the batch in order, which is SPEC.md's sequential loop exactly and
// deterministic whatever the thread count.
#include <omp.h>

#include <algorithm>
#include <vector>

#include "../kernels.h"
#include "image_loops.h"

namespace cream {
namespace {

template <typename T, typename Acc>
void stats_sample(const ContextParams& p, int64_t b, std::vector<Acc>& ws) {
  const cpu::Image<T> im = cpu::image_of<T>(p.f, b);
  const int64_t d = im.d, N = im.N;
  ws.resize(3 * N + 3 * d);
  Acc *m = ws.data(), *u = m + N, *ub = u + N, *w = ub + N, *S1 = w + d, *S2 = S1 + d;

  if (p.weight != nullptr) {  // Eq. 1 in the kernel: cam_i = W[y_b] . f_i
    const float* wrow = p.weight + p.labels[b] * d;
    for (int64_t k = 0; k < d; ++k) w[k] = wrow[k];
    cpu::dots(im, w, m, 0, N);
  } else {
    const float* cam = p.cam + b * N;
    for (int64_t i = 0; i < N; ++i) m[i] = cam[i];
  }
  Acc lo, hi;
  cpu::min_max(m, N, lo, hi);
  const Acc thr = cam_threshold<Acc>(lo, hi, Acc(p.ratio));
  const Acc cnt = cpu::masked_sums(im, m, lo, thr, u, ub, S1, S2);
  const Acc cnt_bg = Acc(N) - cnt;
  float* mean = p.means + b * 2 * d;
  for (int64_t k = 0; k < d; ++k) {
    mean[k] = static_cast<float>(masked_mean<Acc>(S1[k], cnt));
    mean[d + k] = static_cast<float>(masked_mean<Acc>(S2[k], cnt_bg));
  }
  p.nonempty[2 * b] = cnt > 0 ? 1 : 0;
  p.nonempty[2 * b + 1] = cnt_bg > 0 ? 1 : 0;
}

template <typename T, typename Acc>
void stats_all(const ContextParams& p) {
  const int64_t B = p.f.B;
  // Never more threads than images: at B=1 a second thread only adds a wait for
  // a core (8-20 ms on a busy 2-core machine instead of 0.2 ms).
  const int threads = static_cast<int>(std::min<int64_t>(B, omp_get_max_threads()));
#pragma omp parallel num_threads(threads)
  {
    std::vector<Acc> ws;
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < B; ++b) stats_sample<T, Acc>(p, b, ws);
  }
}

}  // namespace

void context_stats_cpu(const ContextParams& p) {
  switch (p.f.dtype) {
    case kFloat32: return stats_all<float, float>(p);
    case kFloat16: return stats_all<half_t, float>(p);
    case kBFloat16: return stats_all<bf16_t, float>(p);
    case kFloat64: return stats_all<double, double>(p);
  }
}

void context_apply_cpu(const ContextParams& p) {
  const int64_t B = p.f.B, d = p.f.d;
  const float lambda = p.momentum;
#pragma omp parallel for schedule(static)
  for (int64_t k = 0; k < d; ++k) {
    for (int64_t b = 0; b < B; ++b) {
      const int64_t y = p.labels[b];
      if (p.nonempty[2 * b])
        p.fg_table[y * d + k] = momentum_update<float>(p.fg_table[y * d + k], p.means[b * 2 * d + k], lambda);
      if (p.nonempty[2 * b + 1])
        p.bg_table[y * d + k] = momentum_update<float>(p.bg_table[y * d + k], p.means[b * 2 * d + d + k], lambda);
    }
  }
}

void context_update_cpu(const ContextParams& p) {
  context_stats_cpu(p);
  context_apply_cpu(p);
}

}  // namespace cream
