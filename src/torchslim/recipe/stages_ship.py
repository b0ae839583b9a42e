"""Recipe stages that write files: pack (.tslim) and export (the deploy targets: ONNX, ExecuTorch, torch...)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

import pydantic
from torch import nn

from torchslim._config import ConfigDict
from torchslim._utils import is_int
from torchslim.errors import ConfigError
from torchslim.pack import pack
from torchslim.recipe._export import deploy_targets, export_stage
from torchslim.recipe.schema import _Strict
from torchslim.recipe.stages import StageContext, signature_defaults, stage
from torchslim.recipe.stages_quantize import check_bits

__all__: list[str] = []

# ``pack`` has no config: its keyword defaults are the schema's
PackSchema = pydantic.create_model("PackStage", __base__=_Strict, **signature_defaults(pack, "bits", "coder"))


@stage("pack", schema=PackSchema, check=check_bits, reduces=("size",),
       description="entropy-coded single-file packing (.tslim)")
def run_pack(model: nn.Module, cfg: dict[str, Any], ctx: StageContext) -> tuple[nn.Module, dict[str, Any]]:
    path = ctx.dir / "model.tslim"
    result = pack(model, path, bits=cfg["bits"], coder=cfg["coder"])
    ctx.files["tslim"] = str(path)
    info = result.to_dict()
    return model, {"packed_bytes": path.stat().st_size, **{k: v for k, v in info.items() if k != "path"}}


@dataclass(frozen=True)
class ExportStageConfig(ConfigDict):
    """The export stage: the deploy targets (recipe-only: which files, checked, timed how).

    Attributes:
        formats: the deploy targets: registered export formats to write (``ts.export``'s
            ``format=``: ``onnx``, ``pte``, ``torchscript``, ``pt2``...) and ``torch`` (the
            ``ts.save`` folder in eager PyTorch); each is measured in its own runtime against the
            original shipped the same way (bytes, latency, accuracy with labeled data).
        check: run each file back in its runtime against eager PyTorch (parity); decoder LLMs:
            load the GGUF file back into transformers, and time prefill / decode of the ONNX
            decoder and the torch model against the original's.
        batch_sizes: batch sizes the files are timed at, interleaved with the original's.
        runs: timed runs per batch size.
        perplexity_tokens: decoder LLMs: held-out tokens each shipped file is scored on.
    """

    formats: tuple[str, ...] = ("onnx",)
    check: bool = True
    batch_sizes: tuple[int, ...] = (1, 32)
    runs: int = 50
    perplexity_tokens: int = 1024

    def __post_init__(self) -> None:
        known = deploy_targets()
        for f in self.formats:
            if f not in known:
                near = difflib.get_close_matches(str(f), known, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise ConfigError(f"field 'formats': {f!r} is no registered export format nor 'torch'{hint}; "
                                  f"allowed: {', '.join(known)}")
        if len(set(self.formats)) != len(self.formats):
            raise ConfigError(f"field 'formats' names a target twice: {list(self.formats)}")
        if not self.formats:
            raise ConfigError("field 'formats' is empty; allowed: " + ", ".join(known))
        if any(not is_int(b) or b < 1 for b in self.batch_sizes) or not is_int(self.runs) or self.runs < 1:
            raise ConfigError("fields 'batch_sizes' and 'runs' must be positive integers")
        if not is_int(self.perplexity_tokens) or self.perplexity_tokens < 2:
            raise ConfigError(f"field 'perplexity_tokens' must be an integer >= 2; got {self.perplexity_tokens!r}")


@stage("export", config=ExportStageConfig,
       description="deploy targets (onnx, pte, torch, torchscript, pt2; decoder LLMs: onnx with a KV cache, gguf): "
                   "files verified, timed and scored in their runtimes vs the original")
def run_export(model: nn.Module, cfg: dict[str, Any], ctx: StageContext) -> tuple[nn.Module, dict[str, Any]]:
    return model, export_stage(model, cfg, ctx)
