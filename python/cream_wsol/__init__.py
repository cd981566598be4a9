"""cream_wsol: the WSOL harness of cream_kernels (data, models, training, evaluation,
metrics, figures, CLI) for CREAM, "Class RE-Activation Mapping" (CVPR 2022).

Submodules are imported on demand (``from cream_wsol import data, metrics``); this
package file stays free of heavy imports.
"""
