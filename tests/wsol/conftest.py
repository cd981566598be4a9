"""Fixtures of the WSOL harness tests (cream_wsol.data, cream_wsol.metrics).

The real wsolevaluation metadata is read from ``../shared/wsol-metadata`` relative
to the repository root (never copied into the repo); tests that need it are skipped
with the reason when it is absent. Images are placeholders generated into tmp_path
at the sizes the metadata gives.
"""
import os
import sys

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_PY = os.path.join(REPO_ROOT, "python")
if _PY not in sys.path:  # cream_wsol lives in python/ (package-dir); works uninstalled
    sys.path.insert(0, _PY)

WSOL_METADATA = os.path.normpath(os.path.join(REPO_ROOT, "..", "shared", "wsol-metadata"))

# The five OpenImages val images whose real masks upstream ships (masks-sample/).
OPENIMAGES_SAMPLE_IDS = (
    "val/0bt_c3/1cd9ac0169ec7df0.jpg",
    "val/0bt_c3/3a29f0b33894d4a6.jpg",
    "val/0bt_c3/3b3b9931325d65c9.jpg",
    "val/0by6g/490365f63135f3e0.jpg",
    "val/0by6g/b4d953e7105da1d8.jpg",
)


@pytest.fixture(scope="session")
def wsol_metadata():
    """Path of the real wsolevaluation metadata, or skip."""
    if not os.path.isfile(os.path.join(WSOL_METADATA, "CUB", "val", "image_ids.txt")):
        pytest.skip(f"real wsolevaluation metadata not found at {WSOL_METADATA} "
                    "(expected ../shared/wsol-metadata next to the repository)")
    return WSOL_METADATA


def write_placeholder(path, width, height, seed=0, fmt=None):
    """A small-entropy RGB image of the given size (fast to encode)."""
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((width, height), Image.NEAREST)
    img.save(path, format=fmt or ("JPEG" if path.lower().endswith((".jpg", ".jpeg")) else "PNG"))
    return path


@pytest.fixture
def placeholder():
    """write_placeholder(path, width, height, seed=0): a placeholder image file."""
    return write_placeholder


@pytest.fixture
def openimages_sample_ids():
    return OPENIMAGES_SAMPLE_IDS


@pytest.fixture(scope="session")
def synthetic_small(tmp_path_factory):
    """A small synthetic data set, generated once per session."""
    from cream_wsol.data import make_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    data_root, metadata_root = make_synthetic(root, seed=3, num_classes=4, n_train=12,
                                              n_val=8, n_test=4, image_size=64)
    return root, data_root, metadata_root


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Applied to every harness test module: tiny models gain nothing from threads, and on a shared machine one thread is much faster."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A tiny synthetic set (3 classes, 24/6/9 images of 32 px) for the training tests; one per module."""
    from _tiny import IMAGE
    from cream_wsol.data import make_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    return make_synthetic(str(root), seed=0, num_classes=3, n_train=24, n_val=6, n_test=9, image_size=IMAGE)
