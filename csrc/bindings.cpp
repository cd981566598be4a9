// pybind11 module cream_kernels._C. It never sees a torch type: Python fills
// the parameter structs with data pointers, sizes, strides, a dtype code and,
// for CUDA, the caller's device and stream (see cream_kernels/_ext.py). One
// build therefore serves every torch version, with no C++ ABI coupling.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "cuda/variant.h"
#include "kernels.h"
#ifdef CREAM_WITH_CUDA
#include "cuda/plan_info.h"
#endif

namespace py = pybind11;
using namespace cream;

namespace {

template <typename P, typename Ptr>
void ptr_field(py::class_<P>& cls, const char* name, Ptr P::*member) {
  cls.def_property(
      name, [member](const P& p) { return reinterpret_cast<uintptr_t>(p.*member); },
      [member](P& p, uintptr_t v) { p.*member = reinterpret_cast<Ptr>(v); });
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "cream_kernels compiled kernels (CPU OpenMP, and CUDA when built with nvcc)";

  py::class_<FeatureView> fv(m, "FeatureView");
  fv.def(py::init<>())
      .def_readwrite("dtype", &FeatureView::dtype)
      .def_readwrite("B", &FeatureView::B)
      .def_readwrite("d", &FeatureView::d)
      .def_readwrite("N", &FeatureView::N)
      .def_readwrite("stride_b", &FeatureView::stride_b)
      .def_readwrite("stride_d", &FeatureView::stride_d)
      .def_readwrite("stride_n", &FeatureView::stride_n);
  ptr_field(fv, "data", &FeatureView::data);

  py::class_<EMParams> em(m, "EMParams");
  em.def(py::init<>())
      .def_readwrite("f", &EMParams::f)
      .def_readwrite("K", &EMParams::K)
      .def_readwrite("v_by_label", &EMParams::v_by_label)
      .def_readwrite("num_iters", &EMParams::num_iters)
      .def_readwrite("sigma", &EMParams::sigma)
      .def_readwrite("sigma_auto", &EMParams::sigma_auto)
      .def_readwrite("ratio", &EMParams::ratio)
      .def_readwrite("cosine", &EMParams::cosine);
  ptr_field(em, "cam", &EMParams::cam);
  ptr_field(em, "weight", &EMParams::weight);
  ptr_field(em, "v_fg", &EMParams::v_fg);
  ptr_field(em, "v_bg", &EMParams::v_bg);
  ptr_field(em, "labels", &EMParams::labels);
  ptr_field(em, "out", &EMParams::out);
  ptr_field(em, "z_fg", &EMParams::z_fg);
  ptr_field(em, "fg_out", &EMParams::fg_out);
  ptr_field(em, "bg_out", &EMParams::bg_out);
  ptr_field(em, "mix", &EMParams::mix);
  ptr_field(em, "picked_fg", &EMParams::picked_fg);
  ptr_field(em, "sigma_used", &EMParams::sigma_used);

  py::class_<ContextParams> cp(m, "ContextParams");
  cp.def(py::init<>())
      .def_readwrite("f", &ContextParams::f)
      .def_readwrite("ratio", &ContextParams::ratio)
      .def_readwrite("C", &ContextParams::C)
      .def_readwrite("momentum", &ContextParams::momentum);
  ptr_field(cp, "labels", &ContextParams::labels);
  ptr_field(cp, "cam", &ContextParams::cam);
  ptr_field(cp, "weight", &ContextParams::weight);
  ptr_field(cp, "means", &ContextParams::means);
  ptr_field(cp, "nonempty", &ContextParams::nonempty);
  ptr_field(cp, "fg_table", &ContextParams::fg_table);
  ptr_field(cp, "bg_table", &ContextParams::bg_table);

  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("em_reactivate_cpu", &em_reactivate_cpu, nogil);
  m.def("context_stats_cpu", &context_stats_cpu, nogil);
  m.def("context_apply_cpu", &context_apply_cpu, nogil);
  m.def("context_update_cpu", &context_update_cpu, nogil);
  m.def("cpu_num_threads", &cpu_num_threads);
  // The CUDA EM variant CREAM_KERNELS_CUDA_VARIANT asks for (csrc/cuda/variant.h),
  // in every build: {"variant": "generic" | "cluster", "why": ...}; a bad value
  // raises ValueError. The cluster kernel still needs a plan (cuda_em_plan).
  m.def("cuda_em_variant", []() {
    const EmVariantChoice c = em_variant_from_env();
    py::dict r;
    r["variant"] = c.variant == EmVariant::kCluster ? "cluster" : "generic";
    r["why"] = c.why;
    r["cluster_verified_on_hardware"] = kClusterVerifiedOnHardware;
    return r;
  });

#ifdef CREAM_WITH_CUDA
  m.attr("with_cuda") = true;
  m.def("em_reactivate_cuda", &em_reactivate_cuda, nogil);
  m.def("context_stats_cuda", &context_stats_cuda, nogil);
  m.def("context_apply_cuda", &context_apply_cuda, nogil);
  m.def("context_update_cuda", &context_update_cuda, nogil);
  m.def("cuda_build_info", &cuda_build_info);
  m.def("cuda_runtime_info", &cuda_runtime_info, nogil);
  // What em_reactivate_cuda would run for a shape (scripts/gpu_check.sh).
  m.def(
      "cuda_em_plan",
      [](int64_t B, int64_t d, int64_t N, int dtype, bool channels_last, int64_t K, int num_iters, bool trainfree,
         bool cosine, bool weight, bool sigma_auto, int device) {
        const CudaEmPlanInfo i = cuda_em_plan_info(B, d, N, dtype, channels_last, K, num_iters, trainfree, cosine,
                                                   weight, sigma_auto, device);
        py::dict r;
        r["variant"] = i.variant;
        r["rule"] = i.rule;
        r["why"] = i.why;
        r["ctas_per_image"] = i.ctas_per_image;
        r["ctas_per_sm"] = i.ctas_per_sm;
        r["clusters_resident"] = i.clusters_resident;
        r["rows"] = i.rows;
        r["rows_resident"] = i.rows_resident;
        r["smem_per_cta"] = i.smem_per_cta;
        r["grid"] = i.grid;
        r["pixel_tile"] = i.pixel_tile;
        return r;
      },
      py::arg("B"), py::arg("d"), py::arg("N"), py::arg("dtype_code"), py::arg("channels_last"), py::arg("K") = 1,
      py::arg("num_iters") = 2, py::arg("trainfree") = false, py::arg("cosine") = false, py::arg("weight") = false,
      py::arg("sigma_auto") = false, py::arg("device") = 0);
#else
  m.attr("with_cuda") = false;
#endif
#include "build_info.h"
#ifdef CREAM_BUILD_INFO
  m.attr("build_info") = CREAM_BUILD_INFO;
#else
  m.attr("build_info") = "";
#endif
}
