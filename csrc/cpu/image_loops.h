// Loops over one image's [d, N] feature map, shared by the CPU kernels.
// Two layouts: channel-major (stride_n == 1, NCHW) and pixel-major
// (stride_d == 1, channels_last); the inner loop always walks unit stride so
// the compiler can vectorise it. Accumulation is in Acc (float, or double for
// float64 features).
#pragma once

#include <algorithm>
#include <cstdint>

#include "../common.h"
#include "../kernels.h"

namespace cream {
namespace cpu {

// Prefetch four consecutive channel rows of n elements (stride sd), starting at
// r, one request per 64-byte line. The NCHW K-row loops call it for the rows of
// their next sweep: their four interleaved row streams, 4 N elements apart,
// defeat the hardware prefetcher where one row after another (the old one-row
// loops) does not, which made a map that comes from DRAM (B=32, 1024x14x14 fp32
// is 26 MB) 1.6x slower to read. A prefetch changes no arithmetic.
template <typename T>
inline void prefetch_rows(const T* r, int64_t sd, int64_t n) {
  constexpr int64_t step = 64 / sizeof(T);
  for (int j = 0; j < 4; ++j)
    for (int64_t i = 0; i < n; i += step) __builtin_prefetch(r + j * sd + i, 0, 3);
}

template <typename T>
struct Image {
  const T* base;
  int64_t d, N, sd, sn;
  bool channel_major() const { return sn == 1; }
};

template <typename T>
Image<T> image_of(const FeatureView& f, int64_t b) {
  const T* base = static_cast<const T*>(f.data) + b * f.stride_b;
  return Image<T>{base, f.d, f.N, f.stride_d, f.stride_n};
}

// x[i] = sum_k w[k] * f[k, i] for i in [i0, i1). x is indexed by absolute pixel.
template <typename T, typename Acc>
void dots(const Image<T>& im, const Acc* w, Acc* x, int64_t i0, int64_t i1) {
  if (im.channel_major()) {
    std::fill(x + i0, x + i1, Acc(0));
    for (int64_t k = 0; k < im.d; ++k) {
      const T* row = im.base + k * im.sd;
      const Acc wk = w[k];
#pragma omp simd
      for (int64_t i = i0; i < i1; ++i) x[i] += wk * load<Acc>(row + i);
    }
  } else {
    for (int64_t i = i0; i < i1; ++i) {
      const T* px = im.base + i * im.sn;
      Acc s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t k = 0; k < im.d; ++k) s += w[k] * load<Acc>(px + k);
      x[i] = s;
    }
  }
}

// q[i] = sum_k f[k, i]^2 for i in [i0, i1).
template <typename T, typename Acc>
void sumsq(const Image<T>& im, Acc* q, int64_t i0, int64_t i1) {
  if (im.channel_major()) {
    std::fill(q + i0, q + i1, Acc(0));
    for (int64_t k = 0; k < im.d; ++k) {
      const T* row = im.base + k * im.sd;
#pragma omp simd
      for (int64_t i = i0; i < i1; ++i) {
        const Acc v = load<Acc>(row + i);
        q[i] += v * v;
      }
    }
  } else {
    for (int64_t i = i0; i < i1; ++i) {
      const T* px = im.base + i * im.sn;
      Acc s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t k = 0; k < im.d; ++k) {
        const Acc v = load<Acc>(px + k);
        s += v * v;
      }
      q[i] = s;
    }
  }
}

// S1[k] += sum_i u[i] f[k, i], S2[k] += sum_i ub[i] f[k, i] over i in [i0, i1).
template <typename T, typename Acc>
void weighted_sums(const Image<T>& im, const Acc* u, const Acc* ub, Acc* S1, Acc* S2, int64_t i0,
                   int64_t i1) {
  if (im.channel_major()) {
    for (int64_t k = 0; k < im.d; ++k) {
      const T* row = im.base + k * im.sd;
      Acc s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
      for (int64_t i = i0; i < i1; ++i) {
        const Acc v = load<Acc>(row + i);
        s1 += u[i] * v;
        s2 += ub[i] * v;
      }
      S1[k] += s1;
      S2[k] += s2;
    }
  } else {
    for (int64_t i = i0; i < i1; ++i) {
      const T* px = im.base + i * im.sn;
      const Acc ui = u[i], ubi = ub[i];
#pragma omp simd
      for (int64_t k = 0; k < im.d; ++k) {
        const Acc v = load<Acc>(px + k);
        S1[k] += ui * v;
        S2[k] += ubi * v;
      }
    }
  }
}

// CAM-masked sums of one image (SPEC.md's mask): S1 = sum of f over foreground
// pixels, S2 over background ones; u/ub receive the 0/1 masks. Returns the
// foreground pixel count. `m` is the image's CAM, lo/thr from cam_threshold().
template <typename T, typename Acc, typename S>
Acc masked_sums(const Image<T>& im, const S* m, Acc lo, Acc thr, Acc* u, Acc* ub, Acc* S1, Acc* S2) {
  Acc cnt = 0;
  for (int64_t i = 0; i < im.N; ++i) {
    const bool fg = cam_is_fg<Acc>(static_cast<Acc>(m[i]), lo, thr);
    u[i] = fg ? Acc(1) : Acc(0);
    ub[i] = fg ? Acc(0) : Acc(1);
    cnt += u[i];
  }
  std::fill(S1, S1 + im.d, Acc(0));
  std::fill(S2, S2 + im.d, Acc(0));
  weighted_sums(im, u, ub, S1, S2, 0, im.N);
  return cnt;
}

// K weight vectors at once: X[r*N + i] = sum_k W[r*d + k] * f[k, i] for rows
// r < K and i in [0, N). Each feature row (NCHW) or pixel vector (channels_last)
// is read once for all K rows and stays in L1 while they use it. NCHW adds four
// channels at a time, so its rounding differs from dots() in the last bits.
template <typename T, typename Acc>
void dots_k(const Image<T>& im, const Acc* W, Acc* X, int64_t K) {
  const int64_t d = im.d, N = im.N;
  if (im.channel_major()) {
    // Four channel rows per sweep of x: a quarter of the loads and stores of x
    // (the rows stay in L1 for the K classes).
    std::fill(X, X + K * N, Acc(0));
    int64_t k = 0;
    for (; k + 4 <= d; k += 4) {
      const T *r0 = im.base + k * im.sd, *r1 = r0 + im.sd, *r2 = r1 + im.sd, *r3 = r2 + im.sd;
      if (k + 8 <= d) prefetch_rows(r0 + 4 * im.sd, im.sd, N);  // the next sweep's rows
      for (int64_t r = 0; r < K; ++r) {
        const Acc *w = W + r * d + k;
        const Acc w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
        Acc* x = X + r * N;
#pragma omp simd
        for (int64_t i = 0; i < N; ++i)
          x[i] += (w0 * load<Acc>(r0 + i) + w1 * load<Acc>(r1 + i)) + (w2 * load<Acc>(r2 + i) + w3 * load<Acc>(r3 + i));
      }
    }
    for (; k < d; ++k) {
      const T* row = im.base + k * im.sd;
      for (int64_t r = 0; r < K; ++r) {
        const Acc wk = W[r * d + k];
        Acc* x = X + r * N;
#pragma omp simd
        for (int64_t i = 0; i < N; ++i) x[i] += wk * load<Acc>(row + i);
      }
    }
  } else {
    for (int64_t i = 0; i < N; ++i) {
      const T* px = im.base + i * im.sn;
      for (int64_t r = 0; r < K; ++r) {
        const Acc* w = W + r * d;
        Acc s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t k = 0; k < d; ++k) s += w[k] * load<Acc>(px + k);
        X[r * N + i] = s;
      }
    }
  }
}

// K pairs of weighted sums at once: S1[r*d + k] = sum_i U[r*N + i] f[k, i],
// S2 likewise with UB (overwritten, not accumulated), one read of the image.
template <typename T, typename Acc>
void weighted_sums_k(const Image<T>& im, const Acc* U, const Acc* UB, Acc* S1, Acc* S2, int64_t K) {
  const int64_t d = im.d, N = im.N;
  if (im.channel_major()) {
    int64_t k = 0;
    for (; k + 4 <= d; k += 4) {  // four channel rows per sweep of u, ub
      const T *r0 = im.base + k * im.sd, *r1 = r0 + im.sd, *r2 = r1 + im.sd, *r3 = r2 + im.sd;
      if (k + 8 <= d) prefetch_rows(r0 + 4 * im.sd, im.sd, N);  // the next sweep's rows
      for (int64_t r = 0; r < K; ++r) {
        const Acc *u = U + r * N, *ub = UB + r * N;
        Acc a0 = 0, a1 = 0, a2 = 0, a3 = 0, b0 = 0, b1 = 0, b2 = 0, b3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3, b0, b1, b2, b3)
        for (int64_t i = 0; i < N; ++i) {
          const Acc ui = u[i], ubi = ub[i];
          const Acc v0 = load<Acc>(r0 + i), v1 = load<Acc>(r1 + i), v2 = load<Acc>(r2 + i), v3 = load<Acc>(r3 + i);
          a0 += ui * v0; a1 += ui * v1; a2 += ui * v2; a3 += ui * v3;
          b0 += ubi * v0; b1 += ubi * v1; b2 += ubi * v2; b3 += ubi * v3;
        }
        Acc *s1 = S1 + r * d + k, *s2 = S2 + r * d + k;
        s1[0] = a0; s1[1] = a1; s1[2] = a2; s1[3] = a3;
        s2[0] = b0; s2[1] = b1; s2[2] = b2; s2[3] = b3;
      }
    }
    for (; k < d; ++k) {
      const T* row = im.base + k * im.sd;
      for (int64_t r = 0; r < K; ++r) {
        const Acc *u = U + r * N, *ub = UB + r * N;
        Acc s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
        for (int64_t i = 0; i < N; ++i) {
          const Acc v = load<Acc>(row + i);
          s1 += u[i] * v;
          s2 += ub[i] * v;
        }
        S1[r * d + k] = s1;
        S2[r * d + k] = s2;
      }
    }
  } else {
    std::fill(S1, S1 + K * d, Acc(0));
    std::fill(S2, S2 + K * d, Acc(0));
    for (int64_t i = 0; i < N; ++i) {
      const T* px = im.base + i * im.sn;
      for (int64_t r = 0; r < K; ++r) {
        const Acc ui = U[r * N + i], ubi = UB[r * N + i];
        Acc *s1 = S1 + r * d, *s2 = S2 + r * d;
#pragma omp simd
        for (int64_t k = 0; k < d; ++k) {
          const Acc v = load<Acc>(px + k);
          s1[k] += ui * v;
          s2[k] += ubi * v;
        }
      }
    }
  }
}

// Per-image min and max of a CAM row (SPEC.md's lo and hi).
template <typename Acc, typename S>
void min_max(const S* m, int64_t N, Acc& lo, Acc& hi) {
  lo = static_cast<Acc>(m[0]);
  hi = lo;
  for (int64_t i = 1; i < N; ++i) {
    const Acc v = static_cast<Acc>(m[i]);
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
  }
}

}  // namespace cpu
}  // namespace cream
