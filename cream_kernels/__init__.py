"""cream_kernels: fused kernels for CREAM (Class RE-Activation Mapping, CVPR 2022).

Public API:
    em_reactivate              the inference-time EM re-activation
    update_context_embeddings  the training-time context embedding update
    ContextEmbeddings          nn.Module holding the per-class tables
    available_backends         what this install can run, and why not
See SPEC.md (the math) and README.md.
"""
from .ops import BackendUnavailable, EMResult, FlatPosteriorWarning, em_reactivate, update_context_embeddings
from .modules import ContextEmbeddings
from ._info import available_backends

__version__ = "0.1.0"
__all__ = [
    "em_reactivate",
    "update_context_embeddings",
    "ContextEmbeddings",
    "available_backends",
    "EMResult",
    "BackendUnavailable",
    "FlatPosteriorWarning",
]
