// Host-side launch helpers shared by the CUDA entry points: errors, the device
// guard, cached device facts, the vector width and the (dtype, vector width,
// layout) template dispatch.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "../common.h"
#include "../kernels.h"
#include "em_kernels.cuh"

namespace cream {
namespace cuda {

// A CUDA error as std::runtime_error naming what failed (pybind11 turns it
// into a Python RuntimeError).
[[noreturn]] void throw_cuda(const std::string& what, cudaError_t err);

inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw_cuda(what, err);
}
// After a launch: launch-configuration errors surface here, named by kernel.
inline void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw_cuda(std::string("launch of ") + kernel, err);
}

// Runs the launch on the caller's device and restores the current device.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) : device_(device) {
    check(cudaGetDevice(&prev_), "cudaGetDevice");
    if (prev_ != device_) check(cudaSetDevice(device_), "cudaSetDevice");
  }
  ~DeviceGuard() {
    if (prev_ != device_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int device_ = 0;
  int prev_ = 0;
};

struct DeviceInfo {
  int cc_major = 0, cc_minor = 0;
  int sms = 1;
  int64_t max_smem = 48 * 1024;  // opt-in dynamic shared memory per block
  int64_t smem_per_sm = 48 * 1024;
  int64_t l2_bytes = 0;
  bool cooperative = false;
};
// Read once per device with cudaDeviceGetAttribute, then cached.
const DeviceInfo& device_info(int device);

inline PlanDevice plan_device(const DeviceInfo& d) {
  PlanDevice p;
  p.cc_major = d.cc_major;
  p.cc_minor = d.cc_minor;
  p.sms = d.sms;
  p.max_smem = d.max_smem;
  p.smem_per_sm = d.smem_per_sm;
  p.l2_bytes = d.l2_bytes;
  return p;
}

// Raises the kernel's dynamic shared memory limit when `bytes` needs it (once
// per kernel, device and size).
void ensure_smem(const void* kernel, int device, int64_t bytes, const char* name);

inline cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

template <typename T, int VB, bool NHWC>
struct Kind {
  using type = T;
  static constexpr int vb = VB;
  static constexpr bool nhwc = NHWC;
};

// fn(Kind<T, VB, NHWC>{}) for the feature dtype, vector width and layout.
// Instantiated widths: 16 bytes and one element for every dtype, plus 8 bytes
// for the 2-byte types (14x14 maps: 196 * 2 bytes per channel row).
template <class Fn>
void dispatch_kind(int dtype, int vb, bool nhwc, Fn&& fn) {
  auto by_layout = [&](auto k_nchw, auto k_nhwc) {
    if (nhwc)
      fn(k_nhwc);
    else
      fn(k_nchw);
  };
  switch (dtype) {
    case kFloat32:
      if (vb == 16) return by_layout(Kind<float, 16, false>{}, Kind<float, 16, true>{});
      return by_layout(Kind<float, 4, false>{}, Kind<float, 4, true>{});
    case kFloat16:
      if (vb == 16) return by_layout(Kind<half_t, 16, false>{}, Kind<half_t, 16, true>{});
      if (vb == 8) return by_layout(Kind<half_t, 8, false>{}, Kind<half_t, 8, true>{});
      return by_layout(Kind<half_t, 2, false>{}, Kind<half_t, 2, true>{});
    case kBFloat16:
      if (vb == 16) return by_layout(Kind<bf16_t, 16, false>{}, Kind<bf16_t, 16, true>{});
      if (vb == 8) return by_layout(Kind<bf16_t, 8, false>{}, Kind<bf16_t, 8, true>{});
      return by_layout(Kind<bf16_t, 2, false>{}, Kind<bf16_t, 2, true>{});
    default:
      throw std::runtime_error("cream_kernels CUDA: unsupported feature dtype code " + std::to_string(dtype) +
                               " (float64 runs on the cpu and reference backends only)");
  }
}

// The generic EM kernel's configuration for these inputs on this device.
// Tiles are sized so that the tiles of all resident CTAs (two per SM) fit in
// half the L2 (see make_generic_cfg).
inline EmGenericCfg generic_cfg_for(const EMParams& p, const DeviceInfo& dev) {
  const FeatureView& f = p.f;
  const int64_t resident = std::max<int64_t>(1, std::min<int64_t>(f.B * p.K, 2 * int64_t(dev.sms)));
  const int64_t tile_bytes = dev.l2_bytes > 0 ? dev.l2_bytes / 2 / resident : 0;
  return make_generic_cfg(f.d, f.N, elem_bytes(f.dtype), pick_vb(f), is_nhwc(f), kGenericThreads, dev.max_smem,
                          tile_bytes);
}

// Entry points of the two EM variants (em_generic.cu, em_cluster.cu); the
// choice between them is made in em.cu.
void launch_em_generic(const EMParams& p, int device, cudaStream_t stream);
// The cluster variant's plan for these inputs on this device: plan.cluster,
// or plan.why says why not (em_kernels.cuh, plan_em).
EmPlan plan_em_cluster(const EMParams& p, int device);
void launch_em_cluster(const EMParams& p, const EmClusterCfg& cfg, int device, cudaStream_t stream);

}  // namespace cuda
}  // namespace cream
