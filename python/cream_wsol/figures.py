"""The paper's figures, in the same shape, from :func:`cream_wsol.evaluate.evaluate` output.

* Fig. 1: histograms of the normalised activation over ground-truth foreground and
  background pixels, CAM vs CREAM (:func:`activation_histograms`).
* Fig. 5: images with their maps side by side, ground-truth box in red and the
  best predicted box at the map's optimal threshold in green (:func:`map_gallery`).
* Fig. 6: BoxAcc against the CAM threshold tau (:func:`boxacc_vs_tau`).

Matplotlib with the Agg backend; PNGs are kept small (well under 200 KB).
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np

__all__ = ["activation_histograms", "map_gallery", "boxacc_vs_tau"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str, dpi: int, max_bytes: int = 180_000) -> str:
    """Save a PNG; one over ``max_bytes`` is re-encoded with a 256-colour palette."""
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    _plt().close(fig)
    if os.path.getsize(path) > max_bytes:
        from PIL import Image

        with Image.open(path) as im:
            pal = im.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
        pal.save(path, format="PNG", optimize=True)
    return path


def activation_histograms(histograms: Mapping[str, Any], path: str, names: Sequence[str] = ("CAM", "CREAM"),
                          titles: Optional[Sequence[str]] = None, dpi: int = 110) -> str:
    """Fig. 1: per map, the share of foreground / background pixels per activation bin."""
    plt = _plt()
    edges = np.asarray(histograms["edges"])
    centers = 0.5 * (edges[1:] + edges[:-1])
    width = edges[1] - edges[0]
    names = [n for n in names if n in histograms]
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.0), sharey=True, squeeze=False)
    for ax, name, title in zip(axes[0], names, titles or names):
        h = histograms[name]
        fg = np.asarray(h["fg"], float)
        bg = np.asarray(h["bg"], float)
        fg_share = fg / max(fg.sum(), 1.0)
        bg_share = bg / max(bg.sum(), 1.0)
        ax.bar(centers, bg_share, width=width, color="tab:blue", alpha=0.6, label="background pixels")
        ax.bar(centers, fg_share, width=width, color="tab:red", alpha=0.6, label="foreground pixels")
        overlap = float(np.minimum(fg_share, bg_share).sum())
        mean_fg = float((fg_share * centers).sum())
        mean_bg = float((bg_share * centers).sum())
        ax.set_title(f"{title}: mean fg {mean_fg:.2f}, bg {mean_bg:.2f}\n"
                     f"(overlap of the two histograms: {overlap:.2f})", fontsize=9)
        ax.set_xlabel("normalised activation")
        ax.set_xlim(0, 1)
        ax.set_yscale("log")
    axes[0][0].set_ylabel("share of pixels (log)")
    axes[0][-1].legend(fontsize=8, loc="upper right")
    fig.suptitle("Activation of foreground vs background pixels (cf. paper Fig. 1)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path, dpi)


def _best_box(scoremap: np.ndarray, tau: float, gt_boxes: np.ndarray) -> np.ndarray:
    from .metrics import best_box

    return tuple(best_box(scoremap, tau, gt_boxes))


def _draw_box(ax, box, color, lw=1.5):
    import matplotlib.patches as patches

    x0, y0, x1, y1 = [float(v) for v in box]
    ax.add_patch(patches.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0 + 1, y1 - y0 + 1, fill=False,
                                   edgecolor=color, linewidth=lw))


def map_gallery(examples: Sequence[Mapping[str, Any]], path: str, names: Sequence[str],
                taus: Optional[Mapping[str, float]] = None, n: int = 6, class_names: Optional[Sequence[str]] = None,
                dpi: int = 80) -> str:
    """Fig. 5: one row per image; columns: the image, then each map overlaid on it."""
    plt = _plt()
    examples = list(examples)[:n]
    cols = 1 + len(names)
    fig, axes = plt.subplots(len(examples), cols, figsize=(1.9 * cols, 1.9 * len(examples)), squeeze=False)
    for r, ex in enumerate(examples):
        img = ex["image"]
        gt = np.asarray(ex["boxes"]).reshape(-1, 4)
        ax = axes[r][0]
        ax.imshow(img)
        for b in gt:
            _draw_box(ax, b, "red")
        label = ex.get("label")
        if class_names is not None and label is not None and label < len(class_names):
            label = class_names[label]
        ax.set_title(f"{ex['image_id'].split('/')[-1][:18]}\nclass {label}", fontsize=6)
        for c, name in enumerate(names, start=1):
            ax = axes[r][c]
            sm = ex["maps"][name]
            ax.imshow(img)
            ax.imshow(sm, cmap="jet", alpha=0.5, vmin=0, vmax=1)
            for b in gt:
                _draw_box(ax, b, "red")
            if taus and name in taus:
                box, iou = _best_box(sm, taus[name], gt)
                _draw_box(ax, box, "lime")
                ax.set_title(f"{name}\nIoU {iou:.2f}", fontsize=6)
            elif r == 0:
                ax.set_title(name, fontsize=6)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Maps (red: ground truth, green: best box at the map's optimal tau; cf. paper Fig. 5)",
                 fontsize=8)
    fig.tight_layout()
    return _save(fig, path, dpi, max_bytes=0)  # photos + heat maps: always a 256-colour palette


def boxacc_vs_tau(curves: Mapping[str, np.ndarray], thresholds: np.ndarray, path: str,
                  iou_thresholds: Sequence[int] = (30, 50, 70), names: Optional[Sequence[str]] = None,
                  dpi: int = 110) -> str:
    """Fig. 6: BoxAcc at each IoU threshold against tau, one colour per map."""
    plt = _plt()
    names = list(names or curves)
    styles = {30: ":", 50: "-", 70: "--"}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    th = np.asarray(thresholds)
    for i, name in enumerate(names):
        curve = np.asarray(curves[name])
        for j, delta in enumerate(iou_thresholds):
            ax.plot(th, curve[j], styles.get(delta, "-"), color=colors[i % len(colors)], lw=1.4,
                    label=f"{name}, IoU>={delta / 100:.1f}")
    ax.set_xlabel("CAM threshold tau")
    ax.set_ylabel("BoxAcc (%)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("BoxAcc vs tau (cf. paper Fig. 6)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path, dpi)
