"""What was built, and what this machine can run (``python -m cream_kernels``)."""
from __future__ import annotations

import torch

from . import _ext, ops


def available_backends(device=None) -> dict:
    """Map each backend to the list of reasons it cannot run on ``device``.

    An empty list means the backend can run. ``device`` defaults to CUDA when
    torch sees a GPU, else CPU.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return {name: ops.backend_reasons(name, device) for name in ops.BACKENDS}


def report() -> str:
    from . import triton as _tr

    lines = [f"cream_kernels {__import__('cream_kernels').__version__}  (torch {torch.__version__})"]
    if _ext.available():
        lines.append(f"compiled module: {_ext.build_info()}; OpenMP threads: {_ext._C.cpu_num_threads()}")
        if _ext.with_cuda():
            lines.append(f"CUDA build: {_ext._C.cuda_build_info()}")
            lines.append(f"CUDA runtime: {_ext._C.cuda_runtime_info()}")
            try:
                v = _ext.cuda_em_variant()
                lines.append(f"CUDA EM variant: {v['variant']} ({v['why']})" if v else "CUDA EM variant: unknown")
            except ValueError as exc:
                lines.append(f"CUDA EM variant: {exc}")
        else:
            info = _ext.build_info()
            why = info.split("cuda: not built (", 1)[1].rstrip(")") if "cuda: not built (" in info else \
                "no nvcc was found when this was built"
            lines.append(f"CUDA build: none ({why})")
    else:
        lines.append(f"compiled module: missing: {_ext.IMPORT_ERROR}")
    lines.append(f"triton: {_tr.VERSION or _tr.IMPORT_ERROR}" + ("  (TRITON_INTERPRET=1)" if _tr.INTERPRET else ""))
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for dev in devices:
        lines.append(f"\non {dev}:")
        for name, reasons in available_backends(dev).items():
            if reasons:
                lines.append(f"  {name:<9} no:  " + "; ".join(reasons))
            else:
                lines.append(f"  {name:<9} yes")
        lines.append(f"  auto picks: {ops.resolve_backend(None, dev, torch.float32)}")
    return "\n".join(lines)
