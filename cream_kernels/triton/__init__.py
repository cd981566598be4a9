"""Triton kernels: ``em.py`` (EM re-activation) and ``context.py`` (context update).

The kernels are decorated when those modules are first imported, so
TRITON_INTERPRET=1 (to run them on CPU tensors) must be set before that.
Importing this package never fails: when Triton is missing, IMPORT_ERROR says why
and ops.py reports it as the reason the backend cannot run.
"""
import os

INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401

    IMPORT_ERROR = None
    VERSION = triton.__version__
except Exception as exc:  # ImportError, or a broken install
    IMPORT_ERROR = f"triton is not importable ({type(exc).__name__}: {exc}); pip install 'cream_kernels[triton]'"
    VERSION = None
