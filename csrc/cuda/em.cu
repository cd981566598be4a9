// em_reactivate_cuda: the one place where the EM variant is chosen.
#include <cstdlib>
#include <cstring>
#include <string>

#include "em_kernels.cuh"
#include "launch.cuh"
#include "plan_info.h"

namespace cream {
namespace {

// Variant choice, by environment, architecture and shape (here and nowhere else):
//
//   CREAM_KERNELS_CUDA_VARIANT = auto (default) | generic | cluster
//
//   generic  the one-CTA-per-row kernel: any GPU, any shape, every option.
//   auto     the thread-block-cluster kernel, which keeps each image's feature
//            map in the cluster's shared memory (F read from HBM once per call
//            for any num_iters), whenever plan_em_cluster finds a plan (sm_90+,
//            K = 1, a given CAM, numeric sigma, and a slice that fits: see
//            plan_em in em_kernels.cuh); otherwise generic. cuda_em_plan
//            reports the choice and, for generic, the reason.
//   cluster  the same as auto (kept so scripts can name it).
// Neither variant had run on a GPU when auto was made to prefer the cluster
// kernel (it was verified under the emulation of tests/cuda_emu only):
// scripts/gpu_check.sh compares both against the reference on the device.
enum class Variant { kAuto, kGeneric };

Variant variant_from_env() {
  const char* env = std::getenv("CREAM_KERNELS_CUDA_VARIANT");
  const char* v = env != nullptr && *env != '\0' ? env : "auto";
  if (std::strcmp(v, "generic") == 0) return Variant::kGeneric;
  if (std::strcmp(v, "auto") == 0 || std::strcmp(v, "cluster") == 0) return Variant::kAuto;
  throw std::runtime_error(std::string("CREAM_KERNELS_CUDA_VARIANT must be one of auto, generic, cluster; got '") + v +
                           "'");
}

}  // namespace

void em_reactivate_cuda(const EMParams& p, int device, uintptr_t stream) {
  if (p.f.B <= 0) return;
  const Variant variant = variant_from_env();
  cuda::DeviceGuard guard(device);
  const cudaStream_t s = cuda::as_stream(stream);
  if (variant == Variant::kAuto) {
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
  const cuda::EmPlan plan = variant_from_env() == Variant::kAuto ? cuda::plan_em_cluster(p, device) : cuda::EmPlan{};
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
  info.why = variant_from_env() == Variant::kGeneric ? "CREAM_KERNELS_CUDA_VARIANT=generic" : plan.why;
  const cuda::EmGenericCfg c = cuda::generic_cfg_for(p, cuda::device_info(device));
  info.ctas_per_image = 1;
  info.ctas_per_sm = 2;
  info.smem_per_cta = c.smem;
  info.grid = B * K;
  info.pixel_tile = c.tp;
  return info;
}

}  // namespace cream
