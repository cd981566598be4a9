// EM re-activation on the CPU (SPEC.md Op 2 and its issue-12 extensions):
// OpenMP over images; one thread runs all K rows (classes) of its image
// together, so every pass below reads the image's features once for all K:
//   [weight given]   1 pass: the K CAMs, cam_r,i = W[labels[r]] . f_i
//   [training-free]  1 pass: the CAM-masked fg/bg sums of the K rows
//   [cosine]         1 pass: the pixel norms (shared by the K rows)
//   [sigma = auto]   1 pass: the K initial logit gaps (in the E-step buffer)
//   per iteration    the E-step dot products over the whole map (1 pass), then
//                    the M-step sums (1 pass), for the K rows at once.
// For NCHW maps both walk contiguous rows of N pixels (a VGG16 map, 784 KB in
// fp32, stays in a 1 MB L2 between the two); channels_last maps are read pixel
// by pixel. (Pixel tiles of 16-48 pixels, to share one read between E and M,
// measured 1.4-2.5x slower at B=32, 1024x14x14: short strided rows defeat the
// prefetcher.) In NCHW the dot products and the M-step sums take four channel
// rows per sweep of the per-pixel arrays, a quarter of their loads and stores,
// and prefetch the next sweep's four rows (image_loops.h: four interleaved row
// streams alone left the hardware prefetcher behind when the map comes from DRAM).
// Thread CPU time, 1 thread, B=32 1024x14x14 fp32 T=2, given CAM, [200, d] tables,
// medians of alternating runs on a 2-core EPYC VM at load 8-12 (issue 25):
// 07bde90's one-row loops 4.1-4.4 ms, four rows without the prefetch 7.7-8.8 ms,
// with it 3.5-5.4 ms; K=5 in one call 10.6-14.4 ms with the prefetch, 11.7-13.5
// without (five one-row calls cost five times the one-row figure). Instructions
// (callgrind, B=4, K=1): 5.81 M, 3.74 M, 4.65 M. A K-row call
// and K one-row calls run the same loops, so their results are bitwise equal.
#include <omp.h>

#include <cmath>
#include <limits>
#include <vector>

#include "../kernels.h"
#include "image_loops.h"

namespace cream {
namespace {

template <typename Acc>
void normalize(Acc* v, int64_t d) {
  Acc s = 0;
  for (int64_t k = 0; k < d; ++k) s += v[k] * v[k];
  const Acc r = inv_norm<Acc>(s);
  for (int64_t k = 0; k < d; ++k) v[k] *= r;
}

template <typename T, typename Acc, bool Cosine>
void em_image(const EMParams& p, int64_t b, std::vector<Acc>& ws) {
  const cpu::Image<T> im = cpu::image_of<T>(p.f, b);
  const int64_t d = im.d, N = im.N, K = p.K;
  // workspace: g [N]; per row x, z, zb, u, ub, cam [N]; vf, vb, w, S1, S2 [d];
  // lo, hi, thr, inv_sigma (4)
  ws.resize(N + K * (6 * N + 5 * d + 4));
  Acc* g = ws.data();
  Acc *X = g + N, *Z = X + K * N, *ZB = Z + K * N, *U = ZB + K * N, *UB = U + K * N, *CAM = UB + K * N;
  Acc *VF = CAM + K * N, *VB = VF + K * d, *W = VB + K * d, *S1 = W + K * d, *S2 = S1 + K * d;
  Acc *LO = S2 + K * d, *HI = LO + K, *THR = HI + K, *INV = THR + K;
  const int64_t r0 = b * K;  // first global row of this image

  // The K CAMs.
  if (p.weight != nullptr) {  // Eq. 1 in the kernel, raw features, no bias
    for (int64_t r = 0; r < K; ++r) {
      const float* wrow = p.weight + p.labels[r0 + r] * d;
      for (int64_t k = 0; k < d; ++k) W[r * d + k] = wrow[k];
    }
    cpu::dots_k(im, W, CAM, K);
  } else {
    const float* cam = p.cam + r0 * N;
    for (int64_t i = 0; i < K * N; ++i) CAM[i] = cam[i];
  }
  for (int64_t r = 0; r < K; ++r) {
    cpu::min_max(CAM + r * N, N, LO[r], HI[r]);
    THR[r] = cam_threshold<Acc>(LO[r], HI[r], Acc(p.ratio));
  }

  // Initial centroids.
  if (p.v_fg == nullptr) {  // training-free: CAM-masked means of the raw features
    std::vector<Acc> cnt(K, Acc(0));
    for (int64_t r = 0; r < K; ++r) {
      const Acc* m = CAM + r * N;
      for (int64_t i = 0; i < N; ++i) {
        const bool fg = cam_is_fg<Acc>(m[i], LO[r], THR[r]);
        U[r * N + i] = fg ? Acc(1) : Acc(0);
        UB[r * N + i] = fg ? Acc(0) : Acc(1);
        cnt[r] += U[r * N + i];
      }
    }
    cpu::weighted_sums_k(im, U, UB, S1, S2, K);
    for (int64_t r = 0; r < K; ++r)
      for (int64_t k = 0; k < d; ++k) {
        VF[r * d + k] = masked_mean<Acc>(S1[r * d + k], cnt[r]);
        VB[r * d + k] = masked_mean<Acc>(S2[r * d + k], Acc(N) - cnt[r]);
      }
  } else {
    for (int64_t r = 0; r < K; ++r) {
      const int64_t row = p.v_by_label ? p.labels[r0 + r] : r0 + r;
      for (int64_t k = 0; k < d; ++k) {
        VF[r * d + k] = p.v_fg[row * d + k];
        VB[r * d + k] = p.v_bg[row * d + k];
      }
    }
  }

  if (Cosine) {
    cpu::sumsq(im, g, 0, N);
    for (int64_t i = 0; i < N; ++i) g[i] = inv_norm<Acc>(g[i]);
    for (int64_t r = 0; r < 2 * K; ++r) normalize(r < K ? VF + r * d : VB + (r - K) * d, d);
  }

  // Temperature per row. sigma = auto (SPEC.md): the population std s of the
  // initial gaps Delta_i = (v_fg - v_bg) . f_i, sigma = s / 2, or no similarity
  // term (inv 0, sigma +inf) when s <= 1e-6 max |Delta|.
  float* sigma_used = p.sigma_used;  // [B*K], always given (kernels.h)
  std::vector<Acc> div(K, Acc(0));  // auto: w = (v_fg - v_bg) / sigma (division: sigma may be tiny)
  if (p.sigma_auto) {
    for (int64_t r = 0; r < K; ++r)
      for (int64_t k = 0; k < d; ++k) W[r * d + k] = VF[r * d + k] - VB[r * d + k];
    cpu::dots_k(im, W, X, K);
    for (int64_t r = 0; r < K; ++r) {
      const Acc* x = X + r * N;
      Acc mu = 0, amax = 0;
      for (int64_t i = 0; i < N; ++i) {
        const Acc delta = Cosine ? g[i] * x[i] : x[i];
        mu += delta;
        const Acc a = std::fabs(delta);
        amax = a > amax ? a : amax;
      }
      mu /= Acc(N);
      Acc var = 0;
      for (int64_t i = 0; i < N; ++i) {
        const Acc e = (Cosine ? g[i] * x[i] : x[i]) - mu;
        var += e * e;
      }
      const Acc s = std::sqrt(var / Acc(N));
      if (s <= Acc(1e-6) * amax) {  // also catches amax = 0; a NaN s is not flat and propagates
        div[r] = 0;
        sigma_used[r0 + r] = std::numeric_limits<float>::infinity();
      } else {
        div[r] = s / Acc(2);
        sigma_used[r0 + r] = static_cast<float>(div[r]);
      }
    }
  } else {
    for (int64_t r = 0; r < K; ++r) {
      INV[r] = Acc(1) / Acc(p.sigma);
      sigma_used[r0 + r] = p.sigma;
    }
  }

  std::vector<Acc> a_fg(K, Acc(0.5)), a_bg(K, Acc(0.5));
  for (int t = 1; t <= p.num_iters; ++t) {
    const bool m_step_follows = t < p.num_iters;
    for (int64_t r = 0; r < K; ++r)
      for (int64_t k = 0; k < d; ++k) {
        const Acc vf = VF[r * d + k], vb = VB[r * d + k];
        W[r * d + k] = !p.sigma_auto ? logit_weight<Acc>(vf, vb, INV[r])
                       : div[r] > Acc(0) ? (vf - vb) / div[r]
                                         : (vf - vb) * Acc(0);  // flat row: Z = a (NaN stays NaN)
      }
    cpu::dots_k(im, W, X, K);
    std::vector<Acc> mass_fg(K, Acc(0)), mass_bg(K, Acc(0));
    for (int64_t r = 0; r < K; ++r) {
      const Acc bias = logit_bias<Acc>(a_fg[r], a_bg[r]);
      const Acc* x = X + r * N;
      Acc *z = Z + r * N, *zb = ZB + r * N;
      for (int64_t i = 0; i < N; ++i) {
        const Acc logit = Cosine ? bias + g[i] * x[i] : bias + x[i];
        z[i] = z_fg_of<Acc>(logit);
        zb[i] = z_bg_of<Acc>(logit);
      }
      if (m_step_follows) {
        Acc *u = U + r * N, *ub = UB + r * N;
        for (int64_t i = 0; i < N; ++i) {
          mass_fg[r] += z[i];
          mass_bg[r] += zb[i];
          u[i] = Cosine ? z[i] * g[i] : z[i];
          ub[i] = Cosine ? zb[i] * g[i] : zb[i];
        }
      }
    }
    if (m_step_follows) {
      cpu::weighted_sums_k(im, U, UB, S1, S2, K);
      for (int64_t r = 0; r < K; ++r) {
        for (int64_t k = 0; k < d; ++k) {
          VF[r * d + k] = m_step<Acc>(S1[r * d + k], mass_fg[r], VF[r * d + k]);
          VB[r * d + k] = m_step<Acc>(S2[r * d + k], mass_bg[r], VB[r * d + k]);
        }
        if (Cosine) {
          normalize(VF + r * d, d);
          normalize(VB + r * d, d);
        }
        a_fg[r] = mass_fg[r] / Acc(N);
        a_bg[r] = mass_bg[r] / Acc(N);
      }
    }
  }

  // Calibration and output (Eqs. 10-12), per row.
  for (int64_t r = 0; r < K; ++r) {
    const Acc *m = CAM + r * N, *z = Z + r * N, *zb = ZB + r * N;
    Acc on_fg_fg = 0, on_fg_bg = 0;
    for (int64_t i = 0; i < N; ++i) {
      if (cam_is_fg<Acc>(m[i], LO[r], THR[r])) {
        on_fg_fg += z[i];
        on_fg_bg += zb[i];
      }
    }
    const bool picked = calibration_picks_fg<Acc>(on_fg_fg, on_fg_bg);
    const int64_t gr = r0 + r;
    float* out = p.out + gr * N;
    float* zout = p.z_fg + gr * N;
    for (int64_t i = 0; i < N; ++i) {
      const Acc cn = cam_normalized<Acc>(m[i], LO[r], HI[r]);
      out[i] = static_cast<float>(reactivated<Acc>(picked, z[i], zb[i], cn));
      zout[i] = static_cast<float>(z[i]);
    }
    for (int64_t k = 0; k < d; ++k) {
      p.fg_out[gr * d + k] = static_cast<float>(VF[r * d + k]);
      p.bg_out[gr * d + k] = static_cast<float>(VB[r * d + k]);
    }
    p.mix[2 * gr] = static_cast<float>(a_fg[r]);
    p.mix[2 * gr + 1] = static_cast<float>(a_bg[r]);
    p.picked_fg[gr] = picked ? 1 : 0;
  }
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
