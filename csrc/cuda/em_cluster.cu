// Cluster EM variant (sm_90): planning and launch (design in em_kernels.cuh;
// the kernel, em_cluster_kernel, is in kernels.cuh and instantiated under
// inst/). Its body is compiled for sm_90 only; on other targets the kernel is
// an empty stub that the planner never launches.
#include <map>
#include <mutex>
#include <string>
#include <tuple>

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

// The plan (rules in em_kernels.cuh, plan_em) with this device's facts and
// occupancy.
EmPlan plan_em_cluster(const EMParams& p, int device) {
  const DeviceInfo& dev = device_info(device);
  return plan_em(p, plan_device(dev), [&](const EmClusterCfg& c) { return active_clusters(p, c, device); });
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
