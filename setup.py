"""Build of cream_kernels._C with ninja: CPU (OpenMP) always, CUDA when nvcc is found.

Environment:
  CREAM_KERNELS_CUDA=0/1        force the CUDA part off / on (on fails if nvcc is missing)
  CREAM_KERNELS_CUDA_ARCHS      ";"-separated targets, default "80;90a;compute_90": sm_80
                                (Ampere, Ada by compatibility) and sm_90a (H100/H200) machine
                                code, plus compute_90 PTX that the driver compiles for newer
                                GPUs. "X" is sm_X machine code, "X+PTX" adds compute_X PTX,
                                "compute_X" is PTX only. (An sm_90 cubin beside sm_90a would be
                                dead weight: both run only on compute capability 9.0, and
                                building it costs a third more ptxas time.)
  CUDA_HOME / CUDA_PATH         where to look for bin/nvcc before PATH
  MAX_JOBS                      ninja's parallelism (default: the cores this process may use)
  CREAM_KERNELS_CUDA_UNITS      how many translation units the CUDA sources are compiled as;
                                default: one per file (29) with 8 or more jobs, else one per
                                job (the files grouped, balanced by cost: see cuda_units)
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

# Build time of the CUDA part (issue 11). Measured on the project's 2-core machine
# while 8 other sessions loaded it (loadavg from 0.9 up to ~460), so wall times are
# inflated up to 10x; CPU times (user + sys) are the comparable figures.
#  before (5 .cu files: em_generic.cu 16 kernels, em_cluster.cu 16, context.cu 33;
#  archs 80;90a;90+PTX):
#    whole build, MAX_JOBS=2, default archs: 55 min 48 s wall, 811 CPU-s (13.5 min)
#    longest file at sm_90a alone (em_cluster.cu, 16 kernels): 219 CPU-s
#      (215.2 user + 4.0 sys; 1826 s wall at loadavg ~260-560)
#  after (5 host files + 24 in inst/, one per kernel x dtype x layout; archs
#  80;90a;compute_90, i.e. without the sm_90 cubin that duplicated sm_90a):
#    longest file at sm_90a alone (inst/em_cluster_bf16_nchw.cu, 3 cluster kernels,
#    the costliest kind):
#      51 CPU-s (49.0 user + 2.0 sys; 787 s wall at loadavg ~260-360)
#    one cluster kernel alone at sm_90a (the 64-file layout tried first): 23 CPU-s (21.6 user + 1.5 sys; 253 s wall);
#    a host-only file (em_cluster.cu) at sm_90a: 12.5 CPU-s
#    whole build, MAX_JOBS=2, default archs: 66 min 21 s wall, 1106 CPU-s (18.4 min;
#      1028 user + 77 sys; loadavg 17.6 at start, 4.0 at end, up to ~560 between).
#      So the split costs ~36% more CPU in all (a fixed ~9-12 CPU-s of preprocessing,
#      cudafe++ and host g++ per file) while the longest file drops 219 -> 51 CPU-s:
#      faster with many cores, but NOT yet "no slower" on 2 cores (fewer, larger
#      groups, or lighter includes in inst/ files, would trade some of that back).
#    kernel resource usage (cuobjdump --dump-resource-usage): identical to before for
#      all 130 (arch, kernel) pairs (65 kernels at sm_80 and sm_90a)
#  Not measured (no time under that load): the sm_90a-only whole builds.
DEFAULT_ARCHS = "80;90a;compute_90"
BUILD_COST = "about 18 CPU-minutes in all, spread over MAX_JOBS cores"


def find_nvcc():
    """(path to nvcc or None, how it was found or why CUDA is off)."""
    flag = os.environ.get("CREAM_KERNELS_CUDA", "").strip()
    if flag == "0":
        return None, "CREAM_KERNELS_CUDA=0"
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append((Path(os.environ[var]) / "bin" / "nvcc", var))
    which = shutil.which("nvcc")
    if which:
        candidates.append((Path(which), "PATH"))
    candidates.append((Path("/usr/local/cuda/bin/nvcc"), "/usr/local/cuda"))
    for c, how in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c), how
    if flag == "1":
        raise RuntimeError("CREAM_KERNELS_CUDA=1 but no nvcc was found (set CUDA_HOME or put nvcc on PATH)")
    return None, "no nvcc in CUDA_HOME, CUDA_PATH, PATH or /usr/local/cuda"


def parse_archs(spec):
    """[(arch, sass, ptx)] from a CREAM_KERNELS_CUDA_ARCHS value."""
    out = []
    for entry in filter(None, (e.strip() for e in spec.replace(",", ";").split(";"))):
        sass, ptx, arch = True, False, entry
        if entry.startswith("compute_"):
            sass, ptx, arch = False, True, entry[len("compute_"):]
        elif entry.endswith("+PTX"):
            ptx, arch = True, entry[: -len("+PTX")]
        arch = arch.replace(".", "")  # "9.0a" as torch writes it
        if not arch[:1].isdigit() or not arch.rstrip("af").isdigit():
            raise RuntimeError(f"CREAM_KERNELS_CUDA_ARCHS: cannot parse {entry!r} (expected e.g. 80, 90a, 90+PTX, "
                               "compute_90)")
        out.append((arch, sass, ptx))
    if not out:
        raise RuntimeError(f"CREAM_KERNELS_CUDA_ARCHS={spec!r} names no target")
    return out


def gencode_flags(spec):
    flags = []
    for arch, sass, ptx in parse_archs(spec):
        if sass:
            flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{arch},code=compute_{arch}")
    return flags


def describe_archs(spec):
    """'sm_80, sm_90a, compute_90 PTX' for the build's one-line report."""
    parts = []
    for arch, sass, ptx in parse_archs(spec):
        if sass:
            parts.append(f"sm_{arch}")
        if ptx:
            parts.append(f"compute_{arch} PTX")
    return ", ".join(parts)


def object_dir(fallback):
    """Where ninja keeps the objects: CREAM_KERNELS_BUILD_DIR, else build/cream_kernels
    in the source tree, which persists across `pip install .` / `pip install -e .` runs
    (pip builds in the tree, but hands setuptools a fresh build_temp each time, so
    objects kept there were always recompiled); `fallback` when the tree is read-only."""
    env = os.environ.get("CREAM_KERNELS_BUILD_DIR")
    for d in ([Path(env)] if env else []) + [ROOT / "build" / "cream_kernels", fallback]:
        try:
            d.mkdir(parents=True, exist_ok=True)
            probe = d / ".write_probe"
            probe.write_text("")
            probe.unlink()
            return d.resolve()
        except OSError:
            continue
    raise RuntimeError(f"no writable build directory (tried {env or ''} {ROOT / 'build'} {fallback})")


def cuda_sources():
    cuda = ROOT / "csrc" / "cuda"
    return sorted(cuda.glob("*.cu")) + sorted((cuda / "inst").glob("*.cu"))


def build_jobs():
    """ninja's parallelism: MAX_JOBS, else the cores this process may use."""
    if os.environ.get("MAX_JOBS"):
        return max(1, int(os.environ["MAX_JOBS"]))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# Relative cost of one kernel instance by kind (CPU-s at sm_90a, see the measurements
# above), for balancing the groups; a host-only file counts as KIND_COST["host"].
KIND_COST = {"em_cluster": 13.0, "em_generic": 8.0, "ctx_update": 6.0, "ctx_stats": 5.0, "host": 4.0}
FILE_COST = 12.0  # the fixed per-translation-unit cost (preprocessing, cudafe++, host g++)


def _source_cost(src):
    if src.parent.name != "inst":
        return KIND_COST["host"]
    kind = next((k for k in KIND_COST if src.name.startswith(k + "_")), "em_generic")
    return KIND_COST[kind] * max(1, src.read_text().count("CK_INSTANTIATE("))


def cuda_units(sources, jobs, out_dir):
    """The CUDA translation units to compile: the files themselves when there are
    cores for them (>= 8 jobs: the longest unit is then one file), else `units`
    groups (CREAM_KERNELS_CUDA_UNITS, default one per job), each a generated file
    in out_dir that #includes its share of the sources, balanced by _source_cost.
    Every unit carries a fixed FILE_COST of front-end work, so on 2 cores 29 units
    cost ~36% more CPU than 2 (setup.py's measurements above)."""
    env = os.environ.get("CREAM_KERNELS_CUDA_UNITS", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise RuntimeError(f"CREAM_KERNELS_CUDA_UNITS={env!r}: expected a positive integer")
        units = int(env)
    else:
        units = len(sources) if jobs >= 8 else jobs
    if units >= len(sources):
        return list(sources)
    groups = [[0.0, []] for _ in range(units)]
    for src in sorted(sources, key=lambda s: (-_source_cost(s), s.name)):  # longest first, to the lightest group
        g = min(groups, key=lambda g: g[0])
        g[0] += _source_cost(src)
        g[1].append(src)
    out = []
    for i, (_, members) in enumerate(groups):
        text = "// Generated by setup.py (cuda_units): one translation unit for several sources.\n" + "".join(
            f'#include "{m.as_posix()}"\n' for m in sorted(members))
        path = out_dir / f"cuda_unit_{i + 1}_of_{units}.cu"
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)  # rewritten only on change: no needless rebuild
        out.append(path)
    return out


class NinjaBuildExt(build_ext):
    """Writes a build.ninja for the sources and lets ninja compile them in parallel."""

    def build_extension(self, ext):
        import pybind11

        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = object_dir(Path(self.build_temp).resolve() / "cream_kernels")

        nvcc, how = find_nvcc()
        # host code in csrc/cuda/*.cu, one kernel instance per file in csrc/cuda/inst/*.cu
        cu_files = cuda_sources() if nvcc else []
        if nvcc and not cu_files:
            nvcc, how = None, "no csrc/cuda sources"
        jobs = build_jobs()
        cu_sources = cuda_units(cu_files, jobs, tmp) if nvcc else []
        cxx = os.environ.get("CXX", "c++")
        includes = [str(ROOT / "csrc"), pybind11.get_include(), sysconfig.get_paths()["include"], str(tmp)]
        inc = " ".join(f"-I{shlex.quote(i)}" for i in includes)
        defines = "-DCREAM_WITH_CUDA" if nvcc else ""
        cflags = f"-O3 -std=c++17 -fPIC -fopenmp -fvisibility=hidden -Wall -Wno-unknown-pragmas {defines} {inc}"
        # The CUDA files need neither pybind11 nor Python.h: leaving out those include
        # paths (which point into pip's throw-away build environment) keeps the nvcc
        # command lines identical from one pip install to the next, so ninja reuses
        # the CUDA objects in the object directory instead of recompiling them.
        nvinc = f"-I{shlex.quote(str(ROOT / 'csrc'))}"

        archs = os.environ.get("CREAM_KERNELS_CUDA_ARCHS", DEFAULT_ARCHS)
        info = f"cpu: {cxx} -O3 -fopenmp"
        if nvcc:
            version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
            info += f"; cuda: {version[-1] if version else nvcc}; archs: {archs}"
        else:
            info += f"; cuda: not built ({how})"
        header = f"#define CREAM_BUILD_INFO {info!r}\n".replace("'", '"')
        if not (tmp / "build_info.h").is_file() or (tmp / "build_info.h").read_text() != header:
            (tmp / "build_info.h").write_text(header)  # rewritten only on change: no needless rebuild

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
                ["-O3", "-std=c++17", "-Xcompiler=-fPIC,-fvisibility=hidden", "--expt-relaxed-constexpr", defines, nvinc]
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
        for src in cu_sources + cpp_sources:  # the long CUDA units first
            name = src.relative_to(ROOT).as_posix() if src.is_relative_to(ROOT) else src.name
            obj = tmp / (name.replace("/", "_") + ".o")
            rule = "nvcc" if src.suffix == ".cu" else "cxx"
            # bindings.cpp includes the generated build_info.h
            lines.append(f"build {obj}: {rule} {src}")
            objects.append(str(obj))
        lines.append(f"build {out}: link {' '.join(objects)}")
        lines.append(f"default {out}")
        (tmp / "build.ninja").write_text("\n".join(lines) + "\n")

        cmd = [self._ninja(), "-C", str(tmp)]
        cmd += ["-j", str(jobs)]
        if nvcc:
            default = "default" if "CREAM_KERNELS_CUDA_ARCHS" not in os.environ else "from CREAM_KERNELS_CUDA_ARCHS"
            line = (f"nvcc found at {nvcc} ({how}); compiling CUDA for {describe_archs(archs)} ({default}; "
                    f"{len(cu_files)} files in {len(cu_sources)} units for {jobs} jobs, {BUILD_COST}; set CREAM_KERNELS_CUDA_ARCHS to change, "
                    "CREAM_KERNELS_CUDA=0 to skip)")
        else:
            line = f"building the CPU backend only ({how}; set CREAM_KERNELS_CUDA=1 to require CUDA)"
        print(f"cream_kernels: {line}; objects in {tmp}", flush=True)
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
