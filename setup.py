"""Build of cream_kernels._C with ninja: CPU (OpenMP) always, CUDA when nvcc is found.

Environment:
  CREAM_KERNELS_CUDA=0/1        force the CUDA part off / on (on fails if nvcc is missing)
  CREAM_KERNELS_CUDA_ARCHS      e.g. "80;90a;90+PTX" (the default): sm_80, sm_90a, sm_90 and
                                compute_90 PTX; "X+PTX" adds PTX for X
  CUDA_HOME / CUDA_PATH         where to look for bin/nvcc before PATH
  MAX_JOBS                      ninja's parallelism
The module does not link against torch (see csrc/bindings.cpp), so torch is not
needed to build it.
"""
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "80;90a;90+PTX"


def find_nvcc():
    flag = os.environ.get("CREAM_KERNELS_CUDA", "").strip()
    if flag == "0":
        return None
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "bin" / "nvcc")
    which = shutil.which("nvcc")
    if which:
        candidates.append(Path(which))
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    if flag == "1":
        raise RuntimeError("CREAM_KERNELS_CUDA=1 but no nvcc was found (set CUDA_HOME or put nvcc on PATH)")
    return None


def gencode_flags(spec):
    flags = []
    for entry in filter(None, (e.strip() for e in spec.replace(",", ";").split(";"))):
        ptx = entry.endswith("+PTX")
        arch = entry[: -len("+PTX")] if ptx else entry
        if not arch.rstrip("af").isdigit():
            raise RuntimeError(f"CREAM_KERNELS_CUDA_ARCHS: cannot parse {entry!r}")
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{arch},code=compute_{arch}")
    return flags


def cuda_sources():
    cuda = ROOT / "csrc" / "cuda"
    return sorted(cuda.glob("*.cu")) + sorted((cuda / "inst").glob("*.cu"))


class NinjaBuildExt(build_ext):
    """Writes a build.ninja for the sources and lets ninja compile them in parallel."""

    def build_extension(self, ext):
        import pybind11

        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(self.build_temp).resolve() / "cream_kernels"
        tmp.mkdir(parents=True, exist_ok=True)

        nvcc = find_nvcc()
        # host code in csrc/cuda/*.cu, one kernel instance per file in csrc/cuda/inst/*.cu
        cu_sources = cuda_sources() if nvcc else []
        if not cu_sources:
            nvcc = None
        cxx = os.environ.get("CXX", "c++")
        includes = [str(ROOT / "csrc"), pybind11.get_include(), sysconfig.get_paths()["include"], str(tmp)]
        inc = " ".join(f"-I{shlex.quote(i)}" for i in includes)
        defines = "-DCREAM_WITH_CUDA" if nvcc else ""
        cflags = f"-O3 -std=c++17 -fPIC -fopenmp -fvisibility=hidden -Wall -Wno-unknown-pragmas {defines} {inc}"

        archs = os.environ.get("CREAM_KERNELS_CUDA_ARCHS", DEFAULT_ARCHS)
        info = f"cpu: {cxx} -O3 -fopenmp"
        if nvcc:
            version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
            info += f"; cuda: {version[-1] if version else nvcc}; archs: {archs}"
        (tmp / "build_info.h").write_text(f"#define CREAM_BUILD_INFO {info!r}\n".replace("'", '"'))

        cpp_sources = [ROOT / "csrc" / "bindings.cpp", *sorted((ROOT / "csrc" / "cpu").glob("*.cpp"))]

        lines = [
            "ninja_required_version = 1.3",
            f"cxx = {cxx}",
            f"cflags = {cflags}",
            "rule cxx",
            "  command = $cxx -MMD -MF $out.d $cflags -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = CXX $in",
        ]
        if nvcc:
            nvflags = " ".join(
                ["-O3", "-std=c++17", "-Xcompiler=-fPIC,-fvisibility=hidden", "--expt-relaxed-constexpr", defines, inc]
                + gencode_flags(archs)
            )
            lines += [
                f"nvcc = {nvcc}",
                f"nvflags = {nvflags}",
                "rule nvcc",
                "  command = $nvcc -MD -MF $out.d $nvflags -c $in -o $out",
                "  depfile = $out.d",
                "  deps = gcc",
                "  description = NVCC $in",
            ]
            # nvcc drives the link so it finds its own static cudart; the module then
            # needs only the driver at run time, never a particular libcudart.so.
            link = f"{nvcc} -shared -cudart=static -Xcompiler=-fopenmp $in -o $out -lgomp"
        else:
            link = f"{cxx} -shared -fopenmp $in -o $out"
        lines += ["rule link", f"  command = {link}", "  description = LINK $out"]

        objects = []
        for src in cpp_sources + cu_sources:
            obj = tmp / (src.relative_to(ROOT).as_posix().replace("/", "_") + ".o")
            rule = "nvcc" if src.suffix == ".cu" else "cxx"
            # bindings.cpp includes the generated build_info.h
            lines.append(f"build {obj}: {rule} {src}")
            objects.append(str(obj))
        lines.append(f"build {out}: link {' '.join(objects)}")
        lines.append(f"default {out}")
        (tmp / "build.ninja").write_text("\n".join(lines) + "\n")

        cmd = [self._ninja(), "-C", str(tmp)]
        if os.environ.get("MAX_JOBS"):
            cmd += ["-j", os.environ["MAX_JOBS"]]
        print("cream_kernels:", info, flush=True)
        subprocess.check_call(cmd)

    @staticmethod
    def _ninja():
        try:
            import ninja  # the PyPI package ships the binary

            return str(Path(ninja.BIN_DIR) / "ninja")
        except ImportError:
            found = shutil.which("ninja")
            if not found:
                raise RuntimeError("ninja is required to build cream_kernels (pip install ninja)")
            return found


setup(
    ext_modules=[Extension("cream_kernels._C", sources=[])],
    cmdclass={"build_ext": NinjaBuildExt},
)
