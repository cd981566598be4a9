// The two reductions every kernel here is made of, over a 2-D block of the
// feature map A (R rows, L columns, columns contiguous, rows `pitch` elements
// apart), read from global or shared memory with VB-byte vectors:
//
//   col_reduce: out_o[c] = sum_r coef_o[r] * A[r][c]   (one result per column)
//   row_reduce: out_o[r] = sum_c coef_o[c] * A[r][c]   (one result per row)
//
// plus, with SQ, a last output of sums of squares (cosine mode's pixel norms).
// With channel-major (NCHW) features the rows are channels and the columns
// pixels, so the E-step dot products w . f_i are a col_reduce and the M-step
// sums sum_i z_i f_i a row_reduce; with channels_last the roles swap. Both
// layouts therefore run the same two loops, always walking the contiguous
// dimension with vector loads:
//
// * col_reduce: a thread owns one column vector (V contiguous elements) and
//   walks rows; consecutive threads take consecutive vectors of a row, so a
//   warp reads one contiguous stretch per row (coalesced in global memory,
//   conflict-free in shared memory) and the row's coefficient is a broadcast.
//   When there are fewer column vectors than threads, rg groups of threads
//   split the rows and a fixed-order pass over `scratch` adds their partials.
// * row_reduce: G adjacent lanes (a power of two, <= 32) share a row and split
//   its vectors; an xor-butterfly over the G lanes finishes the row. G = 32
//   makes a warp read 32 contiguous vectors of one row (coalesced in global
//   memory); G = 1 makes each lane own a row, for shared memory, where the
//   host pads the row pitch so that the lanes hit distinct banks.
//
// Both keep several loads in flight per thread (col_reduce unrolls its row
// loop, row_reduce works on 4 rows at once) and several independent FMA
// chains. Every sum is taken in a fixed order: the results do not depend on
// scheduling, run to run.
// Both functions end with __syncthreads and must be called by the whole block.
#pragma once

#include "device.cuh"

namespace cream {
namespace cuda {

template <int N>
struct Coefs {
  const float* p[N];
};
template <int N>
struct Outs {
  float* p[N];
};

// acc[o][j] += coef_o[r] * a[j] for rows r = r0, r0 + rstep, ... < R of one column vector.
template <typename T, int VB, int NC, bool SQ, int NO, int V>
__device__ __forceinline__ void col_accumulate(const T* col, int64_t pitch, int r0, int R, int rstep, int n,
                                               const Coefs<NC>& cf, float (&acc)[NO][V]) {
  // One row's contribution; the two loops below differ only in how a row is loaded.
  auto add_row = [&](const float (&a)[V], int r) {
#pragma unroll
    for (int o = 0; o < NC; ++o) {
      const float c = cf.p[o][r];
#pragma unroll
      for (int j = 0; j < V; ++j) acc[o][j] = fmaf(c, a[j], acc[o][j]);
    }
    if constexpr (SQ) {
#pragma unroll
      for (int j = 0; j < V; ++j) acc[NC][j] = fmaf(a[j], a[j], acc[NC][j]);
    }
  };
  if (n == V) {
    // 16-byte vectors of 2-byte types carry 8 accumulators per output already.
#pragma unroll(V >= 8 ? 2 : 4)
    for (int r = r0; r < R; r += rstep) {
      float a[V];
      load_vec<T, VB>(col + static_cast<int64_t>(r) * pitch, a);
      add_row(a, r);
    }
  } else {
    for (int r = r0; r < R; r += rstep) {
      float a[V];
      load_part<T, V>(col + static_cast<int64_t>(r) * pitch, n, a);
      add_row(a, r);
    }
  }
}

// out_o[c] (+)= sum_{r<R} coef_o[r] A[r][c] for c < L; with SQ, out_NC[c] (+)= sum_r A[r][c]^2.
// coef_o are indexed by row. scratch: scratch_cap floats of shared memory (may be 0).
template <typename T, int VB, int NC, bool SQ>
__device__ __forceinline__ void col_reduce(const T* A, int64_t pitch, int R, int L, Coefs<NC> cf,
                                           Outs<NC + (SQ ? 1 : 0)> out, bool accumulate, float* scratch,
                                           int scratch_cap) {
  constexpr int V = VB / static_cast<int>(sizeof(T));
  constexpr int NO = NC + (SQ ? 1 : 0);
  const int t = ck_tid(), nt = ck_nthreads();
  const int ncv = (L + V - 1) / V;
  int rg = 1;
  if (ncv > 0 && ncv < nt) {
    rg = nt / ncv;
    if (rg > R) rg = R;
    const int cap = scratch_cap / (NO * ncv * V);
    if (rg > cap) rg = cap;
    if (rg < 1) rg = 1;
  }
  if (rg == 1) {
    for (int cv = t; cv < ncv; cv += nt) {
      float acc[NO][V];
#pragma unroll
      for (int o = 0; o < NO; ++o)
#pragma unroll
        for (int j = 0; j < V; ++j) acc[o][j] = 0.f;
      const int n = L - cv * V < V ? L - cv * V : V;
      col_accumulate<T, VB, NC, SQ, NO, V>(A + cv * V, pitch, 0, R, 1, n, cf, acc);
#pragma unroll
      for (int o = 0; o < NO; ++o)
#pragma unroll
        for (int j = 0; j < V; ++j) {
          if (j < n) {
            float* dst = out.p[o] + cv * V + j;
            *dst = accumulate ? *dst + acc[o][j] : acc[o][j];
          }
        }
    }
  } else {
    const int g = t / ncv, cv = t - g * ncv;
    if (g < rg) {
      float acc[NO][V];
#pragma unroll
      for (int o = 0; o < NO; ++o)
#pragma unroll
        for (int j = 0; j < V; ++j) acc[o][j] = 0.f;
      const int n = L - cv * V < V ? L - cv * V : V;
      col_accumulate<T, VB, NC, SQ, NO, V>(A + cv * V, pitch, g, R, rg, n, cf, acc);
#pragma unroll
      for (int o = 0; o < NO; ++o)
#pragma unroll
        for (int j = 0; j < V; ++j) scratch[((g * NO + o) * ncv + cv) * V + j] = acc[o][j];
    }
    ck_sync();
#pragma unroll
    for (int o = 0; o < NO; ++o) {
      for (int c = t; c < L; c += nt) {
        const int cvv = c / V, j = c - cvv * V;
        float s = 0.f;
        for (int gg = 0; gg < rg; ++gg) s += scratch[((gg * NO + o) * ncv + cvv) * V + j];
        float* dst = out.p[o] + c;
        *dst = accumulate ? *dst + s : s;
      }
    }
  }
  ck_sync();
}

// out_o[r] (+)= sum_{c<L} coef_o[c] A[r][c] for r < R; with SQ, out_NC[r] (+)= sum_c A[r][c]^2.
// coef_o are indexed by column, 16-byte aligned. G: lanes per row, a power of two <= 32.
// Each slot of G lanes works on RB rows at once (rows slot, slot + nslots, ...
// of the block of RB * nslots rows), loading the column's coefficients once
// for all of them and issuing the RB row loads together: enough independent
// loads in flight even when a row is only a few vectors long (NCHW tiles).
template <typename T, int VB, int NC, bool SQ>
__device__ __forceinline__ void row_reduce(const T* A, int64_t pitch, int R, int L, Coefs<NC> cf, int G,
                                           Outs<NC + (SQ ? 1 : 0)> out, bool accumulate) {
  constexpr int V = VB / static_cast<int>(sizeof(T));
  constexpr int NO = NC + (SQ ? 1 : 0);
  constexpr int RB = V >= 4 ? 2 : 4;  // rows per slot at once (fewer for the widest vectors: registers)
  const int t = ck_tid(), nt = ck_nthreads();
  const int g = t & (G - 1), slot = t / G, nslots = nt / G;
  const int nfull = L / V, rem = L - nfull * V;
  // The loop bound is the same for the whole block, so every warp reaches the
  // shuffles below with all 32 lanes.
  for (int rb = 0; rb < R; rb += RB * nslots) {
    float acc[RB][NO];
    const T* rowp[RB];
    bool valid[RB];
#pragma unroll
    for (int k = 0; k < RB; ++k) {
      const int r = rb + k * nslots + slot;
      valid[k] = r < R;
      rowp[k] = A + static_cast<int64_t>(valid[k] ? r : 0) * pitch;
#pragma unroll
      for (int o = 0; o < NO; ++o) acc[k][o] = 0.f;
    }
    if (valid[0]) {
#pragma unroll 2
      for (int cv = g; cv < nfull; cv += G) {
        float c[NC][V];
#pragma unroll
        for (int o = 0; o < NC; ++o) load_f32<V>(cf.p[o] + cv * V, c[o]);
        // the RB loads first (raw bits, few registers), then the arithmetic
        typename RawVec<VB>::type raw[RB];
#pragma unroll
        for (int k = 0; k < RB; ++k) {
          if (valid[k])
            raw[k] = load_raw<T, VB>(rowp[k] + cv * V);
          else
            raw[k] = typename RawVec<VB>::type{};
        }
#pragma unroll
        for (int k = 0; k < RB; ++k) {
          float a[V];
          unpack<T, VB>(raw[k], a);
#pragma unroll
          for (int o = 0; o < NC; ++o)
#pragma unroll
            for (int j = 0; j < V; ++j) acc[k][o] = fmaf(c[o][j], a[j], acc[k][o]);
          if constexpr (SQ) {
#pragma unroll
            for (int j = 0; j < V; ++j) acc[k][NC] = fmaf(a[j], a[j], acc[k][NC]);
          }
        }
      }
      if (rem > 0 && g == (nfull & (G - 1))) {
#pragma unroll
        for (int k = 0; k < RB; ++k) {
          if (!valid[k]) continue;
          float a[V];
          load_part<T, V>(rowp[k] + nfull * V, rem, a);
#pragma unroll
          for (int o = 0; o < NC; ++o)
#pragma unroll
            for (int j = 0; j < V; ++j)
              if (j < rem) acc[k][o] = fmaf(cf.p[o][nfull * V + j], a[j], acc[k][o]);
          if constexpr (SQ) {
#pragma unroll
            for (int j = 0; j < V; ++j) acc[k][NC] = fmaf(a[j], a[j], acc[k][NC]);
          }
        }
      }
    }
    for (int off = G >> 1; off > 0; off >>= 1) {
#pragma unroll
      for (int k = 0; k < RB; ++k)
#pragma unroll
        for (int o = 0; o < NO; ++o) acc[k][o] += ck_shfl_xor(acc[k][o], off);
    }
    if (g == 0) {
#pragma unroll
      for (int k = 0; k < RB; ++k) {
        if (!valid[k]) continue;
        const int r = rb + k * nslots + slot;
#pragma unroll
        for (int o = 0; o < NO; ++o) {
          float* dst = out.p[o] + r;
          *dst = accumulate ? *dst + acc[k][o] : acc[k][o];
        }
      }
    }
  }
  ck_sync();
}

// ----------------------------------------------------------------- host-side helpers
// Smallest power of two >= x (x >= 1), capped at 32.
inline int pow2_at_least(int x) {
  int g = 1;
  while (g < x && g < 32) g <<= 1;
  return g;
}

// Lanes per row for a row_reduce over R rows of `ncv` vectors with nt threads:
// enough lanes that the block has work for every thread, and for global
// memory at least enough to read whole 128-byte lines per row.
inline int row_lanes(int R, int ncv, int nt, bool global_src) {
  int G = pow2_at_least(R > 0 ? (nt + R - 1) / R : 1);
  if (global_src) {
    const int want = pow2_at_least(ncv > 0 ? ncv : 1);
    if (want > G) G = want;
  }
  const int cap = pow2_at_least(ncv > 0 ? ncv : 1);
  if (G > cap) G = cap;
  return G;
}

// Row pitch (in elements) for a matrix kept in shared memory whose rows are
// read by a row_reduce with G lanes per row: the G lanes of a row read
// consecutive vectors and the rows of one shared-memory wavefront (128 bytes)
// must fall in distinct banks. With VB-byte accesses a wavefront serves
// 128/VB lanes (VB >= 4), so the pitch in VB units is made congruent to G
// modulo 128/VB; 2-byte scalar accesses pair up in 4-byte words instead.
inline int64_t smem_pitch(int64_t row_elems, int elem_bytes, int VB, int G) {
  if (VB >= 4) {
    const int64_t slots = 128 / VB;
    int64_t pu = (row_elems * elem_bytes + VB - 1) / VB;
    if (G < slots)
      while (pu % slots != G % slots) ++pu;
    return pu * VB / elem_bytes;
  }
  // VB == 2: pitch in 4-byte words congruent to max(1, G/2) modulo 32.
  int64_t pw = (row_elems * elem_bytes + 3) / 4;
  const int64_t want = G / 2 > 1 ? G / 2 : 1;
  while (pw % 32 != want % 32) ++pw;
  return pw * 4 / elem_bytes;
}

}  // namespace cuda
}  // namespace cream
