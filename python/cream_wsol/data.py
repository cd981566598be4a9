"""WSOL datasets in clovaai/wsolevaluation's metadata format, and synthetic data sets.

Metadata format (upstream's), one folder per split, ``metadata_root/<split>/``:

* ``image_ids.txt``     ``<path>`` per line (relative to ``data_root``)
* ``class_labels.txt``  ``<path>,<label>``
* ``image_sizes.txt``   ``<path>,<w>,<h>`` (original pixels; may be empty, as for
  OpenImages, where masks define the frame)
* ``localization.txt``  either boxes ``<path>,<x0>,<y0>,<x1>,<y1>`` (one line per box,
  original pixels; CUB, ILSVRC) or masks ``<path>,<mask.png>,<ignore.png>`` (one line
  per instance mask, the ignore path on the image's first line only; OpenImages).
  Optional: a split without it has no localization (e.g. ILSVRC train).
* ``masks.txt``         (this project's extension) masks in the OpenImages
  ``localization.txt`` format, for a split whose ``localization.txt`` holds boxes.
  The synthetic sets write both, so MaxBoxAccV2 *and* PxAP can be computed on them.

Mask and ignore paths are relative to ``mask_root`` (default: ``data_root``).

Frames and transforms (as upstream's ``get_data_loader``, without torchvision):

* eval: resize to ``image_size x image_size`` (PIL bilinear, as torchvision's
  ``Resize`` on PIL images), ToTensor, ImageNet normalization.
* train: resize to ``resize_size x resize_size`` (default ``round(256 * crop / 224)``),
  random ``crop_size`` crop (default ``image_size``), horizontal flip with p = 0.5
  (torch's global RNG, like torchvision), ToTensor, normalization.
* ground-truth boxes are resized to the ``image_size`` frame as upstream's
  ``resize_bbox`` does: ``int(x * S / w)``, ``int(y * S / h)`` (truncation);
* masks are read as upstream does (``cv2.imread(..., IMREAD_GRAYSCALE)``), resized to
  ``S x S`` with OpenCV's nearest-neighbour rule (reimplemented in numpy, identical to
  ``cv2.INTER_NEAREST``), foreground = any instance mask > 0.5, ignore = ignore mask
  > 0.5 minus the foreground.

A missing or unreadable file raises an error that names it (``FileNotFoundError`` for
a missing one, :class:`CorruptFileError` for one that cannot be decoded); nothing is
skipped silently.

Synthetic data (:func:`make_synthetic`), the harness's default data: generated
deterministically from a seed and written as PNG images + metadata in the format
above, so it goes through :class:`WSOLDataset` like the real sets. Each object is a
large *body* (a rotated ellipse with a striped, low-saturation texture drawn from
one distribution for all classes) with a small *discriminative part* (a disc on the
body's rim, ~5-10 % of the object's area) whose saturated hue and pattern (solid,
ring, stripes, dot) identify the class. Objects sit on cluttered textured
backgrounds (smooth colour noise, random lines and blobs, all low-saturation) with
distractor shapes. Two regimes (``regime=``):

* ``"cub"`` (CUB-like, the default): the body's look appears nowhere else. Every
  background colour has a hue outside the body's hue range, and the 3 distractors
  carry textures that are not the body's (checkers, speckle, dots). One object, whose
  body is "the same kind of pixels" as its part and unlike the background: the WSOL
  setting the paper is about.
* ``"cluttered"`` (the set earlier versions generated, bit-identical for the same
  seed): 2 distractors, half of them fragments that carry the body texture (so the
  body is no cue to the class, nor to where the object is), the others muted shapes.
  Background pixels look like the body: the hard case.

The classifier only needs the part, so a CAM fires on the part: the incomplete
localization CREAM addresses.

The synthetic splits' metadata: ``localization.txt`` holds the exact box of each
object (CUB style, tight around the mask: ``x0 = min col``, ``x1 = max col``, inclusive
pixel coordinates, as upstream's boxes), ``masks.txt`` holds ``<id>,<id
stem>_mask.png,<id stem>_ignore.png`` (OpenImages style, paths relative to
``data_root``; masks are 0/255 PNGs; the ignore masks are all zero since every pixel
is labelled exactly). ``image_sizes.txt`` gives the on-disk size; ``parts.txt``
(synthetic only, for analysis: ``WSOLDataset.part_boxes``) gives the box of each
object's discriminative part in the localization.txt format. Images, masks and
metadata live under ``root/synthetic-<hash of the parameters>/{data,metadata}``, and a
second call with the same parameters reuses them.

:func:`make_fashion_textures` (optional): Fashion-MNIST items (Debian package
``dataset-fashion-mnist``), colourized and pasted onto scikit-image's bundled
textures (brick, grass, gravel) when scikit-image is installed, else onto
procedural textures; the same metadata layout.
"""

from __future__ import annotations

import colorsys
import gzip
import hashlib
import json
import os
import shutil
import struct
import uuid
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image

__all__ = [
    "make_wsol_standin",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CorruptFileError",
    "WSOLDataset",
    "resize_bbox",
    "resize_nearest",
    "load_mask_image",
    "unnormalize",
    "make_synthetic",
    "SYNTHETIC_REGIMES",
    "make_fashion_textures",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class CorruptFileError(OSError):
    """A data or metadata file exists but cannot be decoded/parsed; names the file."""


# --------------------------------------------------------------------------------------
# Upstream conventions
# --------------------------------------------------------------------------------------
def resize_bbox(box, image_size, resize_size) -> Tuple[int, int, int, int]:
    """Rescale a box (x0, y0, x1, y1) from image_size (w, h) to resize_size (w, h).

    Upstream's rule: ``int(x0 * new_w / w)`` etc. in float64 (truncation).
    """
    x0, y0, x1, y1 = map(float, box)
    w, h = map(float, image_size)
    nw, nh = map(float, resize_size)
    return (int(x0 * nw / w), int(y0 * nh / h), int(x1 * nw / w), int(y1 * nh / h))


def resize_nearest(array: np.ndarray, width: int, height: int) -> np.ndarray:
    """OpenCV's ``INTER_NEAREST`` resize, in numpy (same rule in OpenCV 3, 4 and 5).

    Destination pixel x reads source ``min(floor(x * (1 / (dst_w / src_w))), src_w - 1)``,
    with the scale computed in float64 the way OpenCV does.
    """
    src_h, src_w = array.shape[:2]
    ifx = 1.0 / (float(width) / src_w)
    ify = 1.0 / (float(height) / src_h)
    xs = np.minimum(np.floor(np.arange(width) * ifx).astype(np.int64), src_w - 1)
    ys = np.minimum(np.floor(np.arange(height) * ify).astype(np.int64), src_h - 1)
    return array[ys][:, xs]


def load_mask_image(path: str, size: int) -> np.ndarray:
    """A mask PNG as upstream reads it: grayscale float32, nearest-resized to size x size."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mask file not found: {path}")
    import cv2

    gray = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
    if gray is None:
        raise CorruptFileError(f"cannot decode mask file: {path}")
    return resize_nearest(np.float32(gray), size, size)


def unnormalize(image: torch.Tensor) -> np.ndarray:
    """Undo the ImageNet normalization: [3, H, W] tensor -> uint8 [H, W, 3] array."""
    x = image.detach().cpu().float().numpy().transpose(1, 2, 0)
    x = x * np.asarray(IMAGENET_STD, np.float32) + np.asarray(IMAGENET_MEAN, np.float32)
    return (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)


# --------------------------------------------------------------------------------------
# Metadata parsing
# --------------------------------------------------------------------------------------
def _read_lines(path: str, required: bool = True) -> Optional[List[str]]:
    if not os.path.isfile(path):
        if required:
            raise FileNotFoundError(f"metadata file not found: {path}")
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return [ln.rstrip("\r\n") for ln in f]
    except UnicodeDecodeError as exc:
        raise CorruptFileError(f"metadata file is not UTF-8 text: {path}") from exc


def _split_fields(path: str, lines: List[str], counts, what: str):
    """Yield (line_no, fields) of the non-empty lines; each must have len in counts."""
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        fields = line.split(",")
        if len(fields) not in counts:
            raise CorruptFileError(
                f"{path}:{no}: expected {what}, got {line!r}")
        yield no, fields


def _to_int(path, no, text):
    try:
        return int(text)
    except ValueError:
        raise CorruptFileError(f"{path}:{no}: {text!r} is not an integer") from None


def _read_class_labels(path: str) -> Dict[str, int]:
    labels = {}
    for no, (image_id, lab) in _split_fields(path, _read_lines(path), (2,), "<path>,<label>"):
        labels[image_id] = _to_int(path, no, lab)
    return labels


def _read_mask_listing(path: str, lines):
    """masks-format lines -> (mask paths per id, ignore path per id)."""
    mask_paths: Dict[str, List[str]] = {}
    ignore_paths: Dict[str, str] = {}
    for no, (image_id, mask_path, ignore_path) in _split_fields(
            path, lines, (3,), "<path>,<mask.png>,<ignore.png>"):
        if not mask_path:
            raise CorruptFileError(f"{path}:{no}: empty mask path")
        if image_id in mask_paths:
            mask_paths[image_id].append(mask_path)
            if ignore_path and ignore_path != ignore_paths[image_id]:
                raise CorruptFileError(
                    f"{path}:{no}: second ignore path for {image_id} (one per image)")
        else:
            mask_paths[image_id] = [mask_path]
            ignore_paths[image_id] = ignore_path
    return mask_paths, ignore_paths


# --------------------------------------------------------------------------------------
# Transforms (torchvision-equivalent, PIL based)
# --------------------------------------------------------------------------------------
def _to_normalized_tensor(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.uint8)
    t = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return t.sub_(mean).div_(std)


class WSOLDataset(torch.utils.data.Dataset):
    """A split of a WSOL dataset in wsolevaluation's format.

    Args:
        data_root: folder the image ids are relative to.
        metadata_root: folder holding ``<split>/{image_ids,class_labels,...}.txt``.
        split: 'train', 'val' or 'test' (any sub-folder name).
        train: random crop + flip transform (else the deterministic eval resize).
        image_size: the frame S (eval images are S x S; boxes and masks are given in
            this frame). Default 224.
        crop_size: train crop (default ``image_size``).
        resize_size: train resize before the crop (default ``round(256 * crop / 224)``).
        mask_root: folder mask/ignore paths are relative to (default ``data_root``).
        check_files: verify at construction that every image file exists.

    ``__getitem__`` returns ``(image [3, S, S] float tensor, label int, image_id str)``.
    """

    def __init__(self, data_root, metadata_root, split, train: bool, image_size: int = 224,
                 crop_size: Optional[int] = None, resize_size: Optional[int] = None,
                 mask_root=None, check_files: bool = False):
        self.data_root = os.fspath(data_root)
        self.metadata_root = os.fspath(metadata_root)
        self.split = split
        self.train = bool(train)
        self.image_size = int(image_size)
        self.crop_size = int(crop_size) if crop_size is not None else self.image_size
        self.resize_size = (int(resize_size) if resize_size is not None
                            else int(round(256 * self.crop_size / 224)))
        if min(self.image_size, self.crop_size) <= 0:
            raise ValueError("image_size and crop_size must be positive")
        if self.resize_size < self.crop_size:
            raise ValueError(
                f"resize_size {self.resize_size} is smaller than crop_size {self.crop_size}")
        self.mask_root = os.fspath(mask_root) if mask_root is not None else self.data_root
        self.split_dir = os.path.join(self.metadata_root, split)
        if not os.path.isdir(self.split_dir):
            raise FileNotFoundError(f"metadata folder not found: {self.split_dir}")

        ids_file = os.path.join(self.split_dir, "image_ids.txt")
        self.image_ids: List[str] = [ln for ln in _read_lines(ids_file) if ln.strip()]
        if not self.image_ids:
            raise CorruptFileError(f"no image ids in {ids_file}")
        if len(set(self.image_ids)) != len(self.image_ids):
            raise CorruptFileError(f"duplicate image ids in {ids_file}")

        labels_file = os.path.join(self.split_dir, "class_labels.txt")
        all_labels = _read_class_labels(labels_file)
        missing = [i for i in self.image_ids if i not in all_labels]
        if missing:
            raise CorruptFileError(
                f"{labels_file}: no label for {len(missing)} image id(s), e.g. {missing[0]}")
        self.labels: Dict[str, int] = {i: all_labels[i] for i in self.image_ids}
        self.num_classes = self._count_classes()

        sizes_file = os.path.join(self.split_dir, "image_sizes.txt")
        self.image_sizes: Dict[str, Tuple[int, int]] = {}
        lines = _read_lines(sizes_file, required=False) or []
        for no, (image_id, ws, hs) in _split_fields(sizes_file, lines, (3,), "<path>,<w>,<h>"):
            self.image_sizes[image_id] = (_to_int(sizes_file, no, ws), _to_int(sizes_file, no, hs))

        self._boxes: Dict[str, List[Tuple[int, int, int, int]]] = {}
        self._mask_paths: Dict[str, List[str]] = {}
        self._ignore_paths: Dict[str, str] = {}
        self._parse_localization()
        self._resized_boxes: Dict[str, np.ndarray] = {}
        if check_files:
            for image_id in self.image_ids:
                p = self.image_path(image_id)
                if not os.path.isfile(p):
                    raise FileNotFoundError(f"image file not found: {p}")

    # ---- metadata -------------------------------------------------------------------
    def _count_classes(self) -> int:
        """1 + the largest label over every split of metadata_root (a split may lack
        some classes)."""
        top = max(self.labels.values())
        try:
            siblings = sorted(os.listdir(self.metadata_root))
        except OSError:
            siblings = []
        for name in siblings:
            f = os.path.join(self.metadata_root, name, "class_labels.txt")
            if name != self.split and os.path.isfile(f):
                labs = _read_class_labels(f)
                if labs:
                    top = max(top, max(labs.values()))
        return top + 1

    def _parse_localization(self):
        loc_file = os.path.join(self.split_dir, "localization.txt")
        lines = _read_lines(loc_file, required=False)
        if lines:
            first = next((ln for ln in lines if ln.strip()), None)
            nf = len(first.split(",")) if first is not None else 0
            if nf == 5:
                self._boxes = self._read_box_file(loc_file, lines)
            elif nf == 3:
                self._mask_paths, self._ignore_paths = _read_mask_listing(loc_file, lines)
            elif nf:
                raise CorruptFileError(
                    f"{loc_file}: unknown localization format (first line {first!r})")
        parts_file = os.path.join(self.split_dir, "parts.txt")
        self._parts = self._read_box_file(parts_file, _read_lines(parts_file, required=False) or [])
        masks_file = os.path.join(self.split_dir, "masks.txt")
        mlines = _read_lines(masks_file, required=False)
        if mlines:
            if self._mask_paths:
                raise CorruptFileError(
                    f"{masks_file}: masks given twice (localization.txt already has masks)")
            self._mask_paths, self._ignore_paths = _read_mask_listing(masks_file, mlines)

    @staticmethod
    def _read_box_file(path, lines) -> Dict[str, List[Tuple[int, int, int, int]]]:
        boxes: Dict[str, List[Tuple[int, int, int, int]]] = {}
        for no, f in _split_fields(path, lines, (5,), "<path>,<x0>,<y0>,<x1>,<y1>"):
            box = tuple(_to_int(path, no, v) for v in f[1:])
            if min(box) < 0 or box[2] < box[0] or box[3] < box[1]:
                raise CorruptFileError(f"{path}:{no}: invalid box {box}")
            boxes.setdefault(f[0], []).append(box)
        return boxes

    @property
    def has_boxes(self) -> bool:
        return bool(self._boxes)

    @property
    def has_masks(self) -> bool:
        return bool(self._mask_paths)

    def image_path(self, image_id: str) -> str:
        return os.path.join(self.data_root, image_id)

    def original_size(self, image_id: str) -> Tuple[int, int]:
        """(w, h) from image_sizes.txt, else read from the image file header."""
        if image_id in self.image_sizes:
            return self.image_sizes[image_id]
        path = self.image_path(image_id)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image file not found (and no size in "
                                    f"image_sizes.txt): {path}")
        try:
            with Image.open(path) as im:
                size = im.size
        except Exception as exc:
            raise CorruptFileError(f"cannot read image file: {path} ({exc})") from exc
        self.image_sizes[image_id] = size
        return size

    def original_boxes(self, image_id: str) -> np.ndarray:
        """Boxes [k, 4] in original image pixels."""
        if not self._boxes:
            raise ValueError(f"split {self.split_dir} has no boxes")
        if image_id not in self._boxes:
            raise KeyError(f"no boxes for image id {image_id!r} in {self.split_dir}")
        return np.asarray(self._boxes[image_id], dtype=np.int64)

    def gt_boxes(self, image_id: str) -> np.ndarray:
        """Boxes [k, 4] (int64, x0, y0, x1, y1) in the image_size x image_size frame."""
        cached = self._resized_boxes.get(image_id)
        if cached is None:
            orig = self.original_boxes(image_id)
            size = self.original_size(image_id)
            # upstream's resize_bbox, box by box
            cached = np.asarray(
                [resize_bbox(b, size, (self.image_size, self.image_size)) for b in orig],
                dtype=np.int64)
            self._resized_boxes[image_id] = cached
        return cached.copy()

    @property
    def has_parts(self) -> bool:
        return bool(self._parts)

    def part_boxes(self, image_id: str) -> np.ndarray:
        """Synthetic sets only: box [1, 4] of the discriminative part, in the S frame."""
        if not self._parts:
            raise ValueError(f"split {self.split_dir} has no parts.txt")
        size = self.original_size(image_id)
        return np.asarray([resize_bbox(b, size, (self.image_size, self.image_size))
                           for b in self._parts[image_id]], dtype=np.int64)

    def gt_mask(self, image_id: str) -> Tuple[np.ndarray, np.ndarray]:
        """(foreground bool [S, S], ignore bool [S, S]) in the image_size frame."""
        if not self._mask_paths:
            raise ValueError(f"split {self.split_dir} has no masks")
        if image_id not in self._mask_paths:
            raise KeyError(f"no mask for image id {image_id!r} in {self.split_dir}")
        s = self.image_size
        fg = np.zeros((s, s), dtype=bool)
        for rel in self._mask_paths[image_id]:
            fg |= load_mask_image(os.path.join(self.mask_root, rel), s) > 0.5
        ignore_rel = self._ignore_paths.get(image_id, "")
        if ignore_rel:
            ignore = load_mask_image(os.path.join(self.mask_root, ignore_rel), s) > 0.5
            ignore &= ~fg
        else:
            ignore = np.zeros((s, s), dtype=bool)
        return fg, ignore

    # ---- images ---------------------------------------------------------------------
    def load_image(self, image_id: str) -> Image.Image:
        """The RGB PIL image; raises FileNotFoundError / CorruptFileError naming the file."""
        path = self.image_path(image_id)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image file not found: {path}")
        try:
            with Image.open(path) as im:
                im.load()
                return im.convert("RGB")
        except Exception as exc:
            raise CorruptFileError(f"cannot decode image file: {path} ({exc})") from exc

    def transform(self, img: Image.Image) -> torch.Tensor:
        if not self.train:
            img = img.resize((self.image_size, self.image_size), Image.BILINEAR)
            return _to_normalized_tensor(img)
        r, c = self.resize_size, self.crop_size
        img = img.resize((r, r), Image.BILINEAR)
        i = int(torch.randint(0, r - c + 1, size=(1,)).item())
        j = int(torch.randint(0, r - c + 1, size=(1,)).item())
        img = img.crop((j, i, j + c, i + c))
        if torch.rand(1).item() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return _to_normalized_tensor(img)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int):
        image_id = self.image_ids[index]
        return self.transform(self.load_image(image_id)), self.labels[image_id], image_id

    def __repr__(self) -> str:
        kind = "+".join(k for k, v in (("boxes", self.has_boxes), ("masks", self.has_masks)) if v)
        return (f"WSOLDataset({self.split_dir!r}, n={len(self)}, classes={self.num_classes}, "
                f"train={self.train}, S={self.image_size}, loc={kind or 'none'})")


# --------------------------------------------------------------------------------------
# Writing a data set in the format
# --------------------------------------------------------------------------------------
def _params_dir(root, kind: str, params: dict) -> Tuple[str, str]:
    blob = json.dumps(params, sort_keys=True).encode()
    digest = hashlib.sha1(blob).hexdigest()[:12]
    return os.path.join(os.fspath(root), f"{kind}-{digest}"), digest


def _generate_once(root, kind: str, params: dict, writer) -> Tuple[str, str]:
    """Run writer(tmp_dir) once for these params; reuse a finished earlier run."""
    final, _ = _params_dir(root, kind, params)
    data_root = os.path.join(final, "data")
    metadata_root = os.path.join(final, "metadata")
    done = os.path.join(final, "params.json")
    if os.path.isfile(done):
        with open(done) as f:
            if json.load(f) == params:
                return data_root, metadata_root
        raise RuntimeError(f"{final} holds a data set with other parameters (hash clash?)")
    os.makedirs(os.fspath(root), exist_ok=True)
    tmp = os.path.join(os.fspath(root), f".tmp-{kind}-{uuid.uuid4().hex[:8]}")
    try:
        writer(os.path.join(tmp, "data"), os.path.join(tmp, "metadata"))
        with open(os.path.join(tmp, "params.json"), "w") as f:
            json.dump(params, f, indent=1, sort_keys=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.isfile(done):  # not a concurrent twin that finished first
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return data_root, metadata_root


def _save_png(path: str, array: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, format="PNG", optimize=False, compress_level=6)


class _SplitWriter:
    """Collects the metadata lines of one split and writes them."""

    def __init__(self, data_root, metadata_root, split):
        self.data_root, self.split = data_root, split
        self.meta = os.path.join(metadata_root, split)
        self.ids, self.labels, self.sizes, self.boxes, self.masks = [], [], [], [], []
        self.parts = []

    def add(self, image_id, label, image, mask, part=None):
        stem = os.path.splitext(image_id)[0]
        h, w = mask.shape
        ys, xs = np.nonzero(mask)
        if len(xs) == 0:
            raise RuntimeError(f"empty object mask for {image_id}")
        _save_png(os.path.join(self.data_root, image_id), image)
        _save_png(os.path.join(self.data_root, stem + "_mask.png"),
                  np.where(mask, np.uint8(255), np.uint8(0)))
        _save_png(os.path.join(self.data_root, stem + "_ignore.png"),
                  np.zeros((h, w), np.uint8))
        self.ids.append(image_id)
        self.labels.append(f"{image_id},{label}")
        self.sizes.append(f"{image_id},{w},{h}")
        self.boxes.append(f"{image_id},{xs.min()},{ys.min()},{xs.max()},{ys.max()}")
        self.masks.append(f"{image_id},{stem}_mask.png,{stem}_ignore.png")
        if part is not None:
            py, px = np.nonzero(part)
            self.parts.append(f"{image_id},{px.min()},{py.min()},{px.max()},{py.max()}")

    def close(self):
        os.makedirs(self.meta, exist_ok=True)
        for name, lines in (("image_ids.txt", self.ids), ("class_labels.txt", self.labels),
                            ("image_sizes.txt", self.sizes), ("localization.txt", self.boxes),
                            ("masks.txt", self.masks), ("parts.txt", self.parts)):
            if name == "parts.txt" and not lines:
                continue
            with open(os.path.join(self.meta, name), "w") as f:
                f.write("".join(ln + "\n" for ln in lines))


_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    # One stream per image: an image does not depend on how many others there are.
    return np.random.default_rng([int(seed), _SPLIT_CODES[split], int(index)])


def _hsv(h, s, v) -> np.ndarray:
    return np.asarray(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255


def _grid(size: int):
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    return x, y


def _smooth_noise(rng, size, cells, channels=3):
    import cv2

    small = rng.random((cells, cells, channels)).astype(np.float32)
    big = cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)
    return big.reshape(size, size, channels)


def _muted_colour(rng) -> np.ndarray:
    return _hsv(rng.random(), rng.uniform(0.05, 0.35), rng.uniform(0.3, 0.85))


def _body_texture(rng, size, x, y) -> np.ndarray:
    """The class-agnostic body appearance: tan/brown/grey with stripes."""
    base = _hsv(rng.uniform(0.05, 0.14), rng.uniform(0.2, 0.45), rng.uniform(0.5, 0.8))
    theta = rng.uniform(0, np.pi)
    period = rng.uniform(4.0, 7.0) * size / 128
    phase = rng.uniform(0, 2 * np.pi)
    wave = np.sin(2 * np.pi * (x * np.cos(theta) + y * np.sin(theta)) / period + phase)
    shade = np.where(wave > 0.2, 0.72, 1.0).astype(np.float32)
    return base[None, None, :] * shade[..., None]


def _ellipse(x, y, cx, cy, a, b, ang) -> np.ndarray:
    c, s = np.cos(ang), np.sin(ang)
    u = (x - cx) * c + (y - cy) * s
    v = -(x - cx) * s + (y - cy) * c
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0


def _class_design(c: int, num_classes: int):
    """(hue, pattern) of class c's part; pattern 0 solid, 1 ring, 2 stripes, 3 dot.
    Unique for c < 32."""
    n_hues = min(num_classes, 8)
    hue = (c % 8) / n_hues if num_classes <= 8 else (c % 8) / 8
    pattern = (c + c // 8) % 4
    return hue, pattern


# The body's hue range (see _body_texture); the CUB-like regime keeps every background
# colour outside it, widened by a margin.
_BODY_HUES = (0.05, 0.14)
_BODY_HUE_MARGIN = 0.03


def _nonbody_colour(rng, sat=(0.05, 0.35), val=(0.3, 0.85)) -> np.ndarray:
    """A colour whose hue is outside the body's hue range (plus margin)."""
    lo, hi = _BODY_HUES[0] - _BODY_HUE_MARGIN, _BODY_HUES[1] + _BODY_HUE_MARGIN
    h = hi + rng.random() * (1.0 - (hi - lo))
    return _hsv(h, rng.uniform(*sat), rng.uniform(*val))


def _nonbody_texture(rng, size, x, y, kind: int) -> np.ndarray:
    """A distractor texture that is not the body's: 0 checker, 1 speckle, 2 dots,
    in two colours outside the body's hues."""
    c1 = _nonbody_colour(rng, sat=(0.2, 0.6), val=(0.35, 0.9))
    c2 = _nonbody_colour(rng, sat=(0.2, 0.6), val=(0.35, 0.9))
    if kind == 0:
        period = rng.uniform(3.0, 6.0) * size / 64
        sel = ((np.floor(x / period) + np.floor(y / period)) % 2) == 0
    elif kind == 1:
        sel = rng.random((size, size)) < 0.5
    else:
        period = rng.uniform(4.0, 7.0) * size / 64
        fx, fy = (x % period) - period / 2, (y % period) - period / 2
        sel = np.hypot(fx, fy) <= 0.3 * period
    return np.where(sel[..., None], c1[None, None, :], c2[None, None, :]).astype(np.float32)


def _render_synthetic(rng, size, label, num_classes, n_distractors, part_scale, regime="cluttered"):
    import cv2

    cub = regime == "cub"
    colour = (lambda r: _nonbody_colour(r)) if cub else _muted_colour
    x, y = _grid(size)
    # Background: smooth muted colour noise + clutter (lines, blobs).
    bg_a, bg_b = colour(rng), colour(rng)
    t = _smooth_noise(rng, size, int(rng.integers(3, 7)), 1)
    img = bg_a * t + bg_b * (1 - t)
    img = img + (_smooth_noise(rng, size, int(rng.integers(10, 20))) - 0.5) * 40
    img = np.ascontiguousarray(img, dtype=np.float32)
    for _ in range(int(rng.integers(6, 14))):
        p0 = tuple(int(v) for v in rng.integers(0, size, 2))
        p1 = tuple(int(v) for v in rng.integers(0, size, 2))
        cv2.line(img, p0, p1, tuple(float(v) for v in colour(rng)),
                 int(rng.integers(1, 3)))
    for _ in range(int(rng.integers(3, 7))):
        blob = _ellipse(x, y, *rng.uniform(0, size, 2), *rng.uniform(0.02, 0.08, 2) * size,
                        rng.uniform(0, np.pi))
        img[blob] = colour(rng)

    # Object geometry (decided before distractors, so these avoid its centre).
    a = rng.uniform(0.20, 0.31) * size
    b = rng.uniform(0.13, 0.22) * size
    ang = rng.uniform(0, np.pi)
    margin = a + 0.02 * size
    cx, cy = rng.uniform(margin, size - margin, 2)

    # Distractors. cluttered: body-textured fragments and muted shapes (half each);
    # cub: textured shapes whose texture is never the body's.
    for k in range(n_distractors):
        for _ in range(20):
            dx, dy = rng.uniform(0.1, 0.9, 2) * size
            if np.hypot(dx - cx, dy - cy) > a + 0.1 * size:
                break
        shape = _ellipse(x, y, dx, dy, *rng.uniform(0.06, 0.13, 2) * size, rng.uniform(0, np.pi))
        if cub:
            img[shape] = _nonbody_texture(rng, size, x, y, int(rng.integers(0, 3)))[shape]
        elif k % 2 == 0:
            img[shape] = _body_texture(rng, size, x, y)[shape]
        else:
            img[shape] = _muted_colour(rng)

    # Body.
    body = _ellipse(x, y, cx, cy, a, b, ang)
    img[body] = _body_texture(rng, size, x, y)[body]

    # Discriminative part on the rim of the body.
    r = rng.uniform(part_scale[0], part_scale[1]) * size
    phi = rng.uniform(0, 2 * np.pi)
    # point on the rotated ellipse at parametric angle phi, pushed outwards
    ex, ey = a * np.cos(phi), b * np.sin(phi)
    px = cx + ex * np.cos(ang) - ey * np.sin(ang)
    py = cy + ex * np.sin(ang) + ey * np.cos(ang)
    norm = np.hypot(px - cx, py - cy) + 1e-6
    px += (px - cx) / norm * 0.35 * r
    py += (py - cy) / norm * 0.35 * r
    px, py = float(np.clip(px, r, size - 1 - r)), float(np.clip(py, r, size - 1 - r))
    dist = np.hypot(x - px, y - py)
    part = dist <= r
    hue, pattern = _class_design(label, num_classes)
    colour = _hsv(hue + rng.uniform(-0.015, 0.015), rng.uniform(0.85, 1.0), rng.uniform(0.8, 1.0))
    part_img = np.broadcast_to(colour, (size, size, 3)).copy()
    if pattern == 1:    # ring: light centre
        part_img[dist <= 0.5 * r] = (255, 255, 240)
    elif pattern == 2:  # dark stripes
        th = rng.uniform(0, np.pi)
        wave = np.sin(2 * np.pi * ((x - px) * np.cos(th) + (y - py) * np.sin(th)) / max(r * 0.6, 2.0))
        part_img[wave > 0.3] = (20, 20, 20)
    elif pattern == 3:  # dark dot
        part_img[dist <= 0.4 * r] = (15, 15, 15)
    img[part] = part_img[part]

    img = img + rng.normal(0, 5, img.shape).astype(np.float32)
    mask = body | part
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), mask, part


_SYNTH_VERSION = 2


SYNTHETIC_REGIMES = ("cub", "cluttered")


def make_synthetic(root, seed: int = 0, num_classes: int = 4, n_train: int = 800,
                   n_val: int = 200, n_test: int = 200, image_size: int = 128,
                   n_distractors: Optional[int] = None, part_scale=(0.07, 0.09),
                   regime: str = "cub") -> Tuple[str, str]:
    """Generate (or reuse) the synthetic WSOL data set; returns (data_root, metadata_root).

    Args:
        root: folder under which ``synthetic-<hash>/`` is created.
        seed: the data set is a pure function of the parameters.
        num_classes: 2..32 (the class design is (hue, pattern) of the part).
        n_train, n_val, n_test: images per split (labels cycle through the classes).
        image_size: on-disk image side (images are square). The loader resizes to
            its own frame.
        n_distractors: distractor shapes per image (default 3 for ``"cub"``, 2 for
            ``"cluttered"``, where half of them carry the body texture).
        part_scale: (min, max) radius of the discriminative part, as a fraction of the
            image side.
        regime: ``"cub"`` (the body's look appears nowhere in the background) or
            ``"cluttered"`` (distractors carry the body's look); see the module docs.
    """
    if regime not in SYNTHETIC_REGIMES:
        raise ValueError(f"regime must be one of {SYNTHETIC_REGIMES}; got {regime!r}")
    if n_distractors is None:
        n_distractors = 3 if regime == "cub" else 2
    if int(n_distractors) < 0:
        raise ValueError(f"n_distractors must be >= 0; got {n_distractors}")
    if not (2 <= num_classes <= 32):
        raise ValueError(f"num_classes must be in [2, 32]; got {num_classes}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32; got {image_size}")
    counts = {"train": int(n_train), "val": int(n_val), "test": int(n_test)}
    if any(v < 0 for v in counts.values()):
        raise ValueError(f"split sizes must be >= 0; got {counts}")
    part_scale = tuple(float(v) for v in part_scale)
    params = dict(kind="synthetic", version=_SYNTH_VERSION, seed=int(seed),
                  num_classes=int(num_classes), counts=counts, image_size=int(image_size),
                  n_distractors=int(n_distractors), part_scale=list(part_scale))
    if regime != "cluttered":  # the cluttered set keeps its earlier parameters (and folder)
        params["regime"] = regime

    def writer(data_root, metadata_root):
        for split, n in counts.items():
            w = _SplitWriter(data_root, metadata_root, split)
            for i in range(n):
                label = i % num_classes
                img, mask, part = _render_synthetic(_rng(seed, split, i), image_size, label,
                                                    num_classes, int(n_distractors), part_scale, regime)
                w.add(f"{split}/c{label:02d}/{i:05d}.png", label, img, mask, part)
            w.close()

    return _generate_once(root, "synthetic", params, writer)


def make_wsol_standin(root, dataset: str = "cub", seed: int = 0, num_classes: int = 4, n_train: int = 32,
                      n_val: int = 8, n_test: int = 8, image_size: int = 96) -> Tuple[str, str, Optional[str]]:
    """A stand-in for a real data set in its wsolevaluation layout, to run ``cream-wsol reproduce
    --data-root ...`` end to end without the real images: the synthetic CUB-like scenes of
    :func:`make_synthetic`, saved as JPEGs of varied, non-square sizes (each image resized from
    its ``image_size`` square render to a width and height in [0.75, 1.25] x ``image_size``).

    ``dataset="cub"`` (or ``"ilsvrc"``): ``<root>/images/NNN.Class_NN/Class_NN_IIII_S.jpg`` and
    ``<root>/metadata/{train,val,test}/`` with ``image_ids.txt``, ``class_labels.txt``,
    ``image_sizes.txt`` and ``localization.txt`` (one box per image, original pixels), as
    wsolevaluation's CUB metadata. ``"openimages"``: val's and test's ``localization.txt`` list masks
    instead (``<root>/masks/...png`` and an all-zero ignore map) and train has none, as its
    OpenImages metadata.

    Returns ``(data_root, metadata_root, mask_root)`` (mask_root None for boxes). Written once per
    parameter set (reused when it exists)."""
    if dataset not in ("cub", "ilsvrc", "openimages"):
        raise ValueError(f"dataset must be 'cub', 'ilsvrc' or 'openimages'; got {dataset!r}")
    if not (2 <= num_classes <= 32):
        raise ValueError(f"num_classes must be in [2, 32]; got {num_classes}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32; got {image_size}")
    counts = {"train": int(n_train), "val": int(n_val), "test": int(n_test)}
    if any(v < 1 for v in counts.values()):
        raise ValueError(f"split sizes must be >= 1; got {counts}")
    params = dict(kind="wsol-standin", version=2, dataset=dataset, seed=int(seed), num_classes=int(num_classes),
                  counts=counts, image_size=int(image_size))
    masks = dataset == "openimages"

    def writer(tmp_data, tmp_meta):
        base = os.path.dirname(tmp_data)
        images, mask_dir = os.path.join(base, "images"), os.path.join(base, "masks")
        for split, n in counts.items():
            lines = {k: [] for k in ("image_ids", "class_labels", "image_sizes", "localization")}
            for i in range(n):
                label = i % num_classes
                rng = _rng(seed, split, i)
                img, mask, _ = _render_synthetic(rng, image_size, label, num_classes, 3, (0.07, 0.09), "cub")
                w, h = (int(round(image_size * f)) for f in rng.uniform(0.75, 1.25, size=2))
                folder = f"{label + 1:03d}.Class_{label:02d}"
                image_id = f"{folder}/Class_{label:02d}_{i:04d}_{_SPLIT_CODES[split]}.jpg"
                path = os.path.join(images, image_id)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                Image.fromarray(img).resize((w, h), Image.BILINEAR).save(path, format="JPEG", quality=90)
                m = np.asarray(Image.fromarray(np.where(mask, np.uint8(255), np.uint8(0))).resize((w, h),
                                                                                                 Image.NEAREST)) > 127
                lines["image_ids"].append(image_id)
                lines["class_labels"].append(f"{image_id},{label}")
                lines["image_sizes"].append(f"{image_id},{w},{h}")
                if masks:
                    stem = os.path.splitext(image_id)[0]
                    _save_png(os.path.join(mask_dir, stem + "_mask.png"), np.where(m, np.uint8(255), np.uint8(0)))
                    _save_png(os.path.join(mask_dir, stem + "_ignore.png"), np.zeros((h, w), np.uint8))
                    lines["localization"].append(f"{image_id},{stem}_mask.png,{stem}_ignore.png")
                else:
                    ys, xs = np.nonzero(m)
                    lines["localization"].append(f"{image_id},{xs.min()},{ys.min()},{xs.max()},{ys.max()}")
            d = os.path.join(tmp_meta, split)
            os.makedirs(d, exist_ok=True)
            for name, ls in lines.items():
                if name == "localization" and masks and split == "train":
                    continue  # as wsolevaluation's OpenImages metadata: no masks for train
                with open(os.path.join(d, name + ".txt"), "w") as fh:
                    fh.write("".join(ln + "\n" for ln in ls))

    final, _ = _params_dir(root, "standin", params)
    _generate_once(root, "standin", params, lambda d, m: writer(d, m))
    return (os.path.join(final, "images"), os.path.join(final, "metadata"),
            os.path.join(final, "masks") if masks else None)


# --------------------------------------------------------------------------------------
# Fashion-MNIST on textures (optional)
# --------------------------------------------------------------------------------------
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                   "Shirt", "Sneaker", "Bag", "Ankle boot")


def _find_fashion_dir(fashion_dir=None) -> str:
    cands = [fashion_dir] if fashion_dir else (
        [os.environ["CREAM_FASHION_MNIST_DIR"]] if os.environ.get("CREAM_FASHION_MNIST_DIR")
        else list(FASHION_MNIST_DIRS))
    need = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
            "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    for d in cands:
        if d and all(os.path.isfile(os.path.join(d, n)) for n in need):
            return d
    raise FileNotFoundError(
        "Fashion-MNIST not found (looked in " + ", ".join(map(str, cands)) + " for "
        + ", ".join(need) + "). Install the Debian package: "
        "apt-get install -y dataset-fashion-mnist, or pass fashion_dir= / set "
        "CREAM_FASHION_MNIST_DIR to a folder with those files.")


def _read_idx(path: str) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
        magic = struct.unpack(">I", data[:4])[0]
        ndim = magic & 0xFF
        dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
        return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)
    except (OSError, EOFError, struct.error, ValueError) as exc:
        raise CorruptFileError(f"cannot read IDX file: {path} ({exc})") from exc


def _texture_sources(rng_seed: int):
    """Grayscale textures: scikit-image's bundled ones when available, else procedural."""
    try:
        import skimage.data as skd
        return [np.asarray(getattr(skd, n)(), dtype=np.uint8) for n in ("brick", "grass", "gravel")], "skimage"
    except Exception:  # optional dependency (ImportError) or a missing bundled file
        rng = np.random.default_rng(rng_seed)
        out = []
        for cells in (8, 24, 64):
            t = _smooth_noise(rng, 512, cells, 1)[..., 0]
            out.append((255 * (t - t.min()) / (t.max() - t.min() + 1e-6)).astype(np.uint8))
        return out, "procedural"


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    import cv2

    h, w = mask.shape
    pad = np.zeros((h + 2, w + 2), np.uint8)
    pad[1:-1, 1:-1] = mask.astype(np.uint8)
    flood = pad.copy()
    ff_mask = np.zeros((h + 4, w + 4), np.uint8)
    cv2.floodFill(flood, ff_mask, (0, 0), 1)
    holes = flood[1:-1, 1:-1] == 0
    return mask | holes


def make_fashion_textures(root, seed: int = 0, num_classes: int = 10, n_train: int = 1000,
                          n_val: int = 200, n_test: int = 200, image_size: int = 96,
                          item_scale=(0.45, 0.75), fashion_dir=None) -> Tuple[str, str]:
    """Fashion-MNIST items pasted onto textures; returns (data_root, metadata_root).

    Needs the Fashion-MNIST IDX files (Debian package ``dataset-fashion-mnist``);
    raises FileNotFoundError with the fix when they are absent. Uses scikit-image's
    bundled textures when scikit-image is installed (procedural ones otherwise; the
    choice is part of the parameters, hence of the output folder's name).
    Train items come from Fashion-MNIST's train set, val/test items from its test set
    (disjoint halves).
    """
    if not (2 <= num_classes <= 10):
        raise ValueError(f"num_classes must be in [2, 10]; got {num_classes}")
    src = _find_fashion_dir(fashion_dir)
    textures, texture_kind = _texture_sources(seed)
    counts = {"train": int(n_train), "val": int(n_val), "test": int(n_test)}
    item_scale = tuple(float(v) for v in item_scale)
    params = dict(kind="fashion_textures", version=1, seed=int(seed),
                  num_classes=int(num_classes), counts=counts, image_size=int(image_size),
                  item_scale=list(item_scale), textures=texture_kind)

    def writer(data_root, metadata_root):
        import cv2

        pools = {}
        for part in ("train", "t10k"):
            ims = _read_idx(os.path.join(src, f"{part}-images-idx3-ubyte.gz"))
            labs = _read_idx(os.path.join(src, f"{part}-labels-idx1-ubyte.gz"))
            pools[part] = (ims, labs)
        size = image_size
        for split, n in counts.items():
            ims, labs = pools["train" if split == "train" else "t10k"]
            w = _SplitWriter(data_root, metadata_root, split)
            for i in range(n):
                rng = _rng(seed, split, i)
                label = i % num_classes
                cand = np.flatnonzero(labs == label)
                if split != "train":  # val: first half of t10k, test: second half
                    half = len(ims) // 2
                    cand = cand[cand < half] if split == "val" else cand[cand >= half]
                item = ims[int(rng.choice(cand))]
                tex = textures[int(rng.integers(len(textures)))]
                ty, tx = rng.integers(0, tex.shape[0] - size + 1), rng.integers(0, tex.shape[1] - size + 1)
                patch = tex[ty:ty + size, tx:tx + size].astype(np.float32) / 255
                tint = _muted_colour(rng)
                img = (0.35 + 0.65 * patch[..., None]) * tint[None, None, :]
                s = int(round(rng.uniform(*item_scale) * size))
                it = cv2.resize(item.astype(np.float32), (s, s), interpolation=cv2.INTER_LINEAR)
                m = _fill_holes(it > 20)
                if not m.any():
                    m = it >= it.max()
                colour = _hsv(rng.random(), rng.uniform(0.5, 1.0), rng.uniform(0.7, 1.0))
                shade = 0.25 + 0.75 * (it / 255.0)
                oy, ox = (int(v) for v in rng.integers(0, size - s + 1, 2))
                mask = np.zeros((size, size), bool)
                mask[oy:oy + s, ox:ox + s] = m
                region = img[oy:oy + s, ox:ox + s]
                region[m] = (shade[..., None] * colour[None, None, :])[m]
                img = img + rng.normal(0, 4, img.shape).astype(np.float32)
                img = np.clip(img + 0.5, 0, 255).astype(np.uint8)
                w.add(f"{split}/c{label:02d}/{i:05d}.png", label, img, mask)
            w.close()

    return _generate_once(root, "fashion", params, writer)
