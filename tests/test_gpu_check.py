"""scripts/gpu_check.sh cannot rot: its --dry-run runs every step on CPU (what
needs a GPU is skipped and says so), and the pieces it relies on are checked
here: the generated CUDA instance files, the ncu log parser."""
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cuda_instances_up_to_date():
    gen = _load("generate_instances", ROOT / "csrc/cuda/generate_instances.py")
    assert gen.main(["--check"]) == 0, "run python csrc/cuda/generate_instances.py"
    files = gen.instances()
    # every (kernel, dtype, width, layout) that dispatch_kind can pick is instantiated exactly once
    lines = [ln for text in files.values() for ln in text.splitlines() if ln.startswith("CK_INSTANTIATE(")]
    assert len(lines) == len(set(lines)) == 4 * (2 + 3 + 3) * 2
    launch = (ROOT / "csrc/cuda/launch.cuh").read_text()
    for ctype, _, vbs in gen.KINDS:
        for vb in vbs:
            assert f"Kind<{ctype}, {vb}, false>" in launch and f"Kind<{ctype}, {vb}, true>" in launch


def _setup_module(monkeypatch):
    """setup.py's functions, without running setup() (setuptools.setup is patched out)."""
    import setuptools

    monkeypatch.setattr(setuptools, "setup", lambda **kw: None)
    return _load("cream_setup", ROOT / "setup.py")


def _unit_members(path):
    return [Path(ln.split('"')[1]) for ln in path.read_text().splitlines() if ln.startswith("#include")]


@pytest.mark.parametrize("jobs", [1, 2, 4])
def test_cuda_units_by_kind_on_few_cores(tmp_path, monkeypatch, jobs):
    st = _setup_module(monkeypatch)
    monkeypatch.delenv("CREAM_KERNELS_CUDA_UNITS", raising=False)
    sources = st.cuda_sources()
    assert len(sources) == 29  # 5 host files + 24 in inst/
    units = st.cuda_units(sources, jobs, tmp_path)
    assert len(units) == 5  # em_cluster, em_generic, context (each with its instances), em.cu, runtime.cu
    grouped = {u.name: _unit_members(u) for u in units if u.parent == tmp_path}
    alone = [u for u in units if u.parent != tmp_path]
    assert sorted(u.name for u in alone) == ["em.cu", "runtime.cu"]
    members = [m for ms in grouped.values() for m in ms] + alone
    assert sorted(members) == sorted(sources)  # each source in exactly one unit
    assert all(m.is_absolute() and m.is_file() for m in members)
    for host, prefixes in (("em_cluster.cu", ("em_cluster_",)), ("em_generic.cu", ("em_generic_",)),
                           ("context.cu", ("ctx_stats_", "ctx_update_"))):
        unit = [ms for ms in grouped.values() if any(m.name == host and m.parent.name == "cuda" for m in ms)]
        assert len(unit) == 1, host
        inst = [m for m in unit[0] if m.parent.name == "inst"]
        # a host file shares its unit with ALL of its kind's instances (else they compile twice)
        assert sorted(inst) == sorted(p for p in sources if p.parent.name == "inst" and p.name.startswith(prefixes))


def test_cuda_units_per_file_with_many_jobs_and_env_override(tmp_path, monkeypatch):
    st = _setup_module(monkeypatch)
    monkeypatch.delenv("CREAM_KERNELS_CUDA_UNITS", raising=False)
    sources = st.cuda_sources()
    assert st.cuda_units(sources, 5, tmp_path) == sources
    assert st.cuda_units(sources, 64, tmp_path) == sources
    monkeypatch.setenv("CREAM_KERNELS_CUDA_UNITS", "kind")
    units = st.cuda_units(sources, 16, tmp_path)
    assert len(units) == 5
    mtimes = [u.stat().st_mtime_ns for u in units]
    assert st.cuda_units(sources, 16, tmp_path) == units
    assert [u.stat().st_mtime_ns for u in units] == mtimes  # unchanged text: not rewritten (no rebuild)
    monkeypatch.setenv("CREAM_KERNELS_CUDA_UNITS", "file")
    assert st.cuda_units(sources, 2, tmp_path) == sources
    for bad in ("0", "2", "units"):
        monkeypatch.setenv("CREAM_KERNELS_CUDA_UNITS", bad)
        with pytest.raises(RuntimeError, match="CREAM_KERNELS_CUDA_UNITS"):
            st.cuda_units(sources, 2, tmp_path)
    monkeypatch.setenv("CREAM_KERNELS_CUDA_UNITS", "kind")
    stray = tmp_path / "inst" / "em_new_f32_nchw.cu"  # a kind setup.py does not know: an error, not a guess
    stray.parent.mkdir()
    stray.write_text("")
    with pytest.raises(RuntimeError, match="KIND_HOST"):
        st.cuda_units(sources + [stray], 2, tmp_path)


def test_ncu_parser(tmp_path):
    gc = _load("gpu_check", ROOT / "scripts/gpu_check.py")
    log = tmp_path / "ncu.csv"
    log.write_text(
        "==PROF== Connected to process 1\n"
        '"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size",'
        '"Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"\n'
        '"0","1","python3","h","void cream::cuda::em_generic_kernel<cream::bf16_t, 16, false>(...)","1","7",'
        '"(512, 1, 1)","(256, 1, 1)","0","9.0","Command line profiler metrics","dram__bytes_read.sum","byte",'
        '"1,644,167,168"\n'
    )
    fb = 256 * 2048 * 28 * 28 * 2
    rows = gc.parse_ncu(log, fb)
    assert len(rows) == 1
    kernel, nbytes, passes = rows[0]
    assert "em_generic_kernel" in kernel and nbytes == 1644167168 and passes == pytest.approx(1644167168 / fb)


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, GPU_CHECK_DTYPES="fp32",
               GPU_CHECK_LIMIT_SCALE=os.environ.get("GPU_CHECK_LIMIT_SCALE", "4"), OMP_NUM_THREADS="1")
    r = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), "--dry-run"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1800)
    summary = (out / "summary.txt").read_text()
    assert r.returncode == 0, summary + r.stdout[-4000:] + r.stderr[-2000:]
    for step in ("build", "info", "smoke", "timing", "tests", "sanitizer", "ncu"):
        assert f"{step}: rc=0" in summary, summary
        assert (out / f"{step}.log").is_file()
    assert "smoke: all within bounds" in (out / "smoke.log").read_text()
    timing = (out / "timing.log").read_text()
    assert "cpu(stand-in" in timing and "triton" in timing and "ERROR" not in timing
    assert "no compute-sanitizer on CPU" in (out / "sanitizer.log").read_text()
    assert "no ncu on CPU" in (out / "ncu.log").read_text()
    assert "outputs finite=True" in (out / "ncu.log").read_text()
    # at most 8 files come back from a device call's $OUT
    assert len(list(out.iterdir())) <= 8


def test_build_records_the_source_commit(tmp_path, monkeypatch):
    st = _setup_module(monkeypatch)
    import json

    p = tmp_path / st.BUILD_COMMIT_FILE
    st.write_build_commit(p)
    info = json.loads(p.read_text())
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a checkout: the commit and a dirty flag
        assert info["commit"] == head.stdout.strip() and isinstance(info["dirty"], bool)
    else:  # an unpacked sdist: nothing to record, and the build still works
        assert info == {"commit": None, "dirty": None}
