"""Entropy coders (ANS, range, Huffman) and relative-index coding of sparse positions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import torchslim as ts
from torchslim.errors import CheckpointError, ConfigError
from torchslim.pack import cluster_
from torchslim.pack.coding import (
    CODERS,
    best_gap_bits,
    decode_stream,
    encode_stream,
    entropy_bits,
    gaps_decode,
    gaps_encode,
    huffman_lengths,
)


@pytest.mark.parametrize("coder", CODERS)
@pytest.mark.parametrize("alphabet", [2, 3, 32, 257])
def test_round_trip(coder: str, alphabet: int) -> None:
    rng = np.random.default_rng(alphabet)
    p = rng.dirichlet(np.full(alphabet, 0.4))
    x = rng.choice(alphabet, size=3000, p=p)
    enc = encode_stream(x, alphabet, coder)
    assert np.array_equal(decode_stream(enc.data, enc.model, x.size, alphabet, coder), x)


@pytest.mark.parametrize("coder", CODERS)
def test_degenerate_streams(coder: str) -> None:
    for x in (np.zeros(0, dtype=np.int64), np.full(100, 3), np.array([1])):
        enc = encode_stream(x, 4, coder)
        assert np.array_equal(decode_stream(enc.data, enc.model, x.size, 4, coder), x)


def _real_index_stream() -> np.ndarray:
    """Cluster indices of a real layer: ResNet-20's weights, 5 bits (about 270k symbols)."""
    torch.manual_seed(0)
    model = ts.create_model("zoo:resnet20")
    cluster_(model, bits=5)
    from torchslim.pack import clustered_layers

    return np.concatenate([sw.indices.reshape(-1).numpy().astype(np.int64) for _, sw in clustered_layers(model).values()])


def test_ans_and_range_within_one_percent_of_entropy_huffman_within_one_bit() -> None:
    x = _real_index_stream()
    h = entropy_bits(x, 32)
    assert 2.0 < h < 5.0
    for coder in ("ans", "range"):
        bits = 8 * len(encode_stream(x, 32, coder).data) / x.size
        assert h <= bits <= 1.01 * h, (coder, bits, h)
    huff = 8 * len(encode_stream(x, 32, "huffman").data) / x.size
    assert h <= huff < h + 1


def test_ans_beats_huffman_on_a_skewed_stream() -> None:
    rng = np.random.default_rng(0)
    x = rng.choice(4, size=20000, p=[0.94, 0.02, 0.02, 0.02])  # entropy ~0.42 bits; Huffman needs >= 1
    h = entropy_bits(x)
    ans = 8 * len(encode_stream(x, 4, "ans").data) / x.size
    huff = 8 * len(encode_stream(x, 4, "huffman").data) / x.size
    assert ans <= 1.01 * h + 64 / x.size and huff >= 1.0


def test_huffman_lengths_satisfy_kraft_with_equality() -> None:
    counts = np.array([50, 0, 20, 10, 10, 5, 5])
    ln = huffman_lengths(counts)
    assert ln[1] == 0
    assert sum(2.0 ** -n for n in ln if n) == 1.0
    assert ln[0] == min(n for n in ln if n)


@pytest.mark.parametrize("alphabet", [2, 4, 32, 256])
def test_gaps_round_trip_with_fillers(alphabet: int) -> None:
    rng = np.random.default_rng(alphabet)
    positions = np.sort(rng.choice(50_000, size=700, replace=False))
    positions = np.concatenate([[0, 1], positions[positions > 1], [60_000]])  # adjacent and a long gap
    sym = gaps_encode(positions, alphabet)
    assert sym.max() <= alphabet - 1
    assert np.array_equal(gaps_decode(sym, alphabet), positions)
    assert (sym != alphabet - 1).sum() == positions.size  # one non-filler symbol per non-zero


def test_best_gap_bits_prefers_short_alphabets_for_dense_positions() -> None:
    assert best_gap_bits(np.arange(1000)) == 1
    rng = np.random.default_rng(0)
    sparse = np.sort(rng.choice(1_000_000, size=1000, replace=False))
    g = best_gap_bits(sparse)  # mean gap ~1000: a wide alphabet beats a filler per zero
    assert g >= 4 and gaps_encode(sparse, 2**g).size * 20 < gaps_encode(sparse, 2).size


def test_bad_streams() -> None:
    with pytest.raises(ConfigError, match="coder"):
        encode_stream(np.zeros(3), 2, "zip")
    with pytest.raises(ConfigError, match="0..1"):
        encode_stream(np.array([0, 2]), 2, "ans")
    enc = encode_stream(np.array([0, 1, 1]), 2, "ans")
    with pytest.raises(CheckpointError):
        decode_stream(enc.data, enc.model, 5, 2, "ans")  # counts do not sum to 5
    with pytest.raises(CheckpointError):
        decode_stream(b"\x00", [1, 1], 9, 2, "huffman")  # 8 bits hold at most 8 symbols
