"""The CUDA kernel bodies, run without a GPU.

tests/cuda_emu/ck_emu.h emulates the CUDA primitives the kernels use (one OS
thread per CUDA thread, real barriers, warp shuffles, cluster shared memory);
tests/cuda_emu/test.cpp runs csrc/cuda's kernels under it and compares them with
the CPU kernels. This checks index math, tails, layouts and the cluster
reductions, the mbarrier protocol of the cluster exchange (every st.async must
reach its receiver's mbarrier in the phase the sender means) and issue 12's
fields (K rows per image, the CAM from the classifier weight, v_by_label,
sigma = auto) in the generic kernel; it cannot check hardware memory ordering
or speed. Slow (minutes on
2 cores), so it is marked slow: `pytest tests -m slow -k emulation`.
"""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cuda_kernels_under_emulation(tmp_path):
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ (12 or newer, for <barrier>) is needed to build the emulation")
    exe = tmp_path / "emutest"
    build = [cxx, "-std=c++20", "-O2", "-fopenmp", "-DCK_EMULATE", f"-I{ROOT / 'tests/cuda_emu'}",
             f"-I{ROOT / 'csrc/cuda'}", f"-I{ROOT / 'csrc'}", str(ROOT / "tests/cuda_emu/test.cpp"),
             str(ROOT / "csrc/cpu/em_cpu.cpp"), str(ROOT / "csrc/cpu/context_cpu.cpp"), "-lpthread", "-o", str(exe)]
    out = subprocess.run(build, capture_output=True, text=True)
    if out.returncode != 0 and "barrier" in out.stderr:
        pytest.skip("this compiler lacks C++20 <barrier>")
    assert out.returncode == 0, out.stderr[-3000:]
    for args in (["ctx"], ["em12"], ["em", "8"]):
        run = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=900)
        assert run.returncode == 0 and "PASSED: 0 failures" in run.stdout, run.stdout[-3000:] + run.stderr[-2000:]
