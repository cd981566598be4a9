"""The paper's Table 7, timed: VGG16-CAM forward alone (T=0) against CAM + CREAM, T=1..4.

Paper (CVPR 2022, Table 7): CAM 1.7 ms per image, CAM + CREAM at T=2 6.0 ms, i.e.
+4.3 ms per image. Here, with random weights (timing does not depend on them):

    cam    forward pass of the VGG16 CAM variant (conv6 512->1024 + ReLU, pool5
           removed; python/cream_wsol/models.py VGG16CAM) + top-1 class + its CAM
    cream  em_reactivate on those features with the [200, 1024] context tables
           gathered by the predicted class, T iterations (backend "auto")
    e2e    cam + cream in one timed call, to check that the two parts add up

Rows report per-image milliseconds (median / B). "cream" rows also carry
cam_plus_cream_per_image_ms = the cam row + this row, both from this session.
"""
import pytest
import torch

import cream_kernels
from cream_kernels import ops


@pytest.fixture(scope="module")
def vgg16_cam(harness):
    # cream_wsol ships in the same package (python/cream_wsol); the benchmark times its model.
    from cream_wsol.models import VGG16CAM

    return VGG16CAM(num_classes=200).eval().to(harness.device), "cream_wsol.models.VGG16CAM (random weights)"


def test_table7(benchmark, harness, table7_case, vgg16_cam):
    case = table7_case
    model, source = vgg16_cam
    device = harness.device
    g = torch.Generator().manual_seed(0)
    x = torch.randn(case.B, 3, case.image, case.image, generator=g).to(device)
    fg_table = (torch.randn(200, 1024, generator=g) * 0.1).abs().to(device)
    bg_table = (torch.randn(200, 1024, generator=g) * 0.1).abs().to(device)
    backend = ops.resolve_backend(None, device, torch.float32)
    T = case.T

    def cam_forward():
        with torch.inference_mode():
            logits, feats = model(x, return_features=True)
            pred = logits.argmax(dim=1)
            return feats, model.cams(feats, pred), pred

    def cream(feats, cam, pred):
        with torch.inference_mode():
            return cream_kernels.em_reactivate(feats, cam, fg_table, bg_table, pred, num_iters=T)

    if case.kind == "cam":
        fn = cam_forward
    elif case.kind == "cream":
        feats, cam, pred = cam_forward()

        def fn():
            return cream(feats, cam, pred)

    else:

        def fn():
            return cream(*cam_forward())

    info = {"model": source, "backend": backend, "image": case.image}
    row = harness.measure(benchmark, case, fn, features_bytes=case.B * 1024 * (case.image // 16) ** 2 * 4, info=info)
    if row.get("median_us"):
        row["per_image_ms"] = row["median_us"] / 1e3 / case.B
        cam_us = harness.medians.get(("table7", f"cam-img{case.image}-B{case.B}-T0"), {}).get("auto")
        if case.kind == "cream" and cam_us:
            row["cam_per_image_ms"] = cam_us / 1e3 / case.B
            row["cam_plus_cream_per_image_ms"] = row["cam_per_image_ms"] + row["per_image_ms"]
        benchmark.extra_info.update({k: row[k] for k in ("per_image_ms", "cam_per_image_ms", "cam_plus_cream_per_image_ms") if k in row})
