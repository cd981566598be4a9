"""scripts/gpu_check.sh cannot rot: its --dry-run runs every step on CPU (what
needs a GPU is skipped or stood in for, and says so), in order, with rc=0; its
step limits add up to at most 480 s; a hanging cluster canary switches the later
steps to the generic variant; and the pieces it relies on are checked here: the
supervisor that kills a silent call, the metrics comparison, the generated CUDA
instance files, the ncu log parser."""
import importlib.util
import json
import os
import re
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


STEPS = ("build", "canary", "cuda-correct", "cuda-timing", "table7", "harness", "triton", "tests", "sanitizer", "ncu")
LOGS = {"build": "build.log", "canary": "cuda.log", "cuda-correct": "cuda.log", "cuda-timing": "cuda.log",
        "table7": "e2e.log", "harness": "e2e.log", "triton": "triton.log", "tests": "tests.log",
        "sanitizer": "tools.log", "ncu": "tools.log"}
needs_bash = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and timeout")


def _dry_run(tmp_path, **extra):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable,
               GPU_CHECK_LIMIT_SCALE=os.environ.get("GPU_CHECK_LIMIT_SCALE", "4"), OMP_NUM_THREADS="1")
    env.update(extra)
    for k in ("GPU_CHECK_STEPS", "GPU_CHECK_SIMULATE_HANG"):
        if k not in extra:
            env.pop(k, None)
    r = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), "--dry-run"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1800)
    return r, out


def test_step_limits_in_the_script():
    """Every step's device limit is written in the script, in the issue's order, and
    they add up to at most 480 s (60 s of the 9 minutes left to the build)."""
    text = (ROOT / "scripts/gpu_check.sh").read_text()
    order = re.search(r"^STEPS=\((.*?)\)", text, re.M).group(1).split()
    assert tuple(order) == STEPS
    limits = dict(re.findall(r"\[([a-z0-9-]+)\]=(\d+)", text.split("declare -A LIMIT=(", 1)[1].split(")", 1)[0]))
    assert set(limits) == set(STEPS)
    assert sum(int(v) for v in limits.values()) <= 480
    assert int(limits["canary"]) <= 30
    calls = re.findall(r"^step ([a-z0-9-]+) ", text, re.M)
    assert tuple(calls) == STEPS
    readme = (ROOT / "README.md").read_text()
    for s, v in limits.items():  # the README's table says each step's limit
        assert f"| `{s}` | {v} s |" in readme, s


@needs_bash
def test_gpu_check_dry_run(tmp_path):
    r, out = _dry_run(tmp_path)
    summary = (out / "summary.txt").read_text()
    assert r.returncode == 0, summary + r.stdout[-6000:] + r.stderr[-2000:]
    lines = summary.splitlines()
    # the first lines: the DRY RUN notice, the CUDA variant in force, then the headline numbers
    assert lines[0].startswith("DRY RUN on CPU")
    assert lines[1].startswith("CUDA variant in force: none on CPU (dry run")
    assert lines[2].startswith("canary: generic PASS, cluster PASS")
    assert lines[3].startswith("cuda-correct: generic PASS") and "cluster PASS" in lines[3]
    head = "\n".join(lines[:12])
    assert "EM vs roofline: DRY RUN" in head and "Table 7: DRY RUN" in head
    step_lines = [ln for ln in lines if re.match(r"^[a-z0-9-]+: rc=", ln)]
    assert [ln.split(":")[0] for ln in step_lines] == list(STEPS), summary
    for ln in step_lines:
        assert re.fullmatch(r"[a-z0-9-]+: rc=0 \(\d+s\)", ln), summary
    assert re.search(r"step limits: build 110s, .* total \d+s \(at most 480s", summary)
    # every step's log exists and shows its start; at most 8 files come back from a device call
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files
    for s, f in LOGS.items():
        assert f"=== {s} (limit" in (out / f).read_text(), s
    cuda = (out / "cuda.log").read_text()
    assert "canary generic(cpu stand-in)" in cuda and "canary triton:" in cuda
    rows = re.findall(r"^row +\d+ .* \| (generic|cluster)\(cpu stand-in\) \S+ ok", cuda, re.M)
    assert rows.count("generic") == rows.count("cluster") > 20
    for opt in ("cosine", "trainfree", "T=1 ", "T=3 ", "T=4 ", "K=5", "cam=classifier-weight", "sigma=auto"):
        assert opt in cuda, opt
    assert " cl T=2" in cuda and " nchw T=2" in cuda and " fp32 " in cuda and " bf16 " in cuda
    assert "cuda-correct: all within bounds" in cuda and "ERROR" not in cuda
    e2e = (out / "e2e.log").read_text()
    assert len(re.findall(r"^ +(fp32|bf16) +\d+ +[0-4] +\d", e2e, re.M)) == 20  # 2 dtypes x 2 batches x T=0..4
    assert "harness: small at 64" in e2e and ": PASS (" in e2e
    assert "CREAM_KERNELS_BACKEND=cpu: rc=0" in e2e and "CREAM_KERNELS_BACKEND=reference: rc=0" in e2e
    triton = (out / "triton.log").read_text()
    assert re.search(r"^triton \d+\.\d+", triton.split("===", 2)[1].split("\n", 1)[1], re.M)  # the version first
    assert "2/2 configs compiled and matched" in triton
    tests = (out / "tests.log").read_text()
    starts = re.findall(r"^  (\w+):\S+\| started", tests, re.M)  # children start in this order
    assert starts == ["cluster", "generic", "rest"], starts
    assert "tests: cluster PASS" in tests
    tools = (out / "tools.log").read_text()
    assert "no compute-sanitizer on CPU" in tools and "no ncu on CPU" in tools
    assert "outputs finite=True" in tools
    recs = [json.loads(ln) for ln in (out / "results.jsonl").read_text().splitlines()]
    assert {r["step"] for r in recs} == {"cuda-correct", "cuda-timing", "table7", "harness", "triton"}


@needs_bash
def test_gpu_check_cluster_hang_falls_back_to_generic(tmp_path):
    """A cluster canary that hangs is killed by its timeout, and the later steps run
    with CREAM_KERNELS_CUDA_VARIANT=generic and without cluster."""
    r, out = _dry_run(tmp_path, GPU_CHECK_STEPS="canary,cuda-correct,tests", GPU_CHECK_SIMULATE_HANG="cluster",
                      GPU_CHECK_LIMIT_SCALE="2")
    summary = (out / "summary.txt").read_text()
    assert r.returncode == 1, summary  # the canary step fails
    lines = summary.splitlines()
    assert lines[1].startswith("CUDA variant in force: generic (the cluster canary HUNG"), summary
    assert "canary: generic PASS, cluster FAIL: HUNG" in summary
    assert "cuda-correct: generic PASS" in summary and "cluster not run" in summary
    assert re.search(r"^canary: rc=1 ", summary, re.M) and re.search(r"^cuda-correct: rc=0 ", summary, re.M)
    assert re.search(r"^build: rc=0 ", summary, re.M)  # build always runs
    assert "triton: skipped (not in GPU_CHECK_STEPS)" in summary
    cuda = (out / "cuda.log").read_text()
    assert "=== cuda-correct (limit" in cuda and "CREAM_KERNELS_CUDA_VARIANT=generic)" in cuda
    assert "| cluster" not in cuda
    tests = (out / "tests.log").read_text()
    assert "cluster group dropped" in tests and "cluster:" not in tests


def test_supervisor_kills_a_silent_call_and_resumes(tmp_path):
    """supervise(): a worker call that stays silent is killed; the worker restarts
    at the same row without cluster (a cluster hang), or at the next row."""
    gc = _load("gpu_check", ROOT / "scripts/gpu_check.py")
    worker = tmp_path / "w.py"
    worker.write_text(
        "import sys, time\n"
        "a = sys.argv[1:]\n"
        "start = int(a[a.index('--start') + 1])\n"
        "drop = '--drop-cluster' in a\n"
        "for i in range(start, 4):\n"
        "    for impl in (['generic'] if drop else ['generic', 'cluster']):\n"
        "        print(f'@@call {i} {impl}', flush=True)\n"
        "        if (i, impl) in ((1, 'cluster'), (2, 'generic')):\n"
        "            time.sleep(60)\n"
        "        print(f'row {i} {impl} ok', flush=True)\n"
        "print('@@done', flush=True)\n")
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc, notes = gc.supervise([sys.executable, str(worker)], call_timeout=1.5, setup_timeout=20,
                                 deadline=__import__("time").time() + 60)
    text = buf.getvalue()
    assert rc == 1
    assert notes == ["cluster HUNG at row 1 (no answer in 2 s)", "generic HUNG at row 2"]
    assert "row 0 cluster ok" in text and "row 1 generic ok" in text and "row 3 generic ok" in text
    assert "row 3 cluster" not in text and "row 2 generic ok" not in text


def test_metrics_comparison_bounds():
    gc = _load("gpu_check", ROOT / "scripts/gpu_check.py")
    a = {"cream": {"MaxBoxAccV2": 50.0, "BoxAcc@50": 40.0, "PxAP": 30.0, "top1": 1.0}}
    b = {"cream": {"MaxBoxAccV2": 51.5, "BoxAcc@50": 41.6, "PxAP": 30.05, "top1": 9.0}}
    rows = {(r[0], r[1]): r[5] for r in gc.compare_metrics(a, b, 64)}  # one image = 1.5625 points
    assert rows == {("cream", "MaxBoxAccV2"): True, ("cream", "BoxAcc@50"): False, ("cream", "PxAP"): True}


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


@needs_bash
def test_a_step_timeout_takes_the_children_along(tmp_path):
    """gpu_check.sh's step timeout sends SIGTERM to the Python step, whose children
    run in their own sessions (so that a hung one can be killed whole): the step
    kills them on its way out, so no hung child outlives its step."""
    marker = f"gpu_check_test_{os.getpid()}"
    env = dict(os.environ, GPU_CHECK_SIMULATE_HANG="cluster", GPU_CHECK_STATE=str(tmp_path), PYTHONPATH=os.pathsep.join(
        [str(ROOT), str(ROOT / "python"), os.environ.get("PYTHONPATH", "")]), GPU_CHECK_MARKER=marker)
    r = subprocess.run(["timeout", "6", sys.executable, str(ROOT / "scripts/gpu_check.py"), "--dry-run", "canary",
                        "--limit", "120", "--cuda-timeout", "100", "--triton-timeout", "100"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 124
    import time

    time.sleep(1)
    alive = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker.encode() in (proc / "environ").read_bytes():
                alive.append(proc.name)
        except OSError:
            pass
    assert not alive, f"children left running: {alive}"


def test_correct_summary_counts_rows_per_variant():
    """pass/fail per variant needs every expected row measured within the bound, and
    says how many cluster rows really ran the cluster kernel (the others' plans fell
    back to generic); a failing cluster row switches the later steps to generic."""
    gc = _load("gpu_check", ROOT / "scripts/gpu_check.py")
    row = "row   {i} r50 2048x28x28 B=256 bf16 nchw T=2 dot tables | {impl} {res} (0.10 s){plan}\n"
    plan_c, plan_g = " | plan: cluster rule=C ctas_per_image=16", " | plan: generic (K > 1 classes per image)"
    good = "".join(row.format(i=i, impl=impl, res="1.0e-06 ok", plan=(plan_c if i else plan_g) if impl == "cluster"
                              else "") for i in range(2) for impl in ("generic", "cluster"))
    text, cluster_bad = gc.summarize_correct(good, None, [], 2)
    assert text == ("cuda-correct: generic PASS 2/2 rows within 0.0001, cluster PASS 2/2 rows within 0.0001 "
                    "(1 ran the cluster kernel, 1 fell back to generic by plan)") and not cluster_bad
    bad = good.replace("| cluster 1.0e-06 ok (0.10 s) | plan: cluster", "| cluster nan FAIL (0.10 s) | plan: cluster")
    text, cluster_bad = gc.summarize_correct(bad, None, [], 3)
    assert "generic FAIL 2/3 rows within 0.0001 (1 not measured)" in text and "cluster FAIL 1/3" in text
    assert cluster_bad
    _, cluster_bad = gc.summarize_correct(good, None, ["cluster HUNG at row 1 (no answer in 15 s)"], 2)
    assert cluster_bad
