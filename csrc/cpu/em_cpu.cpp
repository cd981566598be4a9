// EM re-activation on the CPU (SPEC.md Op 2): OpenMP over images. Per image and
// iteration: the E-step dot products over the whole map, then the M-step sums.
// For NCHW maps both walk contiguous rows of N pixels (a VGG16 map, 784 KB in
// fp32, stays in a 1 MB L2 between the two); channels_last maps are done pixel
// by pixel, E and M together. (Pixel tiles of 16-48 pixels, to share one read
// between E and M, measured 1.4-2.5x slower at B=32, 1024x14x14: short strided
// rows defeat the prefetcher.)
#include <omp.h>

#include <vector>

#include "../kernels.h"
#include "image_loops.h"

namespace cream {
namespace {

template <typename T, typename Acc, bool Cosine>
void em_image(const EMParams& p, int64_t b, std::vector<Acc>& ws) {
  const cpu::Image<T> im = cpu::image_of<T>(p.f, b);
  const int64_t d = im.d, N = im.N;
  // workspace: x, z, zb, u, ub, g [N]; v_fg, v_bg, w, S1, S2 [d]
  ws.resize(6 * N + 5 * d);
  Acc *x = ws.data(), *z = x + N, *zb = z + N, *u = zb + N, *ub = u + N, *g = ub + N;
  Acc *vf = g + N, *vb = vf + d, *w = vb + d, *S1 = w + d, *S2 = S1 + d;

  const float* cam = p.cam + b * N;
  Acc lo, hi;
  cpu::min_max(cam, N, lo, hi);
  const Acc thr = cam_threshold<Acc>(lo, hi, Acc(p.ratio));

  if (p.v_fg == nullptr) {  // training-free: CAM-masked means of the raw features
    const Acc cnt = cpu::masked_sums(im, cam, lo, thr, u, ub, S1, S2);
    for (int64_t k = 0; k < d; ++k) {
      vf[k] = masked_mean<Acc>(S1[k], cnt);
      vb[k] = masked_mean<Acc>(S2[k], Acc(N) - cnt);
    }
  } else {
    const int64_t row = p.labels ? p.labels[b] : b;
    for (int64_t k = 0; k < d; ++k) {
      vf[k] = p.v_fg[row * d + k];
      vb[k] = p.v_bg[row * d + k];
    }
  }

  if (Cosine) {
    cpu::sumsq(im, g, 0, N);
    for (int64_t i = 0; i < N; ++i) g[i] = inv_norm<Acc>(g[i]);
    for (Acc* v : {vf, vb}) {
      Acc s = 0;
      for (int64_t k = 0; k < d; ++k) s += v[k] * v[k];
      const Acc r = inv_norm<Acc>(s);
      for (int64_t k = 0; k < d; ++k) v[k] *= r;
    }
  }

  const Acc inv_sigma = Acc(1) / Acc(p.sigma);
  Acc a_fg = 0.5, a_bg = 0.5;
  for (int t = 1; t <= p.num_iters; ++t) {
    const bool m_step_follows = t < p.num_iters;
    for (int64_t k = 0; k < d; ++k) w[k] = logit_weight<Acc>(vf[k], vb[k], inv_sigma);
    const Acc bias = logit_bias<Acc>(a_fg, a_bg);
    Acc mass_fg = 0, mass_bg = 0;
    if (m_step_follows) {
      std::fill(S1, S1 + d, Acc(0));
      std::fill(S2, S2 + d, Acc(0));
    }
    cpu::dots(im, w, x, 0, N);
    for (int64_t i = 0; i < N; ++i) {
      const Acc logit = Cosine ? bias + g[i] * x[i] : bias + x[i];
      z[i] = z_fg_of<Acc>(logit);
      zb[i] = z_bg_of<Acc>(logit);
    }
    if (m_step_follows) {
      for (int64_t i = 0; i < N; ++i) {
        mass_fg += z[i];
        mass_bg += zb[i];
        u[i] = Cosine ? z[i] * g[i] : z[i];
        ub[i] = Cosine ? zb[i] * g[i] : zb[i];
      }
      cpu::weighted_sums(im, u, ub, S1, S2, 0, N);
    }
    if (m_step_follows) {
      for (int64_t k = 0; k < d; ++k) {
        vf[k] = m_step<Acc>(S1[k], mass_fg, vf[k]);
        vb[k] = m_step<Acc>(S2[k], mass_bg, vb[k]);
      }
      if (Cosine) {
        for (Acc* v : {vf, vb}) {
          Acc s = 0;
          for (int64_t k = 0; k < d; ++k) s += v[k] * v[k];
          const Acc r = inv_norm<Acc>(s);
          for (int64_t k = 0; k < d; ++k) v[k] *= r;
        }
      }
      a_fg = mass_fg / Acc(N);
      a_bg = mass_bg / Acc(N);
    }
  }

  // Calibration and output (Eqs. 10-12).
  Acc on_fg_fg = 0, on_fg_bg = 0;
  for (int64_t i = 0; i < N; ++i) {
    if (cam_is_fg<Acc>(cam[i], lo, thr)) {
      on_fg_fg += z[i];
      on_fg_bg += zb[i];
    }
  }
  const bool picked = calibration_picks_fg<Acc>(on_fg_fg, on_fg_bg);
  float* out = p.out + b * N;
  float* zout = p.z_fg + b * N;
  for (int64_t i = 0; i < N; ++i) {
    const Acc cn = cam_normalized<Acc>(cam[i], lo, hi);
    out[i] = static_cast<float>(reactivated<Acc>(picked, z[i], zb[i], cn));
    zout[i] = static_cast<float>(z[i]);
  }
  for (int64_t k = 0; k < d; ++k) {
    p.fg_out[b * d + k] = static_cast<float>(vf[k]);
    p.bg_out[b * d + k] = static_cast<float>(vb[k]);
  }
  p.mix[2 * b] = static_cast<float>(a_fg);
  p.mix[2 * b + 1] = static_cast<float>(a_bg);
  p.picked_fg[b] = picked ? 1 : 0;
}

template <typename T, typename Acc>
void em_all(const EMParams& p) {
  const int64_t B = p.f.B;
  // Never more threads than images: at B=1 a second thread only adds a wait for
  // a core (8-20 ms on a busy 2-core machine instead of 0.2 ms).
  const int threads = static_cast<int>(std::min<int64_t>(B, omp_get_max_threads()));
#pragma omp parallel num_threads(threads)
  {
    std::vector<Acc> ws;
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < B; ++b) {
      if (p.cosine)
        em_image<T, Acc, true>(p, b, ws);
      else
        em_image<T, Acc, false>(p, b, ws);
    }
  }
}

}  // namespace

void em_reactivate_cpu(const EMParams& p) {
  switch (p.f.dtype) {
    case kFloat32: return em_all<float, float>(p);
    case kFloat16: return em_all<half_t, float>(p);
    case kBFloat16: return em_all<bf16_t, float>(p);
    case kFloat64: return em_all<double, double>(p);
  }
}

int cpu_num_threads() { return omp_get_max_threads(); }

}  // namespace cream
