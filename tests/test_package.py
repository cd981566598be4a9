"""The package surface: public names, `python -m cream_kernels`, the build."""
import subprocess
import sys

import torch

import cream_kernels as ck


def test_public_names():
    for name in ("em_reactivate", "update_context_embeddings", "ContextEmbeddings", "available_backends"):
        assert hasattr(ck, name) and name in ck.__all__
        assert getattr(ck, name).__doc__


def test_available_backends_explains_itself():
    av = ck.available_backends("cpu")
    assert set(av) == {"cuda", "triton", "cpu", "reference"}
    assert av["reference"] == [] and av["cpu"] == []
    assert any("CUDA" in r for r in av["cuda"])


def test_cli_report(tmp_path):
    # cwd away from the source tree, so the subprocess imports the installed package
    out = subprocess.run([sys.executable, "-m", "cream_kernels"], capture_output=True, text=True, check=True,
                         cwd=tmp_path).stdout
    assert "compiled module" in out and "auto picks: cpu" in out
    assert "reference yes" in out


def test_compiled_module_has_no_torch_dependency():
    """The extension must not link against libtorch (one build for every torch)."""
    from cream_kernels import _ext

    path = _ext._C.__file__
    try:
        out = subprocess.run(["ldd", path], capture_output=True, text=True).stdout
    except FileNotFoundError:
        return
    assert "libtorch" not in out and "libc10" not in out and "libcudart.so" not in out, out


def test_auto_picks_cpu_kernels_for_cpu_tensors():
    from cream_kernels import ops

    assert ops.resolve_backend(None, torch.device("cpu"), torch.float32) == "cpu"
    assert ops.resolve_backend("auto", torch.device("cpu"), torch.bfloat16) == "cpu"
