// The per-pixel math of SPEC.md, as inline functions that compile both for the
// host (CPU kernels) and the device (CUDA kernels), so the two cannot drift apart.
// Nothing here allocates, validates or loops over a whole map: the kernels own
// the loops, this header owns the formulas.
#pragma once

#include <cstdint>
#include <cstring>
#include <cmath>

#if defined(__CUDACC__)
#define CK_HD __host__ __device__ __forceinline__
#else
#define CK_HD inline
#endif

namespace cream {

// dtype codes shared with cream_kernels/_ext.py
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

constexpr double kEps = 1e-12;  // SPEC.md cosine normalisation eps

// ---------------------------------------------------------------- storage types
struct half_t { uint16_t bits; };
struct bf16_t { uint16_t bits; };

CK_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

CK_HD float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

// IEEE binary16 -> binary32, exact for every input (normals, subnormals, inf, nan).
CK_HD float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  if (exp == 0x1fu) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / nan
  if (exp == 0) {
    if (man == 0) return bits_to_float(sign);  // +-0
    // subnormal: value = man * 2^-24
    float v = static_cast<float>(man) * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
}

template <typename T, typename Acc> struct Load;
template <typename Acc> struct Load<float, Acc> {
  static CK_HD Acc get(const float* p) { return static_cast<Acc>(*p); }
};
template <typename Acc> struct Load<double, Acc> {
  static CK_HD Acc get(const double* p) { return static_cast<Acc>(*p); }
};
template <typename Acc> struct Load<half_t, Acc> {
  static CK_HD Acc get(const half_t* p) { return static_cast<Acc>(half_to_float(p->bits)); }
};
template <typename Acc> struct Load<bf16_t, Acc> {
  static CK_HD Acc get(const bf16_t* p) { return static_cast<Acc>(bf16_to_float(p->bits)); }
};

template <typename Acc, typename T> CK_HD Acc load(const T* p) { return Load<T, Acc>::get(p); }

// ---------------------------------------------------------------- math helpers
CK_HD float ck_exp(float x) { return expf(x); }
CK_HD double ck_exp(double x) { return exp(x); }
CK_HD float ck_log(float x) { return logf(x); }
CK_HD double ck_log(double x) { return log(x); }
CK_HD float ck_sqrt(float x) { return sqrtf(x); }
CK_HD double ck_sqrt(double x) { return sqrt(x); }

// Numerically stable logistic function; sigmoid(-x) gives 1 - sigmoid(x)
// without cancellation. NaN in, NaN out.
template <typename Acc> CK_HD Acc sigmoid(Acc x) {
  if (x >= Acc(0)) {
    return Acc(1) / (Acc(1) + ck_exp(-x));
  }
  const Acc e = ck_exp(x);
  return e / (Acc(1) + e);
}

// ---------------------------------------------------------------- SPEC.md formulas
// CAM foreground mask: fg_i = (m_i - lo) >= r * (hi - lo). `thr` = r * (hi - lo),
// computed once per image by the caller with cam_threshold(). A constant map
// (hi == lo) gives thr = 0 and every pixel is foreground.
template <typename Acc> CK_HD Acc cam_threshold(Acc lo, Acc hi, Acc ratio) { return ratio * (hi - lo); }
template <typename Acc> CK_HD bool cam_is_fg(Acc m, Acc lo, Acc thr) { return (m - lo) >= thr; }

// Second term of Eq. 12: (m - lo) / (hi - lo), 0 for a constant map.
template <typename Acc> CK_HD Acc cam_normalized(Acc m, Acc lo, Acc hi) {
  const Acc rng = hi - lo;
  return rng > Acc(0) ? (m - lo) / rng : Acc(0);
}

// Cosine mode: 1 / max(||x||, eps) from the sum of squares.
template <typename Acc> CK_HD Acc inv_norm(Acc sumsq) {
  const Acc n = ck_sqrt(sumsq);
  return Acc(1) / (n > Acc(kEps) ? n : Acc(kEps));
}

// E-step (Eqs. 7-8). s_fg - s_bg = (log a_fg - log a_bg) + (v_fg - v_bg) . f / sigma.
// The kernels fold everything that does not depend on the pixel into
//   logit_i = bias + g_i * (w . f_i),   w = (v_fg - v_bg) / sigma,
// with g_i = 1/max(||f_i||, eps) for cosine and 1 for dot.
template <typename Acc> CK_HD Acc logit_bias(Acc a_fg, Acc a_bg) { return ck_log(a_fg) - ck_log(a_bg); }
template <typename Acc> CK_HD Acc logit_weight(Acc v_fg, Acc v_bg, Acc inv_sigma) { return (v_fg - v_bg) * inv_sigma; }
template <typename Acc> CK_HD Acc z_fg_of(Acc logit) { return sigmoid(logit); }
template <typename Acc> CK_HD Acc z_bg_of(Acc logit) { return sigmoid(-logit); }

// M-step (Eq. 9) for one channel: v = sum_i Z_i f_i / sum_i Z_i, keeping v when
// the mass is 0. (For cosine the kernel then normalises the whole vector.)
template <typename Acc> CK_HD Acc m_step(Acc weighted_sum, Acc mass, Acc old_v) {
  return mass > Acc(0) ? weighted_sum / mass : old_v;
}

// Masked mean for one channel (training-free init, context update): 0 for an
// empty mask, never NaN.
template <typename Acc> CK_HD Acc masked_mean(Acc total, Acc count) {
  return count > Acc(0) ? total / count : Acc(0);
}

// Calibration (Eqs. 10-11): both means share the fg pixel count, so the sums
// over CAM-foreground pixels are compared. Ties pick Z_fg.
template <typename Acc> CK_HD bool calibration_picks_fg(Acc sum_zfg_on_fg, Acc sum_zbg_on_fg) {
  return sum_zfg_on_fg >= sum_zbg_on_fg;
}

// Eq. 12.
template <typename Acc> CK_HD Acc reactivated(bool picked_fg, Acc z_fg, Acc z_bg, Acc cam_norm) {
  return (picked_fg ? z_fg : z_bg) + cam_norm;
}

// Eq. 4, one element: lambda * emb + (1 - lambda) * mean.
template <typename Acc> CK_HD Acc momentum_update(Acc emb, Acc mean, Acc lambda) {
  return lambda * emb + (Acc(1) - lambda) * mean;
}

}  // namespace cream
