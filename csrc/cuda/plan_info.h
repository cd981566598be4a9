// What the CUDA EM dispatch would do for a shape, for scripts and reports
// (`cream_kernels._C.cuda_em_plan`, scripts/gpu_check.sh). Plain C++: the
// bindings include it without CUDA headers.
#pragma once

#include <cstdint>
#include <string>

namespace cream {

struct CudaEmPlanInfo {
  std::string variant;     // "cluster" or "generic"
  std::string rule;        // the cluster plan's rule (em_kernels.cuh, plan_em), or ""
  std::string why;         // why generic runs, or ""
  int ctas_per_image = 0;  // cluster size (1 for generic)
  int ctas_per_sm = 0;     // what the shared memory of one CTA allows
  int clusters_resident = 0;  // occupancy query (cluster)
  int rows = 0, rows_resident = 0;  // slice rows per CTA and how many stay in shared memory (cluster)
  int64_t smem_per_cta = 0;  // dynamic shared memory bytes
  int64_t grid = 0;          // CTAs launched
  int pixel_tile = 0;        // generic: pixels per tile
};

// The choice em_reactivate_cuda makes for features [B, d, N] of this dtype code
// and layout, with K rows per image and the given options, on `device`.
CudaEmPlanInfo cuda_em_plan_info(int64_t B, int64_t d, int64_t N, int dtype, bool channels_last, int64_t K,
                                 int num_iters, bool trainfree, bool cosine, bool weight, bool sigma_auto,
                                 int device);

}  // namespace cream
