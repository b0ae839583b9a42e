"""ts.pack / ts.unpack: bit-exact round trips, sizes, and clear errors for bad files."""

from __future__ import annotations

import struct

import pytest
import torch

import torchslim as ts
from torchslim.errors import CheckpointError, ConfigError
from torchslim.pack import cluster_, clustered_layers, pack, packed_size_bytes, read_header, unpack
from torchslim.pack.fileformat import MAGIC


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = ts.create_model("zoo:resnet20")
    with torch.no_grad():  # non-trivial BN statistics, so raw tensors matter too
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    cluster_(model, bits=5)
    return model.eval()


@pytest.fixture(scope="module")
def sparse_lenet():
    torch.manual_seed(0)
    model = ts.create_model("zoo:lenet300")
    ts.sparsify_(model, 0.92)
    cluster_(model, bits=6, layer_bits={"fc3": 4})
    return model.eval()


@pytest.mark.parametrize("coder", ["ans", "huffman"])
def test_resnet_round_trip_is_bit_exact(resnet, tmp_path, coder: str) -> None:
    path = tmp_path / "r.tslim"
    result = pack(resnet, path, coder=coder)
    assert result.size_bytes == path.stat().st_size == sum(result.breakdown.values())
    restored = unpack(path)
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(restored(x), resnet(x))
    ref = resnet.state_dict()
    for k, v in restored.state_dict().items():
        assert torch.equal(v, ref[k]), k
    assert set(clustered_layers(restored)) == set(clustered_layers(resnet))
    # 5-bit indices + codebooks: well under a quarter of the fp32 tensors
    assert result.ratio > 5.0
    assert result.path == str(path)


def test_sparse_lenet_round_trip_keeps_zeros(sparse_lenet, tmp_path) -> None:
    path = tmp_path / "l.tslim"
    result = pack(sparse_lenet, path)
    restored = unpack(path)
    for n in ("fc1", "fc2", "fc3"):
        assert torch.equal(getattr(restored, n).weight, getattr(sparse_lenet, n).weight), n
    assert float((restored.fc1.weight == 0).float().mean()) == pytest.approx(0.92, abs=1e-3)
    assert result.layers["fc1.weight"]["position_bytes"] > 0
    assert result.layers["fc3.weight"]["bits"] == 4
    # 8% non-zeros at 6 bits plus their positions: far below the 1 MB of fp32 weights
    assert result.ratio > 20.0
    assert packed_size_bytes(sparse_lenet) == result.size_bytes
    # a packed model saves and loads like any other
    ts.save(restored, tmp_path / "dir")
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(ts.load(tmp_path / "dir")(x), sparse_lenet(x))


def test_pack_with_bits_clusters_a_copy(tmp_path) -> None:
    model = ts.create_model("zoo:lenet300")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="no clustered layers"):
        pack(model, tmp_path / "a.tslim")
    result = pack(model, tmp_path / "a.tslim", bits=3)
    assert not clustered_layers(model) and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert torch.unique(unpack(tmp_path / "a.tslim").fc1.weight).numel() <= 8
    assert read_header(tmp_path / "a.tslim")["layers"]["fc1.weight"]["bits"] == 3 == result.layers["fc1.weight"]["bits"]


def test_packing_a_masked_model_with_bits_leaves_it_working(tmp_path) -> None:
    model = ts.create_model("zoo:lenet300")
    ts.sparsify_(model, 0.5)
    x = torch.randn(2, 1, 28, 28)
    y = model(x)
    pack(model, tmp_path / "m.tslim", bits=4)  # clusters a deep copy (which drops the copy's masks)
    assert torch.equal(model(x), y) and hasattr(model.fc1, "parametrizations")
    assert (unpack(tmp_path / "m.tslim").fc1.weight == 0).sum() == (model.fc1.weight == 0).sum()


@pytest.mark.parametrize("bits", [0, 9, -1, 1.5])
def test_bits_outside_range_writes_nothing(tmp_path, bits) -> None:
    with pytest.raises(ConfigError, match="1 to 8"):
        pack(ts.create_model("zoo:lenet300"), tmp_path / "x.tslim", bits=bits)
    assert list(tmp_path.iterdir()) == []


def test_other_config_errors(resnet, tmp_path) -> None:
    with pytest.raises(ConfigError, match="already clustered"):
        pack(resnet, tmp_path / "x.tslim", bits=4)
    with pytest.raises(ConfigError, match="coder"):
        pack(resnet, tmp_path / "x.tslim", coder="gzip")
    with pytest.raises(ConfigError, match="model spec"):
        plain = torch.nn.Sequential(torch.nn.Linear(3, 3))
        cluster_(plain, bits=2)
        pack(plain, tmp_path / "x.tslim")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def packed_bytes(sparse_lenet, tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("p") / "m.tslim"
    pack(sparse_lenet, path)
    return path.read_bytes()


def _write(tmp_path, data: bytes):
    p = tmp_path / "bad.tslim"
    p.write_bytes(data)
    return p


@pytest.mark.parametrize("where", ["header", "stream", "trailer"])
def test_corruption_is_detected(packed_bytes, tmp_path, where: str) -> None:
    hlen = struct.unpack_from("<I", packed_bytes, 10)[0]
    pos = {"header": 20, "stream": 18 + hlen + 50, "trailer": len(packed_bytes) - 2}[where]
    data = bytearray(packed_bytes)
    data[pos] ^= 0x10
    path = _write(tmp_path, bytes(data))
    with pytest.raises(CheckpointError, match="corrupted") as err:
        unpack(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("keep", [4, 30, 0.5, -1])
def test_truncation_is_detected(packed_bytes, tmp_path, keep) -> None:
    n = int(len(packed_bytes) * keep) if isinstance(keep, float) else (keep if keep > 0 else len(packed_bytes) + keep)
    path = _write(tmp_path, packed_bytes[:n])
    with pytest.raises(CheckpointError, match="truncated|not a torchslim packed") as err:
        unpack(path)
    assert str(path) in str(err.value)


def test_newer_version_and_foreign_files(packed_bytes, tmp_path) -> None:
    newer = packed_bytes[:8] + struct.pack("<H", 99) + packed_bytes[10:]
    with pytest.raises(CheckpointError, match="newer torchslim"):
        unpack(_write(tmp_path, newer))
    with pytest.raises(CheckpointError, match="not a torchslim packed"):
        unpack(_write(tmp_path, b"PK\x03\x04" + packed_bytes[4:]))
    with pytest.raises(CheckpointError, match="cannot read"):
        unpack(tmp_path / "missing.tslim")
    assert packed_bytes.startswith(MAGIC)
