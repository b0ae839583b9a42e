"""The ``export`` stage for decoder LLMs: an ONNX decoder with a KV cache, a GGUF file, the ``ts.save`` folder.

A causal LM (``LlamaForCausalLM``, ``Gemma3ForCausalLM``...) is not shipped like a classifier:
its deploy targets are

* ``onnx``: :func:`~torchslim.export.onnx_decoder.export_onnx_decoder` (``past_key_values`` in and
  out; int4 layers as ``MatMulNBits``, the embedding table as ``GatherBlockQuantized``), run by
  ONNX Runtime;
* ``gguf``: :func:`~torchslim.export.gguf.export_gguf` (int4 / int8 layers carried over exactly as
  Q4_0 / Q8_0), for llama.cpp and ollama;
* ``torch``: the ``ts.save`` folder, run in eager PyTorch;
* ``hf``: a ``save_pretrained`` folder (weights, config and tokenizer) that stock
  ``AutoModelForCausalLM.from_pretrained`` reloads: checked by reloading it and comparing logits.
  Float models only (a pruned one included); integer layers ship as ``onnx`` / ``gguf`` instead.

For each, the original is shipped the same way (float), and the report gets the bytes of both
files, perplexity on held-out text (the run's text data, ``test`` split) and the prefill / decode
speed (batch 1, one thread, the same settings for both) where a runtime for the file runs here:
ONNX Runtime for ``onnx``, eager PyTorch for ``torch``. A GGUF file is checked by loading it back
into transformers (``ts.export``'s check), and its perplexity is that of the weights it holds.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["LLM_TARGETS", "is_decoder_lm", "llm_export_stage", "llm_measure"]

#: The deploy targets of a decoder LLM.
LLM_TARGETS = ("onnx", "gguf", "torch", "hf")
#: Held-out tokens scored for perplexity by the recipe runner and the export stage.
PERPLEXITY_TOKENS = 1024
_RUNTIME = {"onnx": "ONNX Runtime (decoder with KV cache)", "gguf": "llama.cpp", "torch": "eager PyTorch",
            "hf": "transformers (from_pretrained)"}


def is_decoder_lm(model: Any) -> bool:
    """A transformers causal LM (what the LLM export targets and perplexity apply to)."""
    return (isinstance(model, nn.Module) and getattr(model, "config", None) is not None
            and type(model).__name__.endswith("ForCausalLM"))


def _text(data: Any) -> Any:
    from torchslim.data.text import TextBundle

    return data if isinstance(data, TextBundle) else None


def _perplexity(model: Any, data: Any, tokens: int, tokenizer: Any = None) -> dict[str, Any] | None:
    from torchslim.lm import evaluate_lm

    if _text(data) is None:
        return None
    r = evaluate_lm(model, data, max_tokens=tokens, threads=1, tokenizer=tokenizer)
    return {"perplexity": r.perplexity, "tokens": r.tokens, "context": r.context, "data": r.data}


def _speed(model: Any, prompt: int = 64, new: int = 16, runs: int = 3) -> dict[str, Any]:
    from torchslim.lm import lm_speed

    s = lm_speed(model, prompt_tokens=prompt, new_tokens=new, threads=1, runs=runs, warmup=1)
    return {"prefill_ms": s.prefill_ms, "decode_tokens_per_s": s.decode_tokens_per_s, "prompt_tokens": s.prompt_tokens,
            "new_tokens": s.new_tokens, "threads": s.threads, "cpu": s.cpu}


def llm_measure(model: nn.Module, data: Any, tokens: int = PERPLEXITY_TOKENS) -> float | None:
    """Held-out perplexity of ``model`` on the run's text data (None without text data)."""
    got = _perplexity(model, data, tokens)
    return None if got is None else got["perplexity"]


def _both(fig: dict[str, Any], key: str, new: dict[str, Any] | None, old: dict[str, Any] | None) -> None:
    if new is not None and old is not None:
        fig[key], fig[f"original_{key}"] = new, old


def llm_export_stage(model: nn.Module, cfg: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Ship ``model`` and the original to each of ``cfg["formats"]`` (see the module doc)."""
    from torchslim.export import export
    from torchslim.export.onnx_decoder import export_onnx_decoder
    from torchslim.saving import save

    model = model.cpu().eval()  # cfg["formats"] are LLM_TARGETS: the runner's preflight refuses others
    teacher = ctx.teacher().cpu().eval()
    tokens = int(cfg.get("perplexity_tokens") or PERPLEXITY_TOKENS)
    data = ctx.data
    from torchslim.lm import resolve_tokenizer

    tokenizer = resolve_tokenizer(teacher) if _text(data) is not None else None
    out: dict[str, Any] = {"formats": {}}
    for fmt in cfg["formats"]:
        fig: dict[str, Any] = {"runtime": _RUNTIME[fmt], "format": fmt}
        if fmt == "onnx":
            path, original = ctx.dir / "model.onnx", ctx.dir / "original.onnx"
            got = export_onnx_decoder(model, path)
            export_onnx_decoder(teacher, original)
            fig["decoder"] = {k: got.get(k) for k in ("matmul_nbits", "gather_block_quantized", "left_float",
                                                       "embedding", "accuracy_level", "layers", "kv_heads")}
            ship, orig = str(path), str(original)
            _both(fig, "perplexity", _perplexity(ship, data, tokens, tokenizer), _perplexity(orig, data, tokens, tokenizer))
            if cfg.get("check", True):
                _both(fig, "speed", _speed(ship), _speed(orig))
        elif fmt == "gguf":
            path, original = ctx.dir / "model.gguf", ctx.dir / "original.gguf"
            got = export(model, path=path, format="gguf", check=cfg.get("check", True))
            export(teacher, path=original, format="gguf", check=False)
            fig["types"] = got.info.get("types")
            fig["exact"] = got.info.get("exact")
            ship, orig = str(path), str(original)
        else:
            if fmt == "hf":
                path, original = ctx.dir / "hf", ctx.dir / "hf_original"
                fig["reload"] = save_pretrained_checked(model, path, tokenizer or _own_tokenizer(teacher),
                                                        check=cfg.get("check", True))
                save_pretrained_checked(teacher, original, tokenizer or _own_tokenizer(teacher), check=False)
            else:
                path, original = ctx.dir / "torch", ctx.dir / "torch_original"
                save(model, path)
                save(teacher, original)
            ship, orig = str(path), str(original)
            _both(fig, "perplexity", _perplexity(model, data, tokens, tokenizer), _perplexity(teacher, data, tokens, tokenizer))
            if cfg.get("check", True):
                with torch.no_grad():
                    _both(fig, "speed", _speed(model), _speed(teacher))
        size, base_size = _bytes(ship), _bytes(orig)
        fig.update(size_bytes=size, original_size_bytes=base_size, size_ratio=size / base_size if base_size else None)
        ctx.files[fmt] = ship
        ctx.files[f"{fmt}_original"] = orig
        out["formats"][fmt] = fig
    return out


def _bytes(path: str) -> int:
    from pathlib import Path

    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    extra = [f for f in p.parent.glob(p.name + ".data")]  # ONNX external data beside the graph, if any
    return p.stat().st_size + sum(f.stat().st_size for f in extra)


def _own_tokenizer(model: Any) -> Any:
    from torchslim.lm import resolve_tokenizer

    try:
        return resolve_tokenizer(model)
    except Exception:  # a model without a known tokenizer ships without one
        return None


def save_pretrained_checked(model: nn.Module, path: Any, tokenizer: Any = None, *, check: bool = True) -> dict[str, Any]:
    """``model.save_pretrained(path)`` (+ the tokenizer), published whole; with ``check``, the folder is
    reloaded by stock ``AutoModelForCausalLM.from_pretrained`` and its logits compared with the model's.

    Raises:
        ConfigError: the model holds layers transformers cannot describe (integer layers, non-uniform
            widths the config cannot express), or the reloaded model disagrees.
    """
    from pathlib import Path

    from torchslim._fs import atomic_path
    from torchslim._modelinfo import integer_layers
    from torchslim.errors import ConfigError

    held = [n for n, _ in integer_layers(model)]
    if held:
        raise ConfigError("the hf target ships float transformers models; this one holds integer layers "
                          f"({', '.join(held[:3])}{', ...' if len(held) > 3 else ''}): ship it as onnx or gguf")
    import transformers

    path = Path(path)
    bars = transformers.utils.logging
    was = bars.is_progress_bar_enabled()
    bars.disable_progress_bar()  # no "Writing model shards" / "Loading weights" bars in a run's output
    try:
        with atomic_path(path) as tmp:
            model.save_pretrained(str(tmp), safe_serialization=True)
            if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
                tokenizer.save_pretrained(str(tmp))
        if not check:
            return {}
        loaded = transformers.AutoModelForCausalLM.from_pretrained(str(path)).eval()
    finally:
        if was:
            bars.enable_progress_bar()
    probe = torch.arange(16).remainder(int(model.config.vocab_size)).unsqueeze(0)
    with torch.no_grad():
        want = model.eval()(probe).logits.float()
        got = loaded(probe).logits.float()
    diff = float((want - got).abs().max()) if want.shape == got.shape else float("inf")
    if not diff <= 1e-4 * max(1.0, float(want.abs().max())):
        raise ConfigError(f"{path}: stock from_pretrained rebuilds a different model (largest logit difference "
                          f"{diff:.3g}); its config cannot describe this model's widths, ship it as torch (ts.save)")
    return {"from_pretrained": True, "max_abs_diff": diff}
