"""Structured pruning of torchvision's detection and segmentation models (issue #20).

Every model is built by ``ts.create_model("torchvision:NAME", input_shape=(3, S, S))`` (random
weights, backbone too; the R-CNNs, RetinaNet and FCOS then work at S instead of resizing to 800)
and pruned with ``ts.prune_channels_(model, ratio=0.5)``: backbone, FPN and heads. Checked: eval
outputs keep their structure (same keys, same trailing dims), train-mode losses with targets
backpropagate, MACs after / before <= 0.6, and a refused or failed prune leaves the model
bit-identical (every tensor reachable from it, plain attributes included) with identical outputs.

MACs of the R-CNNs depend on how many boxes survive NMS, which random weights decide; they are
compared at fixed counts (``fixed_counts``: NMS and score thresholds that keep every candidate, so
the RoI heads always see ``post_nms_top_n`` proposals and ``detections_per_img`` detections).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_flatten

import torchslim as ts
from torchslim.errors import ConfigError, ModelRunError, SpecError
from torchslim.graph._detection import fixed_counts
from torchslim.graph.state import state_digest

DETECTION = ["fasterrcnn_resnet50_fpn", "fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_mobilenet_v3_large_fpn",
             "retinanet_resnet50_fpn", "fcos_resnet50_fpn", "ssd300_vgg16", "ssdlite320_mobilenet_v3_large",
             "maskrcnn_resnet50_fpn", "keypointrcnn_resnet50_fpn"]
SEGMENTATION = ["fcn_resnet50", "deeplabv3_resnet50", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large"]
SIZE = {"fcn_resnet50": 64, "deeplabv3_resnet50": 64}  # dilated ResNet-50s: output stride 8, costly


def build(name: str) -> nn.Module:
    size = SIZE.get(name, 96)
    model = ts.create_model(f"torchvision:{name}", input_shape=(3, size, size), seed=0)
    rpn = getattr(model, "rpn", None)
    if rpn is not None:  # fewer proposals keep the RoI heads cheap on CPU (torchvision default: 1000)
        rpn._post_nms_top_n["testing"] = 100
        model.roi_heads.detections_per_img = 10
    return model


def macs(model: nn.Module) -> int:
    with fixed_counts(model):
        return ts.profile(model, latency=False, size=False).macs


def structure(out: Any) -> Any:
    """Keys, types and trailing dims (detections per image vary with the weights)."""
    if isinstance(out, torch.Tensor):
        return ("tensor", tuple(out.shape[1:]), out.dtype)
    if isinstance(out, dict):
        return {k: structure(v) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return [structure(v) for v in out]
    return type(out).__name__


def same_outputs(a: Any, b: Any) -> bool:
    la, sa = tree_flatten(a)
    lb, sb = tree_flatten(b)
    return sa == sb and all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(la, lb))


def targets(name: str, size: int) -> list[dict[str, torch.Tensor]]:
    boxes = torch.tensor([[10.0, 12.0, 50.0, 60.0], [30.0, 20.0, 80.0, 90.0]]) * size / 96
    label = 1 if "keypoint" in name else 2  # keypoint R-CNN knows two classes
    t: dict[str, torch.Tensor] = {"boxes": boxes, "labels": torch.tensor([1, label])}
    if "mask" in name:
        masks = torch.zeros(2, size, size, dtype=torch.uint8)
        for m, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
            m[y0:y1, x0:x1] = 1
        t["masks"] = masks
    if "keypoint" in name:
        kp = torch.zeros(2, 17, 3)
        kp[..., 0], kp[..., 1], kp[..., 2] = boxes[:, None, 0] + 5, boxes[:, None, 1] + 5, 1
        t["keypoints"] = kp
    return [t, {k: v.clone() for k, v in t.items()}]


def train_loss(name: str, model: nn.Module, images: Any) -> torch.Tensor:
    """A training step's loss on two images (BatchNorm in train mode needs more than one value)."""
    if name in SEGMENTATION:
        x = torch.cat([images, images.flip(-1)])
        out = model(x)["out"]
        return nn.functional.cross_entropy(out, torch.randint(0, out.shape[1], (2, *out.shape[2:])))
    imgs = [images[0], images[0].flip(-1)]
    losses = model(imgs, targets(name, imgs[0].shape[-1]))
    return sum(losses.values())


def refused(model: nn.Module) -> None:
    """A prune refused after the analysis ran (the traced forward is where side effects came from)."""

    def bad(model: nn.Module, cg: Any, group: Any) -> torch.Tensor:
        return torch.zeros(1)  # the wrong shape: ConfigError

    with pytest.raises(ConfigError, match="importance returned"):
        ts.prune_channels_(model, ratio=0.5, importance=bad)


@pytest.mark.parametrize("name", DETECTION + SEGMENTATION)
def test_prunes_with_outputs_losses_and_macs(name: str) -> None:
    model = build(name)
    (x,) = ts.example_inputs(model)
    with torch.no_grad():
        ref = model(x)
    digest = state_digest(model)
    refused(model)  # contract: nothing a user can observe changed
    assert state_digest(model) == digest
    with torch.no_grad():
        assert same_outputs(model(x), ref)

    before = macs(model)
    ids = {n: id(m) for n, m in model.named_modules()}
    plan = ts.prune_channels_(model, ratio=0.5)
    assert plan.removed_channels > 0.4 * plan.total_channels
    assert {n: id(m) for n, m in model.named_modules()} == ids
    assert macs(model) <= 0.6 * before
    with torch.no_grad():
        out = model(x)
    assert structure(out) == structure(ref)

    model.train()
    loss = train_loss(name, model, x)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and sum(g is not None for g in grads) >= 0.9 * len(grads)


@pytest.mark.parametrize("name", ["fasterrcnn_mobilenet_v3_large_320_fpn", "maskrcnn_resnet50_fpn", "lraspp_mobilenet_v3_large"])
def test_surgery_failing_midway_leaves_model_bit_identical(name: str, fail_surgery_midway) -> None:
    """The whole prune runs (analysis, trials on copies, the real surgery's swaps), then the surgery
    raises midway on the user's model: everything reachable from it is as before."""
    model = build(name)
    (x,) = ts.example_inputs(model)
    with torch.no_grad():
        ref = model(x)
    digest = state_digest(model)
    fail_surgery_midway(model)
    with pytest.raises(ModelRunError, match="restored unchanged"):
        ts.prune_channels_(model, ratio=0.5)
    assert state_digest(model) == digest
    with torch.no_grad():
        assert same_outputs(model(x), ref)


def test_anchor_generator_survives_a_refused_prune() -> None:
    """The report of issue #20: after a refused prune the anchors were left on the meta device."""
    model = build("fasterrcnn_mobilenet_v3_large_320_fpn")
    anchors = list(model.rpn.anchor_generator.cell_anchors)
    refused(model)
    assert all(a.device.type == "cpu" for a in model.rpn.anchor_generator.cell_anchors)
    assert all(a is b for a, b in zip(model.rpn.anchor_generator.cell_anchors, anchors))
    (x,) = ts.example_inputs(model)
    with torch.no_grad():
        model(x)


def test_create_model_builds_detection_models_offline() -> None:
    model = ts.create_model("torchvision:fcos_resnet50_fpn", input_shape=(3, 64, 80))
    (images,) = ts.example_inputs(model)
    assert isinstance(images, list) and images[0].shape == (3, 64, 80)
    assert model.transform.min_size == (64,) and model.transform.max_size == 80
    with pytest.raises(SpecError, match=r"\(3, H, W\)"):
        ts.create_model("torchvision:fcos_resnet50_fpn", input_shape=(1, 64, 64))


def test_pruned_detector_saves_and_loads_with_its_list_of_images(tmp_path: Any) -> None:
    """ts.save keeps nested example inputs (a detector's list of images); ts.load gives the same model."""
    model = build("fasterrcnn_mobilenet_v3_large_320_fpn")
    ts.prune_channels_(model, ratio=0.5)
    ts.save(model, tmp_path / "det")
    loaded = ts.load(tmp_path / "det")
    loaded.rpn._post_nms_top_n["testing"] = 100  # the test's settings of build(), plain attributes
    loaded.roi_heads.detections_per_img = 10
    (images,) = ts.example_inputs(loaded)
    (original,) = ts.example_inputs(model)
    assert isinstance(images, list) and len(images) == 1 and torch.equal(images[0], original[0])
    model.eval()
    with torch.no_grad(), fixed_counts(model), fixed_counts(loaded):
        assert same_outputs(loaded(images), model(images))
        feats_a, feats_b = model.backbone(images[0][None]), loaded.backbone(images[0][None])
    assert all(torch.equal(feats_a[k], feats_b[k]) for k in feats_a)


def test_example_inputs_batch_of_a_detector_is_a_longer_list() -> None:
    model = build("fasterrcnn_mobilenet_v3_large_320_fpn")
    (images,) = ts.example_inputs(model, batch_size=3)
    assert isinstance(images, list) and len(images) == 3
    (one,) = ts.example_inputs(model)
    assert all(torch.equal(im, one[0]) for im in images)


def test_cli_input_shape_of_a_detector_is_a_batch_of_images(capsys: pytest.CaptureFixture[str]) -> None:
    from torchslim.cli import main

    rc = main(["profile", "torchvision:ssdlite320_mobilenet_v3_large", "--input-shape", "2,3,320,320",
               "--no-latency", "--json"])
    import json

    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["input_shapes"] == [[3, 320, 320], [3, 320, 320]]
