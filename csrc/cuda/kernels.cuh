// The templated __global__ kernels (their bodies are in em_kernels.cuh and
// context_kernels.cuh) and the *_kernel_ptr() functions of kernel_ptrs.h.
// Included ONLY by the generated translation units under inst/, each of which
// instantiates one (kernel, dtype, vector width, layout) with CK_INSTANTIATE;
// see generate_instances.py.
#pragma once

#include "context_kernels.cuh"
#include "em_kernels.cuh"
#include "kernel_ptrs.h"

namespace cream {
namespace cuda {

// Generic EM variant: one CTA per EM row r = b*K + k, an image's K CTAs adjacent (em_generic_body).
template <typename T, int VB, bool NHWC>
__global__ void __launch_bounds__(kGenericThreads, 2) em_generic_kernel(const EMParams p, const EmGenericCfg c) {
  em_generic_body<T, VB, NHWC>(p, c);
}

// Cluster EM variant (sm_90): one thread-block cluster per image
// (em_cluster_body; an empty stub on targets below sm_90, never launched there).
template <typename T, int VB, bool NHWC>
__global__ void __launch_bounds__(kClusterThreads, 2) em_cluster_kernel(const EMParams p, const EmClusterCfg c) {
  em_cluster_body<T, VB, NHWC>(p, c);
}

// Context update: the stats kernel of the two-kernel path.
template <typename T, int VB, bool NHWC>
__global__ void __launch_bounds__(kCtxThreads, 2) ctx_stats_kernel(const ContextParams p, const CtxCfg c) {
  for (int64_t item = ck_bid(); item < c.n1; item += ck_nblocks()) ctx_stats_item<T, VB, NHWC>(p, c, item);
}

// Context update, cooperative launch only: stats, grid-wide barrier, apply.
template <typename T, int VB, bool NHWC>
__global__ void __launch_bounds__(kCtxThreads, 2) ctx_update_kernel(const ContextParams p, const CtxCfg c) {
  for (int64_t item = ck_bid(); item < c.n1; item += ck_nblocks()) ctx_stats_item<T, VB, NHWC>(p, c, item);
  ck_grid_sync();  // every sample's means and flags are written and visible
  int* lab;
  uint8_t* flg;
  ctx_stage(p, c, lab, flg);
  for (int64_t item = ck_bid(); item < c.n2; item += ck_nblocks()) ctx_apply_item(p, c, item, lab, flg);
}

// The address of each kernel (kernel_ptrs.h). Defined here, instantiated
// explicitly by CK_INSTANTIATE in exactly one generated translation unit per
// template arguments; taking the address instantiates the kernel, i.e. its
// device code lands in that unit.
template <typename T, int VB, bool NHWC>
const void* em_generic_kernel_ptr() {
  return reinterpret_cast<const void*>(&em_generic_kernel<T, VB, NHWC>);
}
template <typename T, int VB, bool NHWC>
const void* em_cluster_kernel_ptr() {
  return reinterpret_cast<const void*>(&em_cluster_kernel<T, VB, NHWC>);
}
template <typename T, int VB, bool NHWC>
const void* ctx_stats_kernel_ptr() {
  return reinterpret_cast<const void*>(&ctx_stats_kernel<T, VB, NHWC>);
}
template <typename T, int VB, bool NHWC>
const void* ctx_update_kernel_ptr() {
  return reinterpret_cast<const void*>(&ctx_update_kernel<T, VB, NHWC>);
}

}  // namespace cuda
}  // namespace cream

// CK_INSTANTIATE(em_generic, bf16_t, 16, false): the explicit instantiation
// of em_generic_kernel_ptr<bf16_t, 16, false>() and so of its kernel.
#define CK_INSTANTIATE(NAME, T, VB, NHWC)                      \
  namespace cream {                                            \
  namespace cuda {                                             \
  template const void* NAME##_kernel_ptr<T, VB, NHWC>();       \
  }                                                            \
  }
