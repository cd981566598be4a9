"""cream_wsol.data: loaders on the real wsolevaluation metadata (placeholder images),
error reporting, and the synthetic generators."""
import hashlib
import json
import os
import re

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from cream_wsol.data import (IMAGENET_MEAN, IMAGENET_STD, CorruptFileError, WSOLDataset,
                             make_fashion_textures, make_synthetic, resize_bbox,
                             resize_nearest, unnormalize)


# ----------------------------------------------------------------------------- helpers
def test_resize_bbox_truncates_like_upstream():
    assert resize_bbox((1, 2, 4, 3), (10, 20), (35, 10)) == (3, 1, 14, 1)
    assert resize_bbox((1, 2, 1, 2), (3, 3), (3, 3)) == (1, 2, 1, 2)
    # 176 * 224 / 560 = 70.4, 136 * 224 / 419 = 72.7, 459 * 224 / 560 = 183.6,
    # 291 * 224 / 419 = 155.6
    assert resize_bbox((176, 136, 459, 291), (560, 419), (224, 224)) == (70, 72, 183, 155)


@pytest.mark.parametrize("src", [(1066, 1600), (632, 459), (7, 13), (224, 224), (97, 50)])
@pytest.mark.parametrize("dst", [224, 112, 61])
def test_resize_nearest_matches_opencv(src, dst):
    a = np.random.default_rng(0).random(src).astype(np.float32)
    assert np.array_equal(resize_nearest(a, dst, dst),
                          cv2.resize(a, (dst, dst), interpolation=cv2.INTER_NEAREST))


def test_imagenet_constants():
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------- CUB
CUB_FIRST = {  # image_ids[:3]: original box, original (w, h), box at 224, box at 112
    "val": [((176, 136, 459, 291), (560, 419), (70, 72, 183, 155), (35, 36, 91, 77)),
            ((44, 183, 426, 254), (576, 432), (17, 94, 165, 131), (8, 47, 82, 65)),
            ((437, 42, 834, 422), (999, 587), (97, 16, 187, 161), (48, 8, 93, 80))],
    "test": [((60, 27, 385, 331), (500, 335), (26, 18, 172, 221), (13, 9, 86, 110)),
             ((14, 112, 402, 298), (500, 347), (6, 72, 180, 192), (3, 36, 90, 96)),
             ((33, 53, 284, 448), (500, 470), (14, 25, 127, 213), (7, 12, 63, 106))],
}


@pytest.mark.parametrize("split,count", [("val", 1000), ("test", 5794)])
def test_cub_metadata(wsol_metadata, tmp_path, split, count):
    root = os.path.join(wsol_metadata, "CUB")
    ds = WSOLDataset(tmp_path, root, split, train=False)
    ds112 = WSOLDataset(tmp_path, root, split, train=False, image_size=112)
    assert len(ds) == count == len(ds.labels)
    assert ds.num_classes == 200 and set(ds.labels.values()) == set(range(200))
    assert ds.has_boxes and not ds.has_masks
    assert ds.image_ids[0].startswith("001.Black_footed_Albatross/")
    for image_id, (orig, size, b224, b112) in zip(ds.image_ids, CUB_FIRST[split]):
        assert ds.original_boxes(image_id).tolist() == [list(orig)]
        assert ds.original_size(image_id) == size
        assert ds.gt_boxes(image_id).tolist() == [list(b224)]
        assert ds112.gt_boxes(image_id).tolist() == [list(b112)]
    for image_id in ds.image_ids:  # every box inside the frame, x0 <= x1, y0 <= y1
        b = ds.gt_boxes(image_id)
        assert (b >= 0).all() and (b <= 223).all()
        assert (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()
    with pytest.raises(ValueError):
        ds.gt_mask(ds.image_ids[0])
    with pytest.raises(KeyError):
        ds.gt_boxes("no/such.jpg")


def test_cub_images_transforms_and_errors(wsol_metadata, tmp_path, placeholder):
    root = os.path.join(wsol_metadata, "CUB")
    ds = WSOLDataset(tmp_path, root, "val", train=False)
    ids = ds.image_ids[:4]
    for k, image_id in enumerate(ids[:3]):
        placeholder(os.path.join(tmp_path, image_id), *ds.original_size(image_id), seed=k)

    x, label, image_id = ds[0]
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    assert label == ds.labels[ids[0]] == 0 and image_id == ids[0]
    # eval transform = PIL bilinear resize to S x S + ImageNet normalization
    ref = np.asarray(Image.open(os.path.join(tmp_path, ids[0])).convert("RGB")
                     .resize((224, 224), Image.BILINEAR))
    assert np.abs(unnormalize(x).astype(int) - ref).max() <= 1
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(x, (torch.from_numpy(ref.copy()).permute(2, 0, 1) / 255 - mean) / std,
                          atol=1e-5)

    small = WSOLDataset(tmp_path, root, "val", train=False, image_size=112)
    assert small[1][0].shape == (3, 112, 112)
    train = WSOLDataset(tmp_path, root, "val", train=True, image_size=112)
    assert (train.resize_size, train.crop_size) == (128, 112)
    torch.manual_seed(0)
    a = train[2][0]
    torch.manual_seed(0)
    assert a.shape == (3, 112, 112) and torch.equal(a, train[2][0])  # torch-seeded
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(small, [0, 1, 2]), batch_size=3)
    xb, yb, idb = next(iter(loader))
    assert xb.shape == (3, 3, 112, 112) and list(idb) == ids[:3]

    # a missing image: the error names the file
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / ids[3]))):
        ds[3]
    with pytest.raises(FileNotFoundError, match="image file not found"):
        WSOLDataset(tmp_path, root, "val", train=False, check_files=True)
    # a corrupt image (garbage, then a truncated JPEG): the error names the file
    bad = os.path.join(tmp_path, ids[3])
    with open(bad, "wb") as f:
        f.write(b"not a jpeg at all")
    with pytest.raises(CorruptFileError, match=re.escape(ids[3].split("/")[-1])):
        ds[3]
    blob = open(os.path.join(tmp_path, ids[0]), "rb").read()
    with open(bad, "wb") as f:
        f.write(blob[: len(blob) // 3])
    with pytest.raises(CorruptFileError, match=re.escape(ids[3].split("/")[-1])):
        ds[3]


# -------------------------------------------------------------------------- OpenImages
def _reference_mask(path, size):
    m = np.float32(cv2.imread(path, cv2.IMREAD_GRAYSCALE))
    return cv2.resize(m, (size, size), interpolation=cv2.INTER_NEAREST) > 0.5


def test_openimages_masks(wsol_metadata, tmp_path, placeholder, openimages_sample_ids):
    root = os.path.join(wsol_metadata, "OpenImages")
    mask_root = os.path.join(root, "masks-sample")
    ds = WSOLDataset(tmp_path, root, "val", train=False, mask_root=mask_root)
    assert len(ds) == 2500 and ds.num_classes == 100
    assert ds.has_masks and not ds.has_boxes
    with pytest.raises(ValueError):
        ds.gt_boxes(openimages_sample_ids[0])
    # (foreground, ignore, remaining background) pixels at 224; upstream's own test
    # expects a constant map to score fg / (fg + bg) = 43031 / (43031 + 7145) here.
    counts = {openimages_sample_ids[0]: (43031, 0, 7145),
              openimages_sample_ids[1]: (833, 0, 49343),      # union of two masks
              openimages_sample_ids[2]: (347, 35919, 13910),  # large ignore region
              openimages_sample_ids[3]: (0, 0, 50176),
              openimages_sample_ids[4]: (50176, 0, 0)}
    for image_id, (n_fg, n_ign, n_bg) in counts.items():
        fg, ign = ds.gt_mask(image_id)
        assert fg.shape == ign.shape == (224, 224) and fg.dtype == ign.dtype == bool
        assert (fg.sum(), ign.sum(), (~fg & ~ign).sum()) == (n_fg, n_ign, n_bg)
        assert not (fg & ign).any()
    # the union and the ignore rule, against a direct cv2 reading
    stem = os.path.join(mask_root, "val/0bt_c3/3a29f0b33894d4a6")
    ref = (_reference_mask(stem + "_m0bt_c3_3581e3ae.png", 112)
           | _reference_mask(stem + "_m0bt_c3_d2422806.png", 112))
    ds112 = WSOLDataset(tmp_path, root, "val", train=False, image_size=112, mask_root=mask_root)
    assert np.array_equal(ds112.gt_mask(openimages_sample_ids[1])[0], ref)
    stem = os.path.join(mask_root, "val/0bt_c3/3b3b9931325d65c9")
    fg, ign = ds112.gt_mask(openimages_sample_ids[2])
    ref_fg = _reference_mask(stem + "_m0bt_c3_d4e2e136.png", 112)
    assert np.array_equal(fg, ref_fg)
    assert np.array_equal(ign, _reference_mask(stem + "_ignore.png", 112) & ~ref_fg)

    # placeholder images only for the sample ids, at the masks' size
    for k, image_id in enumerate(openimages_sample_ids):
        mpath = os.path.join(mask_root, ds._mask_paths[image_id][0])
        w, h = Image.open(mpath).size
        placeholder(os.path.join(tmp_path, image_id), w, h, seed=k)
        x, label, got_id = ds[ds.image_ids.index(image_id)]
        assert x.shape == (3, 224, 224) and got_id == image_id
    # an image whose mask is not in masks-sample: the error names the mask file
    other = ds.image_ids[0]
    with pytest.raises(FileNotFoundError, match=r"32fdab44f6e415f1_m01226z_7dab3053\.png"):
        ds.gt_mask(other)
    with pytest.raises(FileNotFoundError, match=r"32fdab44f6e415f1\.jpg"):
        ds[0]


def test_openimages_pxap_on_sample_masks(wsol_metadata, tmp_path, openimages_sample_ids):
    from cream_wsol.metrics import MaskEvaluator

    root = os.path.join(wsol_metadata, "OpenImages")
    ds = WSOLDataset(tmp_path, root, "val", train=False,
                     mask_root=os.path.join(root, "masks-sample"))
    for image_id in openimages_sample_ids[:3]:
        fg, ign = ds.gt_mask(image_id)
        for ignore_score in (0.0, 1.0):  # a perfect map, whatever it says on ignore pixels
            m = fg.astype(np.float32)
            m[ign] = ignore_score
            ev = MaskEvaluator()
            ev.accumulate(m, fg, ign)
            assert ev.compute()["PxAP"] == 100.0
    fg, ign = ds.gt_mask(openimages_sample_ids[0])
    ev = MaskEvaluator()
    ev.accumulate(np.full((224, 224), 0.5, np.float32), fg, ign)
    assert ev.compute()["PxAP"] == pytest.approx(100 * 43031 / (43031 + 7145))


# --------------------------------------------------------------- malformed / missing data
def _write_meta(root, split, files):
    d = os.path.join(root, split)
    os.makedirs(d, exist_ok=True)
    for name, text in files.items():
        with open(os.path.join(d, name), "w") as f:
            f.write(text)


def test_metadata_errors_name_the_file(tmp_path):
    meta = tmp_path / "meta"
    with pytest.raises(FileNotFoundError, match="val"):
        WSOLDataset(tmp_path, meta, "val", train=False)
    _write_meta(meta, "val", {"image_ids.txt": "a.png\n"})
    with pytest.raises(FileNotFoundError, match="class_labels.txt"):
        WSOLDataset(tmp_path, meta, "val", train=False)
    _write_meta(meta, "val", {"class_labels.txt": "a.png,x\n"})
    with pytest.raises(CorruptFileError, match=r"class_labels\.txt:1"):
        WSOLDataset(tmp_path, meta, "val", train=False)
    _write_meta(meta, "val", {"class_labels.txt": "a.png,1\n",
                              "localization.txt": "a.png,1,2,3\n"})
    with pytest.raises(CorruptFileError, match=r"localization\.txt"):
        WSOLDataset(tmp_path, meta, "val", train=False)
    _write_meta(meta, "val", {"localization.txt": "a.png,1,2,3,4\na.png,5,5,1,1\n"})
    with pytest.raises(CorruptFileError, match=r"localization\.txt:2"):
        WSOLDataset(tmp_path, meta, "val", train=False)
    # masks: a corrupt mask / ignore file is named
    _write_meta(meta, "val", {"localization.txt": "a.png,a_m.png,a_ig.png\n"})
    ds = WSOLDataset(tmp_path, meta, "val", train=False, image_size=32)
    Image.fromarray(np.full((10, 20), 255, np.uint8)).save(tmp_path / "a_m.png")
    with pytest.raises(FileNotFoundError, match=r"a_ig\.png"):
        ds.gt_mask("a.png")
    (tmp_path / "a_ig.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(CorruptFileError, match=r"a_ig\.png"):
        ds.gt_mask("a.png")
    Image.fromarray(np.zeros((10, 20), np.uint8)).save(tmp_path / "a_ig.png")
    fg, ign = ds.gt_mask("a.png")
    assert fg.all() and not ign.any() and ds.num_classes == 2


# --------------------------------------------------------------------------- synthetic
def _tree_digest(top):
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(top)):
        dirnames.sort()
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            h.update(os.path.relpath(p, top).encode())
            h.update(open(p, "rb").read())
    return h.hexdigest()


def test_synthetic_deterministic_and_reused(synthetic_small, tmp_path):
    root, data_root, metadata_root = synthetic_small
    kw = dict(seed=3, num_classes=4, n_train=12, n_val=8, n_test=4, image_size=64)
    d2, m2 = make_synthetic(tmp_path / "again", **kw)
    assert _tree_digest(os.path.dirname(data_root)) == _tree_digest(os.path.dirname(d2))
    # reuse: same params, same root -> same folder, nothing rewritten
    marker = os.path.join(os.path.dirname(data_root), "params.json")
    before = os.stat(marker).st_mtime_ns
    assert make_synthetic(root, **kw) == (data_root, metadata_root)
    assert os.stat(marker).st_mtime_ns == before
    # another seed gives other images (and another folder)
    d3, _ = make_synthetic(tmp_path / "again", **dict(kw, seed=4))
    assert d3 != d2
    a = np.asarray(Image.open(os.path.join(d2, "val/c00/00000.png")))
    b = np.asarray(Image.open(os.path.join(d3, "val/c00/00000.png")))
    assert a.shape == b.shape == (64, 64, 3) and not np.array_equal(a, b)


def test_synthetic_boxes_and_masks_exact(synthetic_small):
    _, data_root, metadata_root = synthetic_small
    for split, n in (("train", 12), ("val", 8), ("test", 4)):
        native = WSOLDataset(data_root, metadata_root, split, train=False, image_size=64)
        assert len(native) == n and native.has_boxes and native.has_masks
        assert native.num_classes == 4
        assert [native.labels[i] for i in native.image_ids] == [k % 4 for k in range(n)]
        for image_id in native.image_ids:
            # at the on-disk size, resize_bbox is the identity and masks are not resized
            fg, ign = native.gt_mask(image_id)
            ys, xs = np.nonzero(fg)
            assert native.gt_boxes(image_id).tolist() == [[xs.min(), ys.min(), xs.max(), ys.max()]]
            assert not ign.any()
            assert 0.05 < fg.mean() < 0.5  # a large object, not the whole frame
            disk = np.asarray(Image.open(os.path.join(data_root, image_id)))
            assert disk.shape == (64, 64, 3)
            # the discriminative part: small, inside the object's box, mostly on the mask
            (part,) = native.part_boxes(image_id)
            box = native.gt_boxes(image_id)[0]
            assert (part[:2] >= box[:2]).all() and (part[2:] <= box[2:]).all()
            area = (part[2] - part[0] + 1) * (part[3] - part[1] + 1)
            assert area < 0.35 * fg.sum()
            assert fg[part[1]:part[3] + 1, part[0]:part[2] + 1].mean() > 0.75
    ds = WSOLDataset(data_root, metadata_root, "val", train=False, image_size=112)
    assert ds.has_parts
    x, label, image_id = ds[1]
    assert x.shape == (3, 112, 112) and label == 1
    box = ds.original_boxes(image_id)[0]
    assert ds.gt_boxes(image_id).tolist() == [list(resize_bbox(box, (64, 64), (112, 112)))]
    fg, _ = ds.gt_mask(image_id)
    ys, xs = np.nonzero(fg)
    b = ds.gt_boxes(image_id)[0]
    # nearest-resized mask vs truncated box: same object, within the 64 -> 112 rounding
    assert abs(xs.min() - b[0]) <= 2 and abs(ys.min() - b[1]) <= 2
    assert abs(xs.max() - b[2]) <= 2 and abs(ys.max() - b[3]) <= 2


def test_synthetic_rejects_bad_params(tmp_path):
    with pytest.raises(ValueError):
        make_synthetic(tmp_path, num_classes=1)
    with pytest.raises(ValueError):
        make_synthetic(tmp_path, image_size=8)


def test_fashion_textures(tmp_path):
    try:
        data_root, metadata_root = make_fashion_textures(
            tmp_path, seed=0, num_classes=3, n_train=6, n_val=3, n_test=3, image_size=48)
    except FileNotFoundError as exc:
        assert "dataset-fashion-mnist" in str(exc)
        pytest.skip(f"Fashion-MNIST not installed: {exc}")
    ds = WSOLDataset(data_root, metadata_root, "train", train=False, image_size=48)
    assert len(ds) == 6 and ds.num_classes == 3 and ds.has_boxes and ds.has_masks
    for image_id in ds.image_ids:
        fg, _ = ds.gt_mask(image_id)
        ys, xs = np.nonzero(fg)
        assert ds.gt_boxes(image_id).tolist() == [[xs.min(), ys.min(), xs.max(), ys.max()]]


def test_fashion_missing_gives_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        make_fashion_textures(tmp_path, fashion_dir=str(tmp_path / "nowhere"))


def test_synthetic_regimes(tmp_path):
    """cub is the default; cluttered keeps the earlier parameters (folder and images);
    a cub background never carries the body's hue."""
    import colorsys

    from cream_wsol.data import _BODY_HUES

    kw = dict(seed=2, num_classes=4, n_train=8, n_val=0, n_test=0, image_size=64)
    d_cub, m_cub = make_synthetic(tmp_path, **kw)
    assert make_synthetic(tmp_path, regime="cub", **kw) == (d_cub, m_cub)
    d_cl, _ = make_synthetic(tmp_path, regime="cluttered", **kw)
    assert d_cl != d_cub
    assert "regime" not in json.load(open(os.path.join(os.path.dirname(d_cl), "params.json")))
    with pytest.raises(ValueError, match="regime"):
        make_synthetic(tmp_path, regime="ilsvrc", **kw)
    ds = WSOLDataset(d_cub, m_cub, "train", train=False, image_size=64)
    for image_id in ds.image_ids:
        img = np.asarray(ds.load_image(image_id).convert("RGB"), np.float32) / 255
        mask, _ = ds.gt_mask(image_id)
        bg = img[~np.asarray(mask, bool)]
        hsv = np.array([colorsys.rgb_to_hsv(*p) for p in bg[::7]])
        # body pixels: hue in the body range and saturation >= 0.2 (pixel noise aside)
        body_like = (hsv[:, 0] >= _BODY_HUES[0]) & (hsv[:, 0] <= _BODY_HUES[1]) & (hsv[:, 1] >= 0.2)
        assert body_like.mean() < 0.05, (image_id, body_like.mean())


@pytest.mark.slow
def test_synthetic_cam_fires_on_the_part_only(tmp_path):
    """Train a tiny CAM network (~1 min on 2 CPU cores): it classifies well, its CAM
    peaks on the discriminative part and its boxes cover too little of the object."""
    import torch.nn as nn
    import torch.nn.functional as F

    from cream_wsol.metrics import BoxEvaluator, normalize_scoremap

    torch.manual_seed(0)
    d, m = make_synthetic(tmp_path, seed=0, num_classes=4, n_train=480, n_val=80, n_test=0,
                          image_size=64, regime="cluttered")
    train = WSOLDataset(d, m, "train", train=True, image_size=64)
    val = WSOLDataset(d, m, "val", train=False, image_size=64)
    layers, ch = [], [3, 32, 64, 96]
    for i in range(3):
        layers += [nn.Conv2d(ch[i], ch[i + 1], 3, padding=1), nn.BatchNorm2d(ch[i + 1]),
                   nn.ReLU(), nn.MaxPool2d(2)]
    body = nn.Sequential(*layers[:-1])  # 16 x 16 feature map
    fc = nn.Linear(96, 4)
    opt = torch.optim.Adam([*body.parameters(), *fc.parameters()], 2e-3)
    loader = torch.utils.data.DataLoader(train, batch_size=32, shuffle=True)
    for _ in range(6):
        for x, y, _ in loader:
            loss = F.cross_entropy(fc(body(x).mean((2, 3))), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    body.eval()
    xs = torch.stack([val[i][0] for i in range(len(val))])
    ys = torch.tensor([val[i][1] for i in range(len(val))])
    with torch.no_grad():
        feats = body(xs)
        acc = (fc(feats.mean((2, 3))).argmax(1) == ys).float().mean().item()
        cams = torch.einsum("bchw,bc->bhw", feats, fc.weight[ys]).numpy()
    assert acc > 0.8
    ev = BoxEvaluator()
    on_part = []
    for cam, image_id in zip(cams, val.image_ids):
        sm = normalize_scoremap(cam, 64)
        ev.accumulate(sm, val.gt_boxes(image_id))
        y, x = np.unravel_index(np.argmax(sm), sm.shape)
        x0, y0, x1, y1 = val.part_boxes(image_id)[0]
        on_part.append(x0 - 3 <= x <= x1 + 3 and y0 - 3 <= y <= y1 + 3)
    r = ev.compute()
    print(f"acc {acc:.3f}, CAM peak on the part {np.mean(on_part):.2f}, "
          f"BoxAcc@50/70 {r['BoxAcc@50']:.1f}/{r['BoxAcc@70']:.1f}")
    assert np.mean(on_part) > 0.7
    assert r["BoxAcc@70"] < 30
