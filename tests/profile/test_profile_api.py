"""Profile fields that depend on other families: packed bytes of a weight-shared model."""

from __future__ import annotations


def test_profile_counts_packed_bytes_of_a_clustered_model(tmp_path) -> None:
    import torchslim as ts

    model = ts.create_model("zoo:lenet300")
    assert ts.profile(model, latency=False).packed_bytes is None  # nothing to pack
    params = ts.profile(model, latency=False).params
    ts.cluster_(model, bits=4)
    prof = ts.profile(model, latency=False)
    result = ts.pack(model, tmp_path / "m.tslim")
    assert prof.packed_bytes == result.size_bytes == (tmp_path / "m.tslim").stat().st_size
    assert prof.params == params  # a shared weight counts as the weight it produces, not its codebook
