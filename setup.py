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
  CREAM_KERNELS_CUDA_UNITS      file | kind: the CUDA sources compiled one per file (29 units,
                                the default with 5 or more jobs) or one unit per kernel kind
                                (5 units, the default with up to 4 jobs); see cuda_units
The module does not link against torch (see csrc/bindings.cpp), so torch is not
needed to build it.
"""
import os
import shlex
import shutil
import subprocess
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent

# Build time of the CUDA part (issue 11).
#  Measured 2026-12-02 on an idle 2-core Intel Xeon VM (load ~2), nvcc 13.0, MAX_JOBS=2,
#  default archs (80;90a;compute_90), `python setup.py build_ext` into fresh object dirs:
#    9d49090 (the 5-file layout, smaller kernels, archs 80;90a;90+PTX):
#                                               104 s wall, 204 CPU-s (longest file 84 s)
#    today's kernels, 29 units (one per file):  156 s wall, 307 CPU-s (longest 18.5 s;
#                                               at sm_90a alone 11.1 CPU-s)
#    today's kernels, 5 units by kind (default on <= 4 jobs):
#                                               113 s wall, 204 CPU-s (longest 69 s)
#    a balanced 2-unit grouping (tried, dropped): 145 s wall, 267 CPU-s: it compiled 64
#      kernels twice (see cuda_units)
#  The per-file layout costs ~4 s of front end per unit (a host-only file takes 4.3-5.6 s),
#  so on 2 cores the kind layout is 28 % faster than per-file; the kernels themselves grew
#  since 9d49090 (issue 12's K rows, classifier weight, sigma="auto"; issue 11's cluster
#  st.async), which the kind layout of the old code (104 s) does not carry. On 16 cores the
#  per-file layout is bounded by its longest unit (~19 s of CPU) instead of 69 s.
#  cuobjdump --dump-resource-usage: the same 65 kernels x (sm_80, sm_90a) with identical
#  registers/stack/shared memory in the per-file and the kind builds.
#  (Earlier figures, 811 / 1106 CPU-s, were measured at load averages of 260-560, which
#  inflated CPU time several times over.)
DEFAULT_ARCHS = "80;90a;compute_90"
BUILD_COST = {"kind": "about 3.5 CPU-minutes in all, 2 min on 2 cores", "file": "about 5 CPU-minutes in all"}


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


# The host file that launches each kernel kind (it calls that kind's *_kernel_ptr<...>).
KIND_HOST = {"em_cluster": "em_cluster.cu", "em_generic": "em_generic.cu", "ctx_stats": "context.cu",
             "ctx_update": "context.cu"}


def cuda_units(sources, jobs, out_dir):
    """The CUDA translation units to compile.

    "file" (default with 5 or more jobs): every source is its own unit (29; the longest
    takes ~19 s on one core). "kind" (default with up to 4 jobs, so a 2-core build does
    not pay the per-file front-end cost 29 times): one unit per kernel kind, i.e. the host
    file that launches it plus all its instance files, the layout before the split
    (em_cluster, em_generic, context; em.cu and runtime.cu alone). CREAM_KERNELS_CUDA_UNITS
    = file | kind overrides. A host file shares a unit with all of its kind's instances or
    with none: it calls the *_kernel_ptr<...> templates, and where their definitions
    (kernels.cuh) are visible it instantiates them itself, so a unit holding a host file
    and only some of its kind's instances compiles the others a second time (a balanced
    2-unit grouping tried first did: 64 duplicate kernels, +30 % CPU)."""
    env = os.environ.get("CREAM_KERNELS_CUDA_UNITS", "").strip().lower()
    if env not in ("", "file", "kind"):
        raise RuntimeError(f"CREAM_KERNELS_CUDA_UNITS={env!r}: expected 'file' or 'kind'")
    mode = env or ("kind" if jobs <= 4 else "file")
    if mode == "file":
        return list(sources)
    groups = {}
    for src in sources:
        if src.parent.name == "inst":
            kind = next((k for k in KIND_HOST if src.name.startswith(k + "_")), None)
            if kind is None:
                raise RuntimeError(f"{src.name}: no kernel kind in setup.py's KIND_HOST matches it")
            groups.setdefault(KIND_HOST[kind], []).append(src)
        else:
            groups.setdefault(src.name, []).insert(0, src)
    out = []
    for host, members in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):  # long units first
        if len(members) == 1:
            out.append(members[0])
            continue
        text = "// Generated by setup.py (cuda_units): one translation unit for a kernel kind.\n" + "".join(
            f'#include "{m.as_posix()}"\n' for m in members)
        path = out_dir / f"cuda_unit_{Path(host).stem}.cu"
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)  # rewritten only on change: no needless rebuild
        out.append(path)
    return out


BUILD_COMMIT_FILE = "_build_commit.json"  # read by cream_wsol.reproduce when the package is not in a checkout


def write_build_commit(path):
    """The source tree's git commit and whether tracked files differ from it, next to the
    module, so a non-editable install can still say what it was built from."""
    import json

    info = {"commit": None, "dirty": None}
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode == 0:
            st = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
            info = {"commit": head.stdout.strip(), "dirty": bool(st.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        pass
    text = json.dumps(info) + "\n"
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


class NinjaBuildExt(build_ext):
    """Writes a build.ninja for the sources and lets ninja compile them in parallel."""

    def build_extension(self, ext):
        import pybind11

        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        write_build_commit(out.parent / BUILD_COMMIT_FILE)
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
                    f"{len(cu_files)} files as {len(cu_sources)} units for {jobs} jobs, "
                    f"{BUILD_COST['file' if len(cu_sources) == len(cu_files) else 'kind']}; set CREAM_KERNELS_CUDA_ARCHS to change, "
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
