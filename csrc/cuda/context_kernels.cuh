// Context embedding update (SPEC.md Op 1) on the GPU.
//
// Stats (per sample b): the CAM foreground mask, then the masked channel means
// mean_fg_b, mean_bg_b. A work item is (sample, channel chunk); with a given
// CAM the chunks are independent (each CTA recomputes the sample's CAM range,
// N floats from L2), so even a small batch fills the GPU and the features are
// read from HBM once. With the classifier weight the CAM is cam_i = W[y_b].f_i
// over all channels, so an item is a whole sample and makes two passes in
// pixel tiles: pass A computes the CAM (only its min and max are kept), pass B
// recomputes each tile's CAM with the same code (bit-identical values, so the
// same mask as the min/max saw) and accumulates the masked sums. The second
// pass hits L2 only for small batches; see em_kernels.cuh for the tile loops.
//
// Apply: emb_m[y_b] <- lambda * emb_m[y_b] + (1 - lambda) * mean_m_b in batch
// order. Updates of different classes commute, so the work item is (the first
// sample of a class in the batch, a channel chunk): its threads walk the batch
// from there and fold that class's samples in batch order, one element per
// thread. That is exactly the sequential loop of SPEC.md for every table
// element (the same float operations in the same order), with no atomics, and
// it runs in parallel over classes and channels.
//
// context_update_cuda is one cooperative kernel: every CTA does stats items,
// a grid-wide barrier (cooperative_groups; its state comes from the driver,
// so no counter has to be zeroed), then apply items. So the means make one
// round trip through the O(B*d) workspace and nothing else waits on the host.
// Grid = resident CTAs (512 threads, two per SM), items taken in a strided
// loop; the stats items split channels so that B * nsplit >= 2 x SMs.
//
// Target (batch 256, >= 70% of the HBM roofline of one read of F): with a
// given CAM the features are read once, coalesced, 16-byte loads, in items of
// ~400 KB to 1.6 MB, so the stats phase should run near the copy bandwidth;
// the apply phase adds ~2 x B x d x 4 bytes of traffic (<5% at 2048 channels)
// and a grid barrier. With the classifier weight the CAM needs every channel
// before any pixel can be classified: two passes (the second from HBM at
// batch 256), about 50%. Reaching 70% there needs the features on chip per
// sample (a cluster variant as for EM: channel slices in shared memory,
// partial CAMs reduced through distributed shared memory) or a per-sample
// workspace for partial CAMs.
#pragma once

#include "em_kernels.cuh"

namespace cream {
namespace cuda {

struct CtxCfg {
  int nsplit;   // channel chunks per sample in the stats phase (1 with a classifier weight)
  int chunk;    // channels per stats chunk
  int tp;       // pixel tile
  int g_e;      // lanes per row of the E-type row_reduce (channels_last CAM from the weight)
  int g_m;      // lanes per row of the M-type row_reduce (NCHW masked sums)
  int dpad, cpad, tpad;
  int scratch;  // floats
  int64_t n1;   // stats items = B * nsplit
  int apply_ch;  // channels per apply item (= threads per block)
  int64_t n2;   // apply items = B * ceil(d / apply_ch)
  int stage;    // labels and flags staged in shared memory for the apply phase
  int64_t smem_stats, smem_apply;
};

constexpr int kCtxThreads = 512;
constexpr int64_t kStageMaxB = 4096;  // apply phase: labels (int32) + flags staged when B <= this

inline CtxCfg make_ctx_cfg(int64_t B, int64_t d, int64_t N, int elem, int VB, bool nhwc, bool with_weight, int nt,
                           int64_t max_smem, int64_t target_items) {
  CtxCfg c{};
  const int V = VB / elem;
  c.tp = pixel_tile(N, elem, nhwc, nt);
  c.tpad = static_cast<int>(round_up(c.tp, 4));
  c.dpad = with_weight ? static_cast<int>(round_up(d, 4)) : 0;
  int64_t nsplit = 1;
  if (!with_weight && B > 0 && target_items > B) {
    nsplit = ceil_div(target_items, B);
    const int64_t most = ceil_div(d, 64);  // keep chunks >= 64 channels
    if (nsplit > most) nsplit = most;
    if (nsplit < 1) nsplit = 1;
  }
  int64_t chunk = ceil_div(d, nsplit);
  if (nhwc) chunk = round_up(chunk, V);  // vector-aligned chunk starts
  c.nsplit = static_cast<int>(ceil_div(d, chunk));
  c.chunk = static_cast<int>(chunk);
  c.cpad = static_cast<int>(round_up(chunk, 4));
  c.n1 = B * c.nsplit;
  // row_reduce lane counts (global memory)
  c.g_e = row_lanes(c.tp, static_cast<int>(ceil_div(d, V)), nt, true);  // rows = tile pixels, columns = d
  c.g_m = row_lanes(static_cast<int>(chunk), static_cast<int>(ceil_div(c.tp, V)), nt, true);  // rows = channels
  const int64_t fixed = c.dpad + 2 * int64_t(c.cpad) + 3 * int64_t(c.tpad) + 64;
  const int64_t want_scratch = 2 * int64_t(nt) * (16 / elem);
  const int64_t avail = max_smem / 4 - fixed;
  if (avail < 0) {
    c.smem_stats = -1;
  } else {
    c.scratch = static_cast<int>((want_scratch < avail ? want_scratch : avail) / 4 * 4);
    c.smem_stats = (fixed + c.scratch) * 4;
  }
  c.apply_ch = nt;
  c.n2 = B * ceil_div(d, c.apply_ch);
  c.stage = B <= kStageMaxB ? 1 : 0;
  c.smem_apply = c.stage ? round_up(B * 4 + 2 * B, 16) : 0;
  return c;
}

// Masked means of one (sample, channel chunk) item into p.means / p.nonempty.
template <typename T, int VB, bool NHWC>
__device__ __forceinline__ void ctx_stats_item(const ContextParams& p, const CtxCfg& c, int64_t item) {
  float* sm = reinterpret_cast<float*>(ck_dyn_smem());
  float* w = sm;  // classifier row W[y_b] (weight mode)
  float* Sf = w + c.dpad;
  float* Sb = Sf + c.cpad;
  float* x = Sb + c.cpad;
  float* u = x + c.tpad;
  float* ub = u + c.tpad;
  float* red = ub + c.tpad;
  float* scr = red + 64;

  const int t = ck_tid(), nt = ck_nthreads();
  const int64_t b = item / c.nsplit;
  const int chunk = static_cast<int>(item - b * c.nsplit);
  const int d = static_cast<int>(p.f.d), N = static_cast<int>(p.f.N);
  const int k0 = chunk * c.chunk;
  const int C = d - k0 < c.chunk ? d - k0 : c.chunk;
  const T* F = static_cast<const T*>(p.f.data) + b * p.f.stride_b;
  const int64_t pitch = NHWC ? p.f.stride_n : p.f.stride_d;
  const bool weight = p.weight != nullptr;

  auto tile_cam = [&](int i0, int tl) {  // x[j] = W[y_b] . f_{i0 + j}
    if (NHWC)
      row_reduce<T, VB, 1, false>(F + static_cast<int64_t>(i0) * pitch, pitch, tl, d, Coefs<1>{{w}}, c.g_e,
                                  Outs<1>{{x}}, false);
    else
      col_reduce<T, VB, 1, false>(F + i0, pitch, d, tl, Coefs<1>{{w}}, Outs<1>{{x}}, false, scr, c.scratch);
  };
  auto tile_sums = [&](int i0, int tl) {  // Sf += sum_j u_j f_j, Sb likewise, over this item's channels
    if (NHWC)
      col_reduce<T, VB, 2, false>(F + static_cast<int64_t>(i0) * pitch + k0, pitch, tl, C, Coefs<2>{{u, ub}},
                                  Outs<2>{{Sf, Sb}}, true, scr, c.scratch);
    else
      row_reduce<T, VB, 2, false>(F + static_cast<int64_t>(k0) * pitch + i0, pitch, C, tl, Coefs<2>{{u, ub}}, c.g_m,
                                  Outs<2>{{Sf, Sb}}, true);
  };

  for (int k = t; k < C; k += nt) Sf[k] = Sb[k] = 0.f;
  float lo, hi;
  if (weight) {
    const int64_t y = p.labels[b];
    for (int k = t; k < d; k += nt) w[k] = p.weight[y * d + k];
    ck_sync();
    float mn = kInf, mx = -kInf;
    for (int i0 = 0; i0 < N; i0 += c.tp) {  // pass A: the CAM's range
      const int tl = N - i0 < c.tp ? N - i0 : c.tp;
      tile_cam(i0, tl);
      if (t < tl) {
        mn = x[t] < mn ? x[t] : mn;
        mx = x[t] > mx ? x[t] : mx;
      }
      ck_sync();
    }
    lo = block_min(mn, red);
    hi = block_max(mx, red);
  } else {
    cam_range(p.cam + b * N, N, red, lo, hi);
  }
  const float thr = cam_threshold<float>(lo, hi, p.ratio);
  float cnt = 0.f;
  for (int i0 = 0; i0 < N; i0 += c.tp) {  // pass B (the only pass with a given CAM)
    const int tl = N - i0 < c.tp ? N - i0 : c.tp;
    if (weight) tile_cam(i0, tl);
    if (t < tl) {
      const float m = weight ? x[t] : p.cam[b * N + i0 + t];
      const bool fg = cam_is_fg<float>(m, lo, thr);
      u[t] = fg ? 1.f : 0.f;
      ub[t] = fg ? 0.f : 1.f;
      cnt += fg ? 1.f : 0.f;
    }
    ck_sync();
    tile_sums(i0, tl);
  }
  cnt = block_sum(cnt, red);
  const float cnt_bg = static_cast<float>(N) - cnt;
  float* mean = p.means + b * 2 * d;
  for (int k = t; k < C; k += nt) {
    mean[k0 + k] = masked_mean<float>(Sf[k], cnt);
    mean[d + k0 + k] = masked_mean<float>(Sb[k], cnt_bg);
  }
  if (chunk == 0 && t == 0) {
    p.nonempty[2 * b] = cnt > 0.f ? 1 : 0;
    p.nonempty[2 * b + 1] = cnt_bg > 0.f ? 1 : 0;
  }
  ck_sync();  // shared memory is reused by the next item
}

// Stage labels (int32) and flags of the whole batch in shared memory.
__device__ __forceinline__ void ctx_stage(const ContextParams& p, const CtxCfg& c, int*& lab, uint8_t*& flg) {
  const int64_t B = p.f.B;
  if (c.stage) {
    unsigned char* base = ck_dyn_smem();
    lab = reinterpret_cast<int*>(base);
    flg = base + B * 4;
    for (int64_t j = ck_tid(); j < B; j += ck_nthreads()) {
      lab[j] = static_cast<int>(p.labels[j]);
      flg[2 * j] = p.nonempty[2 * j];
      flg[2 * j + 1] = p.nonempty[2 * j + 1];
    }
    ck_sync();
  } else {
    lab = nullptr;
    flg = nullptr;
  }
}

// One apply item: the class of sample b (if b is its first sample in the batch)
// over channels [kc * apply_ch, ...), folding its samples in batch order.
__device__ __forceinline__ void ctx_apply_item(const ContextParams& p, const CtxCfg& c, int64_t item, const int* lab,
                                               const uint8_t* flg) {
  const int64_t B = p.f.B, d = p.f.d;
  const int64_t nkc = ceil_div(d, c.apply_ch);
  const int64_t b = item / nkc;
  const int64_t kc = item - b * nkc;
  const int t = ck_tid(), nt = ck_nthreads();
  auto label = [&](int64_t j) -> int64_t { return lab != nullptr ? lab[j] : p.labels[j]; };
  auto flag = [&](int64_t j, int m) -> bool { return (flg != nullptr ? flg[2 * j + m] : p.nonempty[2 * j + m]) != 0; };
  const int64_t y = label(b);
  int earlier = 0;
  for (int64_t j = t; j < b; j += nt) earlier |= label(j) == y ? 1 : 0;
  if (ck_sync_or(earlier)) return;  // not the class's first sample: its item does the work
  const int64_t k = kc * c.apply_ch + t;
  if (k >= d) return;
  const float lambda = p.momentum;
  float* ef = p.fg_table + y * d + k;
  float* eb = p.bg_table + y * d + k;
  float vf = *ef, vb = *eb;
  for (int64_t j = b; j < B; ++j) {
    if (label(j) != y) continue;
    if (flag(j, 0)) vf = momentum_update<float>(vf, p.means[j * 2 * d + k], lambda);
    if (flag(j, 1)) vb = momentum_update<float>(vb, p.means[j * 2 * d + d + k], lambda);
  }
  *ef = vf;
  *eb = vb;
}

}  // namespace cuda
}  // namespace cream
