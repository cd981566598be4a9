// The contract between the pybind11 bindings and the kernels of each backend.
// Everything arrives validated and laid out by cream_kernels/ops.py: the
// kernels trust these fields and never check user input.
#pragma once

#include <cstdint>
#include <string>

namespace cream {

// features are read through element strides over a [B, d, N] view, N = h*w.
// ops.py guarantees stride_n == 1 (NCHW-like) or stride_d == 1 (channels_last),
// copying only when the input is neither.
struct FeatureView {
  const void* data = nullptr;
  int dtype = 0;  // DType in common.h
  int64_t B = 0, d = 0, N = 0;
  int64_t stride_b = 0, stride_d = 0, stride_n = 0;
};

// One EM "row" r = b*K + k is image b re-activating class k of its K classes
// (K = 1 for the [B] label / [B, h, w] CAM call). Every per-row array below has
// B*K rows; a backend reads image b's features once for all its K rows where
// its design allows.
struct EMParams {
  FeatureView f;
  int64_t K = 1;                  // classes (rows) per image
  // The CAM of each row: given, [B*K, N] float32 contiguous; or nullptr and
  // computed in the kernel as cam_r,i = weight[labels[r]] . f_i (raw features,
  // bias-free: the mask and the normalised CAM are shift-invariant).
  const float* cam = nullptr;
  const float* weight = nullptr;  // [C, d] float32 contiguous classifier weight, or nullptr
  // Initial centroids, float32 contiguous. v_by_label: [C, d] tables, row of r
  // is labels[r]; otherwise [B*K, d], row r. Both nullptr: training-free mode.
  const float* v_fg = nullptr;
  const float* v_bg = nullptr;
  bool v_by_label = false;
  const int64_t* labels = nullptr;  // [B*K], needed when v_by_label or weight
  int num_iters = 2;
  float sigma = 8.f;              // ignored when sigma_auto
  bool sigma_auto = false;        // SPEC.md "sigma = auto": set per row from its initial logits
  float ratio = 0.2f;
  bool cosine = false;
  // Outputs, all written by the kernel, float32 contiguous.
  float* out = nullptr;           // [B*K, N]
  float* z_fg = nullptr;          // [B*K, N]
  float* fg_out = nullptr;        // [B*K, d] centroids of the last E-step
  float* bg_out = nullptr;        // [B*K, d]
  float* mix = nullptr;           // [B*K, 2] (a_fg, a_bg) of the last E-step
  uint8_t* picked_fg = nullptr;   // [B*K] 1 = Z_fg, 0 = Z_bg
  float* sigma_used = nullptr;    // [B*K] the sigma each row used (the given one unless sigma_auto)
};

struct ContextParams {
  FeatureView f;
  const int64_t* labels = nullptr;  // [B]
  const float* cam = nullptr;       // [B, N] float32, or nullptr when weight is given
  const float* weight = nullptr;    // [C, d] float32 classifier weight, or nullptr
  float ratio = 0.2f;
  // Per-sample statistics (outputs of stats, inputs of apply).
  float* means = nullptr;           // [B, 2, d]  (0 = fg, 1 = bg)
  uint8_t* nonempty = nullptr;      // [B, 2]
  // Tables updated in place by apply, float32 contiguous [C, d].
  float* fg_table = nullptr;
  float* bg_table = nullptr;
  int64_t C = 0;
  float momentum = 0.8f;
};

// CPU (csrc/cpu/)
void em_reactivate_cpu(const EMParams& p);
void context_stats_cpu(const ContextParams& p);
void context_apply_cpu(const ContextParams& p);  // uses means/nonempty/labels, B = p.f.B, d = p.f.d
void context_update_cpu(const ContextParams& p);  // stats then apply, one call
int cpu_num_threads();

#ifdef CREAM_WITH_CUDA
// CUDA (csrc/cuda/). `stream` is a cudaStream_t, `device` the caller's current
// device; the launch happens there. They throw std::runtime_error naming the
// kernel when CUDA reports an error.
void em_reactivate_cuda(const EMParams& p, int device, uintptr_t stream);
void context_stats_cuda(const ContextParams& p, int device, uintptr_t stream);
void context_apply_cuda(const ContextParams& p, int device, uintptr_t stream);
void context_update_cuda(const ContextParams& p, int device, uintptr_t stream);
// Build facts for `python -m cream_kernels`: the archs compiled in, and what the
// runtime sees (device count, or the error that prevents seeing any).
std::string cuda_build_info();
std::string cuda_runtime_info();
#endif

}  // namespace cream
