// Cluster EM variant (sm_90): planning and launch (design in em_kernels.cuh;
// the kernel, em_cluster_kernel, is in kernels.cuh and instantiated under
// inst/). Its body is compiled for sm_90 only; on other targets the kernel is
// an empty stub that the planner never launches.
#include <algorithm>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "em_kernels.cuh"
#include "kernel_ptrs.h"
#include "launch.cuh"

namespace cream {
namespace cuda {

namespace {

cudaLaunchConfig_t cluster_launch_config(const EMParams& p, const EmClusterCfg& c, cudaStream_t stream,
                                         cudaLaunchAttribute* attr) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(p.f.B * c.cs), 1, 1);
  cfg.blockDim = dim3(kClusterThreads, 1, 1);
  cfg.dynamicSmemBytes = static_cast<size_t>(c.smem);
  cfg.stream = stream;
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(c.cs);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cfg;
}

// Prepares the kernel for c (shared memory limit, cluster sizes above the
// portable 8) and returns how many such clusters fit on the device at once.
// Cached per kernel, device, cluster size and shared memory size.
int active_clusters(const EMParams& p, const EmClusterCfg& c, int device) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, int, int64_t>, int> cache;
  int n = 0;
  dispatch_kind(p.f.dtype, pick_vb(p.f), is_nhwc(p.f), [&](auto kind) {
    using K = decltype(kind);
    const void* fn = em_cluster_kernel_ptr<typename K::type, K::vb, K::nhwc>();
    const auto key = std::make_tuple(fn, device, c.cs, c.smem);
    {
      std::lock_guard<std::mutex> lock(mu);
      auto it = cache.find(key);
      if (it != cache.end()) {
        n = it->second;
        return;
      }
    }
    ensure_smem(fn, device, c.smem, "em_cluster_kernel");
    if (c.cs > 8)
      check(cudaFuncSetAttribute(fn, cudaFuncAttributeNonPortableClusterSizeAllowed, 1),
            "cudaFuncSetAttribute(em_cluster_kernel, non-portable cluster size)");
    cudaLaunchAttribute attr[1];
    cudaLaunchConfig_t cfg = cluster_launch_config(p, c, nullptr, attr);
    if (cudaOccupancyMaxActiveClusters(&n, fn, &cfg) != cudaSuccess) {
      cudaGetLastError();  // a refusal here only means: not this size
      n = 0;
    }
    std::lock_guard<std::mutex> lock(mu);
    cache[key] = n;
  });
  return n;
}

}  // namespace

// Cluster size and residency, in order of preference:
//  A. the slice fits whole in half an SM's shared memory (two CTAs per SM, so
//     one CTA's loads overlap the other's sweeps): the smallest such cs,
//     raised until the batch gives every SM a CTA (B * cs >= SMs; batch 1
//     spreads one image over 16 SMs);
//  B. 16 CTAs (then 8) per image, two per SM, each keeping what fits of its
//     slice in shared memory and re-reading the rest from L2 (first read from
//     HBM in the first sweep). Only when the slices of all CTAs that run at
//     once fit in half the L2: everything they load passes through L2 between
//     a row's first read and its re-reads, so the re-read rows would be evicted
//     otherwise. (ResNet50 28x28 bf16 at batch 256, 3.2 MB per image, fails
//     this test and goes to C; loading the resident rows with an L2
//     evict-first policy and the re-read rows evict-last is the way to let it
//     use B, to be measured on a GPU.)
//  C. the whole slice in up to 227 KB per CTA (one CTA per SM);
//  otherwise the generic kernel. Each candidate is checked with
//  cudaOccupancyMaxActiveClusters before it is taken.
bool plan_em_cluster(const EMParams& p, int device, EmClusterCfg* out, std::string* why) {
  const DeviceInfo& dev = device_info(device);
  if (dev.cc_major < 9) {
    *why = "thread-block clusters need compute capability 9.0";
    return false;
  }
  const FeatureView& f = p.f;
  const int elem = elem_bytes(f.dtype);
  const int vb = pick_vb(f);
  const bool nhwc = is_nhwc(f);
  const bool trainfree = p.v_fg == nullptr;
  const int sizes[] = {1, 2, 4, 8, 16};
  const int64_t half_sm = std::min<int64_t>(dev.max_smem, dev.smem_per_sm / 2 - 1024);
  auto cfg_for = [&](int cs, int64_t budget) {
    return make_cluster_cfg(f.d, f.N, elem, vb, nhwc, p.num_iters, trainfree, p.cosine, kClusterThreads, cs, budget);
  };
  auto whole = [](const EmClusterCfg& c) { return c.smem > 0 && (!c.keep || c.rres >= c.rows); };
  std::vector<EmClusterCfg> order;
  // A
  int first = -1;
  for (int i = 0; i < 5 && first < 0; ++i)
    if (whole(cfg_for(sizes[i], half_sm))) first = i;
  if (first >= 0) {
    int want = first;
    while (want < 4 && f.B * sizes[want] < dev.sms && whole(cfg_for(sizes[want + 1], half_sm))) ++want;
    for (int i = want; i >= first; --i) order.push_back(cfg_for(sizes[i], half_sm));
  }
  // B
  for (int cs : {16, 8}) {
    const EmClusterCfg c = cfg_for(cs, half_sm);
    if (c.smem <= 0 || whole(c)) continue;
    const int64_t ctas = std::min<int64_t>(f.B * cs, 2 * int64_t(dev.sms));
    const int64_t in_flight = ctas * int64_t(c.rows) * c.row_bytes;
    if (in_flight <= dev.l2_bytes / 2) order.push_back(c);
  }
  // C
  for (int i = 0; i < 5; ++i) {
    const EmClusterCfg c = cfg_for(sizes[i], dev.max_smem);
    if (whole(c)) {
      order.push_back(c);
      break;
    }
  }
  for (const EmClusterCfg& c : order) {
    if (active_clusters(p, c, device) >= 1) {
      *out = c;
      return true;
    }
  }
  *why = order.empty() ? "an image's feature map does not fit in the shared memory (and L2) of 16 CTAs"
                       : "the device cannot schedule a cluster with the shared memory this shape needs";
  return false;
}

void launch_em_cluster(const EMParams& p, const EmClusterCfg& c, int device, cudaStream_t stream) {
  (void)device;  // prepared by plan_em_cluster
  dispatch_kind(p.f.dtype, pick_vb(p.f), is_nhwc(p.f), [&](auto kind) {
    using K = decltype(kind);
    cudaLaunchAttribute attr[1];
    cudaLaunchConfig_t cfg = cluster_launch_config(p, c, stream, attr);
    EMParams pp = p;
    EmClusterCfg cc = c;
    void* args[] = {&pp, &cc};
    check(cudaLaunchKernelExC(&cfg, em_cluster_kernel_ptr<typename K::type, K::vb, K::nhwc>(), args),
          "launch of em_cluster_kernel");
    check_launch("em_cluster_kernel");
  });
}

}  // namespace cuda
}  // namespace cream
