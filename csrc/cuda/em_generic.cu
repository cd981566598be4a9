// Generic EM variant: kernel instantiations and launch (design in em_kernels.cuh).
#include <string>

#include "em_kernels.cuh"
#include "launch.cuh"

namespace cream {
namespace cuda {

template <typename T, int VB, bool NHWC>
__global__ void __launch_bounds__(kGenericThreads, 2) em_generic_kernel(const EMParams p, const EmGenericCfg c) {
  em_generic_body<T, VB, NHWC>(p, c);
}

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
    auto kernel = em_generic_kernel<typename K::type, K::vb, K::nhwc>;
    ensure_smem(reinterpret_cast<const void*>(kernel), device, c.smem, "em_generic_kernel");
    kernel<<<static_cast<unsigned>(f.B * p.K), kGenericThreads, static_cast<size_t>(c.smem), stream>>>(p, c);
    check_launch("em_generic_kernel");
  });
}

}  // namespace cuda
}  // namespace cream
