"""MACs of transformer inference as deployed (eval + no_grad): torchslim vs other counters.

In eval mode under ``torch.no_grad()``, PyTorch runs ``nn.TransformerEncoder`` and
``nn.MultiheadAttention`` through fused kernels (``_transformer_encoder_layer_fwd``,
``_native_multi_head_attention``). Counters that only know unfused ops miss them. This script
counts three models with torchslim, ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2),
thop and fvcore (when installed), next to the analytic count, and writes
benchmarks/results/profile_transformers.json.

    python benchmarks/profile_transformers.py
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from torchslim.profile import profile


def encoder_macs(layers: int, length: int, d: int, ffn: int) -> int:
    return layers * (4 * length * d * d + 2 * length * length * d + 2 * length * d * ffn)


class SelfAttention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(d, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mha(x, x, x, need_weights=False)[0]


def cases() -> list[tuple[str, nn.Module, object, int]]:
    out = []
    layer = nn.TransformerEncoderLayer(768, 12, 3072, dropout=0.0, batch_first=True)
    vit = nn.TransformerEncoder(layer, 12, enable_nested_tensor=False).eval()
    out.append(("ViT-B/16-shaped nn.TransformerEncoder (197 tokens)", vit, (torch.randn(1, 197, 768),),
                encoder_macs(12, 197, 768, 3072)))
    mha = SelfAttention(768, 12).eval()
    out.append(("nn.MultiheadAttention 768/12 (197 tokens)", mha, (torch.randn(1, 197, 768),),
                4 * 197 * 768 * 768 + 2 * 197 * 197 * 768))
    try:
        import transformers

        bert = transformers.BertModel(transformers.BertConfig()).eval()
        ids = torch.randint(0, 30522, (1, 128))
        out.append(("transformers BERT-base (seq 128, sdpa)", bert, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                    encoder_macs(12, 128, 768, 3072) + 768 * 768))
    except ImportError:
        pass
    return out


def call(model: nn.Module, inputs: object) -> None:
    if isinstance(inputs, dict):
        model(**inputs)
    else:
        model(*inputs)


def flop_counter(model: nn.Module, inputs: object) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    mode = FlopCounterMode(display=False)
    with torch.no_grad(), mode:
        call(model, inputs)
    return mode.get_total_flops() / 2


def thop_count(model: nn.Module, inputs: object) -> float | None:
    try:
        import thop
    except ImportError:
        return None
    if isinstance(inputs, dict):
        return None
    import copy

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        macs, _ = thop.profile(copy.deepcopy(model), inputs=inputs, verbose=False)
    return float(macs)


def fvcore_count(model: nn.Module, inputs: object) -> float | None:
    try:
        from fvcore.nn import FlopCountAnalysis
    except ImportError:
        return None
    if isinstance(inputs, dict):
        return None
    import logging

    logging.getLogger("fvcore").setLevel(logging.ERROR)
    with torch.no_grad():
        return float(FlopCountAnalysis(model, inputs).unsupported_ops_warnings(False).total())


def main() -> int:
    rows = []
    for name, model, inputs, analytic in cases():
        ts_macs = profile(model, inputs, latency=False, size=False).macs
        rows.append({
            "model": name,
            "analytic_gmacs": analytic / 1e9,
            "torchslim_gmacs": ts_macs / 1e9,
            "flop_counter_gmacs": flop_counter(model, inputs) / 1e9,
            "thop_gmacs": (lambda v: None if v is None else v / 1e9)(thop_count(model, inputs)),
            "fvcore_gmacs": (lambda v: None if v is None else v / 1e9)(fvcore_count(model, inputs)),
            "torchslim_rel_err": abs(ts_macs - analytic) / analytic,
        })
    t = Table(title="Transformer MACs in eval + no_grad (G)")
    for col in ("model", "analytic", "torchslim", "FlopCounterMode", "thop", "fvcore (jit trace)"):
        t.add_column(col, justify="left" if col == "model" else "right")
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    for r in rows:
        t.add_row(r["model"], fmt(r["analytic_gmacs"]), fmt(r["torchslim_gmacs"]), fmt(r["flop_counter_gmacs"]),
                  fmt(r["thop_gmacs"]), fmt(r["fvcore_gmacs"]))
    Console(width=150).print(t)
    path = os.path.join(os.path.dirname(__file__), "results", "profile_transformers.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump({"rows": rows, "torch": torch.__version__}, f, indent=2)
    os.replace(path + ".tmp", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
