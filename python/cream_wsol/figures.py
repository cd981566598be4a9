"""The paper's figures, in the same shape, from :func:`cream_wsol.evaluate.evaluate` output.

* Fig. 1: histograms of the normalised activation over ground-truth foreground and
  background pixels, CAM vs CREAM (:func:`activation_histograms`).
* Fig. 5: images with their maps side by side, ground-truth box in red and the
  best predicted box at the map's optimal threshold in green (:func:`map_gallery`).
* Fig. 6: BoxAcc against the CAM threshold tau (:func:`boxacc_vs_tau`).
* Real photos: CAM vs training-free CREAM of EfficientNet-Lite0's own ImageNet
  classifier on the sample photos shipped by matplotlib and scikit-image
  (:func:`real_photo_figure`).

Matplotlib with the Agg backend; PNGs are kept small (well under 200 KB).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

__all__ = ["activation_histograms", "map_gallery", "boxacc_vs_tau", "offline_photos", "real_photo_maps",
           "real_photo_figure"]


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


def _draw_box(ax, box, color, lw=1.5):
    import matplotlib.patches as patches

    x0, y0, x1, y1 = [float(v) for v in box]
    ax.add_patch(patches.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0 + 1, y1 - y0 + 1, fill=False,
                                   edgecolor=color, linewidth=lw))


def map_gallery(examples: Sequence[Mapping[str, Any]], path: str, names: Sequence[str],
                taus: Optional[Mapping[str, float]] = None, n: int = 6, class_names: Optional[Sequence[str]] = None,
                dpi: int = 80) -> str:
    """Fig. 5: one row per image; columns: the image, then each map overlaid on it."""
    from .metrics import best_box

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
                box, iou = best_box(sm, taus[name], gt)
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


# --------------------------------------------------------------------------------------
# CAM vs CREAM on real photos with Lite0's own ImageNet classifier
# --------------------------------------------------------------------------------------
# A few ImageNet-1k class names, for the titles (index -> name); any other class is
# shown by its index.
_IMAGENET_NAMES = {281: "tabby cat", 282: "tiger cat", 285: "Egyptian cat", 504: "coffee mug", 967: "espresso",
                   968: "cup", 457: "bow tie", 652: "military uniform", 834: "suit", 906: "Windsor tie",
                   812: "space shuttle", 657: "missile", 744: "projectile", 665: "moped", 670: "motor scooter"}


def offline_photos() -> Dict[str, np.ndarray]:
    """The real photos that ship inside the harness's dependencies (no download):
    matplotlib's ``grace_hopper.jpg`` and scikit-image's astronaut, chelsea the cat,
    coffee, rocket and the motorcycle (when scikit-image is installed). uint8 [H, W, 3]."""
    from PIL import Image

    photos: Dict[str, np.ndarray] = {}
    try:
        import matplotlib.cbook as cbook

        with cbook.get_sample_data("grace_hopper.jpg") as fh:
            photos["grace_hopper"] = np.asarray(Image.open(fh).convert("RGB"))
    except (OSError, ValueError):
        pass
    try:
        import skimage.data as skd
    except ImportError:
        return photos
    for name in ("chelsea", "coffee", "rocket", "astronaut"):
        try:
            photos[name] = np.asarray(getattr(skd, name)())[..., :3]
        except Exception:  # noqa: BLE001 - a missing sample must not stop the figure
            continue
    try:
        photos["motorcycle"] = np.asarray(skd.stereo_motorcycle()[0])[..., :3]
    except Exception:  # noqa: BLE001
        pass
    return photos


def real_photo_maps(photos: Mapping[str, np.ndarray], input_size: int = 320, num_iters: int = 2,
                    sigma: float = 8.0, similarity: str = "dot", cam_threshold: float = 0.2) -> List[Dict[str, Any]]:
    """CAM and training-free CREAM (no context embeddings exist for ImageNet classes: the
    EM starts from each image's own CAM split) of the top-1 class of EfficientNet-Lite0
    with its own ImageNet classifier (the stock network, stride 32: 10 x 10 maps at 320).
    Returns one dict per photo: image (the square crop), class, prob, cam, cream
    (normalised maps at image resolution)."""
    import torch
    from PIL import Image

    from cream_kernels import em_reactivate

    from .data import IMAGENET_MEAN, IMAGENET_STD
    from .metrics import normalize_scoremap
    from .models import EfficientNetLite0CAM, _read_state_dict, efficientnet_lite0_weights_path, load_pretrained

    path = efficientnet_lite0_weights_path()
    model = EfficientNetLite0CAM(1000, output_stride=32)
    load_pretrained(model, path)
    sd = _read_state_dict(path)
    with torch.no_grad():
        model.fc.weight.copy_(sd["_fc.weight"])
        model.fc.bias.copy_(sd["_fc.bias"])
    model.eval()
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    out = []
    for name, arr in photos.items():
        h, w = arr.shape[:2]
        s = min(h, w)
        crop = arr[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        img = np.array(Image.fromarray(crop).resize((input_size, input_size), Image.BICUBIC))
        x = ((torch.from_numpy(img).permute(2, 0, 1).float() / 255 - mean) / std).unsqueeze(0)
        with torch.no_grad():
            logits, feats = model(x, return_features=True)
            prob = torch.softmax(logits, 1)
            cls = int(prob.argmax(1))
            cam = model.cams(feats, torch.tensor([cls]))
            cream = em_reactivate(feats, cam, None, None, num_iters=num_iters, sigma=sigma,
                                  cam_threshold=cam_threshold, similarity=similarity)
        out.append({"name": name, "image": img, "class": cls, "class_name": _IMAGENET_NAMES.get(cls),
                    "prob": float(prob[0, cls]),
                    "cam": normalize_scoremap(cam[0].numpy(), size=input_size),
                    "cream": normalize_scoremap(cream[0].numpy(), size=input_size)})
    return out


def real_photo_figure(path: str, maps: Optional[Sequence[Mapping[str, Any]]] = None, dpi: int = 70, **kw) -> str:
    """The figure: one column per photo; rows: the photo, its CAM, its training-free CREAM."""
    plt = _plt()
    maps = list(maps if maps is not None else real_photo_maps(offline_photos(), **kw))
    if not maps:
        raise FileNotFoundError("no offline sample photos found (matplotlib's sample_data or scikit-image's data)")
    fig, axes = plt.subplots(3, len(maps), figsize=(2.0 * len(maps), 6.3), squeeze=False)
    for c, m in enumerate(maps):
        label = m["class_name"] or f"class #{m['class']}"
        axes[0][c].imshow(m["image"])
        axes[0][c].set_title(f"{m['name']}\ntop-1: {label} ({100 * m['prob']:.0f} %)", fontsize=7)
        for r, key in ((1, "cam"), (2, "cream")):
            axes[r][c].imshow(m["image"])
            axes[r][c].imshow(m[key], cmap="jet", alpha=0.5, vmin=0, vmax=1)
    axes[1][0].set_ylabel("CAM", fontsize=8)
    axes[2][0].set_ylabel("CREAM (training-free)", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("EfficientNet-Lite0 (ImageNet weights, its own classifier): CAM vs CREAM of the top-1 class "
                 "(T=2, sigma=8, dot)", fontsize=8)
    fig.tight_layout()
    return _save(fig, path, dpi, max_bytes=0)
