// Generic EM variant: launch (design in em_kernels.cuh; the kernel,
// em_generic_kernel, is in kernels.cuh and instantiated under inst/).
#include <string>

#include "em_kernels.cuh"
#include "kernel_ptrs.h"
#include "launch.cuh"

namespace cream {
namespace cuda {

void launch_em_generic(const EMParams& p, int device, cudaStream_t stream) {
  const DeviceInfo& dev = device_info(device);
  const FeatureView& f = p.f;
  const int vb = pick_vb(f);
  const bool nhwc = is_nhwc(f);
  const EmGenericCfg c = generic_cfg_for(p, dev);
  if (c.smem <= 0 || c.smem > dev.max_smem)
    throw std::runtime_error("cream_kernels CUDA: em_reactivate needs 12 bytes of shared memory per channel; d = " +
                             std::to_string(f.d) + " exceeds what this device offers (" +
                             std::to_string(dev.max_smem) + " bytes per block); use the cpu backend");
  dispatch_kind(f.dtype, vb, nhwc, [&](auto kind) {
    using K = decltype(kind);
    const void* kernel = em_generic_kernel_ptr<typename K::type, K::vb, K::nhwc>();
    ensure_smem(kernel, device, c.smem, "em_generic_kernel");
    launch_kernel(kernel, f.B * p.K, kGenericThreads, c.smem, stream, p, c);
    check_launch("em_generic_kernel");
  });
}

}  // namespace cuda
}  // namespace cream
