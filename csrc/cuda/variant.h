// Which CUDA EM variant CREAM_KERNELS_CUDA_VARIANT asks for: the rule itself,
// host-only and free of CUDA, so that bindings.cpp exposes it in every build
// (_C.cuda_em_variant) and the tests check it without a GPU. em.cu applies it
// (the cluster kernel still needs a plan that fits: plan_em in em_kernels.cuh).
//
//   unset / auto  generic until a device run has verified the cluster kernel
//                 (kClusterVerifiedOnHardware; scripts/gpu_check.sh is that run)
//   generic       the one-CTA-per-row kernel: any GPU, any shape, every option
//   cluster       opt in: the thread-block-cluster kernel wherever its plan fits
//                 (sm_90+, K = 1, a given CAM, numeric sigma), else generic.
//                 Not yet verified on hardware (only under tests/cuda_emu).
#pragma once

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

namespace cream {

// Flip to true in the commit that records a passing device run (canary,
// cuda-correct, the cluster tests and compute-sanitizer all clean): auto then
// prefers the cluster kernel where its plan fits, as it did before issue 18.
constexpr bool kClusterVerifiedOnHardware = false;

enum class EmVariant { kGeneric, kCluster };

struct EmVariantChoice {
  EmVariant variant;
  std::string why;  // how the variant was chosen (for cuda_em_plan and python -m cream_kernels)
};

inline EmVariantChoice em_variant_choice(const char* env) {
  const std::string v = env != nullptr ? env : "";
  if (v == "generic") return {EmVariant::kGeneric, "CREAM_KERNELS_CUDA_VARIANT=generic"};
  if (v == "cluster") return {EmVariant::kCluster, "CREAM_KERNELS_CUDA_VARIANT=cluster (opt-in; not yet verified on hardware)"};
  if (v.empty() || v == "auto") {
    if (kClusterVerifiedOnHardware) return {EmVariant::kCluster, "auto: the cluster kernel where its plan fits"};
    return {EmVariant::kGeneric,
            "auto: the generic kernel until a device run has verified the cluster kernel "
            "(CREAM_KERNELS_CUDA_VARIANT=cluster opts in)"};
  }
  throw std::invalid_argument("CREAM_KERNELS_CUDA_VARIANT must be one of auto, generic, cluster; got '" + v + "'");
}

inline EmVariantChoice em_variant_from_env() { return em_variant_choice(std::getenv("CREAM_KERNELS_CUDA_VARIANT")); }

}  // namespace cream
