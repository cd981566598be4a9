// em_reactivate_cuda: the one place where the EM variant is chosen.
#include <string>

#include "em_kernels.cuh"
#include "launch.cuh"
#include "plan_info.h"
#include "variant.h"

namespace cream {

// Variant choice, by environment, architecture and shape (here and nowhere
// else): variant.h says which variant CREAM_KERNELS_CUDA_VARIANT asks for
// (auto = generic until a device run has verified the cluster kernel; cluster
// is opt-in), and the cluster kernel then runs only where plan_em_cluster finds
// a plan (sm_90+, K = 1, a given CAM, numeric sigma, and a slice that fits: see
// plan_em in em_kernels.cuh); otherwise generic. cuda_em_plan reports the
// choice and, for generic, the reason. Neither variant had run on a GPU when
// this was written (both were verified under the emulation of tests/cuda_emu
// only): scripts/gpu_check.sh compares both against the reference on the device.

void em_reactivate_cuda(const EMParams& p, int device, uintptr_t stream) {
  if (p.f.B <= 0) return;
  const EmVariantChoice choice = em_variant_from_env();
  cuda::DeviceGuard guard(device);
  const cudaStream_t s = cuda::as_stream(stream);
  if (choice.variant == EmVariant::kCluster) {
    const cuda::EmPlan plan = cuda::plan_em_cluster(p, device);
    if (plan.cluster) {
      cuda::launch_em_cluster(p, plan.cfg, device, s);
      return;
    }
  }
  cuda::launch_em_generic(p, device, s);
}

CudaEmPlanInfo cuda_em_plan_info(int64_t B, int64_t d, int64_t N, int dtype, bool channels_last, int64_t K,
                                 int num_iters, bool trainfree, bool cosine, bool weight, bool sigma_auto,
                                 int device) {
  // A stand-in for the call: contiguous features at an aligned address (the
  // plans depend on the pointers only through their alignment and nullness).
  static const float dummy[4] = {0.f, 0.f, 0.f, 0.f};
  EMParams p;
  p.f.data = reinterpret_cast<const void*>(uintptr_t(1) << 12);
  p.f.dtype = dtype;
  p.f.B = B;
  p.f.d = d;
  p.f.N = N;
  p.f.stride_b = d * N;
  p.f.stride_d = channels_last ? 1 : N;
  p.f.stride_n = channels_last ? d : 1;
  p.K = K;
  p.num_iters = num_iters;
  p.cosine = cosine;
  p.sigma_auto = sigma_auto;
  p.cam = weight ? nullptr : dummy;
  p.weight = weight ? dummy : nullptr;
  p.v_fg = trainfree ? nullptr : dummy;
  p.v_bg = trainfree ? nullptr : dummy;
  CudaEmPlanInfo info;
  cuda::DeviceGuard guard(device);
  const EmVariantChoice choice = em_variant_from_env();
  const cuda::EmPlan plan =
      choice.variant == EmVariant::kCluster ? cuda::plan_em_cluster(p, device) : cuda::EmPlan{};
  if (plan.cluster) {
    info.variant = "cluster";
    info.rule = plan.rule;
    info.ctas_per_image = plan.cfg.cs;
    info.ctas_per_sm = plan.ctas_per_sm;
    info.clusters_resident = plan.clusters;
    info.rows = plan.cfg.rows;
    info.rows_resident = plan.cfg.keep ? plan.cfg.rres : 0;
    info.smem_per_cta = plan.cfg.smem;
    info.grid = B * plan.cfg.cs;
    return info;
  }
  info.variant = "generic";
  info.why = choice.variant == EmVariant::kGeneric ? choice.why : plan.why;
  const cuda::EmGenericCfg c = cuda::generic_cfg_for(p, cuda::device_info(device));
  info.ctas_per_image = 1;
  info.ctas_per_sm = 2;
  info.smem_per_cta = c.smem;
  info.grid = B * K;
  info.pixel_tile = c.tp;
  return info;
}

}  // namespace cream
