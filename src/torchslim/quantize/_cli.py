"""CLI verb ``torchslim quantize``: dynamic / static / weight-only / QAT, plus the int8 ONNX files."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from torchslim._registry import register as _register_entry

__all__ = ["register", "TEXT_SMOOTHQUANT_ALPHA"]

#: SmoothQuant alpha a text encoder gets by default in ``--mode dynamic`` (calibrated on 128 bundled
#: training sentences): all-MiniLM-L6-v2's mean cosine to fp32 on the 800 held-out sentences goes
#: 0.9930 -> 0.9968 in PyTorch, 0.9926 -> 0.9963 in ONNX Runtime; alpha 0.5 / 0.6 / 0.85 give
#: 0.9961 / 0.9963 / 0.9968 with a lower recall@1 at 0.85 (benchmarks/defaults.py, results/defaults.json).
TEXT_SMOOTHQUANT_ALPHA = 0.75


def register(sub: Any) -> None:
    """Add ``quantize`` to the ``torchslim`` parser."""
    from torchslim._cli_common import add_model_verb_args
    from torchslim.quantize.api import QuantConfig

    # flag defaults are the configs' (the one place defaults live)
    qd = QuantConfig.defaults()

    p = sub.add_parser("quantize", help="quantize (dynamic, static, weight-only int8/int4, QAT) and write int8 ONNX")
    add_model_verb_args(p)
    p.add_argument("--mode", default=qd["mode"], help="dynamic, static, weight-only or qat (default static)")
    p.add_argument("--bits", type=int, default=qd["bits"], help="weight bits, 2..8 (default 8)")
    p.add_argument("--act-bits", type=int, default=qd["act_bits"], help="activation bits for static / qat (default 8)")
    p.add_argument("--granularity", default=None, help="channel (default), tensor, or group (weight-only)")
    p.add_argument("--group-size", type=int, default=None,
                   help=f"elements per group (default {qd['group_size']}; 32 for a decoder LLM / --method)")
    p.add_argument("--observer", default=None, help="minmax, moving_average, percentile, entropy, mse")
    p.add_argument("--calibration-batches", type=int, default=qd["calibration_batches"],
                   help="batches of --data the observers see (static, qat)")
    p.add_argument("--lsq", default=qd["lsq"], help="qat only: lsq or lsq+ (learned step sizes)")
    p.add_argument("--bias-correction", action="store_true", help="static: correct each layer's mean output shift")
    p.add_argument("--smoothquant", type=float, default=None, metavar="ALPHA",
                   help="static / qat / dynamic: SmoothQuant scale migration for Linear inputs (alpha in [0, 1], e.g. 0.5; "
                        f"needs --data; text encoders: --data sentences[:N]; default {TEXT_SMOOTHQUANT_ALPHA} for a "
                        "text encoder in --mode dynamic, which then calibrates on the bundled sentences)")
    p.add_argument("--no-smoothquant", action="store_true",
                   help="no SmoothQuant, not even a text encoder's default (and no default calibration data for it)")
    p.add_argument("--smoothquant-min-gain", type=float, default=None, metavar="G",
                   help="smooth a layer with an input multiply only if that divides its simulated int8 error by G "
                        "(default 3; 0 smooths all; folds into a LayerNorm/RMSNorm are free and always taken)")
    p.add_argument("--embeddings", action="store_true",
                   help="weight-only: also store nn.Embedding tables as integers (bits 4 or 8, groups of --group-size)")
    p.add_argument("--method", default=None,
                   help="weight-only: rtn (default), gptq, awq, awq-gptq (calibrate on --data) or hqq (no data); a decoder LLM "
                        "(pretrained:smollm2-135m) calibrates on token windows of a text spec: --data shakespeare")
    p.add_argument("--rotate", action="store_true",
                   help="weight-only, Llama-style LLMs: rotate the residual stream (randomized Hadamard) before quantizing")
    p.add_argument("--scale-rule", default=qd["scale_rule"], metavar="{search,absmax}",
                   help="weight-only symmetric int4 (rtn, gptq, awq-gptq): search (default: ggml's Q4_0 rule, clipped "
                        "steps and least-squares refits per group, weighted by the inputs' energy when calibrated) or "
                        "absmax (max|w| / 7.5, the older rule)")
    p.add_argument("--embedding-bits", default=None, metavar="{4,8,fp}",
                   help="decoder LLM: bits of the embedding table (default 8; fp keeps it float)")
    p.add_argument("--lm-head-bits", default=None, metavar="{2..8,fp}",
                   help="decoder LLM: bits of lm_head (default 8; fp keeps it float)")
    p.add_argument("--epochs", type=int, default=1, help="qat: training epochs on --data")
    p.add_argument("--lr", type=float, default=1e-3, help="qat: learning rate")
    p.add_argument("--optimizer", default="adam", help="qat: sgd, adam or adamw")
    p.add_argument("--max-steps", type=int, default=None, help="qat: steps per epoch cap")
    p.add_argument("--no-onnx", action="store_true", help="skip the fp32 / int8 ONNX files")
    p.add_argument("--format", default=None, metavar="LIST",
                   help="files to ship beside the saved model, comma-separated: onnx (default; a decoder LLM: the ONNX "
                        "decoder with a KV cache, MatMulNBits) and, for a decoder LLM, gguf (llama.cpp: Q4_0 / Q8_0); "
                        "default onnx,gguf for a decoder LLM")
    p.set_defaults(func=_cmd_quantize)


def _config(args: argparse.Namespace) -> Any:
    from torchslim.quantize.api import QuantConfig

    granularity = args.granularity or ("group" if args.mode == "weight-only" and args.bits <= 4 else "channel")
    observer = args.observer or ("moving_average" if args.mode == "qat" else "minmax")
    given = {} if args.smoothquant_min_gain is None else {"smoothquant_min_gain": args.smoothquant_min_gain}
    return QuantConfig(
        mode=args.mode, bits=args.bits, act_bits=args.act_bits, granularity=granularity,
        group_size=args.group_size or QuantConfig.defaults()["group_size"],
        observer=observer, calibration_batches=args.calibration_batches, lsq=args.lsq,
        bias_correction=args.bias_correction, smoothquant_alpha=getattr(args, "_smoothquant", args.smoothquant),
        embeddings=args.embeddings, scale_rule=args.scale_rule, **given,
    )


def _cmd_quantize(args: argparse.Namespace) -> int:
    from torchslim._cli_common import run_model_verb
    from torchslim.errors import ConfigError

    _pick_defaults(args)
    config = _config(args)  # every setting checked before anything is built
    _check_llm_args(args)
    args._formats = _formats(args)
    args._sentences = _sentences_spec(args.data, config.mode)
    if config.mode in ("static", "qat") and not args.data:
        raise ConfigError(f"--mode {config.mode} needs --data SPEC ({'calibration' if config.mode == 'static' else 'training'} data)")
    if config.smoothquant_alpha is not None and not args.data:
        raise ConfigError("--smoothquant needs --data SPEC (calibration batches give the activation ranges)")
    from torchslim._cli_common import finetune_config

    args._train_config = finetune_config(args, args.epochs if config.mode == "qat" else 0)
    args._quant_config = config
    return run_model_verb(args, "quantize", _apply_quantize, load_data=args._sentences is None)


_FORMATS = ("onnx", "gguf")


def _formats(args: argparse.Namespace) -> tuple[str, ...] | None:
    """``--format`` as a tuple (``None``: the default for the model, decided once it is built)."""
    from torchslim.errors import ConfigError

    if args.format is None:
        return None
    names = tuple(f.strip() for f in str(args.format).split(",") if f.strip())
    bad = [f for f in names if f not in _FORMATS]
    if bad or not names:
        raise ConfigError(f"--format takes {', '.join(_FORMATS)} (comma-separated); got {args.format!r}")
    if len(set(names)) != len(names):
        raise ConfigError(f"--format names a file twice: {args.format!r}")
    if args.no_onnx and "onnx" in names:
        raise ConfigError("--no-onnx and --format onnx contradict each other; give one")
    return names


def _ship_llm(model: Any, args: argparse.Namespace, ctx: Any) -> dict[str, Any]:
    """Write the decoder LLM's deploy files (``--format``, default onnx,gguf) into the staging folder:
    the ONNX decoder with a KV cache and the GGUF file; their bytes against the float model's."""
    from torchslim.errors import ConfigError

    formats = args._formats if args._formats is not None else (() if args.no_onnx else ("onnx", "gguf"))
    out: dict[str, Any] = {}
    for fmt in formats:
        if fmt == "onnx":
            from torchslim.export.onnx_decoder import export_onnx_decoder

            info = export_onnx_decoder(model, ctx.staging / "model.onnx")
            ctx.files["onnx"] = str(ctx.staging / "model.onnx")
            out["onnx"] = {k: info.get(k) for k in ("bytes", "embedding", "accuracy_level", "left_float")}
            out["onnx"]["matmul_nbits"] = len(info.get("matmul_nbits") or [])
        else:
            from torchslim.export import export

            try:
                got = export(model, path=ctx.staging / "model.gguf", format="gguf", check=False)
            except ConfigError as exc:
                raise ConfigError(f"--format gguf: {exc}") from None
            ctx.files["gguf"] = str(got.path)
            out["gguf"] = {"bytes": got.size_bytes, "types": got.info.get("types"),
                           "exact": len(got.info.get("exact") or []), "snapped": len(got.info.get("snapped") or [])}
    return out


def _human_bytes(n: float) -> str:
    from torchslim.profile.tables import human

    return str(human(n, "B"))


def _role_bits(value: str | None, flag: str, allowed: tuple[int, ...]) -> int | None | str:
    """``--embedding-bits`` / ``--lm-head-bits``: an int in ``allowed``, ``None`` for ``fp``, ``"default"`` if not given."""
    from torchslim.errors import ConfigError

    if value is None:
        return "default"
    if value.lower() in ("fp", "float", "fp32"):
        return None
    if not value.isdigit() or int(value) not in allowed:
        raise ConfigError(f"{flag} must be one of {', '.join(map(str, allowed))} or fp; got {value!r}")
    return int(value)


def _check_llm_args(args: argparse.Namespace) -> None:
    """``--method`` / ``--rotate`` / per-role bits: checked before anything is built."""
    from torchslim.errors import ConfigError
    from torchslim.quantize.llm import LLM_METHODS

    if args.method is not None and args.method not in LLM_METHODS:
        raise ConfigError(f"--method must be one of {', '.join(LLM_METHODS)}; got {args.method!r}")
    llm_flags = [f for f, given in (("--method", args.method is not None), ("--rotate", args.rotate),
                                    ("--embedding-bits", args.embedding_bits is not None),
                                    ("--lm-head-bits", args.lm_head_bits is not None)) if given]
    if llm_flags and args.mode != "weight-only":
        raise ConfigError(f"{llm_flags[0]} is for --mode weight-only; got --mode {args.mode}")
    args._embedding_bits = _role_bits(args.embedding_bits, "--embedding-bits", (4, 8))
    args._lm_head_bits = _role_bits(args.lm_head_bits, "--lm-head-bits", (2, 3, 4, 5, 6, 7, 8))
    if args.method in ("gptq", "awq", "awq-gptq") and not args.data:
        raise ConfigError(f"--method {args.method} calibrates on data: give --data (shakespeare or text:PATH for an LLM)")


def _is_llm(model: Any) -> bool:
    """A causal LM from transformers (``pretrained:smollm2-135m``, a saved one, a file spec)."""
    get = getattr(model, "get_output_embeddings", None)
    return callable(get) and type(model).__name__.endswith("ForCausalLM")


def _llm_quantize(model: Any, args: argparse.Namespace, ctx: Any, config: Any) -> dict[str, Any]:
    """``--mode weight-only`` of a decoder LLM or with ``--method`` / ``--rotate``: :func:`quantize_llm_`."""
    import time

    from torchslim.data.text import TextBundle
    from torchslim.quantize.llm import quantize_llm_

    llm = _is_llm(model)
    emb = 8 if args._embedding_bits == "default" and llm else None if args._embedding_bits == "default" else args._embedding_bits
    head = 8 if args._lm_head_bits == "default" else args._lm_head_bits
    if args._embedding_bits == "default" and not llm and config.embeddings:
        emb = config.table_bits
    data: Any = None
    calibration: Any = None
    if isinstance(ctx.data, TextBundle):
        data = ctx.data
    elif ctx.data is not None:
        calibration = ctx.data.loader("train", 64, shuffle=False)
    method = args.method or "rtn"
    start = time.perf_counter()
    plan = quantize_llm_(model, bits=config.bits, group_size=args.group_size or 32, method=method, rotate=args.rotate,
                         embedding_bits=emb, lm_head_bits=head, data=data, calibration=calibration,
                         skip=config.skip, scale_rule=config.scale_rule)
    out: dict[str, Any] = {"quantize": plan.to_dict(), "method": method, "rotate": args.rotate,
                           "embedding_bits": emb, "lm_head_bits": head,
                           "calibration_seconds": round(time.perf_counter() - start, 2)}
    if isinstance(data, TextBundle) and method in ("gptq", "awq", "awq-gptq", "rtn"):
        from torchslim.quantize.llm import LLM_CALIBRATION

        out["calibration"] = {"data": f"{data.spec}[train]", **LLM_CALIBRATION}
    return out


def _pick_defaults(args: argparse.Namespace) -> None:
    """The best settings where the user gave none (the CLI's defaults; the Python API keeps its own).

    Without ``--data``, a model made for a bundled data set (:func:`torchslim._cli_defaults.default_data`)
    gets it where its best setting needs data: ``--mode static`` / ``qat`` calibrate (train) on it, a
    text encoder in ``--mode dynamic`` calibrates SmoothQuant on the bundled training sentences. A
    text encoder calibrated on sentences in ``--mode dynamic`` smooths with alpha
    :data:`TEXT_SMOOTHQUANT_ALPHA` unless ``--smoothquant`` or ``--no-smoothquant`` says otherwise.
    ``args._defaults`` records what was picked (the JSON's ``defaults``, one line in the tables).
    """
    from torchslim._cli_defaults import SENTENCES, default_data
    from torchslim.errors import ConfigError

    if args.no_smoothquant and args.smoothquant is not None:
        raise ConfigError(f"--smoothquant {args.smoothquant:g} and --no-smoothquant contradict each other; give one of them")
    args._defaults = {}
    args._smoothquant = None if args.no_smoothquant else args.smoothquant
    if not args.data:
        data = default_data(args.model)
        text = data == SENTENCES
        wanted = (args.mode == "dynamic" and not args.no_smoothquant) if text else (
            args.mode in ("static", "qat") or args.smoothquant is not None)
        if data is not None and wanted:
            args.data = data
            args._defaults["data"] = data
    is_sentences = bool(args.data) and args.data.split(":")[0] == SENTENCES
    if is_sentences and args.mode == "dynamic" and args.smoothquant is None and not args.no_smoothquant:
        args._smoothquant = TEXT_SMOOTHQUANT_ALPHA
        args._defaults["smoothquant"] = TEXT_SMOOTHQUANT_ALPHA


def _default_lines(args: argparse.Namespace) -> list[str]:
    """What the tables say about the defaults picked (which data, which smoothing, how to opt out)."""
    from torchslim._cli_defaults import describe_default

    picked, lines = args._defaults, []
    if "data" in picked:
        what = "training" if args.mode == "qat" else "calibration"
        text = describe_default(args.model, picked["data"], what)
        if args._sentences is not None:
            text += f"; {args._sentences} bundled training sentences, none of the held-out evaluation pairs"
        lines.append(text)
    if "smoothquant" in picked:
        lines.append(f"SmoothQuant alpha {picked['smoothquant']:g} (the default for text encoders; --no-smoothquant turns it off)")
    return lines


def _sentences_spec(spec: str | None, mode: str) -> int | None:
    """``--data sentences[:N]``: calibrate a text encoder (``pretrained:minilm``) on the first
    ``N`` (default 128) bundled training sentences; ``None`` for any other spec."""
    from torchslim.data.sentences import train_sentences
    from torchslim.errors import ConfigError

    if not spec or spec.split(":")[0] != "sentences":
        return None
    parts = spec.split(":")
    most = len(train_sentences())
    if len(parts) > 2 or (len(parts) == 2 and not (parts[1].isdigit() and 0 < int(parts[1]) <= most)):
        raise ConfigError(f"data spec {spec!r}: use sentences or sentences:N with N from 1 to {most} (bundled training sentences)")
    if mode not in ("dynamic", "weight-only"):
        raise ConfigError(f"--data sentences calibrates text encoders in --mode dynamic or weight-only; got --mode {mode}")
    return int(parts[1]) if len(parts) == 2 else 128


def _text_calibration(model: Any, args: argparse.Namespace) -> list[Any]:
    from torchslim.data.sentences import calibration_batches, calibration_sentences
    from torchslim.errors import ConfigError
    from torchslim.zoo.pretrained import SentenceEncoder

    if not isinstance(model, SentenceEncoder) or not args.model.startswith("pretrained:"):
        raise ConfigError(f"--data sentences needs a pretrained text encoder (e.g. pretrained:minilm); got {args.model}")
    return calibration_batches(calibration_sentences(args._sentences), model=args.model.split(":", 1)[1])


def _apply_quantize(model: Any, ctx: Any) -> dict[str, Any]:
    import torchslim as ts
    from torchslim.export.onnx_int import export_integer_onnx
    from torchslim.quantize import qat_prepare_, quantize_

    args, config = ctx.args, ctx.args._quant_config
    if not args.json:
        for line in _default_lines(args):
            ctx.console.print(line, highlight=False)
    llm_path = config.mode == "weight-only" and (_is_llm(model) or args.method is not None or args.rotate)
    if args._formats is not None and "gguf" in args._formats and not _is_llm(model):
        from torchslim.errors import ConfigError

        raise ConfigError(f"--format gguf is for decoder LLMs (transformers ...ForCausalLM); {type(model).__name__} is not one")
    if args._sentences is not None:
        calibration: Any = _text_calibration(model, args)
    else:
        calibration = ctx.data.loader("train", 64, shuffle=False) if ctx.data is not None and not llm_path else None
    extras: dict[str, Any] = {}
    if llm_path:
        fp32 = sum(p.numel() for p in model.parameters()) * 4  # the float weights (a tied table once)
        extras.update(_llm_quantize(model, args, ctx, config))
        if _is_llm(model):  # shipped as an ONNX decoder with a KV cache and a GGUF file
            shipped = _ship_llm(model, args, ctx)
            extras["shipped"] = shipped
            for fmt, fig in shipped.items():
                name = {"onnx": "ONNX decoder (KV cache) model.onnx", "gguf": "GGUF model.gguf"}[fmt]
                what = f"{_human_bytes(fig['bytes'])}"
                if fp32:
                    what += f", {fp32 / fig['bytes']:.2f}x smaller than fp32 weights ({_human_bytes(fp32)})"
                ctx.notes.append(f"shipped {name}: {what}")
            return extras
        plan = None
    elif config.mode == "qat":
        plan = qat_prepare_(model, config, calibration=calibration if not config.lsq else None)
        if args._train_config is not None:
            result = ts.fit(model, ctx.data, args._train_config, progress=not args.no_progress)
            extras["qat"] = {"epochs": result.epochs_run, "history": result.history}
        ts.finalize_(model, kinds=["qat"])
    else:
        plan = quantize_(model, config, calibration=calibration)
    if plan is not None:
        extras["quantize"] = plan.to_dict()
    if args._defaults:  # what this run picked because the user gave nothing (see _pick_defaults)
        extras["defaults"] = {**args._defaults, "notes": _default_lines(args)}
    if not args.no_onnx:
        onnx_dir = ctx.staging  # moved into --out beside the saved model
        example = ts.example_inputs(model)
        files = export_integer_onnx(model, example, onnx_dir / "model.onnx", calibration=calibration)
        ctx.files.update(files)
        extras["onnx_bytes"] = {k: Path(v).stat().st_size for k, v in files.items()}
        b = extras["onnx_bytes"]
        if b.get("onnx") and b.get("onnx_fp32"):
            eager = ("; the table above measures the PyTorch model, whose eager int8 is simulated in float "
                     "(ts.quantize.compile runs its integer kernels)" if config.mode in ("static", "qat")
                     else "; the table above measures the PyTorch model")
            ctx.notes.append(f"shipped int8 ONNX model.onnx: {_human_bytes(b['onnx'])}, {b['onnx_fp32'] / b['onnx']:.2f}x smaller "
                             f"than the fp32 ONNX ({_human_bytes(b['onnx_fp32'])}){eager}")
        from torchslim.quantize.onnx_lowering import onnx_parity

        x = example[0] if isinstance(example, tuple) else example
        if calibration is not None and args._sentences is None:
            x = next(iter(calibration))[0]
        extras["onnx_parity"] = onnx_parity(model, files, x)
    return extras


# the verbs above, found by `torchslim` through the registry (ordered by `order` in --help)
_register_entry("cli_verb", "quantize", register, family="quantize", order=20, verbs=("quantize",))
