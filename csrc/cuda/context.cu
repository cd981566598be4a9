// Context embedding update on the GPU (design in context_kernels.cuh):
// context_stats_cuda, context_apply_cuda and the fused context_update_cuda.
// The templated kernels (ctx_stats_kernel, ctx_update_kernel) are in
// kernels.cuh and instantiated under inst/; ctx_apply_kernel is here.
#include <algorithm>
#include <string>

#include "context_kernels.cuh"
#include "kernel_ptrs.h"
#include "launch.cuh"

namespace cream {
namespace cuda {

__global__ void __launch_bounds__(kCtxThreads) ctx_apply_kernel(const ContextParams p, const CtxCfg c) {
  int* lab;
  uint8_t* flg;
  ctx_stage(p, c, lab, flg);
  for (int64_t item = ck_bid(); item < c.n2; item += ck_nblocks()) ctx_apply_item(p, c, item, lab, flg);
}

namespace {

CtxCfg stats_cfg(const ContextParams& p, const DeviceInfo& dev) {
  const FeatureView& f = p.f;
  const CtxCfg c = make_ctx_cfg(f.B, f.d, f.N, elem_bytes(f.dtype), pick_vb(f), is_nhwc(f), p.weight != nullptr,
                                kCtxThreads, dev.max_smem, 2 * int64_t(dev.sms));
  if (c.smem_stats <= 0 || c.smem_stats > dev.max_smem)
    throw std::runtime_error("cream_kernels CUDA: the context update with a classifier weight needs 4 bytes of "
                             "shared memory per channel; d = " + std::to_string(f.d) + " exceeds what this device "
                             "offers; use the cpu backend or pass the CAM");
  return c;
}

void launch_stats(const ContextParams& p, const CtxCfg& c, int device, cudaStream_t s) {
  dispatch_kind(p.f.dtype, pick_vb(p.f), is_nhwc(p.f), [&](auto kind) {
    using K = decltype(kind);
    const void* kernel = ctx_stats_kernel_ptr<typename K::type, K::vb, K::nhwc>();
    ensure_smem(kernel, device, c.smem_stats, "ctx_stats_kernel");
    launch_kernel(kernel, c.n1, kCtxThreads, c.smem_stats, s, p, c);
    check_launch("ctx_stats_kernel");
  });
}

void launch_apply(const ContextParams& p, const CtxCfg& c, const DeviceInfo& dev, int device, cudaStream_t s) {
  const int64_t grid = std::min<int64_t>(c.n2, 4 * int64_t(dev.sms));
  ensure_smem(reinterpret_cast<const void*>(ctx_apply_kernel), device, c.smem_apply, "ctx_apply_kernel");
  ctx_apply_kernel<<<static_cast<unsigned>(grid), kCtxThreads, static_cast<size_t>(c.smem_apply), s>>>(p, c);
  check_launch("ctx_apply_kernel");
}

}  // namespace
}  // namespace cuda

void context_stats_cuda(const ContextParams& p, int device, uintptr_t stream) {
  if (p.f.B <= 0) return;
  cuda::DeviceGuard guard(device);
  const cuda::DeviceInfo& dev = cuda::device_info(device);
  cuda::launch_stats(p, cuda::stats_cfg(p, dev), device, cuda::as_stream(stream));
}

void context_apply_cuda(const ContextParams& p, int device, uintptr_t stream) {
  if (p.f.B <= 0 || p.f.d <= 0) return;
  cuda::DeviceGuard guard(device);
  const cuda::DeviceInfo& dev = cuda::device_info(device);
  // Only B, d and the apply fields matter here (p.f.data is null).
  const cuda::CtxCfg c = cuda::make_ctx_cfg(p.f.B, p.f.d, 1, 4, 4, false, false, cuda::kCtxThreads, dev.max_smem, 0);
  cuda::launch_apply(p, c, dev, device, cuda::as_stream(stream));
}

// One cooperative kernel: stats, grid barrier, apply. Where the device cannot
// launch it cooperatively (cudaDevAttrCooperativeLaunch = 0, or no block fits),
// the same work runs as two kernels on the stream.
void context_update_cuda(const ContextParams& p, int device, uintptr_t stream) {
  if (p.f.B <= 0) return;
  cuda::DeviceGuard guard(device);
  const cuda::DeviceInfo& dev = cuda::device_info(device);
  const cudaStream_t s = cuda::as_stream(stream);
  cuda::CtxCfg c = cuda::stats_cfg(p, dev);
  const int64_t smem = std::max(c.smem_stats, c.smem_apply);
  if (smem > dev.max_smem) c.stage = 0;  // labels read from global memory instead
  bool done = false;
  cuda::dispatch_kind(p.f.dtype, cuda::pick_vb(p.f), cuda::is_nhwc(p.f), [&](auto kind) {
    using K = decltype(kind);
    const void* fn = cuda::ctx_update_kernel_ptr<typename K::type, K::vb, K::nhwc>();
    const int64_t bytes = std::max(c.smem_stats, c.stage ? c.smem_apply : int64_t(0));
    if (!dev.cooperative) return;
    cuda::ensure_smem(fn, device, bytes, "ctx_update_kernel");
    int per_sm = 0;
    cuda::check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, fn, cuda::kCtxThreads, static_cast<size_t>(bytes)),
                "cudaOccupancyMaxActiveBlocksPerMultiprocessor(ctx_update_kernel)");
    if (per_sm < 1) return;
    const int64_t grid = std::min<int64_t>(std::max(c.n1, c.n2), int64_t(per_sm) * dev.sms);
    const cream::ContextParams pp = p;
    const cuda::CtxCfg cc = c;
    void* args[] = {const_cast<cream::ContextParams*>(&pp), const_cast<cuda::CtxCfg*>(&cc)};
    cuda::check(cudaLaunchCooperativeKernel(fn, dim3(static_cast<unsigned>(grid)), dim3(cuda::kCtxThreads), args,
                                            static_cast<size_t>(bytes), s),
                "cooperative launch of ctx_update_kernel");
    cuda::check_launch("ctx_update_kernel");
    done = true;
  });
  if (!done) {
    cuda::launch_stats(p, c, device, s);
    cuda::launch_apply(p, c, dev, device, s);
  }
}

}  // namespace cream
