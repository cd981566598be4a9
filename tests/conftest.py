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
