"""The package layering of ARCHITECTURE.md, read from the imports themselves (ast).

Bottom up, a module may import only its own layer (where the layer allows it) and layers below:

    core        errors, _utils, _optional, _config, _registry, _select, _ops, _finalize, _fs, _text
    graph       the tracer, channel spaces, surgery
    profile     params, MACs, bytes, latency (profile/latency.py: the one timer)
    modelinfo   _modelinfo: what was applied to a model, plan replay, rebuild
    data, zoo   data specs, model specs
    train       the training loop, callbacks, checkpoints, distributed
    saving      ts.save / ts.load
    infra       _layerwise (layer-by-layer calibration), _masks (the reversible weight-mask
                parametrization prune sets and pack recognises), export (every writer and runtime),
                lm (perplexity and tokens/s of decoder LLMs)
    families    prune, quantize, binarize, distill, lowrank, pack: never import each other
    orchestration  recipe, search, report: use families through their public names only
    cli         cli.py, __main__, the package root, _cli_common, _cli_defaults, _cli_output and every ``_cli*.py`` / ``*_cli.py`` verb module

Every import is checked, including the ones inside functions (a lazy import is still a
dependency). A module outside ``cli`` never imports the package root (``import torchslim``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "torchslim"

LAYERS: list[tuple[str, set[str], bool]] = [
    # (name, top-level modules, may modules of this layer import each other across packages?)
    ("core", {"errors", "_utils", "_optional", "_config", "_registry", "_select", "_ops", "_finalize", "_compile", "_fs", "_text"}, True),
    ("graph", {"graph"}, True),
    ("profile", {"profile"}, True),
    ("modelinfo", {"_modelinfo"}, True),
    ("data", {"data"}, True),
    ("zoo", {"zoo"}, True),
    ("train", {"train"}, True),
    ("saving", {"saving"}, True),
    ("infra", {"_layerwise", "_masks", "export", "lm"}, True),  # _masks: prune sets masks, pack reads them; lm: perplexity, tokens/s
    ("families", {"prune", "quantize", "binarize", "distill", "lowrank", "pack"}, False),
    ("orchestration", {"recipe", "search", "report"}, True),
    ("cli", {"cli", "__main__", "<root>", "_cli_common", "_cli_defaults", "_cli_output"}, True),
]
RANK = {top: i for i, (_, tops, _) in enumerate(LAYERS) for top in tops}
CLI_RANK = len(LAYERS) - 1


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "<root>"


def _is_cli(path: Path, module: str) -> bool:
    return path.name.startswith("_cli") or path.stem.endswith("_cli") or RANK.get(_top(module)) == CLI_RANK


def _imports(path: Path, module: str) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, imported names) for every torchslim import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "torchslim":
                    out.append((node.lineno, alias.name, []))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_pkg else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "torchslim":
                out.append((node.lineno, target, [a.name for a in node.names]))
    return out


def _violations() -> list[str]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        module = _module_name(path)
        top = _top(module)
        cli = _is_cli(path, module)
        rank = CLI_RANK if cli else RANK.get(top)
        if rank is None:
            found.append(f"{path.relative_to(SRC)}: top-level module {top!r} has no layer in tests/test_layering.py")
            continue
        layer, _, cross_ok = LAYERS[rank]
        where = f"{path.relative_to(SRC)}"
        for line, target, names in _imports(path, module):
            ttop = _top(target)
            if ttop == top:
                continue  # a package may import itself freely
            trank = RANK.get(ttop)
            if trank is None:
                found.append(f"{where}:{line}: imports {target}, which has no layer")
                continue
            if ttop == "<root>" and not cli:
                found.append(f"{where}:{line}: imports the package root (torchslim); import the module that defines the name")
                continue
            if trank > rank:
                found.append(f"{where}:{line}: layer {layer!r} imports {target} of the higher layer {LAYERS[trank][0]!r}")
                continue
            if trank == rank and not cross_ok and not cli:
                found.append(f"{where}:{line}: {top!r} imports another package of its layer {layer!r}: {target}")
                continue
            # a package's private parts stay its own: no _module or _name of another non-core package
            if not cli and trank > 0:
                sub = target.split(".")[2:]
                private_mod = any(p.startswith("_") for p in sub)
                private_names = [n for n in names if n.startswith("_")]
                if private_mod or private_names:
                    what = target if private_mod else f"{target}.{private_names[0]}"
                    found.append(f"{where}:{line}: uses the private {what} of package {ttop!r}")
    return found


def test_layers_cover_every_module() -> None:
    tops = {_top(_module_name(p)) for p in SRC.rglob("*.py")}
    assert tops <= set(RANK), f"modules with no layer: {sorted(tops - set(RANK))}"


def test_imports_respect_layers() -> None:
    found = _violations()
    assert not found, f"{len(found)} layering violations:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "source, expect",
    [
        ("from torchslim.prune import masks\n", "imports another package of its layer"),
        ("from torchslim.recipe import runner\n", "higher layer"),
        ("import torchslim\n", "package root"),
        ("from torchslim.zoo.spec import _attach\n", "private"),
    ],
)
def test_checker_catches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, expect: str) -> None:
    """The checker itself fails on each kind of violation (so a green run means something)."""
    fake = tmp_path / "torchslim"
    (fake / "quantize").mkdir(parents=True)
    (fake / "quantize" / "probe.py").write_text(source)
    monkeypatch.setitem(globals(), "SRC", fake)
    found = _violations()
    assert any(expect in f for f in found), found
