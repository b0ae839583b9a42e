"""No side effects, by construction (issue #20): analysis, trials and surgery never change anything a
user can observe. ``graph.state.preserved`` puts back every attribute, container and tensor
reachable from the model; ``clone_module`` copies models whose forward left non-leaf tensors behind.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.errors import ConfigError, ModelRunError
from torchslim.graph import analyse, trace
from torchslim.graph.state import clone_module, preserved, state_digest
from torchslim.graph.surgery import slice_model_


class Leaky(nn.Module):
    """Everything a forward can leave behind, in one model."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)
        self.anchors = [torch.arange(4.0), torch.ones(2)]  # moved to the input's device (AnchorGenerator)
        self.cache: dict[str, torch.Tensor] = {}  # filled per device (LeViT's attention-bias cache)
        self.pyramid: list[torch.Tensor] = []  # replaced by activations (RAFT's corr_pyramid)
        self.register_buffer("calls", torch.zeros(()))
        self.fail = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.anchors = [a.to(x.device) for a in self.anchors]
        self.cache.setdefault(str(x.device), self.fc.weight * 2)
        y = self.bn(self.conv(x))
        self.pyramid = [y, y.amax((2, 3))]
        self.last_shape = tuple(y.shape)  # a new attribute
        self.calls += 1  # an in-place write into a buffer
        if self.fail:
            raise RuntimeError("forward failed after leaving things behind")
        return self.fc(y.mean((2, 3))) + self.anchors[0].sum()


def _leaky() -> tuple[Leaky, torch.Tensor]:
    torch.manual_seed(0)
    return Leaky().eval(), torch.randn(2, 3, 8, 8)


def test_preserved_puts_everything_back() -> None:
    m, x = _leaky()
    digest = state_digest(m)
    anchors, cache, weight_data = m.anchors, m.cache, m.conv.weight.data
    with preserved(m):
        m.train()
        m(x)  # BatchNorm running statistics updated in place, attributes added and replaced
        m.conv.weight.data = torch.zeros(1)  # a .data swap
        m.fc.weight.grad = torch.ones_like(m.fc.weight)
        m.bn.weight.requires_grad_(False)
        m.anchors.append(torch.zeros(1))
        m.bn.__class__ = type("Swapped", (nn.BatchNorm2d,), {})  # a forward swapped for the trace
        del m.fail
    assert state_digest(m) == digest and type(m.bn) is nn.BatchNorm2d
    assert m.anchors is anchors and m.cache is cache and len(m.anchors) == 2 and not cache
    assert m.conv.weight.data.data_ptr() == weight_data.data_ptr()
    assert m.fc.weight.grad is None and m.bn.weight.requires_grad and not hasattr(m, "last_shape")


def test_preserved_restores_when_the_block_raises() -> None:
    m, x = _leaky()
    digest = state_digest(m)
    m.fail = True
    digest = state_digest(m)
    with pytest.raises(RuntimeError, match="failed after"), preserved(m):
        m(x)
    assert state_digest(m) == digest


def test_preserved_guards_extra_roots_against_writes() -> None:
    x = torch.randn(3)
    before = x.clone()
    with preserved(x):
        x.mul_(0)
    assert torch.equal(x, before)


def test_trace_and_analyse_leave_the_model_and_inputs_unchanged() -> None:
    m, x = _leaky()
    ref = m(x)
    digest, x0 = state_digest(m), x.clone()
    trace(m, x)
    assert state_digest(m) == digest
    cg = analyse(m, x)  # the meta trace moves anchors to meta and fills the caches with meta tensors
    assert cg.meta_ok
    assert state_digest(m) == digest and torch.equal(x, x0)
    assert torch.equal(m(x), ref)


def test_a_failing_trace_leaves_the_model_unchanged() -> None:
    m, x = _leaky()
    m.fail = True
    digest = state_digest(m)
    with pytest.raises(ModelRunError):
        trace(m, x)
    assert state_digest(m) == digest


def test_clone_module_copies_non_leaf_tensors_held_in_attributes() -> None:
    m, x = _leaky()
    m.train()
    m(x).sum().backward()  # pyramid and cache now hold tensors with autograd history
    with pytest.raises(RuntimeError, match="graph leaves"):
        copy.deepcopy(m)
    twin = clone_module(m)
    assert torch.equal(twin.pyramid[0], m.pyramid[0]) and twin.pyramid[0] is not m.pyramid[0]
    assert not twin.pyramid[0].requires_grad
    shadow = clone_module(m, meta=True)
    assert shadow.conv.weight.is_meta and not m.conv.weight.is_meta


def test_prune_works_after_a_training_step_left_non_leaf_caches() -> None:
    m, x = _leaky()
    m.train()
    m(x).sum().backward()
    m.eval()
    ts.prune_channels_(m, x, ratio=0.5)
    assert m.conv.out_channels == 4
    m(x)


def test_refused_and_failed_prunes_leave_everything_bit_identical(fail_surgery_midway) -> None:
    m, x = _leaky()
    with torch.no_grad():
        ref = m(x)
    digest = state_digest(m)
    with pytest.raises(ConfigError, match="cannot be met"):
        ts.prune_channels_(m, x, target=ts.Budget(macs=0.001))
    assert state_digest(m) == digest
    fail_surgery_midway(m)
    with pytest.raises(ModelRunError, match="restored unchanged"):
        ts.prune_channels_(m, x, ratio=0.5)
    assert state_digest(m) == digest
    with torch.no_grad():
        assert torch.equal(m(x), ref)


def test_surgery_check_run_leaves_no_cache_of_the_new_widths() -> None:
    m, x = _leaky()
    cg = analyse(m, x)
    (g,) = [g for g in cg if ("conv.weight", 0) in g.producers]
    keep = cg.keep_indices(set(g.channels[:4]))
    slice_model_(m, keep, example_inputs=x)
    assert m.cache == {} and m.pyramid == [] and not hasattr(m, "last_shape")
    assert m.conv.out_channels == 4


@pytest.mark.parametrize("name", ["levit_128s", "efficientformerv2_s0"])
def test_timm_models_with_attention_bias_caches(name: str) -> None:
    """Issue #20: the trace left meta tensors in the attention-bias caches, and the trial's deep copy
    raised "Only Tensors created explicitly by the user (graph leaves) support the deepcopy protocol".
    (A full prune of both works too; it probes many attention groups, about 40 s each on 2 cores.)"""
    timm = pytest.importorskip("timm")
    from torchslim.graph.meta import meta_copy

    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False, img_size=128).eval()
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        ref = m(x)  # fills the caches for the cpu device
    digest = state_digest(m)
    with pytest.raises(ConfigError, match="importance returned"):
        ts.prune_channels_(m, x, ratio=0.5, importance=lambda model, cg, g: torch.zeros(1))
    assert state_digest(m) == digest
    with torch.no_grad():
        assert torch.equal(m(x), ref)
    cg = analyse(m, x)
    assert cg.meta_ok and len(cg) > 0 and state_digest(m) == digest
    assert meta_copy(m) is not None  # what a trial runs on
    with torch.no_grad():
        assert torch.equal(clone_module(m)(x), ref)
