// Device facts, error reporting and the build/runtime reports of
// `python -m cream_kernels`.
#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <utility>

#include "launch.cuh"
#include "variant.h"

namespace cream {
namespace cuda {

void throw_cuda(const std::string& what, cudaError_t err) {
  throw std::runtime_error("cream_kernels CUDA: " + what + " failed: " + cudaGetErrorName(err) + " (" +
                           cudaGetErrorString(err) + ")");
}

const DeviceInfo& device_info(int device) {
  static std::mutex mu;
  static std::map<int, DeviceInfo> cache;  // node-based: references stay valid
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(device);
  if (it != cache.end()) return it->second;
  DeviceInfo info;
  int v = 0;
  check(cudaDeviceGetAttribute(&info.cc_major, cudaDevAttrComputeCapabilityMajor, device), "cudaDeviceGetAttribute");
  check(cudaDeviceGetAttribute(&info.cc_minor, cudaDevAttrComputeCapabilityMinor, device), "cudaDeviceGetAttribute");
  check(cudaDeviceGetAttribute(&info.sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  check(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), "cudaDeviceGetAttribute");
  info.max_smem = v;
  check(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device), "cudaDeviceGetAttribute");
  info.smem_per_sm = v;
  check(cudaDeviceGetAttribute(&v, cudaDevAttrL2CacheSize, device), "cudaDeviceGetAttribute");
  info.l2_bytes = v;
  check(cudaDeviceGetAttribute(&v, cudaDevAttrCooperativeLaunch, device), "cudaDeviceGetAttribute");
  info.cooperative = v != 0;
  return cache.emplace(device, info).first->second;
}

void ensure_smem(const void* kernel, int device, int64_t bytes, const char* name) {
  if (bytes <= 48 * 1024) return;
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, int64_t> done;
  std::lock_guard<std::mutex> lock(mu);
  int64_t& have = done[{kernel, device}];
  if (bytes <= have) return;
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
        (std::string("cudaFuncSetAttribute(") + name + ")").c_str());
  have = bytes;
}

}  // namespace cuda

std::string cuda_build_info() {
  std::ostringstream os;
  // __CUDA_ARCH_LIST__ names compute capabilities only (sm_90a and compute_90 PTX both
  // read 900), so this says which capabilities have device code; the exact targets
  // (sm_90a vs sm_90, SASS vs PTX) are in the module's build_info, from setup.py.
  os << "device code for compute capability";
#if defined(__CUDA_ARCH_LIST__)
  const int archs[] = {__CUDA_ARCH_LIST__};
  const char* sep = " ";
  int last = -1;
  for (int a : archs) {
    if (a == last) continue;
    os << sep << a / 100 << "." << (a % 100) / 10;
    sep = ", ";
    last = a;
  }
#endif
  os << "; cudart " << CUDART_VERSION / 1000 << "." << (CUDART_VERSION % 1000) / 10 << " (static)";
  if (kClusterVerifiedOnHardware)
    os << "; EM variants: cluster (sm_90, by default where its plan fits: _C.cuda_em_plan says), generic (all GPUs, "
          "every option; CREAM_KERNELS_CUDA_VARIANT=generic forces it)";
  else
    os << "; EM variants: generic (all GPUs, every option; the default), cluster (sm_90 where its plan fits; opt-in "
          "with CREAM_KERNELS_CUDA_VARIANT=cluster, not yet verified on hardware: csrc/cuda/variant.h)";
  return os.str();
}

std::string cuda_runtime_info() {
  std::ostringstream os;
  int driver = 0;
  cudaDriverGetVersion(&driver);
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear it: this is a report, not a failure
    os << "no usable CUDA device (" << cudaGetErrorName(err) << ": " << cudaGetErrorString(err) << ")";
    if (driver > 0) os << "; driver CUDA " << driver / 1000 << "." << (driver % 1000) / 10;
    return os.str();
  }
  os << count << " device" << (count == 1 ? "" : "s") << ", driver CUDA " << driver / 1000 << "."
     << (driver % 1000) / 10;
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, i) != cudaSuccess) {
      cudaGetLastError();
      continue;
    }
    os << "; [" << i << "] " << prop.name << " sm_" << prop.major << prop.minor << ", " << prop.multiProcessorCount
       << " SMs";
  }
  return os.str();
}

}  // namespace cream
