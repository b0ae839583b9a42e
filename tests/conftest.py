"""Shared test settings: small thread counts and deterministic seeds."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TORCHSLIM_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache", "torchslim"))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _zero_channels(model: torch.nn.Module, cg, name: str, dim: int, chans: set[int]) -> list[int]:
    """Zero the slices of parameter ``name`` along ``dim`` that carry any of the channels
    ``chans`` (channel ids of ``cg``); return their positions."""
    pos = [p for p, r in enumerate(cg.roots(name, dim).tolist()) if r in chans]
    with torch.no_grad():
        model.get_parameter(name).index_fill_(dim, torch.tensor(pos, dtype=torch.long), 0.0)
    return pos


@pytest.fixture
def zero_channels():
    """``zero_channels(model, cg, name, dim, chans)``: zero what reads or writes the chosen
    channels in one weight, so that slicing those channels out must leave the outputs as they are."""
    return _zero_channels


@pytest.fixture
def zero_heads():
    """``zero_heads(model, cg, heads, picks, suffix, dim=1)``: in every head group, zero the
    out-projection slices (members ending in ``suffix`` on ``dim``) of the heads at ``picks``;
    return the channels of those heads."""

    def zero(model: torch.nn.Module, cg, heads, picks: list[int], suffix: str, dim: int = 1) -> set[int]:
        removed: set[int] = set()
        for g in heads:
            chans = {g.channels[i] for i in picks}
            for name, d in g.members:
                if d == dim and name.endswith(suffix):
                    _zero_channels(model, cg, name, dim, chans)
            removed |= chans
        return removed

    return zero


@pytest.fixture
def fail_surgery_midway(monkeypatch):
    """``fail_surgery_midway(model)``: the next prune's surgery on ``model`` itself (not on the
    trial copies) raises after its swaps and attribute syncs, as a failure midway would."""

    def install(model: torch.nn.Module) -> None:
        from torchslim.graph import surgery

        real = surgery.sync_vision_attributes

        def fail(m: torch.nn.Module) -> None:
            real(m)  # attributes are set to the new widths first: they must come back too
            if m is model:
                raise RuntimeError("surgery failed midway")

        monkeypatch.setattr(surgery, "sync_vision_attributes", fail)

    return install


_LLAMA_FILE = '''
import torch, transformers


def build():
    config = transformers.LlamaConfig(vocab_size={vocab}, hidden_size={hidden}, intermediate_size={inter},
                                      num_hidden_layers={layers}, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings={positions}, tie_word_embeddings={tie})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    if {uneven}:
        with torch.no_grad():  # norm scales away from 1, as in a trained model
            for m in model.modules():
                if type(m).__name__.endswith("RMSNorm"):
                    m.weight.uniform_(0.5, 1.5)
    return model


def example_inputs():
    return (torch.tensor([[1, 5, 9, 13, 2]]),)
'''


@pytest.fixture
def llama_spec(tmp_path):
    """``make(...)`` writes a random 2-layer Llama (4 heads, 2 key/value heads) as a model file and
    returns its spec (``path.py:build``), which ``ts.create_model`` and the CLI take."""
    pytest.importorskip("transformers")
    made = iter(range(1000))

    def make(vocab: int = 256, hidden: int = 64, inter: int = 128, tie: bool = False, uneven_norms: bool = False,
             positions: int = 512, layers: int = 2) -> str:
        path = tmp_path / f"tiny_llama_{next(made)}.py"
        path.write_text(_LLAMA_FILE.format(vocab=vocab, hidden=hidden, inter=inter, tie=tie, uneven=uneven_norms,
                                           positions=positions, layers=layers))
        return f"{path}:build"

    return make


@pytest.fixture
def run_cli(capsys):
    """``run_cli(argv) -> (exit code, stdout, stderr)`` of the ``torchslim`` CLI, run in-process."""
    from torchslim.cli import main

    def run(argv: list[str]) -> tuple[int, str, str]:
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
        out = capsys.readouterr()
        return int(code or 0), out.out, out.err
    return run
