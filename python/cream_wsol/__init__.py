"""cream_wsol: the WSOL harness of cream_kernels (data, models, training, evaluation,
metrics, figures, CLI) for CREAM, "Class RE-Activation Mapping" (CVPR 2022).

Public names (imported on first use, so ``import cream_wsol`` stays light):

* :class:`CREAM` (``cream_wsol.cam_api``): CREAM maps at image size, and the logits,
  from a user's CNN whose head is global average pooling + a linear classifier.
* :func:`boxes_from_map`, :func:`best_box` (``cream_wsol.metrics``): the
  wsolevaluation box rule, the same code the metrics run.

Submodules are imported on demand (``from cream_wsol import data, metrics``).
"""

__all__ = ["CREAM", "CREAMOutput", "boxes_from_map", "best_box"]

_LAZY = {
    "CREAM": "cam_api",
    "CREAMOutput": "cam_api",
    "boxes_from_map": "metrics",
    "best_box": "metrics",
}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cream_wsol' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
