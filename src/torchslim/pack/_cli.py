"""CLI verbs ``pack`` and ``unpack``.

``torchslim pack MODEL --bits 5 [--data SPEC --finetune-epochs N] --out model.tslim [--json]``
clusters the model's layers (unless MODEL is already clustered), optionally fine-tunes the
centroids on ``--data``, and writes one entropy-coded file. Unlike the other verbs, ``--out`` is
that *file*; the JSON is the common shape (``before`` / ``after`` profiles, accuracies, ``files``)
with ``after`` measured on the model unpacked from the file and ``after.size_bytes`` being the
file's size, plus ``cluster`` (the plan, when this run clustered), ``pack`` (the byte breakdown)
and ``train``.

``torchslim unpack model.tslim --out DIR [--json]`` writes the model as a ``ts.save`` directory.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from torchslim._registry import register as _register_entry

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add the ``pack`` and ``unpack`` verbs to the ``torchslim`` parser."""
    from torchslim._cli_common import add_out_args
    from torchslim.pack import ClusterConfig
    from torchslim.train import TrainConfig

    # flag defaults are the configs' (the one place defaults live)
    cd = ClusterConfig.defaults()
    td = TrainConfig.defaults()

    p = sub.add_parser("pack", help="Deep-Compression packing: weight sharing + entropy coding into one .tslim file")
    p.add_argument("model", metavar="MODEL", help="model spec: torchvision:NAME, timm:NAME, zoo:NAME, file.py:factory, or a saved dir")
    add_out_args(p, kind="file", help="the packed file to write, e.g. model.tslim")
    p.add_argument("--bits", type=int, help="index bits per weight, 1..8 (default 5 when MODEL is not clustered yet)")
    p.add_argument("--init", default=cd["init"], help="centroid initialisation: linear, density or random (default linear)")
    p.add_argument("--modules", help="comma-separated layer names/globs/re: patterns to cluster (default: all Linear/Conv)")
    p.add_argument("--skip", help="comma-separated layer names/globs/re: patterns to keep unclustered")
    p.add_argument("--coder", default="ans", help="entropy coder: ans, range or huffman (default ans)")
    p.add_argument("--data", help="data spec: accuracy before/after, and fine-tuning with --finetune-epochs")
    p.add_argument("--finetune-epochs", type=int, default=0, help="epochs of centroid fine-tuning on --data (default 0)")
    p.add_argument("--lr", type=float, default=1e-4, help="fine-tuning learning rate (default 1e-4)")
    p.add_argument("--optimizer", default="adam", help="sgd, adam or adamw (default adam)")
    p.add_argument("--batch-size", type=int, default=td["batch_size"])
    p.add_argument("--max-steps", type=int, help="at most this many fine-tuning steps per epoch")
    p.add_argument("--device", default=td["device"], help="fine-tuning device: auto, cpu, cuda (default auto)")
    p.add_argument("--input-shape", help="example input shape, e.g. 1,3,224,224")
    p.add_argument("--seed", type=int, default=cd["seed"])
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of tables")
    p.add_argument("--no-latency", action="store_true", help="skip latency measurement in the before/after profiles")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_pack)

    u = sub.add_parser("unpack", help="a .tslim file back to a model directory (ts.save)")
    u.add_argument("file", metavar="FILE", help="a file written by `torchslim pack` / ts.pack")
    add_out_args(u, help="folder for the model (written by ts.save)")
    u.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of text")
    u.set_defaults(func=_cmd_unpack)


def _split(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    return tuple(s.strip() for s in text.split(",") if s.strip())


def _check(args: argparse.Namespace) -> Any:
    """Validate the flags before anything is built; returns the TrainConfig (or None)."""
    from torchslim._cli_common import finetune_config
    from torchslim.errors import ConfigError
    from torchslim.pack.cluster import INITS, check_bits
    from torchslim.pack.coding import check_coder

    if args.bits is not None:
        check_bits(args.bits, "--bits")
    if args.init not in INITS:
        raise ConfigError(f"--init must be one of {', '.join(INITS)}; got {args.init!r}")
    check_coder(args.coder)
    if args.finetune_epochs and not args.data:
        raise ConfigError("--finetune-epochs needs --data to train on")
    return finetune_config(args, args.finetune_epochs, lr_schedule="constant")


def _accuracy(model: Any, data: Any) -> float | None:
    if data is None or not data.labeled:
        return None
    from torchslim.train import evaluate

    return evaluate(model, data.loader("test", batch_size=256))["accuracy"]


def _cmd_pack(args: argparse.Namespace) -> int:
    import torchslim as ts
    from torchslim._cli_common import build_model, console_for, emit_json, writing
    from torchslim.pack import cluster_, clustered_layers, pack, unpack

    train_cfg = _check(args)
    data = ts.load_data(args.data, seed=args.seed) if args.data else None
    model = build_model(args, data)
    latency = not args.no_latency
    before = ts.profile(model, ts.example_inputs(model), latency=latency)
    acc_before = _accuracy(model, data)
    extras: dict[str, Any] = {"cluster": None, "train": None}
    if not clustered_layers(model):
        plan = cluster_(model, args.bits if args.bits is not None else 5, init=args.init, modules=_split(args.modules),
                        skip=_split(args.skip) or (), seed=args.seed)
        extras["cluster"] = plan.to_dict()
    else:
        from torchslim.errors import ConfigError

        if args.modules or args.skip:
            raise ConfigError(f"{args.model} is already clustered; --modules/--skip apply only to a model not clustered yet")
        have = sorted({sw.bits for _, sw in clustered_layers(model).values()})
        if args.bits is not None and have != [args.bits]:
            raise ConfigError(f"{args.model} is already clustered with {have} bits; leave out --bits to pack it as it is")
    acc_clustered = _accuracy(model, data)
    if train_cfg is not None:
        result = ts.fit(model, data, train_cfg, progress=not (args.no_progress or args.json))
        extras["train"] = result.to_dict()
        model.to("cpu")
    with writing(args.out) as tmp:
        packed = pack(model, tmp, bits=args.bits, coder=args.coder)
        restored = unpack(tmp)
    after = ts.profile(restored, ts.example_inputs(restored), latency=latency).to_dict()
    after["size_bytes"] = packed.size_bytes
    payload: dict[str, Any] = {
        "verb": "pack",
        "model": args.model,
        "data": args.data,
        "before": before.to_dict(),
        "after": after,
        "accuracy_before": acc_before,
        "accuracy_clustered": acc_clustered,
        "accuracy_after": _accuracy(restored, data),
        "files": {"packed": str(Path(args.out))},
        "pack": packed.to_dict(),
        **extras,
    }
    if args.json:
        emit_json(payload)
        return 0
    con = console_for(args)
    con.print(_table(packed, before.size_bytes))
    if acc_before is not None:
        line = f"test accuracy: {100 * acc_before:.2f}% -> clustered {100 * acc_clustered:.2f}%"
        if train_cfg is not None:
            line += f" -> fine-tuned {100 * payload['accuracy_after']:.2f}%"
        con.print(line)
    con.print(f"packed to {args.out}: {packed.size_bytes:,} bytes ({packed.ratio:.1f}x smaller than the dense tensors)")
    return 0


def _table(packed: Any, saved_bytes: int | None) -> Any:
    from rich.table import Table

    t = Table(title=f"packed with {packed.coder}")
    t.add_column("layer")
    for col in ("weights", "non-zero", "bits", "index bytes", "position bytes", "bits/index", "entropy"):
        t.add_column(col, justify="right")
    for name, r in packed.layers.items():
        t.add_row(name, f"{r['numel']:,}", f"{r['nonzero']:,}", str(r["bits"]), f"{r['index_bytes']:,}",
                  f"{r['position_bytes']:,}", f"{r['index_bits_per_symbol']:.3f}", f"{r['index_entropy_bits']:.3f}")
    parts = ", ".join(f"{k} {v:,}" for k, v in packed.breakdown.items())
    t.caption = f"file {packed.size_bytes:,} B ({parts}); dense tensors {packed.dense_bytes:,} B" + (
        f"; ts.save of the original {saved_bytes:,} B" if saved_bytes else ""
    )
    return t


def _cmd_unpack(args: argparse.Namespace) -> int:
    import torchslim as ts
    from torchslim._cli_common import console_for, emit_json, writing
    from torchslim.pack import unpack
    from torchslim.profile.api import _logical_params

    model = unpack(args.file)
    out = Path(args.out)
    with writing(out) as tmp:
        ts.save(model, tmp)
    files = {"model": str(out), "plan": str(out / "plan.json"), "weights": str(out / "model.safetensors")}
    if args.json:
        emit_json({"verb": "unpack", "file": args.file, "size_bytes": Path(args.file).stat().st_size,
                   "params": _logical_params(model)[0], "files": files})
        return 0
    console_for(args).print(f"unpacked {args.file} to {out}")
    return 0


# the verbs above, found by `torchslim` through the registry (ordered by `order` in --help)
_register_entry("cli_verb", "pack", register, family="pack", order=60, verbs=("pack", "unpack"))
