"""torchvision's video classifiers prune at ratio 0.5: same outputs' shape, backward runs, MACs <= 0.6.

MViT V2 (0.50 of MACs, 16x224x224 input) and Swin3D (tests/graph/test_swin_attention.py) are covered
by ``benchmarks/prune_coverage.py --suite video``; MViT is left out here for time (72 s on 2 cores).
"""

from __future__ import annotations

import pytest
import torch
import torchvision

import torchslim as ts
from torchslim.prune.channels import prune_channels_


@pytest.mark.parametrize(("arch", "shape"), [
    ("r3d_18", (1, 3, 4, 56, 56)),
    ("mc3_18", (1, 3, 4, 56, 56)),
    ("r2plus1d_18", (1, 3, 4, 56, 56)),
    ("s3d", (1, 3, 16, 224, 224)),  # its pooling needs the full clip size
])
def test_video_classifier_prunes_half(arch: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None).eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        ref = model(x)
    ts.set_example_inputs(model, (x,))
    before = ts.profile(model, latency=False, size=False).macs
    plan = prune_channels_(model, ratio=0.5)
    assert plan.left_whole == []
    assert ts.profile(model, latency=False, size=False).macs <= 0.6 * before
    model.train()
    out = model(x)
    assert out.shape == ref.shape
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
