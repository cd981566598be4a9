"""DDT, the pseudo-box baseline of Table 6 (Wei et al. 2019, "Unsupervised object discovery
and co-localization by deep descriptor transformation"; the generator PSOL uses).

For each class, every spatial descriptor of every image of that class is pooled; the
descriptors are centred on their mean and the first principal component ``v`` of their
covariance is taken. The projection ``p_i = (f_i - mean) . v`` of an image's
descriptors is its indicator map: positive projections are the common object. The box
is that of the largest connected positive region, after upsampling the projection
(bilinear) to the image frame, through the metrics' own contour code
(:func:`cream_wsol.metrics.best_box`, single contour).

A principal component has no sign. We orient ``v`` so that the projection correlates
positively with the descriptor norm ``||f_i||`` over the class's pixels (ReLU features
are larger on the object than on background); this rule is ours and is stated here.

Features: the model's CAM feature map (``model(x, return_features=True)``), so DDT and
CREAM_Base use the same backbone. Statistics are accumulated in float64 in one pass.
"""
from __future__ import annotations

from typing import Dict, Mapping, Tuple

import numpy as np
import torch
from torch import Tensor

from .metrics import best_box

__all__ = ["DDTStats", "ddt_fit", "ddt_project", "ddt_box", "ddt_pseudo_boxes"]


class DDTStats:
    """Per-class running sums of descriptors: count, sum f, sum f f^T, sum f ||f||, sum ||f||."""

    def __init__(self, num_classes: int, dim: int):
        if num_classes < 1 or dim < 1:
            raise ValueError(f"DDTStats needs num_classes >= 1 and dim >= 1; got {num_classes}, {dim}")
        self.num_classes, self.dim = int(num_classes), int(dim)
        self.n = np.zeros(num_classes, dtype=np.float64)
        self.s1 = np.zeros((num_classes, dim), dtype=np.float64)
        self.s2 = np.zeros((num_classes, dim, dim), dtype=np.float64)
        self.sfn = np.zeros((num_classes, dim), dtype=np.float64)
        self.sn = np.zeros(num_classes, dtype=np.float64)

    def add(self, features: Tensor, labels: Tensor) -> None:
        """features [B, d, h, w], labels [B]."""
        if not isinstance(features, Tensor) or features.dim() != 4 or features.shape[1] != self.dim:
            raise ValueError(f"DDTStats.add: features must be [B, {self.dim}, h, w]; got "
                             f"{tuple(getattr(features, 'shape', ()))}")
        labels = torch.as_tensor(labels).long().view(-1)
        if labels.numel() != features.shape[0]:
            raise ValueError(f"DDTStats.add: {labels.numel()} labels for {features.shape[0]} images")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"DDTStats.add: labels must be in [0, {self.num_classes}); got {labels.tolist()}")
        f = features.detach().double().cpu().flatten(2).transpose(1, 2)  # [B, N, d]
        if not torch.isfinite(f).all():
            raise ValueError("DDTStats.add: features contain NaN or Inf")
        norms = f.norm(dim=2)  # [B, N]
        for c in labels.unique().tolist():
            sel = labels.cpu() == c
            x = f[sel].reshape(-1, self.dim)
            nx = norms[sel].reshape(-1)
            self.n[c] += x.shape[0]
            self.s1[c] += x.sum(0).numpy()
            self.s2[c] += (x.T @ x).numpy()
            self.sfn[c] += (x * nx[:, None]).sum(0).numpy()
            self.sn[c] += nx.sum().item()


def ddt_fit(stats: DDTStats) -> Dict[int, Tuple[np.ndarray, np.ndarray]]:
    """{class: (mean [d], oriented first principal component [d])} for every class seen."""
    out: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}
    for c in range(stats.num_classes):
        n = stats.n[c]
        if n < 2:
            continue
        mean = stats.s1[c] / n
        cov = stats.s2[c] / n - np.outer(mean, mean)
        cov = 0.5 * (cov + cov.T)
        _, vecs = np.linalg.eigh(cov)
        v = vecs[:, -1].copy()
        # orientation: corr(projection, ||f||) >= 0, i.e. v . (E[f ||f||] - mean E[||f||]) >= 0
        if float(v @ (stats.sfn[c] / n - mean * (stats.sn[c] / n))) < 0:
            v = -v
        out[c] = (mean, v)
    return out


def ddt_project(features: Tensor, mean: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Indicator map [h, w] (float64) of one image's features [d, h, w]."""
    f = features.detach().double().cpu().numpy()
    if f.ndim != 3 or f.shape[0] != len(v):
        raise ValueError(f"ddt_project: features must be [{len(v)}, h, w]; got {f.shape}")
    return np.einsum("dhw,d->hw", f - np.asarray(mean).reshape(-1, 1, 1), np.asarray(v))


def ddt_box(projection: np.ndarray, size: int) -> np.ndarray:
    """Box [4] int64 in the size x size frame: largest positive region of the (bilinearly
    upsampled) projection; ``[0, 0, 0, 0]`` when nothing is positive (the metrics' rule)."""
    import cv2

    p = np.ascontiguousarray(projection, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"ddt_box: projection must be 2-D; got shape {p.shape}")
    if p.shape != (size, size):
        p = cv2.resize(p, (int(size), int(size)), interpolation=cv2.INTER_LINEAR)
    binary = (p > 0).astype(np.float64)
    return best_box(binary, 0.5).box


@torch.no_grad()
def ddt_pseudo_boxes(model, dataset, *, batch_size: int = 32, device: str = "cpu",
                     progress: bool = True) -> Dict[str, np.ndarray]:
    """DDT boxes {image_id: [4] int64, S x S frame} of every image of ``dataset`` (two passes:
    statistics, then projections), with each image's ground-truth class."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    stats = None
    for images, labels, _ in tqdm(loader, desc="DDT statistics", disable=not progress, leave=False):
        _, feats = model(images.to(device), return_features=True)
        if stats is None:
            stats = DDTStats(int(dataset.num_classes), int(feats.shape[1]))
        stats.add(feats.float(), labels)
    comps = ddt_fit(stats)
    boxes: Dict[str, np.ndarray] = {}
    for images, labels, ids in tqdm(loader, desc="DDT boxes", disable=not progress, leave=False):
        _, feats = model(images.to(device), return_features=True)
        size = int(images.shape[-1])
        for b, image_id in enumerate(ids):
            c = int(labels[b])
            if c not in comps:
                boxes[image_id] = np.zeros(4, dtype=np.int64)
                continue
            boxes[image_id] = ddt_box(ddt_project(feats[b], *comps[c]), size)
    return boxes
