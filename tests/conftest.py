"""Test configuration shared by every test file.

TRITON_INTERPRET must be set before cream_kernels' Triton kernels are decorated,
so it is set here, before anything imports the package: on a machine without a
GPU the Triton backend then runs on CPU tensors through the interpreter. Fresh
op outputs are poisoned with NaN (CREAM_KERNELS_DEBUG_POISON) so a kernel that
leaves an element unwritten fails loudly.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("CREAM_KERNELS_DEBUG_POISON", "1")
os.environ.pop("CREAM_KERNELS_BACKEND", None)


def pytest_collection_modifyitems(config, items):
    """Mark every test that runs on a GPU with `gpu`, so that scripts/gpu_check.sh
    runs exactly the CUDA/Triton part of the suite with `-m gpu`: tests taking a
    CUDA device parameter (backend-device ids such as cuda-cuda, triton-cuda), tests
    marked @pytest.mark.gpu, and tests skipped without CUDA (a skipif whose reason
    names CUDA or a GPU). A GPU test must have one of the three."""
    import re

    import pytest

    names_gpu = re.compile(r"\b(cuda|gpu)\b", re.IGNORECASE)
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        on_cuda = any(isinstance(v, torch.device) and v.type == "cuda" for v in params.values())
        skip_no_cuda = any(names_gpu.search(str(m.kwargs.get("reason", ""))) for m in item.iter_markers("skipif"))
        if on_cuda or skip_no_cuda:
            item.add_marker(pytest.mark.gpu)
