"""LSTM / GRU / RNN channel rules: hidden channels are one group per module (every layer and
direction, gate blocks together), zeroed hidden channels prune without changing outputs, the
final state h_n can feed the head, and the module's attributes follow the new widths."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from torchslim.graph import groups
from torchslim.graph.surgery import slice_model_
from torchslim.prune.channels import prune_channels_


class Tagger(nn.Module):
    """Linear -> RNN -> per-step classifier, or a classifier on the last layer's final state."""

    def __init__(self, kind: type, layers: int, bidirectional: bool, from_state: bool = False) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.rnn = kind(32, 24, num_layers=layers, batch_first=True, bidirectional=bidirectional)
        self.from_state = from_state
        self.head = nn.Linear(24 if from_state else 24 * (2 if bidirectional else 1), 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, state = self.rnn(torch.relu(self.inp(x)))
        if self.from_state:
            h = state[0] if isinstance(state, tuple) else state
            return self.head(h[-1])
        return self.head(out)


CASES = [(nn.LSTM, 1, False), (nn.LSTM, 2, True), (nn.GRU, 2, True), (nn.GRU, 1, False), (nn.RNN, 2, False)]


@pytest.mark.parametrize("kind,layers,bidirectional", CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_zeroed_hidden_channels_prune_without_changing_outputs(kind: type, layers: int, bidirectional: bool, zero_channels) -> None:
    torch.manual_seed(0)
    model = Tagger(kind, layers, bidirectional).eval()
    x = torch.randn(3, 9, 16)
    cg = groups(model, x)
    hidden = [g for g in cg.groups if any(n.startswith("rnn.weight_hh") for n, _ in g.members)]
    assert len(hidden) == 1 and hidden[0].size == 24
    g = hidden[0]
    take = {g.channels[i] for i in (1, 5, 6, 17)}
    params = dict(model.named_parameters())
    for name, dim in g.members:  # everything that reads those hidden channels: recurrent, next layer, head
        if dim == 1 and params[name].dim() == 2:
            zero_channels(model, cg, name, 1, take)
    with torch.no_grad():
        ref = model(x)
    slice_model_(model, cg.keep_indices(take), example_inputs=x)
    assert model.rnn.hidden_size == 20 and model.rnn.weight_hh_l0.shape[1] == 20
    with torch.no_grad():
        assert (model(x) - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU])
def test_half_ratio_with_head_on_final_state(kind: type) -> None:
    torch.manual_seed(0)
    model = Tagger(kind, 2, True, from_state=True).eval()
    x = torch.randn(3, 9, 16)
    before = sum(p.numel() for p in model.parameters())
    plan = prune_channels_(model, x, ratio=0.5)
    assert plan.left_whole == []
    assert model.rnn.hidden_size == 12 and model.rnn.input_size == 16 and model.head.in_features == 12
    out = model(x)
    out.sum().backward()
    assert out.shape == (3, 5) and sum(p.numel() for p in model.parameters()) < 0.5 * before


def test_lstm_with_projections_is_refused_clearly() -> None:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.rnn = nn.LSTM(8, 16, proj_size=4, batch_first=True)
    x = torch.randn(2, 5, 8)
    ref = copy.deepcopy(model)
    with pytest.raises(Exception, match="no channel rule"):
        groups(model, x)  # no rule for projected LSTMs: a clear error naming the op and module
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))
