"""Weight sharing: k-means codebooks, zeros kept, trainable centroids, save/load of clustered models."""

from __future__ import annotations

import pytest
import torch

import torchslim as ts
from torchslim.errors import ConfigError
from torchslim.pack import ClusterConfig, bake_clusters, cluster_, clustered_layers, kmeans_1d


def _lenet() -> torch.nn.Module:
    return ts.create_model("zoo:lenet300")


def test_kmeans_1d_separates_groups_and_is_a_fixed_point() -> None:
    x = torch.cat([torch.randn(500) * 0.01 - 1, torch.randn(500) * 0.01 + 2, torch.randn(200) * 0.01 + 5])
    for init in ("linear", "density", "random"):
        c, a = kmeans_1d(x, 3, init=init, seed=1)
        assert torch.allclose(c, torch.tensor([-1.0, 2.0, 5.0], dtype=torch.float64), atol=0.01), init
        # each centroid is the mean of its members and every value is with its nearest centroid
        for j in range(3):
            assert torch.isclose(c[j], x[a == j].double().mean())
        assert torch.equal(a, (x.double()[:, None] - c[None]).abs().argmin(1))


@pytest.mark.parametrize("init", ["linear", "density", "random"])
def test_cluster_gives_at_most_2_pow_bits_values(init: str) -> None:
    model = _lenet()
    plan = cluster_(model, bits=3, init=init)
    assert set(plan.layers) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    for name, (module, _) in clustered_layers(model).items():
        assert torch.unique(module.weight).numel() <= 8, name
        assert plan.layers[name]["clusters_used"] <= 8
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_sparse_zeros_stay_zero_and_masks_go() -> None:
    model = _lenet()
    ts.sparsify_(model, 0.9)
    zeros = {n: (getattr(model, n).weight == 0).clone() for n in ("fc1", "fc2", "fc3")}
    cluster_(model, bits=4)
    for n, z in zeros.items():
        w = getattr(model, n).weight
        assert torch.equal(w == 0, z), n  # exactly the pruned entries are zero
        assert torch.unique(w[w != 0]).numel() <= 16
    assert all(type(p).__name__ == "SharedWeight" for p in model.fc1.parametrizations.weight)


def test_centroid_gradient_is_the_sum_over_its_cluster() -> None:
    model = _lenet()
    ts.sparsify_(model, 0.5)
    cluster_(model, bits=2)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    sw = model.fc2.parametrizations.weight[0]
    codebook = model.fc2.parametrizations.weight.original
    # the same loss with the weight as a free tensor gives the per-weight gradients
    dense = model.fc2.weight.detach().clone().requires_grad_(True)
    h = torch.relu(model.fc1(x.flatten(1)))
    out = model.fc3(torch.relu(torch.nn.functional.linear(h, dense, model.fc2.bias)))
    torch.nn.functional.cross_entropy(out, y).backward()
    expected = torch.stack([dense.grad[sw.indices.long() == j].sum() for j in range(4)])
    assert torch.allclose(codebook.grad, expected, atol=1e-6)


def test_fit_tunes_centroids_and_keeps_sharing() -> None:
    model = _lenet()
    ts.sparsify_(model, 0.8)
    cluster_(model, bits=3)
    zeros = (model.fc1.weight == 0).clone()
    before = model.fc1.parametrizations.weight.original.detach().clone()
    data = ts.load_data("synthetic:1x1x28x28:n=64")
    ts.fit(model, data, ts.TrainConfig(epochs=1, lr=0.01, optimizer="adam", max_steps_per_epoch=3), progress=False)
    after = model.fc1.parametrizations.weight.original.detach()
    assert not torch.equal(before, after)
    assert torch.equal(model.fc1.weight == 0, zeros)
    assert torch.unique(model.fc1.weight).numel() <= 9  # 8 centroids + the pruned zero


@pytest.mark.parametrize("bits", [0, 9, 2.5, True, "5", None])
def test_bits_outside_1_to_8_is_a_config_error_and_changes_nothing(bits) -> None:
    model = _lenet()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="bits"):
        cluster_(model, bits=bits)
    assert not clustered_layers(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_selection_errors_and_patterns() -> None:
    model = _lenet()
    with pytest.raises(ConfigError, match="selects? no"):
        cluster_(model, modules=["conv*"])
    with pytest.raises(ConfigError, match="init"):
        cluster_(model, init="kmeans++")
    with pytest.raises(ConfigError, match="regular expression"):
        cluster_(model, modules=["re:("])
    plan = cluster_(model, bits=2, modules=["re:fc[12]"], layer_bits={"fc2": 6})
    assert {n: v["bits"] for n, v in plan.layers.items()} == {"fc1.weight": 2, "fc2.weight": 6}
    with pytest.raises(ConfigError, match="already clustered"):
        cluster_(model, modules=["fc1"])
    assert set(clustered_layers(model)) == {"fc1.weight", "fc2.weight"}
    cfg = ClusterConfig(bits=4, skip=("fc3",))
    assert ClusterConfig.from_dict(cfg.to_dict()) == cfg


def test_save_load_roundtrip_of_clustered_and_baked_models(tmp_path) -> None:
    model = _lenet()
    ts.sparsify_(model, 0.7)
    cluster_(model, bits=5)
    x = torch.randn(3, 1, 28, 28)
    ts.save(model, tmp_path / "c")
    loaded = ts.load(tmp_path / "c")
    assert set(clustered_layers(loaded)) == set(clustered_layers(model))
    assert torch.equal(loaded(x), model(x))
    assert bake_clusters(model) == ["fc1.weight", "fc2.weight", "fc3.weight"]
    assert not clustered_layers(model) and torch.unique(model.fc2.weight).numel() <= 33
    ts.save(model, tmp_path / "b")
    baked = ts.load(tmp_path / "b")
    assert not clustered_layers(baked)
    assert torch.equal(baked(x), loaded(x))
