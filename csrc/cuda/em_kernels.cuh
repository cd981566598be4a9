// EM re-activation (SPEC.md Op 2) on the GPU: the two kernel variants and
// their launch configurations. The choice between them is made in one place,
// em_reactivate_cuda() in em.cu, with plan_em() below for the cluster's size.
//
// Generic variant (any GPU, any shape, every option): one CTA of 512 threads
//   per row r = b*K + k (image b, its k-th class); the K CTAs of an image have
//   adjacent indices, run together and walk the same tiles in the same order,
//   so the image's features come from HBM about once per pass for all K rows
//   and from L2 for the others. Each iteration is one pass over the image in
//   pixel tiles (all d channels x tp pixels): the tile's E-step dot products,
//   then its posteriors, then its share of the M-step sums, which re-read the
//   tile from L1/L2 while it is hot. Tiles are sized in bytes so that the
//   tiles of all resident CTAs fit in half the L2 (make_generic_cfg). So an
//   E-step and the M-step after it share one pass from HBM (T passes for T
//   iterations; the CAM from the classifier weight, the training-free start
//   and sigma = auto add one each). Partial sums live in shared memory, the
//   centroids in the fg_out/bg_out rows, per-pixel posteriors in z_fg/out
//   until the final write (a CAM computed from W waits in `out`).
//   Grid = B*K, __launch_bounds__(512, 2): two CTAs per SM, so B = 256 fills
//   132 SMs in one wave. Successive passes walk the tiles in alternating
//   order, so a pass starts on what the previous one read last (L2 hits).
//
// Cluster variant (sm_90): one thread-block cluster of cs CTAs (<= 16) per
//   image, each CTA owning a channel slice (d/cs channels x N pixels), which
//   it copies once into its shared memory with cp.async (4 commit groups, the
//   first sweep running on each chunk as it lands). Every E/M iteration then
//   runs from shared memory: F is read from HBM exactly once per call,
//   whatever T is. (When a slice is too large for the shared memory, the
//   planner may keep only part of it resident and re-read the other rows from
//   L2, when those of all resident CTAs fit in half of it; see plan_em.) K = 1,
//   a given CAM and a numeric sigma only: other calls run the generic kernel
//   (cluster_unsupported gives the reason).
//   256 threads per CTA, __launch_bounds__(256, 2). Per iteration:
//     E: partial logits over the CTA's channels for all N pixels;
//        reduce-scatter through distributed shared memory: CTA s owns pixels
//        [s*N/cs, (s+1)*N/cs) (at least one: the planner needs N >= cs), and
//        adds the cs partials of its pixels in rank order;
//     the owners compute Z and push (Z_fg, Z_bg) (times the pixel's inverse
//        norm for cosine) into every CTA's coefficient buffer, plus their
//        masses;
//     M: each CTA's channel sums are then local: sum_i u_i f_i over its slice.
//   The exchanges are st.async stores into the peers' shared memory, each
//   completing its bytes on the receiver's mbarrier (one per kind of message:
//   partials, coefficients + masses, centroid norms for cosine), so a step
//   waits for exactly the data it needs and no cluster barrier runs in the
//   loop. (A barrier.cluster arrive.release/wait.acquire pair compiles to
//   MEMBAR.ALL.GPU + CCTL.IVALL: a GPU-wide fence that waits for every
//   outstanding global access plus an L1 invalidate, two or three times per
//   iteration. The SASS of the bf16/16-byte/NCHW kernel at sm_90a had 5
//   MEMBAR.ALL.GPU, 6 CCTL.IVALL and 6 UCGABAR_ARV/WAIT pairs before, and has
//   0 MEMBAR, 2 CCTL.IVALL (the two cluster barriers at start and exit) and
//   SYNCS.ARRIVE/PHASECHK mbarrier operations now.) Channel slices make the
//   global slice of NCHW features one contiguous block, and keep the exchanged
//   data at O(N) per iteration.
//
// Both accumulate in float32 and take every sum in a fixed order, so results
// do not depend on scheduling.
//
// Memory access (both variants, through sweeps.cuh): 16-byte vector loads
// where every row of every image is 16-byte aligned (8 bf16/f16 or 4 f32 per
// load), else 8-byte loads for 2-byte types (14x14 maps: 392-byte channel
// rows), else one element; a warp always reads contiguous stretches of the
// contiguous dimension (pixels for NCHW, channels for channels_last), so both
// layouts are coalesced; rows end in a masked partial vector (any d, any N).
//
// The H100 targets, and what this design expects of them (estimates, to be
// measured with scripts/gpu_check.sh; ~3.0 TB/s copy bandwidth, 132 SMs):
// * batch 256 ResNet50 28x28 bf16 T=2 (822 MB, 274 us at 3 TB/s; >= 80%):
//   generic: 2 HBM passes (3.2 MB per image, 264 images in flight do not fit
//   in L2), about 45-50%. Cluster: 16 CTAs x 200 KB hold an image (plan C:
//   one CTA per SM, 8 images in flight); one HBM read, but each SM idles HBM
//   while sweeping, about 65-70%. 80% needs load/compute overlap: the partial
//   residency of plan B with L2 evict-first/evict-last policies (see
//   em_cluster.cu).
// * batch 1 VGG16 14x14 (400 KB bf16; <= 15 us): cluster, 16 CTAs x 25 KB,
//   16 SMs load in parallel; about 2-3 us of loads plus 4 cluster barriers
//   and 3 small sweeps, well under 15 us. Generic: one SM, about 20 us.
// * batch 32 T=4 vs T=1 (<= 1.3x): cluster, 8 CTAs per image (256 CTAs, two
//   per SM). T=1 is one HBM read (12.8 MB bf16, ~4.3 us + launch); each extra
//   iteration reads the slices twice from shared memory (E and M), at best
//   2 x 12.8 MB / (132 SMs x 128 B/clk) = 0.9 us, plus two cluster barriers:
//   about 1.5-2x. Meeting 1.3x would need the sweeps from registers (the
//   256 KB register file per SM holds a batch-32 image set: ~100 KB per SM).
#pragma once

#include <algorithm>
#include <string>
#include <vector>

#include "sweeps.cuh"

namespace cream {
namespace cuda {

CK_HD int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
CK_HD int64_t ceil_div(int64_t x, int64_t m) { return (x + m - 1) / m; }

// Features are channels_last-like when the channel stride is 1 (and the pixel
// stride is not); ops.py guarantees one of the two is 1.
inline bool is_nhwc(const FeatureView& f) { return f.stride_n != 1 && f.stride_d == 1; }

inline int elem_bytes(int dtype) { return dtype == kFloat32 ? 4 : 2; }

// The widest access (16 or 8 bytes; 8 only for 2-byte types) that keeps every
// row of every image aligned, else one element.
inline int pick_vb(const FeatureView& f) {
  const int elem = elem_bytes(f.dtype);
  const bool nhwc = is_nhwc(f);
  const uint64_t addr = reinterpret_cast<uint64_t>(f.data);
  const int64_t sb = f.stride_b * elem;
  const int64_t rows = nhwc ? f.N : f.d;
  const int64_t sp = (nhwc ? f.stride_n : f.stride_d) * elem;
  for (int vb : {16, 8}) {
    if (elem == 4 && vb == 8) continue;
    if (addr % vb == 0 && (f.B <= 1 || sb % vb == 0) && (rows <= 1 || sp % vb == 0)) return vb;
  }
  return elem;
}

// Pixel tile of the tiled passes (generic EM kernel, context kernels).
// Channel-major: rows of tp pixels, 512 bytes per channel row at most, a
// multiple of 8 pixels (keeps every tile start aligned for 16-byte loads);
// channels_last: 32 pixel rows of d channels. Tiles are balanced over N.
// tp_cap > 0 caps tp further (rounded down to 8 pixels for channel-major).
inline int pixel_tile(int64_t N, int elem, bool nhwc, int nt, int64_t tp_cap = 0) {
  int64_t tpmax = nhwc ? 32 : 512 / elem;
  if (tpmax > nt) tpmax = nt;
  if (tp_cap > 0) {
    if (!nhwc) tp_cap = tp_cap / 8 * 8 > 8 ? tp_cap / 8 * 8 : 8;
    if (tp_cap < tpmax) tpmax = tp_cap;
  }
  const int64_t ntiles = ceil_div(N, tpmax);
  int64_t tp = ceil_div(N, ntiles);
  if (!nhwc) tp = round_up(tp, 8);
  if (tp > tpmax) tp = tpmax;
  return static_cast<int>(tp < 1 ? 1 : tp);
}

// ============================================================ generic variant
struct EmGenericCfg {
  int tp;       // pixels per tile
  int g_row;    // lanes per row of the row_reduce (E for channels_last, M for NCHW)
  int dpad;     // d rounded up to 4 floats
  int tpad;     // tp rounded up to 4 floats
  int scratch;  // floats of col_reduce scratch
  int64_t smem;  // dynamic shared memory bytes (<= 0: does not fit)
};

constexpr int kGenericThreads = 512;

// tile_bytes > 0: the most bytes of features one tile may span (d x tp x
// elem). A tile is read by the E-step and re-read by the M-step right after,
// from L2 only if the tiles of all CTAs resident at once fit there: the caller
// passes half the L2 over those CTAs (generic_cfg_for). ResNet50 28x28 bf16 at
// B = 256: 264 resident CTAs, 60 MB L2 -> 119 KB, tp = 24 pixels (was 200,
// 819 KB a tile, 216 MB between a tile's two reads: T = 2 read F three times).
inline EmGenericCfg make_generic_cfg(int64_t d, int64_t N, int elem, int VB, bool nhwc, int nt, int64_t max_smem,
                                     int64_t tile_bytes = 0) {
  EmGenericCfg c{};
  const int V = VB / elem;
  c.tp = pixel_tile(N, elem, nhwc, nt, tile_bytes > 0 ? std::max<int64_t>(1, tile_bytes / (d * elem)) : 0);
  c.dpad = static_cast<int>(round_up(d, 4));
  c.tpad = static_cast<int>(round_up(c.tp, 4));
  const int64_t R = nhwc ? c.tp : d;                       // rows of the row_reduce
  const int64_t ncv = ceil_div(nhwc ? d : c.tp, V);         // its vectors per row
  c.g_row = row_lanes(static_cast<int>(R < (1 << 30) ? R : (1 << 30)), static_cast<int>(ncv), nt, true);
  const int64_t fixed = 3 * int64_t(c.dpad) + 4 * int64_t(c.tpad) + 64;
  const int64_t want_scratch = 2 * int64_t(nt) * (16 / elem);  // rg * outputs * columns, at most
  int64_t avail = max_smem / 4 - fixed;
  if (avail < 0) {
    c.smem = -1;
    return c;
  }
  c.scratch = static_cast<int>((want_scratch < avail ? want_scratch : avail) / 4 * 4);
  c.smem = (fixed + c.scratch) * 4;
  return c;
}

template <typename T, int VB, bool NHWC>
__device__ __forceinline__ void em_generic_body(const EMParams& p, const EmGenericCfg& c) {
  float* sm = reinterpret_cast<float*>(ck_dyn_smem());
  float* w = sm;  // E-step weight (v_fg - v_bg) / sigma
  float* Sf = w + c.dpad;
  float* Sb = Sf + c.dpad;
  float* x = Sb + c.dpad;  // tile dot products
  float* q = x + c.tpad;   // tile sums of squares (cosine)
  float* u = q + c.tpad;   // tile M-step coefficients
  float* ub = u + c.tpad;
  float* red = ub + c.tpad;
  float* scr = red + 64;

  const int t = ck_tid(), nt = ck_nthreads();
  const int64_t r = ck_bid();  // row r = b * K + k: image b, its k-th class
  const int64_t b = r / p.K;
  const int d = static_cast<int>(p.f.d), N = static_cast<int>(p.f.N);
  const T* F = static_cast<const T*>(p.f.data) + b * p.f.stride_b;
  const int64_t pitch = NHWC ? p.f.stride_n : p.f.stride_d;
  const bool cosine = p.cosine;
  // The centroids live in this row of the outputs: what they hold at the end
  // is what the last E-step used, which is what the op returns.
  float* vf = p.fg_out + r * d;
  float* vb = p.bg_out + r * d;
  float* zrow = p.z_fg + r * N;
  float* orow = p.out + r * N;
  // The CAM: given, or computed below into `out` (raw features, no bias), which
  // then holds it until the final write. The last E-step then parks its logits
  // in z_fg (Z_fg and Z_bg are recomputed from them, bit-identically).
  const bool cam_in_out = p.cam == nullptr;
  const float* cam = cam_in_out ? orow : p.cam + r * N;

  // E-step dot products of tile [i0, i0 + tl) into x (and q).
  auto tile_e = [&](int i0, int tl, bool sq) {
    if (NHWC) {
      const T* A = F + static_cast<int64_t>(i0) * pitch;
      if (sq)
        row_reduce<T, VB, 1, true>(A, pitch, tl, d, Coefs<1>{{w}}, c.g_row, Outs<2>{{x, q}}, false);
      else
        row_reduce<T, VB, 1, false>(A, pitch, tl, d, Coefs<1>{{w}}, c.g_row, Outs<1>{{x}}, false);
    } else {
      const T* A = F + i0;
      if (sq)
        col_reduce<T, VB, 1, true>(A, pitch, d, tl, Coefs<1>{{w}}, Outs<2>{{x, q}}, false, scr, c.scratch);
      else
        col_reduce<T, VB, 1, false>(A, pitch, d, tl, Coefs<1>{{w}}, Outs<1>{{x}}, false, scr, c.scratch);
    }
  };
  // Sf += sum_j u_j f_j, Sb += sum_j ub_j f_j over tile [i0, i0 + tl).
  auto tile_m = [&](int i0, int tl) {
    if (NHWC)
      col_reduce<T, VB, 2, false>(F + static_cast<int64_t>(i0) * pitch, pitch, tl, d, Coefs<2>{{u, ub}},
                                  Outs<2>{{Sf, Sb}}, true, scr, c.scratch);
    else
      row_reduce<T, VB, 2, false>(F + i0, pitch, d, tl, Coefs<2>{{u, ub}}, c.g_row, Outs<2>{{Sf, Sb}}, true);
  };
  auto normalize = [&](float* v) {  // cosine: v <- v / max(||v||, eps)
    float s = 0.f;
    for (int k = t; k < d; k += nt) s = fmaf(v[k], v[k], s);
    const float r = inv_norm<float>(block_sum(s, red));
    for (int k = t; k < d; k += nt) v[k] *= r;
    ck_sync();
  };

  // Passes alternate their tile order, so that each pass starts on the tiles
  // the previous one read last, the likeliest to still be in L2.
  const int ntiles = (N + c.tp - 1) / c.tp;
  int pass = 0;
  auto tile_start = [&](int tt, int pass_index) { return ((pass_index & 1) ? ntiles - 1 - tt : tt) * c.tp; };

  if (cam_in_out) {  // cam_i = W[labels[r]] . f_i, one pass
    const float* wrow = p.weight + p.labels[r] * d;
    for (int k = t; k < d; k += nt) w[k] = wrow[k];
    ck_sync();
    for (int tt = 0; tt < ntiles; ++tt) {
      const int i0 = tile_start(tt, pass), tl = N - i0 < c.tp ? N - i0 : c.tp;
      tile_e(i0, tl, false);
      if (t < tl) orow[i0 + t] = x[t];
      ck_sync();
    }
    ++pass;
  }
  float lo, hi;
  cam_range(cam, N, red, lo, hi);
  const float thr = cam_threshold<float>(lo, hi, p.ratio);

  // ---- initial centroids
  if (p.v_fg == nullptr) {  // training-free: CAM-masked means of the raw features
    float cnt = 0.f;
    for (int i = t; i < N; i += nt) cnt += cam_is_fg<float>(cam[i], lo, thr) ? 1.f : 0.f;
    cnt = block_sum(cnt, red);
    for (int k = t; k < d; k += nt) Sf[k] = Sb[k] = 0.f;
    for (int tt = 0; tt < ntiles; ++tt) {
      const int i0 = tile_start(tt, pass), tl = N - i0 < c.tp ? N - i0 : c.tp;
      if (t < tl) {
        const bool fg = cam_is_fg<float>(cam[i0 + t], lo, thr);
        u[t] = fg ? 1.f : 0.f;
        ub[t] = fg ? 0.f : 1.f;
      }
      ck_sync();
      tile_m(i0, tl);
    }
    ++pass;
    for (int k = t; k < d; k += nt) {
      vf[k] = masked_mean<float>(Sf[k], cnt);
      vb[k] = masked_mean<float>(Sb[k], static_cast<float>(N) - cnt);
    }
  } else {
    const int64_t row = p.v_by_label ? p.labels[r] : r;
    for (int k = t; k < d; k += nt) {
      vf[k] = p.v_fg[row * d + k];
      vb[k] = p.v_bg[row * d + k];
    }
  }
  ck_sync();
  if (cosine) {
    normalize(vf);
    normalize(vb);
  }

  // ---- temperature. sigma = auto (SPEC.md): s = population std of the
  // initial gaps Delta_i = (v_fg - v_bg) . f_i (f_i normalised for cosine),
  // sigma = s / 2; no similarity term (sigma +inf) when s <= 1e-6 max |Delta|.
  // One pass; the gaps wait in z_fg. The weight is then (v_fg - v_bg) / sigma,
  // a division (sigma may be tiny), as in the CPU kernel.
  // The temperature waits in shared memory (red[40], red[41]: block_all uses
  // red[0..32]) rather than in two registers live through the whole loop.
  float* temp = red + 40;  // [0] 1/sigma, [1] sigma = auto: sigma, 0 for a flat row
  if (p.sigma_auto) {
    for (int k = t; k < d; k += nt) w[k] = vf[k] - vb[k];
    ck_sync();
    float sum = 0.f, amax = 0.f;
    for (int tt = 0; tt < ntiles; ++tt) {
      const int i0 = tile_start(tt, pass), tl = N - i0 < c.tp ? N - i0 : c.tp;
      tile_e(i0, tl, cosine);
      if (t < tl) {
        const float delta = cosine ? inv_norm<float>(q[t]) * x[t] : x[t];
        zrow[i0 + t] = delta;
        sum += delta;
        const float a = fabsf(delta);
        amax = a > amax ? a : amax;
      }
      ck_sync();
    }
    ++pass;
    const float mu = block_sum(sum, red) / static_cast<float>(N);
    amax = block_max(amax, red);
    float var = 0.f;
    for (int i = t; i < N; i += nt) {
      const float e = zrow[i] - mu;
      var = fmaf(e, e, var);
    }
    const float sd = sqrtf(block_sum(var, red) / static_cast<float>(N));
    const bool flat = sd <= 1e-6f * amax;  // a NaN sd is not flat and propagates
    if (t == 0) {
      temp[1] = flat ? 0.f : sd / 2.f;
      temp[0] = flat ? 0.f : 1.f / temp[1];
      p.sigma_used[r] = flat ? kInf : temp[1];
    }
  } else if (t == 0) {
    temp[0] = 1.f / p.sigma;
    temp[1] = 0.f;
    p.sigma_used[r] = p.sigma;
  }
  ck_sync();

  // ---- iterations: E-step (+ M-step) in one pass over the tiles
  float a_fg = 0.5f, a_bg = 0.5f;
  float on_fg_fg = 0.f, on_fg_bg = 0.f;  // calibration sums of this thread (last E-step)
  for (int it = 1; it <= p.num_iters; ++it) {
    const bool mstep = it < p.num_iters;
    const float inv_sigma = temp[0], div = temp[1];
    for (int k = t; k < d; k += nt) {
      w[k] = !p.sigma_auto ? logit_weight<float>(vf[k], vb[k], inv_sigma)
             : div > 0.f   ? (vf[k] - vb[k]) / div
                           : (vf[k] - vb[k]) * 0.f;  // flat row: Z = a (NaN stays NaN)
      if (mstep) Sf[k] = Sb[k] = 0.f;
    }
    const float bias = logit_bias<float>(a_fg, a_bg);
    float mass_fg = 0.f, mass_bg = 0.f;
    ck_sync();
    for (int tt = 0; tt < ntiles; ++tt) {
      const int i0 = tile_start(tt, pass), tl = N - i0 < c.tp ? N - i0 : c.tp;
      tile_e(i0, tl, cosine);
      if (t < tl) {
        const int i = i0 + t;
        const float g = cosine ? inv_norm<float>(q[t]) : 1.f;
        const float logit = cosine ? bias + g * x[t] : bias + x[t];
        const float z = z_fg_of<float>(logit), zb = z_bg_of<float>(logit);
        if (mstep) {
          u[t] = cosine ? z * g : z;
          ub[t] = cosine ? zb * g : zb;
          mass_fg += z;
          mass_bg += zb;
        } else {
          if (cam_in_out) {
            zrow[i] = logit;  // `out` holds the CAM
          } else {
            zrow[i] = z;
            orow[i] = zb;  // Z_bg parked in `out` until calibration picks a branch
          }
          if (cam_is_fg<float>(cam[i], lo, thr)) {
            on_fg_fg += z;
            on_fg_bg += zb;
          }
        }
      }
      ck_sync();
      if (mstep) tile_m(i0, tl);
    }
    ++pass;
    if (mstep) {
      mass_fg = block_sum(mass_fg, red);
      mass_bg = block_sum(mass_bg, red);
      for (int k = t; k < d; k += nt) {
        vf[k] = m_step<float>(Sf[k], mass_fg, vf[k]);
        vb[k] = m_step<float>(Sb[k], mass_bg, vb[k]);
      }
      ck_sync();
      if (cosine) {
        normalize(vf);
        normalize(vb);
      }
      a_fg = mass_fg / static_cast<float>(N);
      a_bg = mass_bg / static_cast<float>(N);
    }
  }

  // ---- calibration (Eqs. 10-11) and output (Eq. 12)
  const float sf = block_sum(on_fg_fg, red);
  const float sb = block_sum(on_fg_bg, red);
  const bool picked = calibration_picks_fg<float>(sf, sb);
  for (int i = t; i < N; i += nt) {
    const float cn = cam_normalized<float>(cam[i], lo, hi);
    if (cam_in_out) {
      const float logit = zrow[i];
      const float z = z_fg_of<float>(logit), zb = z_bg_of<float>(logit);
      zrow[i] = z;
      orow[i] = reactivated<float>(picked, z, zb, cn);
    } else {
      orow[i] = reactivated<float>(picked, zrow[i], orow[i], cn);
    }
  }
  if (t == 0) {
    p.mix[2 * r] = a_fg;
    p.mix[2 * r + 1] = a_bg;
    p.picked_fg[r] = picked ? 1 : 0;
  }
}

// ============================================================ cluster variant
struct EmClusterCfg {
  int cs;         // CTAs per cluster (one cluster per image)
  int cl;         // channels per CTA
  int rown;       // most pixels owned by one CTA (ceil(N / cs)); CTA s owns [s*N/cs, (s+1)*N/cs)
  int rownp;      // rown rounded up to 4
  int npad;       // N rounded up to 4
  int clp;        // cl rounded up to 4
  int rows;       // rows of a CTA's slice: channels (NCHW) or pixels (channels_last)
  int rres;       // rows kept in shared memory; rows [rres, rows) are re-read from global memory (L2)
  int64_t pitch;  // row pitch (elements) of the shared-memory slice
  int64_t row_bytes;  // bytes of one row of the slice in global memory
  int g_smem;     // lanes per row of a row_reduce over the shared-memory rows
  int g_glob;     // lanes per row of a row_reduce over the global rows
  int keep;       // the slice is swept more than once (T > 1 or training-free)
  int nchunks;    // cp.async commit groups of the initial copy (<= 7)
  int scratch;    // floats of col_reduce scratch
  int64_t mat_bytes;
  // float offsets after the slice
  int off_w, off_vf, off_vb, off_sf, off_sb, off_xq, off_recv, off_uu, off_g, off_z, off_zb, off_slots, off_bar,
      off_red, off_scr;
  int64_t smem;  // dynamic shared memory bytes (<= 0: does not fit)
};

constexpr int kClusterThreads = 256;

// Configuration for cs CTAs per image within `smem_budget` bytes of shared
// memory per CTA: as many rows of the slice resident as fit (all of them when
// possible, trading col_reduce scratch for residency first).
// g_min: the least lanes per row of the shared-memory row_reduce; 0 = the
// default (row_lanes), which pads the row pitch against bank conflicts. With
// g_min >= 128 / VB a row's lanes cover whole 128-byte wavefronts and the rows
// need no padding (channels_last 28x28 bf16: 784 rows of 256 bytes, 213 KB
// padded to 272 bytes a row, 200 KB unpadded).
inline EmClusterCfg make_cluster_cfg(int64_t d, int64_t N, int elem, int VB, bool nhwc, int num_iters, bool trainfree,
                                     bool cosine, int nt, int cs, int64_t smem_budget, int g_min = 0) {
  EmClusterCfg c{};
  c.smem = -1;
  const int V = VB / elem;
  c.cs = cs;
  int64_t cl = ceil_div(d, cs);
  if (nhwc) cl = round_up(cl, V);  // keeps each CTA's first channel vector-aligned
  if ((cs - 1) * cl >= d) return c;  // some CTA would own no channel: use fewer CTAs
  if (N < cs) return c;              // some CTA would own no pixel (the exchange needs every CTA to own one)
  if (8 * N >= (int64_t(1) << 20)) return c;  // an mbarrier phase counts < 2^20 bytes (8 per pixel at most)
  c.cl = static_cast<int>(cl);
  c.clp = static_cast<int>(round_up(cl, 4));
  c.rown = static_cast<int>(ceil_div(N, cs));
  c.rownp = static_cast<int>(round_up(c.rown, 4));
  c.npad = static_cast<int>(round_up(N, 4));
  c.keep = (num_iters > 1 || trainfree) ? 1 : 0;
  c.nchunks = 4;
  const int64_t rows = nhwc ? N : cl, cols = nhwc ? cl : N;
  c.rows = static_cast<int>(rows);
  c.row_bytes = cols * elem;
  const int ncv = static_cast<int>(ceil_div(cols, V));
  c.g_smem = row_lanes(static_cast<int>(rows), ncv, nt, false);
  if (g_min > c.g_smem) c.g_smem = g_min < pow2_at_least(ncv) ? g_min : pow2_at_least(ncv);
  c.g_glob = row_lanes(static_cast<int>(rows), ncv, nt, true);
  c.pitch = smem_pitch(cols, elem, VB, c.g_smem);
  int off = 0;
  c.off_w = off;
  off += c.clp;
  c.off_vf = off;
  off += c.clp;
  c.off_vb = off;
  off += c.clp;
  c.off_sf = off;
  off += c.clp;
  c.off_sb = off;
  off += c.clp;
  c.off_xq = off;
  off += 2 * c.npad;
  c.off_recv = off;
  off += cs * 2 * c.rownp;
  c.off_uu = off;
  off += 2 * c.npad;
  c.off_g = off;
  off += c.rownp;
  c.off_z = off;
  off += c.rownp;
  c.off_zb = off;
  off += c.rownp;
  c.off_slots = off;
  off += static_cast<int>(round_up(3 * 2 * cs, 4));
  c.off_bar = off;  // three 8-byte mbarriers (16-byte aligned)
  off += 8;
  c.off_red = off;
  off += 64;
  c.off_scr = off;
  // col_reduce scratch: the E-step for NCHW (columns = N pixels, 1 or 2
  // outputs), the M-step for channels_last (columns = cl channels, 2 outputs).
  const int64_t L = nhwc ? cl : N;
  const int64_t ncv_c = ceil_div(L, V);
  const int64_t R = nhwc ? N : cl;
  int64_t rg = ncv_c < nt ? nt / ncv_c : 1;
  if (rg > R) rg = R;
  const int no = nhwc ? 2 : (cosine ? 2 : 1);
  const int64_t want = round_up(rg > 1 ? rg * no * ncv_c * V : 0, 4);
  const int64_t fixed = int64_t(off) * 4;
  if (fixed > smem_budget) return c;
  const int64_t row_smem = c.pitch * elem;
  const int64_t full = round_up(rows * row_smem, 16);
  int64_t scratch = 0, rres = 0;
  if (!c.keep) {
    scratch = want * 4 <= smem_budget - fixed ? want : (smem_budget - fixed) / 16 * 4;
  } else if (full + fixed + want * 4 <= smem_budget) {
    rres = rows;
    scratch = want;
  } else if (full + fixed <= smem_budget) {
    rres = rows;
    scratch = (smem_budget - fixed - full) / 16 * 4;
  } else {
    scratch = want * 4 <= smem_budget - fixed ? want : (smem_budget - fixed) / 16 * 4;
    rres = (smem_budget - fixed - scratch * 4) / row_smem;
    while (rres > 0 && round_up(rres * row_smem, 16) + fixed + scratch * 4 > smem_budget) --rres;
  }
  c.rres = static_cast<int>(rres);
  c.scratch = static_cast<int>(scratch);
  c.mat_bytes = round_up(rres * row_smem, 16);
  c.smem = c.mat_bytes + fixed + int64_t(c.scratch) * 4;
  return c;
}

template <typename T, int VB, bool NHWC>
__device__ __forceinline__ void em_cluster_body(const EMParams& p, const EmClusterCfg& c) {
#if defined(CK_HAS_CLUSTERS)
  constexpr int V = VB / static_cast<int>(sizeof(T));
  unsigned char* base = ck_dyn_smem();
  T* mat = reinterpret_cast<T*>(base);
  float* fl = reinterpret_cast<float*>(base + c.mat_bytes);
  float* w = fl + c.off_w;
  float* vf = fl + c.off_vf;
  float* vb = fl + c.off_vb;
  float* Sf = fl + c.off_sf;
  float* Sb = fl + c.off_sb;
  float* xq = fl + c.off_xq;      // [2][npad] partial logits (and sums of squares) over this CTA's channels
  float* recv = fl + c.off_recv;  // [cs][2][rownp] partials pushed by each CTA for the pixels this CTA owns
  float* uu = fl + c.off_uu;      // [2][npad] M-step coefficients of every pixel, pushed by their owners
  float* og = fl + c.off_g;       // [rownp] inverse pixel norms (cosine) of owned pixels
  float* oz = fl + c.off_z;       // [rownp] last Z_fg of owned pixels
  float* ozb = fl + c.off_zb;     // [rownp] last Z_bg of owned pixels
  float* slots = fl + c.off_slots;  // [3][cs][2]: masses, calibration sums, centroid norms
  uint64_t* bars = reinterpret_cast<uint64_t*>(fl + c.off_bar);
  uint64_t* barX = bars;      // phase: the partial logits of this CTA's pixels have arrived
  uint64_t* barU = bars + 1;  // phase: the M-step coefficients and masses (or calibration sums) have arrived
  uint64_t* barN = bars + 2;  // phase: the centroid norm partials (cosine) have arrived
  float* red = fl + c.off_red;
  float* scr = fl + c.off_scr;

  const int t = ck_tid(), nt = ck_nthreads();
  const int cs = c.cs, rank = ck_cluster_rank();
  const int64_t b = ck_bid() / cs;
  const int d = static_cast<int>(p.f.d), N = static_cast<int>(p.f.N);
  const int k0 = rank * c.cl;
  const int Cr = d - k0 < c.cl ? (d - k0 > 0 ? d - k0 : 0) : c.cl;  // channels of this CTA
  // Pixels owned: CTA s owns [start(s), start(s + 1)), at least one (N >= cs).
  auto start = [&](int s) { return static_cast<int>(static_cast<int64_t>(s) * N / cs); };
  auto owner = [&](int i) { return static_cast<int>((static_cast<int64_t>(i + 1) * cs - 1) / N); };
  const int o0 = start(rank);
  const int nown = start(rank + 1) - o0;
  const T* Fb = static_cast<const T*>(p.f.data) + b * p.f.stride_b;
  // This CTA's slice: NCHW rows = its channels, columns = pixels;
  // channels_last rows = pixels, columns = its channels.
  const int64_t gpitch = NHWC ? p.f.stride_n : p.f.stride_d;
  const T* gslice = NHWC ? Fb + k0 : Fb + static_cast<int64_t>(k0) * gpitch;
  const int rows = NHWC ? N : Cr, cols = NHWC ? Cr : N;
  const int rres = c.keep ? (c.rres < rows ? c.rres : rows) : 0;  // rows resident in shared memory
  const bool trainfree = p.v_fg == nullptr;
  const bool cosine = p.cosine;
  const float* cam = p.cam + b * N;
  const float inv_sigma = 1.f / p.sigma;

  // E-step partials over rows [r0, r1) of the slice in A (shared or global memory).
  auto e_sweep_in = [&](const T* A, int64_t apitch, int G, int r0, int r1, bool sq, bool accumulate) {
    const T* A0 = A + static_cast<int64_t>(r0) * apitch;
    if (NHWC) {
      if (sq)
        row_reduce<T, VB, 1, true>(A0, apitch, r1 - r0, Cr, Coefs<1>{{w}}, G, Outs<2>{{xq + r0, xq + c.npad + r0}},
                                   false);
      else
        row_reduce<T, VB, 1, false>(A0, apitch, r1 - r0, Cr, Coefs<1>{{w}}, G, Outs<1>{{xq + r0}}, false);
    } else {
      if (sq)
        col_reduce<T, VB, 1, true>(A0, apitch, r1 - r0, N, Coefs<1>{{w + r0}}, Outs<2>{{xq, xq + c.npad}}, accumulate,
                                   scr, c.scratch);
      else
        col_reduce<T, VB, 1, false>(A0, apitch, r1 - r0, N, Coefs<1>{{w + r0}}, Outs<1>{{xq}}, accumulate, scr,
                                    c.scratch);
    }
  };
  // M-step sums over rows [r0, r1) of the slice in A (shared or global memory).
  auto m_sweep_in = [&](const T* A, int64_t apitch, int G, int r0, int r1, bool accumulate) {
    const T* A0 = A + static_cast<int64_t>(r0) * apitch;
    if (NHWC)
      col_reduce<T, VB, 2, false>(A0, apitch, r1 - r0, Cr, Coefs<2>{{uu + r0, uu + c.npad + r0}}, Outs<2>{{Sf, Sb}},
                                  accumulate, scr, c.scratch);
    else
      row_reduce<T, VB, 2, false>(A0, apitch, r1 - r0, N, Coefs<2>{{uu, uu + c.npad}}, G, Outs<2>{{Sf + r0, Sb + r0}},
                                  false);
  };
  // Whole-slice sweeps: the resident rows from shared memory, the others from
  // global memory (L2 after the first pass). Separate calls per source, so each
  // compiles to plain shared (or global) loads rather than generic ones.
  auto e_sweep = [&](bool sq) {
    e_sweep_in(mat, c.pitch, c.g_smem, 0, rres, sq, false);
    if (rres < rows) e_sweep_in(gslice, gpitch, c.g_glob, rres, rows, sq, true);
  };
  auto m_sweep = [&]() {
    m_sweep_in(mat, c.pitch, c.g_smem, 0, rres, false);
    if (rres < rows) m_sweep_in(gslice, gpitch, c.g_glob, rres, rows, true);
  };
  // The exchange (no cluster barrier in the loop): each kind of message has an
  // mbarrier in every CTA; a sender st.async-s its values into the peer's
  // buffer, each store completing its bytes on the peer's mbarrier, and writes
  // its own share locally; the receiver announces the peers' byte count
  // (ck_mbar_expect), then waits for the phase. The messages follow one fixed
  // sequence (X, U, [N], X, U, [N], ...), never the same kind twice in a row,
  // and every step is all-to-all (every CTA owns a pixel and sends every peer
  // its partials, coefficients and sums). So a CTA sends its step-n+1 data
  // only after it received every peer's step-n data, which each peer sent
  // after finishing its own step n-1 (reads of the buffers included): one
  // buffer per kind suffices, and no phase can receive the next phase's bytes.
  int phX = 0, phU = 0, phN = 0;
  auto finish = [&](uint64_t* bar, int& ph, unsigned bytes) {
    if (t == 0) ck_mbar_expect(bar, bytes);
    ck_sync();  // this CTA's local share is written
    ck_mbar_wait(bar, ph & 1);
    ++ph;
  };
  // Push (a, b) to slot `kind` of every CTA (threads 0..cs-1, one peer each).
  auto push2 = [&](int kind, float a, float bsum, uint64_t* bar, int ph) {
    if (t < cs) {
      float* dst = slots + (kind * cs + rank) * 2;
      if (t == rank) {
        dst[0] = a;
        dst[1] = bsum;
      } else {
        ck_st_async2(dst, t, a, bsum, bar, ph);
      }
    }
  };
  // Sum over the cluster of the pairs in slot `kind`, in rank order (the same
  // bits in every CTA).
  auto slot_sum = [&](int kind, float& ra, float& rb) {
    ra = 0.f;
    rb = 0.f;
    for (int s = 0; s < cs; ++s) {
      ra += slots[(kind * cs + s) * 2];
      rb += slots[(kind * cs + s) * 2 + 1];
    }
  };
  auto normalize = [&]() {  // cosine: both centroids to unit norm over all d channels
    float sf = 0.f, sb = 0.f;
    for (int k = t; k < Cr; k += nt) {
      sf = fmaf(vf[k], vf[k], sf);
      sb = fmaf(vb[k], vb[k], sb);
    }
    sf = block_sum(sf, red);
    sb = block_sum(sb, red);
    push2(2, sf, sb, barN, phN);
    finish(barN, phN, 8u * static_cast<unsigned>(cs - 1));
    float tf, tb;
    slot_sum(2, tf, tb);
    const float rf = inv_norm<float>(tf), rb = inv_norm<float>(tb);
    for (int k = t; k < Cr; k += nt) {
      vf[k] *= rf;
      vb[k] *= rb;
    }
    ck_sync();
  };
  auto set_weight = [&]() {
    for (int k = t; k < Cr; k += nt) w[k] = logit_weight<float>(vf[k], vb[k], inv_sigma);
    ck_sync();
  };

  if (t == 0) {
    ck_mbar_init(barX);
    ck_mbar_init(barU);
    ck_mbar_init(barN);
    ck_fence_mbar_init();
  }
  ck_cluster_arrive_relaxed();

  // 1. Start copying the resident rows into shared memory, in nchunks chunks.
  const int rc = (rres + c.nchunks - 1) / c.nchunks;
  if (c.keep) {
    const int ncv = (cols + V - 1) / V;
    for (int ch = 0; ch < c.nchunks; ++ch) {
      const int r0 = ch * rc < rres ? ch * rc : rres;
      const int r1 = r0 + rc < rres ? r0 + rc : rres;
      const int64_t total = static_cast<int64_t>(r1 - r0) * ncv;
      for (int64_t e = t; e < total; e += nt) {
        const int rr = static_cast<int>(e / ncv);
        const int cv = static_cast<int>(e - static_cast<int64_t>(rr) * ncv);
        const int r = r0 + rr;
        const T* src = gslice + static_cast<int64_t>(r) * gpitch + cv * V;
        T* dst = mat + static_cast<int64_t>(r) * c.pitch + cv * V;
        if constexpr (VB >= 4) {
          const int n = cols - cv * V < V ? cols - cv * V : V;
          ck_cp_async<VB>(dst, src, n * static_cast<int>(sizeof(T)));
        } else {
          *dst = *src;
        }
      }
      ck_cp_commit();
    }
  }

  // 2. Local setup while the copies are in flight.
  float lo, hi;
  cam_range(cam, N, red, lo, hi);
  const float thr = cam_threshold<float>(lo, hi, p.ratio);
  float cnt = 0.f;
  if (trainfree) {
    for (int i = t; i < N; i += nt) {
      const bool fg = cam_is_fg<float>(cam[i], lo, thr);
      cnt += fg ? 1.f : 0.f;
      uu[i] = fg ? 1.f : 0.f;  // masked-sum coefficients (local: peers write uu only after barrier #1)
      uu[c.npad + i] = fg ? 0.f : 1.f;
    }
    cnt = block_sum(cnt, red);
  } else {
    const int64_t row = p.v_by_label ? p.labels[b] : b;  // (K = 1: row = image)
    for (int k = t; k < Cr; k += nt) {
      vf[k] = p.v_fg[row * d + k0 + k];
      vb[k] = p.v_bg[row * d + k0 + k];
    }
  }
  ck_cluster_wait();  // every CTA of the cluster runs: distributed shared memory is usable
  ck_sync();

  if (!trainfree) {
    if (cosine) normalize();
    set_weight();
  }
  // 3. The first sweep: over each resident chunk as it lands, then over the
  // rows that stay in global memory. It is the E-step with given centroids,
  // the masked sums of the training-free start otherwise.
  for (int ch = 0; ch < c.nchunks; ++ch) {
    if (c.keep) ck_cp_wait(c.nchunks - 1 - ch);
    ck_sync();
    const int r0 = ch * rc < rres ? ch * rc : rres;
    const int r1 = r0 + rc < rres ? r0 + rc : rres;
    if (trainfree)
      m_sweep_in(mat, c.pitch, c.g_smem, r0, r1, ch > 0);
    else
      e_sweep_in(mat, c.pitch, c.g_smem, r0, r1, cosine, ch > 0);
  }
  if (rres < rows) {
    if (trainfree)
      m_sweep_in(gslice, gpitch, c.g_glob, rres, rows, true);
    else
      e_sweep_in(gslice, gpitch, c.g_glob, rres, rows, cosine, true);
  }
  if (trainfree) {
    for (int k = t; k < Cr; k += nt) {
      vf[k] = masked_mean<float>(Sf[k], cnt);
      vb[k] = masked_mean<float>(Sb[k], static_cast<float>(N) - cnt);
    }
    ck_sync();
    if (cosine) normalize();
    set_weight();
  }

  // 4. Iterations.
  float a_fg = 0.5f, a_bg = 0.5f;
  for (int it = 1; it <= p.num_iters; ++it) {
    const bool mstep = it < p.num_iters;
    const bool sq = cosine && it == 1;
    if (it > 1 || trainfree) e_sweep(sq);  // (iteration 1 of given centroids ran in step 3)
    // reduce-scatter: the partials of pixel i go to its owner
    for (int i = t; i < N; i += nt) {
      const int s = owner(i);
      float* dst = recv + (rank * 2) * c.rownp + (i - start(s));
      if (s == rank) {
        dst[0] = xq[i];
        if (sq) dst[c.rownp] = xq[c.npad + i];
      } else {
        ck_st_async(dst, s, xq[i], barX, phX);
        if (sq) ck_st_async(dst + c.rownp, s, xq[c.npad + i], barX, phX);
      }
    }
    finish(barX, phX, 4u * static_cast<unsigned>((cs - 1) * nown * (sq ? 2 : 1)));

    const float bias = logit_bias<float>(a_fg, a_bg);
    float s1 = 0.f, s2 = 0.f;  // masses (M-step) or calibration sums (last E-step)
    for (int j = t; j < nown; j += nt) {
      float xs = 0.f;
      for (int s = 0; s < cs; ++s) xs += recv[(s * 2) * c.rownp + j];
      if (sq) {
        float qs = 0.f;
        for (int s = 0; s < cs; ++s) qs += recv[(s * 2 + 1) * c.rownp + j];
        og[j] = inv_norm<float>(qs);
      }
      const float g = cosine ? og[j] : 1.f;
      const float logit = cosine ? bias + g * xs : bias + xs;
      const float z = z_fg_of<float>(logit), zb = z_bg_of<float>(logit);
      if (mstep) {
        const float cu = cosine ? z * g : z, cub = cosine ? zb * g : zb;
        for (int s = 0; s < cs; ++s) {
          if (s == rank) {
            uu[o0 + j] = cu;
            uu[c.npad + o0 + j] = cub;
          } else {
            ck_st_async(uu + o0 + j, s, cu, barU, phU);
            ck_st_async(uu + c.npad + o0 + j, s, cub, barU, phU);
          }
        }
        s1 += z;
        s2 += zb;
      } else {
        oz[j] = z;
        ozb[j] = zb;
        if (cam_is_fg<float>(cam[o0 + j], lo, thr)) {
          s1 += z;
          s2 += zb;
        }
      }
    }
    s1 = block_sum(s1, red);
    s2 = block_sum(s2, red);
    push2(mstep ? 0 : 1, s1, s2, barU, phU);
    finish(barU, phU, 8u * static_cast<unsigned>(cs - 1 + (mstep ? N - nown : 0)));
    float t1, t2;
    slot_sum(mstep ? 0 : 1, t1, t2);

    if (mstep) {
      m_sweep();
      for (int k = t; k < Cr; k += nt) {
        vf[k] = m_step<float>(Sf[k], t1, vf[k]);
        vb[k] = m_step<float>(Sb[k], t2, vb[k]);
      }
      ck_sync();
      if (cosine) normalize();  // barrier #3
      a_fg = t1 / static_cast<float>(N);
      a_bg = t2 / static_cast<float>(N);
      set_weight();
    } else {
      const bool picked = calibration_picks_fg<float>(t1, t2);
      for (int j = t; j < nown; j += nt) {
        const int64_t i = b * N + o0 + j;
        p.out[i] = reactivated<float>(picked, oz[j], ozb[j], cam_normalized<float>(cam[o0 + j], lo, hi));
        p.z_fg[i] = oz[j];
      }
      for (int k = t; k < Cr; k += nt) {
        p.fg_out[b * d + k0 + k] = vf[k];
        p.bg_out[b * d + k0 + k] = vb[k];
      }
      if (rank == 0 && t == 0) {
        p.mix[2 * b] = a_fg;
        p.mix[2 * b + 1] = a_bg;
        p.picked_fg[b] = picked ? 1 : 0;
        p.sigma_used[b] = p.sigma;
      }
    }
  }
  // Every store into this CTA's shared memory has landed (the last phase of
  // barU), but this CTA's own stores to its peers may still be in flight: no
  // CTA exits before all have arrived here (the one cluster barrier after the
  // start; no data is ordered by it, so its arrive is relaxed).
  ck_cluster_arrive_relaxed();
  ck_cluster_wait();
#else
  (void)p;
  (void)c;
#endif
}

// ============================================================ variant choice
// Host-side and free of CUDA calls (the occupancy query comes in as `occ`), so
// the emulation test can print the plans of the benchmark shapes.
struct PlanDevice {
  int cc_major = 0, cc_minor = 0, sms = 1;
  int64_t max_smem = 48 * 1024, smem_per_sm = 48 * 1024, l2_bytes = 0;
};

struct EmPlan {
  bool cluster = false;   // run the cluster kernel with cfg
  EmClusterCfg cfg{};
  int clusters = 0;       // clusters resident at once (occupancy query)
  int ctas_per_sm = 0;    // what the plan's shared memory allows: 2 or 1
  std::string rule;       // which rule of plan_em picked it
  std::string why;        // why the generic kernel runs, when !cluster
};

// Why the cluster kernel cannot run these inputs at all ("" when it can).
inline std::string cluster_unsupported(const EMParams& p, const PlanDevice& dev) {
  if (dev.cc_major < 9)
    return "thread-block clusters need compute capability 9.0 (this device: " + std::to_string(dev.cc_major) + "." +
           std::to_string(dev.cc_minor) + ")";
  if (p.K != 1) return "K > 1 classes per image (the cluster kernel runs one row per image)";
  if (p.weight != nullptr) return "the CAM from the classifier weight (computed by the generic kernel only)";
  if (p.sigma_auto) return "sigma = auto (implemented in the generic kernel only)";
  return "";
}

// Cluster size and residency, in order of preference (each checked with the
// occupancy query `occ(cfg)` -> clusters resident at once, before it is taken):
//  A. the slice fits whole in half an SM's shared memory (two CTAs per SM, so
//     one CTA's loads overlap the other's sweeps): the smallest such cs,
//     raised until the batch gives every SM a CTA (B * cs >= SMs; batch 1
//     spreads one image over 16 SMs);
//  C. the whole slice in one CTA per SM (up to 227 KB);
//  B. 16 CTAs (then 8) per image, two per SM, each keeping what fits of its
//     slice in shared memory and re-reading the other rows from L2 (read from
//     HBM in the first sweep), when the re-read rows of all the CTAs resident
//     at once fit in half the L2;
//  D. the same with one CTA per SM (more rows resident, fewer CTAs).
//  Otherwise the generic kernel. A and C read F from HBM exactly once; B and D
//  rely on L2 keeping the re-read rows, hence after C. (ResNet50 28x28: bf16
//  NCHW and channels_last take C; fp32 takes D where the L2 holds the re-read
//  rows, i.e. 132 CTAs x 63 rows x 3136 bytes = 26 MB within half the L2.)
//  With a row pitch padded against bank conflicts a whole slice can miss the
//  budget by the padding (channels_last 28x28 bf16: 213 KB padded, 200 KB
//  not): then the row_reduce takes enough lanes per row to need no padding.
template <class Occ>
EmPlan plan_em(const EMParams& p, const PlanDevice& dev, Occ&& occ) {
  EmPlan plan;
  plan.why = cluster_unsupported(p, dev);
  if (!plan.why.empty()) return plan;
  const FeatureView& f = p.f;
  const int elem = elem_bytes(f.dtype);
  const int vb = pick_vb(f);
  const bool nhwc = is_nhwc(f);
  const bool trainfree = p.v_fg == nullptr;
  const int sizes[] = {1, 2, 4, 8, 16};
  const int64_t half_sm = std::min<int64_t>(dev.max_smem, dev.smem_per_sm / 2 - 1024);
  auto cfg_for = [&](int cs, int64_t budget) {
    EmClusterCfg a =
        make_cluster_cfg(f.d, f.N, elem, vb, nhwc, p.num_iters, trainfree, p.cosine, kClusterThreads, cs, budget);
    if (vb >= 4 && (a.smem <= 0 || (a.keep && a.rres < a.rows))) {
      EmClusterCfg w = make_cluster_cfg(f.d, f.N, elem, vb, nhwc, p.num_iters, trainfree, p.cosine, kClusterThreads,
                                        cs, budget, 128 / vb);
      if (w.smem > 0 && (a.smem <= 0 || w.rres > a.rres)) return w;
    }
    return a;
  };
  auto whole = [](const EmClusterCfg& c) { return c.smem > 0 && (!c.keep || c.rres >= c.rows); };
  struct Cand {
    EmClusterCfg c;
    int per_sm;
    const char* rule;
  };
  std::vector<Cand> order;
  // A
  int first = -1;
  for (int i = 0; i < 5 && first < 0; ++i)
    if (whole(cfg_for(sizes[i], half_sm))) first = i;
  if (first >= 0) {
    int want = first;
    while (want < 4 && f.B * sizes[want] < dev.sms && whole(cfg_for(sizes[want + 1], half_sm))) ++want;
    for (int i = want; i >= first; --i)
      order.push_back({cfg_for(sizes[i], half_sm), 2, "A: whole slice, two CTAs per SM"});
  }
  // C
  for (int i = 0; i < 5; ++i) {
    const EmClusterCfg c = cfg_for(sizes[i], dev.max_smem);
    if (whole(c)) {
      order.push_back({c, 1, "C: whole slice, one CTA per SM"});
      break;
    }
  }
  // B, D
  int64_t least_reread = -1;
  for (int per_sm : {2, 1}) {
    for (int cs : {16, 8}) {
      const EmClusterCfg c = cfg_for(cs, per_sm == 2 ? half_sm : dev.max_smem);
      if (c.smem <= 0 || whole(c)) continue;
      const int64_t ctas = std::min<int64_t>(f.B * cs, per_sm * int64_t(dev.sms));
      const int64_t reread = ctas * int64_t(c.rows - c.rres) * c.row_bytes;
      if (least_reread < 0 || reread < least_reread) least_reread = reread;
      if (reread <= dev.l2_bytes / 2)
        order.push_back({c, per_sm,
                         per_sm == 2 ? "B: partly resident, two CTAs per SM" : "D: partly resident, one CTA per SM"});
    }
  }
  for (const Cand& cand : order) {
    const int n = occ(cand.c);
    if (n >= 1) {
      plan.cluster = true;
      plan.cfg = cand.c;
      plan.clusters = n;
      plan.ctas_per_sm = cand.per_sm;
      plan.rule = cand.rule;
      return plan;
    }
  }
  if (!order.empty()) {
    plan.why = "the device cannot schedule a cluster with the shared memory this shape needs";
  } else if (f.N < 2) {
    plan.why = "a map of one pixel";
  } else {
    const double mb = 1.0 / (1024.0 * 1024.0);
    const int64_t image = f.d * f.N * elem;
    plan.why = "an image's map (" + std::to_string(image * mb).substr(0, 6) +
               " MB) fits neither in the shared memory of 16 CTAs nor partly, with the rows re-read by all resident "
               "CTAs in half the L2 (" +
               (least_reread < 0 ? std::string("no partial plan") : std::to_string(least_reread * mb).substr(0, 6) + " MB") +
               " > " + std::to_string(dev.l2_bytes / 2 * mb).substr(0, 6) + " MB)";
  }
  return plan;
}

}  // namespace cuda
}  // namespace cream
