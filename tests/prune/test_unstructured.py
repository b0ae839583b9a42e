"""Criteria and patterns: N:M, blocks, torch.nn.utils.prune parity, LAMP, Wanda, SNIP, movement."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as tprune
from torch import nn

import torchslim as ts
from torchslim.errors import ConfigError
from torchslim.prune import Movement, get_mask, masked_weights, sparsify_
from torchslim.prune.unstructured import Pattern, lamp_scores, nm_mask, parse_pattern, select_masks


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is faster than two on a shared machine (no spin-waiting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)



@pytest.fixture
def lenet():
    torch.manual_seed(0)
    return ts.create_model("zoo:lenet300")


def _calib(n_batches=2, batch=16, shape=(1, 28, 28), classes=10):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, *shape, generator=g), torch.randint(0, classes, (batch,), generator=g)) for _ in range(n_batches)]


def test_2_4_holds_in_every_group_of_4(lenet):
    plan = sparsify_(lenet, pattern="2:4", modules=["fc1", "fc2"])
    assert plan.overall == 0.5 and plan.pattern == "2:4"
    for name in ("fc1", "fc2"):
        w = getattr(lenet, name).weight.detach()
        groups = (w != 0).reshape(w.shape[0], -1, 4).sum(-1)
        assert (groups <= 2).all()
        assert (get_mask(getattr(lenet, name)).reshape(w.shape[0], -1, 4).sum(-1) == 2).all()


def test_nm_keeps_largest_in_group():
    w = torch.tensor([[0.1, -5.0, 0.2, 3.0, 9.0, 8.0, -7.0, 0.0]])
    assert nm_mask(w.abs(), 2, 4).int().tolist() == [[0, 1, 0, 1, 1, 1, 0, 0]]
    assert nm_mask(w.abs(), 1, 4).int().tolist() == [[0, 1, 0, 0, 1, 0, 0, 0]]


def test_nm_on_conv_groups_input_channels():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 4, 3)
    sparsify_(conv, pattern="2:4")
    keep = get_mask(conv)  # (out, in, kh, kw): groups of 4 input channels at each kernel position
    assert (keep.reshape(4, 2, 4, 3, 3).sum(2) == 2).all()


def test_block_pattern_prunes_whole_tiles(lenet):
    plan = sparsify_(lenet, 0.75, pattern="block:4x4", modules=["fc2"])
    keep = get_mask(lenet.fc2)
    tiles = keep.reshape(25, 4, 75, 4).float().mean(dim=(1, 3))
    assert ((tiles == 0) | (tiles == 1)).all()
    assert int((tiles == 0).sum()) == round(0.75 * 1875)
    assert plan.layers["fc2.weight"] == pytest.approx(round(0.75 * 1875) / 1875)
    assert parse_pattern("block", block=(2, 8)) == Pattern("block", block=(2, 8))


def test_global_magnitude_masks_identical_to_torch_prune(lenet):
    reference = copy.deepcopy(lenet)
    sparsify_(lenet, 0.9, scope="global")
    params = [(reference.fc1, "weight"), (reference.fc2, "weight"), (reference.fc3, "weight")]
    tprune.global_unstructured(params, pruning_method=tprune.L1Unstructured, amount=0.9)
    for name in ("fc1", "fc2", "fc3"):
        assert torch.equal(get_mask(getattr(lenet, name)), getattr(reference, name).weight_mask.bool())
    x = torch.randn(5, 1, 28, 28)
    assert torch.equal(lenet(x), reference(x))


def test_layer_magnitude_masks_identical_to_torch_prune(lenet):
    reference = copy.deepcopy(lenet)
    sparsify_(lenet, 0.37)
    for name in ("fc1", "fc2", "fc3"):
        tprune.l1_unstructured(getattr(reference, name), "weight", amount=0.37)
        assert torch.equal(get_mask(getattr(lenet, name)), getattr(reference, name).weight_mask.bool())


def test_lamp_scores_match_definition():
    torch.manual_seed(0)
    w = torch.randn(5, 7)
    s = lamp_scores(w).reshape(-1)
    flat = w.reshape(-1) ** 2
    for u in range(flat.numel()):
        brute = flat[u] / flat[flat >= flat[u]].sum()
        assert s[u] == pytest.approx(float(brute), rel=1e-5)


def test_lamp_global_keeps_every_layers_largest_weight(lenet):
    sparsify_(lenet, 0.999, method="lamp", scope="global")
    for name in ("fc1", "fc2", "fc3"):
        w = getattr(lenet, name).parametrizations.weight.original.detach()
        assert get_mask(getattr(lenet, name)).any()
        assert w.abs().max() > 0


def test_random_is_seeded_and_exact(lenet):
    other = copy.deepcopy(lenet)
    sparsify_(lenet, 0.6, method="random", seed=3)
    sparsify_(other, 0.6, method="random", seed=3)
    assert torch.equal(get_mask(lenet.fc1), get_mask(other.fc1))
    assert int((~get_mask(lenet.fc1)).sum()) == round(0.6 * 235200)
    third = ts.create_model("zoo:lenet300")
    sparsify_(third, 0.6, method="random", seed=4)
    assert not torch.equal(get_mask(lenet.fc1), get_mask(third.fc1))


def test_wanda_scores_and_per_row_sparsity(lenet):
    calib = _calib()
    ref = copy.deepcopy(lenet)
    sparsify_(lenet, 0.5, method="wanda", calibration=calib, modules=["fc1"])
    keep = get_mask(lenet.fc1)
    assert (keep.sum(dim=1) == 392).all()  # each output row pruned to 50%
    x = torch.cat([b[0] for b in calib]).flatten(1)
    score = ref.fc1.weight.detach().abs() * x.norm(dim=0)
    expected = torch.ones_like(keep)
    expected.scatter_(1, score.topk(392, dim=1, largest=False).indices, False)
    assert torch.equal(keep, expected)


def test_one_wanda_sparsify_criterion_equals_wanda_(lenet):
    """``sparsify_(method="wanda")`` and ``wanda_`` are one implementation: measured on the
    unpruned model (``sequential=False``), both prune exactly the same weights, N:M included."""
    from torchslim.prune.wanda import wanda_

    calib = _calib()
    for pattern, sparsity in (("unstructured", 0.5), ("2:4", None)):
        a, b = copy.deepcopy(lenet), copy.deepcopy(lenet)
        sparsify_(a, sparsity, method="wanda", pattern=pattern, calibration=calib)
        wanda_(b, sparsity, pattern=pattern, calibration=calib, sequential=False)
        for name in ("fc1", "fc2", "fc3"):
            assert torch.equal(get_mask(getattr(a, name)), get_mask(getattr(b, name))), (pattern, name)


def test_wanda_on_convolutions_scores_input_channels():
    """For a convolution ``X_j`` is input channel ``j`` over every position and kernel tap."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    calib = [torch.randn(4, 3, 12, 12) * torch.tensor([0.1, 1.0, 5.0]).reshape(1, 3, 1, 1)]
    ref = copy.deepcopy(model)
    sparsify_(model, 0.5, method="wanda", calibration=calib, modules=["2"])
    h = ref[1](ref[0](calib[0]))
    norms = h.detach().transpose(0, 1).reshape(8, -1).norm(dim=1)
    score = (ref[2].weight.detach().abs() * norms.reshape(1, -1, 1, 1)).movedim(1, -1).reshape(4, -1)
    expected = torch.ones_like(score, dtype=torch.bool)
    expected.scatter_(1, score.topk(36, dim=1, largest=False).indices, False)
    assert torch.equal(get_mask(model[2]), expected.reshape(4, 3, 3, 8).movedim(-1, 1))


def test_wanda_refuses_global_scope(lenet):
    with pytest.raises(ConfigError, match="layer"):
        sparsify_(lenet, 0.5, method="wanda", calibration=_calib(), scope="global")


def test_snip_scores_are_weight_times_gradient(lenet):
    calib = _calib(n_batches=1)
    ref = copy.deepcopy(lenet)
    sparsify_(lenet, 0.9, method="snip", calibration=calib, scope="global")
    x, y = calib[0]
    ref.eval()
    F.cross_entropy(ref(x), y).backward()
    scores = [(m.weight.detach() * m.weight.grad).abs() for m in (ref.fc1, ref.fc2, ref.fc3)]
    masks = select_masks({f"fc{i + 1}.weight": s for i, s in enumerate(scores)}, 0.9, scope="global")
    for name in ("fc1", "fc2", "fc3"):
        assert torch.equal(get_mask(getattr(lenet, name)), masks[f"{name}.weight"])


def test_snip_needs_labels(lenet):
    with pytest.raises(ConfigError, match="labeled"):
        sparsify_(lenet, 0.5, method="snip", calibration=[torch.randn(4, 1, 28, 28)])


def test_movement_accumulates_minus_w_times_grad():
    crit = Movement()
    w = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
    crit.accumulate({"w": w}, {"w": torch.tensor([[1.0, 1.0, -1.0, 0.0]])})
    crit.accumulate({"w": w}, {"w": torch.tensor([[1.0, 1.0, -1.0, 0.0]])})
    assert crit.scores({"w": w})["w"].tolist() == [[-2.0, 4.0, 6.0, 0.0]]
    # the weight moving towards zero (score -2) goes first
    assert select_masks(crit.scores({"w": w}), 0.25)["w"].int().tolist() == [[0, 1, 1, 1]]


def test_movement_one_shot_from_calibration(lenet):
    plan = sparsify_(lenet, 0.5, method="movement", calibration=_calib())
    assert plan.overall == pytest.approx(0.5)


def test_parse_pattern_errors():
    for bad in ("5:4", "0:4", "3-4", "blocks", "block:0x4", 24):
        with pytest.raises(ConfigError):
            parse_pattern(bad)
    assert parse_pattern("2:4").sparsity == 0.5 and str(parse_pattern("block:1x4")) == "block:1x4"


def test_registry_lists_criteria():
    names = ts.list_methods("prune.unstructured")
    for n in ("magnitude", "random", "lamp", "movement", "wanda", "snip"):
        assert f"prune.unstructured.{n}" in names


def test_masks_follow_the_model_device(lenet):
    sparsify_(lenet, 0.5)
    assert all(get_mask(m).device == m.parametrizations.weight.original.device for m in masked_weights(lenet).values())
