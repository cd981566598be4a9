// Runs the CUDA kernel bodies of csrc/cuda under the software emulation
// (ck_emu.h) and compares them with the CPU kernels of csrc/cpu.
#include "context_kernels.cuh"

#include <cinttypes>
#include <random>
#include <string>

using namespace cream;
using namespace cream::cuda;

float ck_half_bits(uint32_t h) { return cream::half_to_float(static_cast<uint16_t>(h)); }

static uint16_t f2bf(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fff + ((u >> 16) & 1);
  return static_cast<uint16_t>(u >> 16);
}
static uint16_t f2h(float f) {
  _Float16 h = static_cast<_Float16>(f);
  uint16_t u;
  std::memcpy(&u, &h, 2);
  return u;
}

struct Feat {
  std::vector<unsigned char> store;
  FeatureView v;
  std::vector<double> vals;  // logical [B][d][N] values (as rounded)
};

// layout 0: NCHW contiguous; 1: NHWC; 2: NCHW with padded channel stride; 3: NHWC with padded pixel stride
static Feat make_feat(int dtype, int64_t B, int64_t d, int64_t N, int layout, std::mt19937& rng, int misalign = 0) {
  Feat F;
  const int elem = dtype == kFloat32 ? 4 : 2;
  int64_t sb, sd, sn;
  if (layout == 0) { sn = 1; sd = N; sb = d * N; }
  else if (layout == 1) { sd = 1; sn = d; sb = d * N; }
  else if (layout == 2) { sn = 1; sd = N + 3; sb = d * sd + 1; }
  else { sd = 1; sn = d + 5; sb = N * sn + 2; }
  const int64_t total = (B - 1) * sb + (d - 1) * sd + (N - 1) * sn + 1;
  F.store.assign((total + 16) * elem + 64, 0xEE);
  unsigned char* base = F.store.data();
  base = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(base) + 63) & ~uintptr_t(63)) + misalign * elem;
  F.v.data = base;
  F.v.dtype = dtype;
  F.v.B = B; F.v.d = d; F.v.N = N;
  F.v.stride_b = sb; F.v.stride_d = sd; F.v.stride_n = sn;
  std::normal_distribution<float> nd(0.f, 1.f);
  F.vals.resize(B * d * N);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = 0; k < d; ++k)
      for (int64_t i = 0; i < N; ++i) {
        float x = nd(rng) + 0.3f * std::sin(0.1f * k + 0.05f * i);  // some structure
        const int64_t off = b * sb + k * sd + i * sn;
        if (dtype == kFloat32) { std::memcpy(base + off * 4, &x, 4); }
        else if (dtype == kBFloat16) { uint16_t h = f2bf(x); std::memcpy(base + off * 2, &h, 2); x = bf16_to_float(h); }
        else { uint16_t h = f2h(x); std::memcpy(base + off * 2, &h, 2); x = half_to_float(h); }
        F.vals[(b * d + k) * N + i] = x;
      }
  return F;
}

template <typename T, int VB, bool NHWC>
struct Kind { using type = T; static constexpr int vb = VB; static constexpr bool nhwc = NHWC; };

template <class Fn>
void dispatch(int dtype, int vb, bool nhwc, Fn&& fn) {
  auto L = [&](auto a, auto b) { if (nhwc) fn(b); else fn(a); };
  switch (dtype) {
    case kFloat32: if (vb == 16) return L(Kind<float,16,false>{}, Kind<float,16,true>{}); return L(Kind<float,4,false>{}, Kind<float,4,true>{});
    case kFloat16: if (vb == 16) return L(Kind<half_t,16,false>{}, Kind<half_t,16,true>{}); if (vb == 8) return L(Kind<half_t,8,false>{}, Kind<half_t,8,true>{}); return L(Kind<half_t,2,false>{}, Kind<half_t,2,true>{});
    default: if (vb == 16) return L(Kind<bf16_t,16,false>{}, Kind<bf16_t,16,true>{}); if (vb == 8) return L(Kind<bf16_t,8,false>{}, Kind<bf16_t,8,true>{}); return L(Kind<bf16_t,2,false>{}, Kind<bf16_t,2,true>{});
  }
}

struct EmOut {  // B = rows (images x K)
  std::vector<float> out, z, fg, bg, mix, sig;
  std::vector<uint8_t> picked;
  EmOut(int64_t B, int64_t d, int64_t N) : out(B * N, NAN), z(B * N, NAN), fg(B * d, NAN), bg(B * d, NAN), mix(2 * B, NAN), sig(B, NAN), picked(B, 0xAB) {}
  void bind(EMParams& p) { p.out = out.data(); p.z_fg = z.data(); p.fg_out = fg.data(); p.bg_out = bg.data(); p.mix = mix.data(); p.picked_fg = picked.data(); p.sigma_used = sig.data(); }
};

static int failures = 0;
static double maxdiff(const std::vector<float>& a, const std::vector<float>& b, bool& nan) {
  double m = 0;
  nan = false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(a[i]) || std::isnan(b[i])) { nan = true; continue; }
    m = std::max(m, (double)std::fabs(a[i] - b[i]) / (1.0 + std::fabs(b[i])));
  }
  return m;
}

static void check_em(const char* what, const EmOut& g, const EmOut& c, double tol) {
  bool n1, n2, n3, n4, n5;
  double d1 = maxdiff(g.out, c.out, n1), d2 = maxdiff(g.z, c.z, n2), d3 = maxdiff(g.fg, c.fg, n3),
         d4 = maxdiff(g.bg, c.bg, n4), d5 = maxdiff(g.mix, c.mix, n5);
  int pk = 0, sg = 0;
  for (size_t i = 0; i < g.picked.size(); ++i) pk += g.picked[i] != c.picked[i];
  for (size_t i = 0; i < g.sig.size(); ++i)  // sigma_used: both inf, or close
    sg += !(std::isinf(g.sig[i]) && std::isinf(c.sig[i])) && !(std::fabs(g.sig[i] - c.sig[i]) <= tol * (1 + std::fabs(c.sig[i])));
  const bool bad = n1 || n2 || n3 || n4 || n5 || pk || sg || d1 > tol || d2 > tol || d3 > tol || d4 > tol || d5 > tol;
  if (bad || getenv("VERBOSE"))
    std::printf("%s %s: out %.2e z %.2e fg %.2e bg %.2e mix %.2e picked-mismatch %d sigma-mismatch %d nan %d%d%d%d%d\n", bad ? "FAIL" : "ok  ",
                what, d1, d2, d3, d4, d5, pk, sg, n1, n2, n3, n4, n5);
  failures += bad;
}

struct EmCase {
  int dtype; int64_t B, d, N; int layout; int T; bool trainfree, labels, cosine; int misalign = 0;
  int64_t K = 1; bool weight = false, sigma_auto = false;  // issue 12: K rows per image, CAM from W, sigma = auto
};

static void run_em_case(const EmCase& ec, std::mt19937& rng) {
  Feat F = make_feat(ec.dtype, ec.B, ec.d, ec.N, ec.layout, rng, ec.misalign);
  const int64_t R = ec.B * ec.K;  // rows
  std::vector<float> cam(R * ec.N);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (auto& x : cam) x = nd(rng);
  if (ec.N > 3) cam[1] = cam[2];  // ties
  const int64_t C = 5;
  std::vector<float> tf(std::max(C, R) * ec.d), tb(std::max(C, R) * ec.d), W(C * ec.d);
  for (auto& x : tf) x = 0.5f * nd(rng) + 0.2f;
  for (auto& x : tb) x = 0.5f * nd(rng) - 0.2f;
  for (auto& x : W) x = 0.2f * nd(rng);
  std::vector<int64_t> lab(R);
  for (auto& l : lab) l = rng() % C;
  EMParams p;
  p.f = F.v;
  p.K = ec.K;
  if (ec.weight) {
    p.weight = W.data();
    p.labels = lab.data();
  } else {
    p.cam = cam.data();
  }
  if (!ec.trainfree) {
    p.v_fg = tf.data(); p.v_bg = tb.data();
    if (ec.labels) { p.labels = lab.data(); p.v_by_label = true; }
  }
  p.num_iters = ec.T; p.sigma = 8.f; p.ratio = 0.2f; p.cosine = ec.cosine; p.sigma_auto = ec.sigma_auto;
  EmOut ref(R, ec.d, ec.N);
  {
    // The CPU kernel with labels==null and per-image rows needs [B, d] tables
    EMParams q = p;
    std::vector<float> pf, pb;
    if (!ec.trainfree && !ec.labels) {
      pf.assign(tf.begin(), tf.begin() + std::min<int64_t>(C, R) * ec.d);
      pf.resize(R * ec.d, 0.1f); pb.assign(tb.begin(), tb.begin() + std::min<int64_t>(C, R) * ec.d); pb.resize(R * ec.d, -0.1f);
      q.v_fg = pf.data(); q.v_bg = pb.data(); p.v_fg = pf.data(); p.v_bg = pb.data();
      ref.bind(q);
      em_reactivate_cpu(q);
    } else {
      ref.bind(q);
      em_reactivate_cpu(q);
    }
    const int elem = ec.dtype == kFloat32 ? 4 : 2;
    const int vb = pick_vb(p.f);
    const bool nhwc = is_nhwc(p.f);
    char name[256];
    // generic variant, 512 and 128 threads
    for (int nt : {512, 128}) {
      // 512 threads with the default tile, 128 with the tile capped at 40 bytes a pixel row (several tiles)
      EmOut g(R, ec.d, ec.N);
      EMParams pg = p; g.bind(pg);
      const EmGenericCfg c = make_generic_cfg(ec.d, ec.N, elem, vb, nhwc, nt, 227 * 1024, nt == 512 ? 0 : ec.d * 40);
      dispatch(ec.dtype, vb, nhwc, [&](auto k) {
        using K = decltype(k);
        emu::launch(R, nt, c.smem, 1, 1, [&] { em_generic_body<typename K::type, K::vb, K::nhwc>(pg, c); });
      });
      std::snprintf(name, sizeof name, "em generic nt=%d tp=%d dt=%d B=%ld K=%ld d=%ld N=%ld lay=%d vb=%d T=%d tf=%d lab=%d cos=%d w=%d auto=%d", nt, c.tp, ec.dtype,
                    (long)ec.B, (long)ec.K, (long)ec.d, (long)ec.N, ec.layout, vb, ec.T, ec.trainfree, ec.labels, ec.cosine, ec.weight, ec.sigma_auto);
      check_em(name, g, ref, 2e-3);
    }
    if (ec.K != 1 || ec.weight || ec.sigma_auto) return;  // generic only (cluster_unsupported)
    for (int cs : {1, 2, 3, 4, 16}) {
      for (int nt : {256, 64}) {
        if (cs == 16 && nt == 256) continue;
       for (int tight = 0; tight < 4; ++tight) {
        EmClusterCfg c = make_cluster_cfg(ec.d, ec.N, elem, vb, nhwc, ec.T, ec.trainfree, ec.cosine, nt, cs, 227 * 1024);
        if (c.smem <= 0) continue;
        if (tight == 1) {  // less scratch
          if (c.scratch == 0) continue;
          c = make_cluster_cfg(ec.d, ec.N, elem, vb, nhwc, ec.T, ec.trainfree, ec.cosine, nt, cs, c.smem - c.scratch * 4 + 40);
        } else if (tight == 2) {  // half the rows resident
          if (!c.keep || c.rows < 2) continue;
          c = make_cluster_cfg(ec.d, ec.N, elem, vb, nhwc, ec.T, ec.trainfree, ec.cosine, nt, cs, c.smem - c.mat_bytes / 2);
        } else if (tight == 3) {  // nothing resident
          if (!c.keep) continue;
          c = make_cluster_cfg(ec.d, ec.N, elem, vb, nhwc, ec.T, ec.trainfree, ec.cosine, nt, cs, c.smem - c.mat_bytes);
        }
        if (c.smem <= 0) continue;
        EmOut g(ec.B, ec.d, ec.N);
        EMParams pg = p; g.bind(pg);
        dispatch(ec.dtype, vb, nhwc, [&](auto k) {
          using K = decltype(k);
          emu::launch(ec.B * cs, nt, c.smem, cs, cs, [&] { em_cluster_body<typename K::type, K::vb, K::nhwc>(pg, c); });
        });
        std::snprintf(name, sizeof name, "em cluster cs=%d nt=%d dt=%d B=%ld d=%ld N=%ld lay=%d vb=%d T=%d tf=%d lab=%d cos=%d scr=%d rres=%d/%d", cs, nt,
                      ec.dtype, (long)ec.B, (long)ec.d, (long)ec.N, ec.layout, vb, ec.T, ec.trainfree, ec.labels, ec.cosine, c.scratch, c.rres, c.rows);
        check_em(name, g, ref, 2e-3);
       }
      }
    }
  }
}

// ---------------------------------------------------------------- context
static void run_ctx_case(int dtype, int64_t B, int64_t d, int64_t N, int layout, bool weight, int64_t C,
                         std::mt19937& rng) {
  Feat F = make_feat(dtype, B, d, N, layout, rng);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> cam(B * N), W(C * d), fg0(C * d), bg0(C * d);
  for (auto& x : cam) x = nd(rng);
  if (B > 1) for (int64_t i = 0; i < N; ++i) cam[N + i] = 1.5f;  // constant map: all foreground, empty bg
  for (auto& x : W) x = nd(rng) * 0.1f;
  for (auto& x : fg0) x = nd(rng);
  for (auto& x : bg0) x = nd(rng);
  std::vector<int64_t> lab(B);
  for (auto& l : lab) l = rng() % C;
  ContextParams p;
  p.f = F.v;
  p.labels = lab.data();
  if (weight) p.weight = W.data(); else p.cam = cam.data();
  p.ratio = 0.2f; p.momentum = 0.8f; p.C = C;
  // CPU reference
  std::vector<float> mr(B * 2 * d, NAN), fr = fg0, br = bg0;
  std::vector<uint8_t> nr(2 * B, 0xAB);
  ContextParams pc = p;
  pc.means = mr.data(); pc.nonempty = nr.data(); pc.fg_table = fr.data(); pc.bg_table = br.data();
  context_update_cpu(pc);
  const int elem = dtype == kFloat32 ? 4 : 2;
  const int vb = pick_vb(p.f);
  const bool nhwc = is_nhwc(p.f);
  for (int nt : {512, 128}) {
    for (int64_t target : {int64_t(0), int64_t(40)}) {
      for (int mode = 0; mode < 2; ++mode) {  // 0: stats kernel + apply kernel, 1: fused cooperative
        std::vector<float> mg(B * 2 * d, NAN), fg = fg0, bg = bg0;
        std::vector<uint8_t> ng(2 * B, 0xAB);
        ContextParams pg = p;
        pg.means = mg.data(); pg.nonempty = ng.data(); pg.fg_table = fg.data(); pg.bg_table = bg.data();
        const CtxCfg c = make_ctx_cfg(B, d, N, elem, vb, nhwc, weight, nt, 227 * 1024, target);
        dispatch(dtype, vb, nhwc, [&](auto k) {
          using K = decltype(k);
          using T = typename K::type;
          if (mode == 0) {
            emu::launch(c.n1, nt, c.smem_stats, 1, 1, [&] {
              for (int64_t item = ck_bid(); item < c.n1; item += ck_nblocks()) ctx_stats_item<T, K::vb, K::nhwc>(pg, c, item);
            });
            const int64_t grid = std::min<int64_t>(c.n2, 3);
            emu::launch(grid, nt, c.smem_apply, 1, 1, [&] {
              int* l; uint8_t* f; ctx_stage(pg, c, l, f);
              for (int64_t item = ck_bid(); item < c.n2; item += ck_nblocks()) ctx_apply_item(pg, c, item, l, f);
            });
          } else {
            const int64_t grid = 3;
            emu::launch(grid, nt, std::max(c.smem_stats, c.smem_apply), 1, grid, [&] {
              for (int64_t item = ck_bid(); item < c.n1; item += ck_nblocks()) ctx_stats_item<T, K::vb, K::nhwc>(pg, c, item);
              ck_grid_sync();
              int* l; uint8_t* f; ctx_stage(pg, c, l, f);
              for (int64_t item = ck_bid(); item < c.n2; item += ck_nblocks()) ctx_apply_item(pg, c, item, l, f);
            });
          }
        });
        bool n1, n2, n3;
        const double dm = maxdiff(mg, mr, n1), df = maxdiff(fg, fr, n2), db = maxdiff(bg, br, n3);
        int ne = 0;
        for (int64_t i = 0; i < 2 * B; ++i) ne += ng[i] != nr[i];
        const bool bad = n1 || n2 || n3 || ne || dm > 1e-4 || df > 1e-4 || db > 1e-4;
        if (bad || getenv("VERBOSE"))
          std::printf("%s ctx mode=%d nt=%d target=%ld dt=%d B=%ld d=%ld N=%ld lay=%d vb=%d w=%d nsplit=%d: means %.2e fg %.2e bg %.2e flags %d nan %d%d%d\n",
                      bad ? "FAIL" : "ok  ", mode, nt, (long)target, dtype, (long)B, (long)d, (long)N, layout, vb, weight, c.nsplit, dm, df, db, ne, n1, n2, n3);
        failures += bad;
      }
    }
  }
}

int det_main();
int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "det") return det_main();
  std::mt19937 rng(1234);
  const std::string which = argc > 1 ? argv[1] : "all";
  if (which == "all" || which == "em") {
    std::vector<EmCase> cases = {
        {kFloat32, 2, 59, 49, 0, 2, false, true, false},
        {kBFloat16, 2, 64, 196, 0, 2, false, true, false},
        {kBFloat16, 2, 64, 196, 1, 2, false, false, false},
        {kFloat16, 2, 40, 49, 1, 3, true, false, true},
        {kBFloat16, 3, 111, 221, 2, 1, false, true, true},
        {kFloat32, 2, 33, 30, 3, 2, true, false, false},
        {kFloat32, 1, 128, 784, 0, 4, false, true, false},
        {kBFloat16, 2, 96, 100, 0, 2, true, false, true},
        {kBFloat16, 2, 72, 36, 1, 1, true, false, false},
        {kFloat16, 2, 16, 7, 0, 2, false, true, true},
        {kFloat32, 2, 9, 5, 1, 3, false, true, true},
        {kBFloat16, 2, 50, 64, 0, 2, false, true, false, 1},
        {kFloat32, 2, 64, 50, 1, 1, false, true, false},
        {kBFloat16, 1, 256, 784, 0, 2, false, true, false},
        {kBFloat16, 1, 256, 196, 1, 3, false, true, true},
        {kBFloat16, 2, 96, 100, 0, 3, true, false, true},
    };
    if (getenv("ONLY_LAST")) cases.erase(cases.begin(), cases.end() - 1);
    if (const char* sel = getenv("EM_CASES")) {  // e.g. EM_CASES=3,7: those cases only (0-based)
      std::vector<EmCase> picked;
      for (const char* q = sel; *q;) {
        char* end;
        const long i = std::strtol(q, &end, 10);
        if (end == q) break;
        if (i >= 0 && i < static_cast<long>(cases.size())) picked.push_back(cases[i]);
        q = *end == ',' ? end + 1 : end;
      }
      cases = picked;
    }
    if (argc > 2) cases.resize(std::min<size_t>(cases.size(), std::stoul(argv[2])));
    for (auto& c : cases) run_em_case(c, rng);
  }
  if (which == "all" || which == "em12") {  // issue 12: K rows, CAM from W, v_by_label, sigma = auto (generic kernel)
    auto x = [](EmCase c, int64_t K, bool w, bool a) { c.K = K; c.weight = w; c.sigma_auto = a; return c; };
    const std::vector<EmCase> cases = {
        x({kBFloat16, 2, 64, 196, 0, 2, false, true, false}, 3, false, false),
        x({kFloat32, 2, 59, 49, 1, 2, false, false, false}, 2, true, false),
        x({kBFloat16, 2, 40, 100, 0, 3, true, false, true}, 2, true, true),
        x({kFloat16, 3, 33, 30, 2, 2, false, true, false}, 1, false, true),
        x({kFloat32, 2, 16, 36, 3, 1, false, true, true}, 3, true, true),
        x({kBFloat16, 1, 72, 36, 1, 2, true, false, false}, 1, false, true),
    };
    for (auto& c : cases) run_em_case(c, rng);
  }
  if (which == "plan") {  // the dispatch's plans for the benchmark shapes, with an H200's facts
    PlanDevice dev;
    dev.cc_major = 9; dev.sms = 132; dev.max_smem = 232448; dev.smem_per_sm = 233472;
    dev.l2_bytes = argc > 2 ? std::stoll(argv[2]) << 20 : int64_t(60) << 20;
    auto occ = [&](const EmClusterCfg& c) { return c.smem <= dev.max_smem ? 1 : 0; };  // stand-in for the occupancy query
    static const float dummy[4] = {};
    for (int dt : {kFloat32, kBFloat16})
      for (int nhwc = 0; nhwc < 2; ++nhwc)
        for (auto [d, hw] : {std::pair<int64_t, int64_t>{1024, 14}, {2048, 14}, {1024, 28}, {2048, 28}})
          for (int64_t B : {1, 32, 256}) {
            EMParams p;
            p.f.data = reinterpret_cast<const void*>(uintptr_t(1) << 12); p.f.dtype = dt; p.f.B = B; p.f.d = d; p.f.N = hw * hw;
            p.f.stride_b = d * hw * hw; p.f.stride_d = nhwc ? 1 : hw * hw; p.f.stride_n = nhwc ? d : 1;
            p.cam = dummy; p.v_fg = p.v_bg = dummy; p.num_iters = 2;
            const EmPlan pl = plan_em(p, dev, occ);
            const int64_t resident = std::min<int64_t>(B, 2 * dev.sms);
            const EmGenericCfg g = make_generic_cfg(d, hw * hw, dt == kFloat32 ? 4 : 2, pick_vb(p.f), nhwc, kGenericThreads, dev.max_smem, dev.l2_bytes / 2 / resident);
            std::printf("%s %s d=%ld %ldx%ld B=%ld: %s cs=%d smem=%ld rows=%d/%d %s%s | generic tp=%d\n", dt == kFloat32 ? "f32 " : "bf16",
                        nhwc ? "NHWC" : "NCHW", (long)d, (long)hw, (long)hw, (long)B, pl.cluster ? "cluster" : "generic", pl.cfg.cs,
                        (long)pl.cfg.smem, pl.cfg.rres, pl.cfg.rows, pl.rule.c_str(), pl.why.c_str(), g.tp);
          }
    return 0;
  }
  if (which == "all" || which == "ctx") {
    run_ctx_case(kFloat32, 4, 59, 49, 0, false, 3, rng);
    run_ctx_case(kBFloat16, 5, 64, 196, 0, true, 2, rng);
    run_ctx_case(kBFloat16, 4, 130, 36, 1, false, 3, rng);
    run_ctx_case(kFloat16, 3, 40, 30, 1, true, 2, rng);
    run_ctx_case(kFloat32, 6, 33, 13, 2, true, 4, rng);
    run_ctx_case(kBFloat16, 3, 100, 100, 3, false, 2, rng);
  }
  std::printf("%s: %d failures\n", failures ? "FAILED" : "PASSED", failures);
  return failures != 0;
}
// determinism: the same launch twice must give identical bits
int det_main() {
  std::mt19937 rng(7);
  Feat F = make_feat(kBFloat16, 2, 96, 100, 0, rng);
  std::vector<float> cam(2 * 100);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (auto& x : cam) x = nd(rng);
  EMParams p; p.f = F.v; p.cam = cam.data(); p.num_iters = 3; p.cosine = true;
  const int vb = pick_vb(p.f);
  int bad = 0;
  for (int variant = 0; variant < 2; ++variant) {
    EmOut a(2, 96, 100), b(2, 96, 100);
    for (EmOut* o : {&a, &b}) {
      EMParams q = p; o->bind(q);
      dispatch(kBFloat16, vb, false, [&](auto k) {
        using K = decltype(k);
        if (variant == 0) {
          const EmGenericCfg c = make_generic_cfg(96, 100, 2, vb, false, 512, 227 * 1024);
          emu::launch(2, 512, c.smem, 1, 1, [&] { em_generic_body<typename K::type, K::vb, K::nhwc>(q, c); });
        } else {
          const EmClusterCfg c = make_cluster_cfg(96, 100, 2, vb, false, 3, true, true, 256, 4, 227 * 1024);
          emu::launch(8, 256, c.smem, 4, 4, [&] { em_cluster_body<typename K::type, K::vb, K::nhwc>(q, c); });
        }
      });
    }
    const int d1 = std::memcmp(a.out.data(), b.out.data(), a.out.size() * 4) != 0;
    const int d2 = std::memcmp(a.fg.data(), b.fg.data(), a.fg.size() * 4) != 0;
    const int d3 = std::memcmp(a.mix.data(), b.mix.data(), a.mix.size() * 4) != 0;
    const int d4 = std::memcmp(a.z.data(), b.z.data(), a.z.size() * 4) != 0;
    bad += d1 + d2 + d3 + d4;
    double md = 0; for (size_t i = 0; i < a.fg.size(); ++i) md = std::max(md, (double)std::fabs(a.fg[i] - b.fg[i]));
    std::printf("determinism variant %d: out %d fg %d mix %d z %d (max fg diff %.3e)\n", variant, d1, d2, d3, d4, md);
  }
  return bad;
}
